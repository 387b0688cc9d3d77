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

`time_generation` times one prefill and `new_tokens` decode steps of the loop after a warm-up.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import time
from pathlib import Path

import numpy as np

from ..runtime.loop import GenerationConfig, decode

EAGER_NAME = "eager (PEFT, PyTorch)"
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
    return f"{_KIND_LABELS[(kind, layout)]} {precision}{suffix}"


@dataclasses.dataclass
class Backend:
    """One measured row group: eager PyTorch (graph None) or a graph on one provider, with or without a
    prefix fed as the first past (the cache layout)."""

    kind: str  # "eager", "export" (ours, prefix applied), "base" (no prefix), or a peer: "genai", "openvino"
    layout: str  # "folded", "cache" or "-" (eager, base)
    precision: str  # "fp32", "fp32+fused", "int8", "int4", "fp16"
    provider: str  # ORT provider alias, or "torch:cpu" / "torch:cuda"
    graph: Path | None
    weights: int  # bytes of weights read per decode step
    prefix_length: int  # positions of prefix in the cache
    build_s: float
    prefix: np.ndarray | None = None  # (L, 2, H_kv, P, D), fed as the first past

    @property
    def name(self) -> str:
        return backend_name(self.kind, self.layout, self.precision, self.provider)

    def key(self) -> dict:
        return {"backend": self.name, "kind": self.kind, "layout": self.layout, "precision": self.precision,
                "provider": self.provider}

    def open(self, peft_model, threads: int):
        """The live backend: an object with `stepper(input_ids, max_new_tokens)` and `close()`."""
        if self.graph is None:
            return EagerBackend(peft_model, threads, self.provider.split(":", 1)[1])
        if self.kind == "genai":
            from .peers import GenaiBackend

            return GenaiBackend(self.graph.parent, threads)
        if self.kind == "openvino":
            from .peers import OpenVinoBackend

            return OpenVinoBackend(self.graph, threads, self.prefix)
        return OrtBackend(self.graph, self.provider, threads, self.prefix)


class OrtBackend:
    """A graph on one provider, run by the shared loop (host cache on the CPU, IO binding on a GPU)."""

    def __init__(self, graph: Path, provider: str, threads: int, prefix: np.ndarray | None = None):
        from ..runtime.decoder import make_decoder
        from ..runtime.loop import Engine
        from ..runtime.providers import device_of
        from ..runtime.sessions import create_session

        start = time.perf_counter()
        session = create_session(graph, provider, threads=threads)
        self.session_s = time.perf_counter() - start
        self.engine = Engine(make_decoder(session, prefix), device_of(session.get_providers()[0]))

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
