"""What bench measures: each backend is a typed record, run on the shared decode loop (runtime/loop.py).

  eager     PEFT in PyTorch with a KV cache, what users run today: `PeftModelForCausalLM` forward on
            the prompt (PEFT prepends its prefix cache, P ones to the mask, shifts positions by P),
            then decode steps on the *base* model with the returned cache (which holds the P prefix
            positions), mask (B, P + T) and positions T + P: exactly PEFT's state after its first
            call. (Calling PEFT's forward again would overwrite the cache with a fresh prefix.)
  export    our graph on ONNX Runtime, per provider and precision, through runtime.loop's
            DecoderStepper: folded (the prefix inside), or cache layout (`export[cache]`: the base
            graph with prefix_kv.safetensors as its first past, from OnnxDecoder.first_past).
  base      the cache-layout graph with no prefix at all: the base model, same contract; the
            difference to `export` is what the prefix costs.
  genai, openvino   other runtimes on the same export folder (peers.py, `bench --peers`).
  torch_compile  what a PyTorch user would pick to speed eager up (`bench --torch-compile`): the same
            PEFT prefill, uncompiled, then decode steps through `torch.compile` of the base model on a
            StaticCache, mode "reduce-overhead" (CUDA graphs) on CUDA, "default" on the CPU (where
            reduce-overhead has no graphs to capture); see TorchCompileBackend.

`time_generation` times one prefill and `new_tokens` decode steps of the loop after a warm-up.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import time
from pathlib import Path

import numpy as np

from ..runtime.loop import GenerationConfig, decode

log = logging.getLogger(__name__)

EAGER_NAME = "eager (PEFT, PyTorch)"
CUDA_GRAPH = "+cuda-graph"  # precision label suffix of a shared-buffer graph's rows with captured decode steps
TORCH_COMPILE_NAME = "torch.compile (PEFT, {mode})"
_KIND_LABELS = {("export", "folded"): "export", ("export", "cache"): "export[cache]", ("base", "-"): "base",
                ("genai", "folded"): "genai", ("openvino", "folded"): "openvino",
                ("openvino", "cache"): "openvino[cache]"}
PEERS = ("genai", "openvino")  # other runtimes on the same export folder (peers.py)


def backend_name(kind: str, layout: str, precision: str, provider: str) -> str:
    """The display name of a backend (tables, plots, JSON `backend`); decisions use the typed fields."""
    device = provider.split(":", 1)[1] if provider.startswith("torch:") else provider
    suffix = "" if device == "cpu" else f" [{device}]"
    if kind == "eager":
        return EAGER_NAME + suffix
    if kind == "torch_compile":
        return TORCH_COMPILE_NAME.format(mode=torch_compile_mode(device)) + suffix
    return f"{_KIND_LABELS[(kind, layout)]} {precision}{suffix}"


def torch_compile_mode(device: str) -> str:
    """The torch.compile mode run on `device`: "reduce-overhead" (CUDA graphs) on CUDA; on the CPU that mode
    captures no graphs, so inductor's "default" runs there, and is named so in the row."""
    return "reduce-overhead" if device == "cuda" else "default"


@dataclasses.dataclass
class Backend:
    """One measured row group: eager PyTorch (graph None) or a graph on one provider, with or without a
    prefix fed as the first past (the cache layout)."""

    kind: str  # "eager", "torch_compile", "export" (ours, prefix applied), "base" (no prefix), or a peer:
    # "genai", "openvino"
    layout: str  # "folded", "cache" or "-" (eager, torch_compile, base)
    precision: str  # "fp32", "fp32+fused", "int8", "int4", "fp16"
    provider: str  # ORT provider alias, or "torch:cpu" / "torch:cuda"
    graph: Path | None
    weights: int  # bytes of weights read per decode step
    prefix_length: int  # positions of prefix in the cache
    build_s: float
    prefix: np.ndarray | None = None  # (L, 2, H_kv, P, D), fed as the first past
    cuda_graph: bool = False  # a shared-KV-buffer graph on CUDA, decode steps replayed as a CUDA graph

    @property
    def name(self) -> str:
        return backend_name(self.kind, self.layout, self.precision, self.provider)

    def key(self) -> dict:
        key = {"backend": self.name, "kind": self.kind, "layout": self.layout, "precision": self.precision,
               "provider": self.provider}
        if self.kind == "torch_compile":
            key["compile_mode"] = torch_compile_mode(self.provider.split(":", 1)[1])
        return key

    def open(self, peft_model, threads: int, max_new_tokens: int = 0):
        """The live backend: an object with `stepper(input_ids, max_new_tokens)` and `close()`.
        `max_new_tokens`: the most any stepper will be asked for (torch_compile sizes its static caches by it)."""
        if self.kind == "torch_compile":
            return TorchCompileBackend(peft_model, threads, self.provider.split(":", 1)[1], max_new_tokens)
        if self.graph is None:
            return EagerBackend(peft_model, threads, self.provider.split(":", 1)[1])
        if self.kind == "genai":
            from .peers import GenaiBackend

            return GenaiBackend(self.graph.parent, threads)
        if self.kind == "openvino":
            from .peers import OpenVinoBackend

            return OpenVinoBackend(self.graph, threads, self.prefix)
        return OrtBackend(self.graph, self.provider, threads, self.prefix, self.cuda_graph)


class OrtBackend:
    """A graph on one provider, run by the shared loop (host cache on the CPU, IO binding on a GPU; a
    shared-KV-buffer graph by its own fixed-shape loop, with `cuda_graph` as captured CUDA graphs)."""

    def __init__(self, graph: Path, provider: str, threads: int, prefix: np.ndarray | None = None,
                 cuda_graph: bool = False):
        from ..runtime.decoder import make_decoder
        from ..runtime.loop import Engine
        from ..runtime.providers import cuda_options, device_of, resolve_provider
        from ..runtime.sessions import create_session

        start = time.perf_counter()
        options = {**cuda_options(), "enable_cuda_graph": "1"} if cuda_graph else None
        if cuda_graph and resolve_provider(provider) != "CUDAExecutionProvider":
            raise ValueError(f"CUDA graphs need the CUDA provider, not {provider}")
        session = create_session(graph, provider, options, threads=threads)
        self.session_s = time.perf_counter() - start
        self.engine = Engine(make_decoder(session, prefix), device_of(session.get_providers()[0]),
                             cuda_graph=cuda_graph)

    def stepper(self, input_ids: np.ndarray, max_new_tokens: int):
        return self.engine.stepper(input_ids, None, max_new_tokens)

    def close(self) -> None:
        self.engine = None


class EagerBackend:
    """PEFT in PyTorch with a KV cache (see the module docstring for exactly what runs)."""

    def __init__(self, peft_model, threads: int, device: str = "cpu"):
        import torch

        torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type != "cpu":  # a copy, so that the CPU model stays for validation and eager on CPU
            peft_model = copy.deepcopy(peft_model).to(self.device)
        self.peft_model = peft_model
        self.session_s = 0.0

    def stepper(self, input_ids: np.ndarray, max_new_tokens: int):
        from ..validate.reference import PeftCachedStepper

        return PeftCachedStepper(self.peft_model, input_ids, self.device)

    def close(self) -> None:
        if self.device.type != "cpu":
            import torch

            self.peft_model = None
            gc.collect()
            torch.cuda.empty_cache()


class TorchCompileBackend:
    """PEFT's prefill, then each decode step through `torch.compile` of the base model on fixed shapes.

    The prefill is PEFT's own forward, *uncompiled*, exactly as in EagerBackend (it prepends the prefix
    cache, P ones to the mask, shifts positions by P); the cache it returns, (B, H_kv, P + C, D) per layer,
    is copied into a transformers StaticCache of T_max = P + C + max_new_tokens - 1 slots. Every decode
    step then calls the compiled `base_model.forward` with the same shapes: tokens (B, 1), positions
    (B, 1) = P + t, a mask (B, T_max) of ones (the causal mask hides the slots not yet written: the
    cache's write index is a tensor it advances in place, so a new position costs no recompile;
    transformers 5.x has no `cache_position` argument), and the same cache and mask tensors for every
    step of every run of that shape, so that CUDA graphs (reduce-overhead, on CUDA) are replayed, not
    re-recorded. A growing DynamicCache would change shapes, and recompile or re-record, every step.

    One graph per (B, T_max), compiled by the first decode step of that shape: `session_s` sums those
    steps (the compile). fullgraph: a graph break would split the step (and its CUDA graph) with Python
    in between, so an unsupported model fails here, and bench skips the row, recording why. The second
    step of each shape runs under `fail_on_recompile` and later ones check dynamo's graph count, so that
    a shape which recompiles every step raises during the warm-up instead of timing compiles. Sliding-window
    attention shorter than the static cache is refused: transformers' static sliding layers recompile
    every step (mistral, gemma2), and GPT-Neo's local layers on a StaticCache pick other tokens than eager
    (uncompiled too).
    """

    RECOMPILE_LIMIT = 64  # graphs per forward code object: one per bench config, CPU and CUDA backends share it

    def __init__(self, peft_model, threads: int, device: str = "cpu", max_new_tokens: int = 0):
        import torch

        from ..source import architectures

        torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type != "cpu":  # a copy, so that the CPU model stays for validation and eager on CPU
            peft_model = copy.deepcopy(peft_model).to(self.device)
        self.peft_model, self.model = peft_model, peft_model.get_base_model()
        self.P = peft_model.active_peft_config.num_virtual_tokens
        self.spec = architectures.describe(self.model.config)
        self.max_new_tokens = max_new_tokens
        self.mode = torch_compile_mode(self.device.type)
        self.cache_keyword = next(iter(architectures.cache_kwargs(self.model, None)))  # "cache" or "past_key_values"
        # dynamic=False: a graph per shape; dynamo would otherwise make the second shape a dynamic-shape graph.
        # Compiles the bound forward: the shared CPU model itself is left as it was (eager runs it).
        self.forward = torch.compile(self.model.forward, mode=self.mode, fullgraph=True, dynamic=False)
        self.states: dict[tuple[int, int], _StaticState] = {}  # (B, T_max) -> its cache, mask and call count
        self.session_s = 0.0

    def stepper(self, input_ids: np.ndarray, max_new_tokens: int):
        if max_new_tokens > self.max_new_tokens:
            raise ValueError(f"torch.compile backend: a run of {max_new_tokens} new tokens asked for, but its static "
                             f"caches were sized for {self.max_new_tokens} (Backend.open's max_new_tokens).")
        batch, seq = input_ids.shape
        shape = (batch, self.P + seq + self.max_new_tokens - 1)
        window = self.spec.sliding_window
        if window is not None and shape[1] > window:
            raise NotImplementedError(
                f"torch.compile backend: {self.spec.model_type} attends over a sliding window of {window} positions, "
                f"shorter than the static cache of {shape[1]} (P + context + new tokens); transformers' static "
                "sliding layers recompile every step, and GPT-Neo's local layers pick other tokens than eager.")
        if shape not in self.states:
            self.states[shape] = _StaticState(self.model.config, shape, self.device)
        return _CompiledStepper(self, self.states[shape], input_ids)

    def decode_step(self, state: "_StaticState", tokens: np.ndarray, position: int) -> np.ndarray:
        """One compiled step: tokens (B, 1) at `position` -> logits (B, 1, V) on the host."""
        import torch
        from torch._dynamo.utils import counters

        batch = tokens.shape[0]
        inputs = {"input_ids": torch.from_numpy(tokens).to(self.device), "attention_mask": state.mask,
                  "position_ids": torch.full((batch, 1), position, dtype=torch.int64, device=self.device),
                  "use_cache": True, "return_dict": True, self.cache_keyword: state.cache}
        if self.device.type == "cuda":  # a new iteration: the previous step's CUDA-graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        state.calls += 1
        if state.calls == 1:  # the compile of this shape; refuse (not fall back to eager) at dynamo's limit
            start = time.perf_counter()
            limit = max(torch._dynamo.config.recompile_limit, self.RECOMPILE_LIMIT)
            with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
                logits = self.forward(**inputs).logits[:, -1:].float().cpu().numpy()  # .cpu() waits for the device
            self.session_s += time.perf_counter() - start
            log.info("torch.compile (%s) B=%d T_max=%d: compiled in %.1f s", self.mode, *state.shape,
                     time.perf_counter() - start)
            # Tracing leaves garbage cycles (dynamo's tracers, with weak proxies to objects already freed):
            # collect them now, not in a timed step, and before anything walks gc.get_objects() (the
            # exporter's release_exporter_state meets a dead proxy there and fails).
            gc.collect()
            return logits
        graphs = counters["stats"]["unique_graphs"]
        if state.calls == 2:  # still in the warm-up: the graph just compiled must serve this step
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    out = self.forward(**inputs)
            except RuntimeError as exc:
                raise RuntimeError(f"torch.compile: the second decode step of B={state.shape[0]} T_max="
                                   f"{state.shape[1]} failed (it would recompile? expected one graph per shape): "
                                   f"{exc}") from exc
        else:
            out = self.forward(**inputs)
        if counters["stats"]["unique_graphs"] != graphs:
            raise RuntimeError(f"torch.compile recompiled at decode step {state.calls} of B={state.shape[0]} "
                               f"T_max={state.shape[1]}; expected one graph per shape (fixed shapes, static cache).")
        return out.logits[:, -1:].float().cpu().numpy()

    def close(self) -> None:
        self.states.clear()
        if self.device.type != "cpu":
            import torch

            self.peft_model = self.model = self.forward = None
            gc.collect()
            torch.cuda.empty_cache()


class _StaticState:
    """One shape's fixed tensors: the StaticCache (its keys and values allocated by the first prefill copied in)
    and the mask (B, T_max) of ones."""

    def __init__(self, config, shape: tuple[int, int], device):
        import torch
        from transformers import StaticCache

        self.shape = shape
        self.cache = StaticCache(config=config, max_cache_len=shape[1])
        self.mask = torch.ones(shape, dtype=torch.int64, device=device)
        torch._dynamo.mark_static_address(self.mask)  # never changes: CUDA graphs need not copy it in each replay
        self.calls = 0


class _CompiledStepper:
    """The decode loop's stepper for TorchCompileBackend: PEFT's prefill into the shape's static cache, then
    compiled steps."""

    def __init__(self, backend: TorchCompileBackend, state: _StaticState, input_ids: np.ndarray):
        self.backend, self.state = backend, state
        self.first_tokens = input_ids
        self.position = None  # of the next token, counting the P prefix positions

    def step(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        from ..source import architectures

        backend, cache = self.backend, self.state.cache
        with torch.inference_mode():
            if self.position is not None:
                logits = backend.decode_step(self.state, tokens, self.position)
                self.position += 1
                return logits
            batch, seq = tokens.shape
            device = backend.device
            out = backend.peft_model(input_ids=torch.from_numpy(tokens).to(device),
                                     attention_mask=torch.ones(batch, seq, dtype=torch.int64, device=device),
                                     position_ids=torch.arange(seq, device=device).expand(batch, -1),
                                     use_cache=True, return_dict=True)
            prefilled = architectures.output_cache(out)  # P + seq positions per layer
            # Rewind the previous run's write index (crop, not reset: no need to zero T_max slots the causal mask
            # hides), then write (B, H_kv, P + seq, D) per layer into slots [0, P + seq).
            cache.crop(-int(cache.get_seq_length()))
            for index, layer in enumerate(prefilled.layers):
                cache.update(layer.keys, layer.values, index)
            self.position = backend.P + seq
            return out.logits[:, -1:].float().cpu().numpy()


def time_generation(backend, input_ids: np.ndarray, new_tokens: int, warmup_tokens: int) -> dict:
    """Warm-up (prefill + a few steps, discarded), then a timed prefill and `new_tokens` timed steps."""
    for _ in decode(backend.stepper(input_ids, warmup_tokens + 1), GenerationConfig.greedy(warmup_tokens + 1)):
        pass
    steps = decode(backend.stepper(input_ids, new_tokens + 1), GenerationConfig.greedy(new_tokens + 1))
    start = time.perf_counter()
    step = next(steps)  # the prefill, and its token
    prefill_s = time.perf_counter() - start
    tokens, times = [int(step.tokens[0])], []
    start = time.perf_counter()
    for step in steps:
        times.append(time.perf_counter() - start)
        tokens.append(int(step.tokens[0]))
        start = time.perf_counter()
    steps_ms = np.array(times) * 1e3
    batch = input_ids.shape[0]
    p50 = float(np.median(steps_ms)) if len(steps_ms) else float("nan")
    return {"prefill_ms": round(prefill_s * 1e3, 3), "decode_p50_ms": round(p50, 3),
            "decode_p90_ms": round(float(np.percentile(steps_ms, 90)), 3) if len(steps_ms) else None,
            "decode_min_ms": round(float(steps_ms.min()), 3) if len(steps_ms) else None,
            "tokens_per_s": round(batch * 1e3 / p50, 2) if len(steps_ms) else None,
            "tokens_row0": tokens[:new_tokens], "steps_ms": steps_ms.tolist()}
