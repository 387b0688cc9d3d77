"""`prefix-export bench`: PEFT eager vs our export vs the base-model export, same prompts, one run.

What is measured, per backend, batch size B and context length C (the prompt's length):
  prefill   one forward over the prompt (B, C), from an empty cache;
  decode    each of `new_tokens` greedy steps (B, 1) after it, feeding the cache back; p50/p90 over
            the steps, tokens/s = B / p50. Warm-up (one prefill + a few steps per shape) is excluded.
Backends:
  eager     PEFT in PyTorch with a KV cache, what users run today: `PeftModelForCausalLM` forward on
            the prompt (PEFT prepends its prefix cache, P ones to the mask, shifts positions by P),
            then decode steps on the *base* model with the returned cache (which holds the P prefix
            positions), mask (B, P + T) and positions T + P: exactly PEFT's state after its first
            call. (Calling PEFT's forward again would overwrite the cache with a fresh prefix.)
  export    our folded graph on ONNX Runtime, per provider and precision (fp32, fp32 fused with
            `--optimize`, int8), in a lean loop: IO binding, the presents fed back as OrtValues
            (no numpy round trip), intra-op threads = all cores.
  base      the same tool's export of the base model without a prefix (the `--layout cache` wrapper,
            same contract, P = 0), with the same passes: the difference is what the prefix costs.
  export[cache]  the cache layout: those base graphs with the export's prefix_kv.safetensors fed as
            the first past (P ones lead the mask, positions start at P), validated against PEFT.
            The folded graph copies the cache three times per step, this one once.
Rounds run every backend in turn on one configuration before the next, so that the backends being
compared are measured seconds apart; with a GPU provider, eager also runs on the GPU.
The floor: decode cannot be faster than reading every weight a token touches plus the KV cache once,
at the machine's memory read bandwidth (`measure_bandwidth`); each decode figure is printed beside it.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import contract

log = logging.getLogger(__name__)

BENCH_JSON = "bench.json"
BENCH_PNG = "bench.png"

# The issue-5 targets, checked at batch 1 on the context closest to 32 tokens.
TARGETS = {"export_vs_eager": 0.35, "prefix_cost": 0.03, "export_vs_floor": 1.4, "int8_vs_fp32": 0.45,
           "int8_top1_agreement": 0.9}


@dataclasses.dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 4)
    contexts: tuple[int, ...] = (32, 128, 512)
    new_tokens: int = 64
    warmup_tokens: int = 4
    rounds: int = 2  # every backend on every config, in turn, this many times
    providers: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("fp32",)
    optimize: bool = False
    eager: bool = True
    base: bool = True
    cache_layout: bool = True  # also run the base graph with the prefix as its first past (`--layout cache`)
    threads: int | None = None  # ORT intra-op and torch threads; default: all cores
    bandwidth_mb: int = 1024
    bandwidth_passes: int = 5
    validate_tokens: int = 8  # greedy tokens in the (shortened) validation of each variant
    agreement_model: Path | None = None  # an embedded-style folder (base/, prefix/, test_split.jsonl)
    seed: int = 0


# ---- the machine ---------------------------------------------------------------------------------


def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure_bandwidth(size_mb: int = 1024, passes: int = 5, threads: int | None = None) -> dict:
    """Memory read bandwidth: the best of `passes` reads of a buffer far larger than the caches.

    Method: a float32 buffer of `size_mb` (pages touched first), split in one contiguous slice per
    core; each pass, one thread per slice computes `np.dot(s, s)` (BLAS, vectorised, reads each
    element once; numpy releases the GIL), and the pass's bandwidth is buffer bytes / wall time. A
    single whole-buffer `np.dot` (which BLAS may thread itself) is tried too; the best pass is quoted.
    """
    threads = threads or os.cpu_count() or 1
    buffer = np.ones(size_mb * 1024**2 // 4, dtype=np.float32)
    slices = np.array_split(buffer, threads)
    results = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            start = time.perf_counter()
            list(pool.map(lambda s: float(np.dot(s, s)), slices))
            results.append(buffer.nbytes / (time.perf_counter() - start) / 1e9)
    for _ in range(max(1, passes // 2)):
        start = time.perf_counter()
        float(np.dot(buffer, buffer))
        results.append(buffer.nbytes / (time.perf_counter() - start) / 1e9)
    del buffer, slices
    return {"gb_per_s": round(max(results), 2), "passes_gb_per_s": [round(r, 2) for r in results],
            "buffer_mb": size_mb, "threads": threads,
            "method": "best pass of np.dot(s, s) over a float32 buffer, one slice per core in threads "
                      "(and one whole-buffer np.dot); bytes read / wall time"}


def measure_gpu_bandwidth(size_mb: int = 1024, passes: int = 10) -> dict | None:
    """The GPU's memory bandwidth through PyTorch, or None without a CUDA device.

    Method: device-to-device copies of a `size_mb` float32 buffer, timed with CUDA events after a
    warm-up; bytes read + bytes written per copy / time, the best pass quoted. A decode step mostly
    reads, so this is the ceiling its floor is computed with (the same way as on the CPU).
    """
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    source = torch.rand(size_mb * 1024**2 // 4, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    results = []
    for _ in range(passes):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        results.append(2 * source.nbytes / (start.elapsed_time(end) * 1e-3) / 1e9)
    name = torch.cuda.get_device_name(0)
    del source, target
    torch.cuda.empty_cache()
    return {"gb_per_s": round(max(results), 1), "passes_gb_per_s": [round(r, 1) for r in results],
            "buffer_mb": size_mb, "device": name,
            "method": "best of device-to-device copies (torch, CUDA events); bytes read + written / time"}


def weights_read_per_token(graph: Path) -> int:
    """Bytes of initializers a decode step reads: all but those only gathered (embedding rows) and
    the folded prefix (counted with the KV cache)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        if init.name.startswith("prefix_") or consumers.get(init.name, {"Gather"}) <= {"Gather"}:
            continue
        nbytes = len(init.raw_data) if init.HasField("raw_data") else 0
        if not nbytes:
            for entry in init.external_data:
                if entry.key == "length":
                    nbytes = int(entry.value)
            if not nbytes:
                nbytes = init.ByteSize()
        total += nbytes
    return total


def kv_bytes(spec, batch: int, positions: int, itemsize: int = 4) -> int:
    """The whole KV cache, (L, 2, B, H_kv, positions, D), read once per decode step."""
    return 2 * spec.num_layers * batch * spec.num_kv_heads * positions * spec.head_dim * itemsize


# ---- memory sampling -----------------------------------------------------------------------------


class PeakMemory:
    """Samples this process's RSS every few ms while active; `peak_mb` is the highest seen."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> float:
        return self.process.memory_info().rss / 1024**2

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())


# ---- backends ------------------------------------------------------------------------------------


class OrtBackend:
    """A lean greedy loop on one session: IO binding, presents fed back as OrtValues.

    With `prefix` (L, 2, H_kv, P, D), the graph is the cache layout's plain decoder and the prefix
    is its first past: P ones lead the mask and positions start at P, as `CacheLayoutDecoder` does.
    """

    def __init__(self, graph: Path, provider: str, threads: int, prefix: np.ndarray | None = None):
        import onnxruntime as ort

        from .providers import device_of
        from .runtime import resolve_provider

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        full = resolve_provider(provider)
        providers = [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]
        start = time.perf_counter()
        self.session = ort.InferenceSession(str(graph), options, providers=providers)
        self.session_s = time.perf_counter() - start
        # On a GPU the presents stay in device memory and are fed back as they are; only the logits
        # (B, T, V) come back to the host, for the argmax.
        self.device = device_of(self.session.get_providers()[0])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        first = inputs[self.past_names[0]]
        self.kv_shape = (int(first.shape[1]), int(first.shape[3]))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.binding = self.session.io_binding()
        self.presents = []
        self.total = 0  # positions in the cache after the current step, prefix included
        # One (1, H_kv, P, D) array per past input, in input order (layer 0 key, layer 0 value, ...).
        self.prefix = None if prefix is None else [np.ascontiguousarray(prefix[i, j][None], dtype=np.float32)
                                                   for i in range(prefix.shape[0]) for j in (0, 1)]
        self.num_virtual_tokens = 0 if prefix is None else int(prefix.shape[3])

    def _run(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        binding = self.binding
        batch = input_ids.shape[0]
        binding.bind_cpu_input(contract.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(contract.ATTENTION_MASK, np.ones((batch, self.total), np.int64))
        binding.bind_cpu_input(contract.POSITION_IDS, positions)
        binding.bind_output(self.output_names[0])
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.presents = outputs[1:]
        return outputs[0].numpy()[:, -1]  # (B, V)

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        batch, seq = input_ids.shape
        H, D = self.kv_shape
        P = self.num_virtual_tokens
        if self.prefix is None:
            empty = np.zeros((batch, H, 0, D), np.float32)
            for name in self.past_names:
                self.binding.bind_cpu_input(name, empty)
        else:
            for name, prefix in zip(self.past_names, self.prefix):  # (B, H_kv, P, D) per input
                self.binding.bind_cpu_input(name, np.ascontiguousarray(np.broadcast_to(prefix, (batch, H, P, D))))
        self.total = P + seq
        return self._run(input_ids, np.tile(np.arange(P, P + seq, dtype=np.int64), (batch, 1)))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        for name, value in zip(self.past_names, self.presents):
            self.binding.bind_ortvalue_input(name, value)
        self.total += 1
        return self._run(tokens, np.full((tokens.shape[0], 1), self.total - 1, np.int64))

    def close(self) -> None:
        self.presents = []
        self.binding = None
        self.session = None


class EagerBackend:
    """PEFT in PyTorch with a KV cache (see the module docstring for exactly what runs)."""

    def __init__(self, peft_model, threads: int, device: str = "cpu"):
        import copy

        import torch

        torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type != "cpu":  # a copy, so that the CPU model stays for validation and eager on CPU
            peft_model = copy.deepcopy(peft_model).to(self.device)
        self.peft_model = peft_model
        self.model = peft_model.get_base_model()
        self.P = peft_model.active_peft_config.num_virtual_tokens
        self.session_s = 0.0
        self.cache = None
        self.total = 0

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        from .architectures import output_cache

        batch, seq = input_ids.shape
        device = self.device
        with torch.inference_mode():
            out = self.peft_model(input_ids=torch.from_numpy(input_ids).to(device),
                                  attention_mask=torch.ones(batch, seq, dtype=torch.int64, device=device),
                                  position_ids=torch.arange(seq, device=device).expand(batch, -1),
                                  use_cache=True, return_dict=True)
        self.cache = output_cache(out)  # P + seq positions per layer
        self.total = seq
        return out.logits[:, -1].float().cpu().numpy()  # .cpu() waits for the device

    def step(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        from .architectures import cache_kwargs, output_cache

        batch = tokens.shape[0]
        device = self.device
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(tokens).to(device),
                             attention_mask=torch.ones(batch, self.P + self.total + 1, dtype=torch.int64,
                                                       device=device),
                             position_ids=torch.full((batch, 1), self.P + self.total, dtype=torch.int64,
                                                     device=device),
                             use_cache=True, return_dict=True, **cache_kwargs(self.model, self.cache))
        self.cache = output_cache(out)
        self.total += 1
        return out.logits[:, -1].float().cpu().numpy()

    def close(self) -> None:
        self.cache = None
        if self.device.type != "cpu":
            import torch

            self.peft_model = self.model = None
            gc.collect()
            torch.cuda.empty_cache()


def time_generation(backend, input_ids: np.ndarray, new_tokens: int, warmup_tokens: int) -> dict:
    """Warm-up (prefill + a few steps, discarded), then a timed prefill and `new_tokens` timed steps."""
    logits = backend.prefill(input_ids)
    for _ in range(warmup_tokens):
        logits = backend.step(logits.argmax(-1).astype(np.int64)[:, None])
    start = time.perf_counter()
    logits = backend.prefill(input_ids)
    prefill_s = time.perf_counter() - start
    steps, tokens = [], []
    for _ in range(new_tokens):
        next_tokens = logits.argmax(-1).astype(np.int64)[:, None]
        tokens.append(int(next_tokens[0, 0]))
        start = time.perf_counter()
        logits = backend.step(next_tokens)
        steps.append(time.perf_counter() - start)
    steps_ms = np.array(steps) * 1e3
    batch = input_ids.shape[0]
    p50 = float(np.median(steps_ms)) if len(steps_ms) else float("nan")
    return {"prefill_ms": round(prefill_s * 1e3, 3), "decode_p50_ms": round(p50, 3),
            "decode_p90_ms": round(float(np.percentile(steps_ms, 90)), 3) if len(steps_ms) else None,
            "decode_min_ms": round(float(steps_ms.min()), 3) if len(steps_ms) else None,
            "tokens_per_s": round(batch * 1e3 / p50, 2) if len(steps_ms) else None,
            "tokens_row0": tokens, "steps_ms": steps_ms.tolist()}


# ---- building the variants -----------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One graph to measure: ours or the base model's, at one precision, with how it was made."""

    name: str  # e.g. "export fp32", "base int8"
    graph: Path
    kind: str  # "export" or "base"
    precision: str  # "fp32", "fp32+fused", "int8"
    build_s: float
    info: dict = dataclasses.field(default_factory=dict)
    weights_read: int = 0


def _short_validation(graph: Path, peft_model, spec, P: int, greedy_tokens: int, atol: float = 1e-4,
                      prefix_file: Path | None = None) -> dict:
    """Validation against PEFT, shortened; with `prefix_file` the graph is run as the cache layout."""
    from .decoding import load_prefix_file
    from .runtime import CacheLayoutDecoder, OnnxDecoder, create_session
    from .validate import Tolerances, validate

    budget = spec.max_positions - P if spec.positions == "learned" else None
    decoder = OnnxDecoder(create_session(graph, "cpu"))
    if prefix_file is not None:
        decoder = CacheLayoutDecoder(decoder, load_prefix_file(prefix_file))
    report = validate(decoder, peft_model, spec.vocab_size, Tolerances(atol=atol), prompt_lengths=(9, 5, 1),
                      decode_steps=2, greedy_tokens=greedy_tokens, greedy_prompts=1, max_positions=budget,
                      graph_file=None if prefix_file is not None else graph, prefix_kv_file=prefix_file)
    del decoder
    return {"passed": report.passed, "failures": report.failures()[:10],
            "summary": report.to_dict()["summary"], "greedy": [{k: g[k] for k in ("new_tokens", "matching")}
                                                               for g in report.greedy]}


def _export_base(base, workdir: Path) -> tuple[Path, float]:
    """The base model alone, same contract, no prefix: exactly the graph `--layout cache` exports
    (its wrapper), so it serves both as "base" (P = 0) and as the cache layout (prefix fed as past)."""
    from . import __version__, graph
    from .export import export_decoder

    folder = workdir / "base"
    raw = workdir / ".raw-base"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(raw, ignore_errors=True)
    folder.mkdir(parents=True)
    raw.mkdir(parents=True)
    start = time.perf_counter()
    export_decoder(base.model, None, base.spec, raw / "model.onnx", layout="cache")
    graph.finalize(raw / "model.onnx", folder / "model.onnx",
                   {contract.META_PREFIX_LENGTH: "0", contract.META_LAYOUT: "cache (base model, no prefix inside)",
                    contract.META_VERSION: __version__})
    shutil.rmtree(raw)
    return folder / "model.onnx", time.perf_counter() - start


def _check_base_export(graph: Path, model, vocab_size: int) -> dict:
    """The base export against the base model's own forward on one prompt (logits)."""
    import torch

    from .runtime import OnnxDecoder, create_session

    decoder = OnnxDecoder(create_session(graph, "cpu"))
    ids = np.random.default_rng(1).integers(0, vocab_size, (1, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    logits, _ = decoder.run(ids, mask, np.arange(9, dtype=np.int64)[None], decoder.empty_past(1))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()
    diff = float(np.abs(logits - ref).max())
    return {"max_abs_logits": diff, "passed": diff <= 1e-3}


@dataclasses.dataclass
class Backend:
    """One measured row group: eager PyTorch (graph None) or a graph on one provider, with or without a
    prefix fed as the first past (the cache layout)."""

    name: str
    kind: str  # "eager", "export" (ours, prefix applied) or "base" (no prefix)
    layout: str  # "folded", "cache" or "-" (eager, base)
    precision: str
    provider: str  # ORT provider alias, or "torch:cpu" / "torch:cuda"
    graph: Path | None
    weights: int  # bytes of weights read per decode step
    prefix_length: int  # positions of prefix in the cache
    build_s: float
    prefix: np.ndarray | None = None  # (L, 2, H_kv, P, D), fed as the first past


def _prefix_file(folder) -> Path | None:
    from .decoding import PREFIX_KV_FILE

    path = Path(folder) / PREFIX_KV_FILE if folder is not None else None
    return path if path is not None and path.is_file() else None


def _backends(variants, settings: BenchSettings, peft_model, P: int, prefix_file: Path | None, export_layout: str,
              on_gpu: bool) -> list[Backend]:
    """Every backend to measure, in measuring order: eager, then each graph on each provider; the base
    graphs run twice, bare ("base": what the prefix costs) and with the prefix as past ("export[cache]")."""
    from .decoding import load_prefix_file

    prefix = load_prefix_file(prefix_file) if prefix_file is not None else None

    def cache_validated(variant) -> bool:
        return bool((variant.info.get("cache_layout_validation") or {}).get("passed"))

    # With a validated fused base graph, the plain one is not run as the cache layout: whether fusing
    # pays is already measured on these very graphs by the bare "base" rows.
    fused_cache = any(v.kind == "base" and v.precision == "fp32+fused" and cache_validated(v) for v in variants)
    backends = []
    fp32_weights = next(v.weights_read for v in variants if v.kind == "export")
    # Eager runs where the providers run: on the CPU, and on the GPU when a GPU provider is asked for.
    eager_devices = (["cpu"] if "cpu" in settings.providers else []) + (["cuda"] if on_gpu else [])
    if settings.eager and peft_model is not None:
        for device in eager_devices:
            name = "eager (PEFT, PyTorch)" + ("" if device == "cpu" else f" [{device}]")
            backends.append(Backend(name, "eager", "-", "fp32", f"torch:{device}", None, fp32_weights, P, 0.0))
    cache_runs = []
    for variant in variants:
        for provider in settings.providers:
            if variant.precision == "int8" and provider != "cpu":
                continue  # dynamic int8 MatMuls are CPU kernels; on a GPU they would fall back to it
            suffix = "" if provider == "cpu" else f" [{provider}]"
            if variant.kind == "export":
                cache_export = export_layout == "cache"  # an existing cache-layout folder: feed its prefix
                label = variant.name.replace("export", "export[cache]", 1) if cache_export else variant.name
                backends.append(Backend(label + suffix, "export", export_layout, variant.precision, provider,
                                        variant.graph, variant.weights_read, P, variant.build_s,
                                        prefix if cache_export else None))
                continue
            backends.append(Backend(variant.name + suffix, "base", "-", variant.precision, provider, variant.graph,
                                    variant.weights_read, 0, variant.build_s))
            validated = variant.precision == "int8" or cache_validated(variant)
            superseded = variant.precision == "fp32" and fused_cache
            if settings.cache_layout and prefix is not None and export_layout != "cache" and validated \
                    and not superseded:
                cache_runs.append(Backend(f"export[cache] {variant.precision}{suffix}", "export", "cache",
                                          variant.precision, provider, variant.graph, variant.weights_read, P,
                                          variant.build_s, prefix))
    return backends + cache_runs


# ---- the run -------------------------------------------------------------------------------------


class _Bar:
    """The progress bar, and a timeline of every step (seconds since the start), kept in bench.json."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.started = time.perf_counter()
        self.timeline: list[tuple[str, float]] = []
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="bench", unit="step", file=sys.stderr, leave=False)

    def __call__(self, description: str, n: int = 1) -> None:
        log.info("bench: %s", description)
        self.timeline.append((description, round(time.perf_counter() - self.started, 2)))
        if self.bar is not None:
            self.bar.set_description(description[:40])
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_bench(out_dir: str | Path, *, model: str | None = None, prefix: str | Path | None = None,
              export_dir: str | Path | None = None, settings: BenchSettings | None = None,
              progress: bool = True) -> dict:
    """Build what is to be compared, measure every backend on the same prompts, write bench.json + bench.png.

    Give `model` + `prefix` (the export is made here, timed), or `export_dir` (an existing export
    folder; its report names the model and prefix for the eager and base backends).
    """
    from . import __version__
    from .api import export_prefix_model, library_versions, read_report
    from .base_model import load_base_model
    from .checkpoint import load_prefix_checkpoint
    from .errors import InputError
    from .prefix_kv import build_peft_model
    from .runtime import graph_path

    settings = settings or BenchSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = settings.threads or os.cpu_count() or 1
    started = time.perf_counter()
    result = {"tool": "prefix-export bench", "version": __version__, "created_unix": int(time.time()),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()},
              "machine": machine_info(), "versions": library_versions(), "load_average_before": load_average(),
              "threads": threads, "notes": []}
    report = read_report(Path(export_dir)) if export_dir is not None else {}  # an existing export's
    export_layout = report.get("layout", "folded")
    if export_dir is not None:
        model = model or report.get("inputs", {}).get("model")
        prefix = prefix or report.get("inputs", {}).get("prefix")
    if model is None or prefix is None or prefix == "<in-memory>":
        if export_dir is None:
            raise InputError("bench needs --model and --prefix, or an export folder.")
        result["notes"].append("model/prefix unknown: eager and base backends skipped")
    n_configs = len(settings.batch_sizes) * len(settings.contexts)
    n_graph_variants = (1 + int(settings.optimize) + int("int8" in settings.precisions)) * (1 + int(settings.base))
    bar = _Bar(4 + n_graph_variants + settings.rounds * n_configs * (n_graph_variants * len(settings.providers)
                                                                     + int(settings.eager)),
               progress)
    try:
        bandwidth = measure_bandwidth(settings.bandwidth_mb, settings.bandwidth_passes, threads)
        result["bandwidth"] = bandwidth
        bar(f"bandwidth {bandwidth['gb_per_s']:.1f} GB/s")
        gpu_bandwidth = None
        if any(p.lower() not in ("cpu", "cpuexecutionprovider") for p in settings.providers):
            gpu_bandwidth = measure_gpu_bandwidth(settings.bandwidth_mb)
            result["gpu_bandwidth"] = gpu_bandwidth

        base = peft_model = None
        if model is not None and prefix is not None and prefix != "<in-memory>":
            base = load_base_model(str(model))
            checkpoint = load_prefix_checkpoint(prefix)
            peft_model = build_peft_model(base, checkpoint)
        bar("loaded model")

        workdir = out_dir / "graphs"
        workdir.mkdir(exist_ok=True)
        variants: list[Variant] = []
        if export_dir is None:
            # The prefix by path (not the loaded checkpoint) so the export's report names it.
            exported = export_prefix_model(base, prefix, workdir / "export", force=True, run_validation=False,
                                           progress=False)
            graph_file = exported.graph
            export_s = exported.report["timing_s"]["export"]
        else:
            graph_file = graph_path(export_dir)
            export_s = report.get("timing_s", {}).get("export")
        spec = base.spec if base is not None else None
        P = int(_graph_meta(graph_file).get(contract.META_PREFIX_LENGTH, 0))
        fp32 = Variant("export fp32", graph_file, "export", "fp32", export_s or 0.0)
        if peft_model is not None:
            fp32.info["validation"] = _short_validation(
                graph_file, peft_model, spec, P, settings.validate_tokens,
                prefix_file=_prefix_file(export_dir) if export_layout == "cache" else None)
        variants.append(fp32)
        bar("exported")
        if settings.base and base is not None:
            base_graph, base_s = _export_base(base, workdir)
            variants.append(Variant("base fp32", base_graph, "base", "fp32", base_s,
                                    {"validation": _check_base_export(base_graph, base.model, spec.vocab_size)}))
            bar("exported base")
        if settings.optimize:
            variants += _fused_variants(variants, workdir, spec or _spec_from_graph(graph_file), peft_model, P,
                                        settings, bar)
        if "int8" in settings.precisions:
            variants += _int8_variants(variants, workdir, bar)
        # The cache layout: the base graph (and its fused / int8 versions) with the prefix fed as the
        # first past, from the export's prefix_kv.safetensors; validated against PEFT like an export.
        prefix_file = _prefix_file(export_dir if export_dir is not None else workdir / "export")
        if settings.cache_layout and prefix_file is not None and peft_model is not None:
            for variant in variants:
                if variant.kind == "base" and variant.precision != "int8":
                    variant.info["cache_layout_validation"] = _short_validation(
                        variant.graph, peft_model, spec, P, settings.validate_tokens, prefix_file=prefix_file)
            bar("validated the cache layout")
        for variant in variants:
            variant.weights_read = weights_read_per_token(variant.graph)
        result["variants"] = [{"name": v.name, "graph": str(v.graph), "kind": v.kind, "precision": v.precision,
                               "build_s": round(v.build_s, 2), "weights_read_per_token": v.weights_read, **v.info}
                              for v in variants]

        kv_spec = spec or _spec_from_graph(graph_file)
        prompts = {(b, c): np.random.default_rng([settings.seed, b, c]).integers(0, kv_spec.vocab_size, (b, c),
                                                                                  dtype=np.int64)
                   for b in settings.batch_sizes for c in settings.contexts}
        backends = _backends(variants, settings, peft_model, P, prefix_file, export_layout, gpu_bandwidth is not None)
        result["backends"] = [{"name": b.name, "kind": b.kind, "layout": b.layout, "precision": b.precision,
                               "provider": b.provider, "graph": str(b.graph) if b.graph else None} for b in backends]
        # eager's weights were loaded before its measurement started: add them to its footprint.
        model_mb = sum(p.numel() * p.element_size() for p in base.model.parameters()) / 1024**2 if base else 0.0
        configs = [(b, c) for (b, c) in prompts
                   if kv_spec.positions != "learned"
                   or c + settings.new_tokens + settings.warmup_tokens + P <= kv_spec.max_positions]
        skipped = sorted(set(prompts) - set(configs))
        if skipped:
            result["notes"].append(f"configs {skipped} skipped: P + context + new tokens exceed the model's positions")
        if bar.bar is not None:  # the real count of measurements, now that the backends are known
            bar.bar.total = bar.bar.n + (settings.rounds * len(configs) + 1) * len(backends)
            bar.bar.refresh()
        # Every backend is created first (its memory: RSS growth over creation and one short run at
        # the smallest config). Then, per round and per config, every backend runs in turn, so that
        # backends compared on one config are measured seconds apart, not minutes, on a machine whose
        # speed drifts; odd rounds run the backends in reverse order. One backend at a time: ONNX
        # Runtime's spinning worker threads make sessions run step-by-step in alternation about 2x slower.
        live, memory_mb, samples, session_s = {}, {}, {}, {}
        smallest = min(configs, key=lambda c: c[0] * c[1])
        for b in backends:
            gc.collect()
            with PeakMemory() as memory:
                live[b.name] = (EagerBackend(peft_model, threads, b.provider.split(":", 1)[1]) if b.graph is None
                                else OrtBackend(b.graph, b.provider, threads, b.prefix))
                time_generation(live[b.name], prompts[smallest], settings.warmup_tokens, 0)
            session_s[b.name] = live[b.name].session_s
            memory_mb[b.name] = (memory.peak_mb, memory.peak_mb - memory.start_mb)
            bar(f"created {b.name}")
        for round_index in range(settings.rounds):
            for batch, context in configs:
                for b in (backends if round_index % 2 == 0 else backends[::-1]):
                    timing = time_generation(live[b.name], prompts[(batch, context)], settings.new_tokens,
                                             settings.warmup_tokens)
                    entry = samples.setdefault((b.name, batch, context), {"prefill": [], "steps": [], "rounds": []})
                    entry["prefill"].append(timing["prefill_ms"])
                    entry["steps"].extend(timing["steps_ms"])
                    entry["rounds"].append(timing["decode_p50_ms"])
                    entry.setdefault("tokens_row0", timing["tokens_row0"])
                    bar(f"{b.name} B={batch} C={context}")
        for backend in live.values():
            backend.close()
        live.clear()
        gc.collect()
        # The machine's bandwidth drifts on a shared host: probe again after the measurements, and
        # compute every floor with the best pass of both probes (the stricter floor).
        after = measure_bandwidth(settings.bandwidth_mb, settings.bandwidth_passes, threads)
        result["bandwidth_after"] = after
        bandwidth = dict(bandwidth, gb_per_s=max(bandwidth["gb_per_s"], after["gb_per_s"]),
                         probes_gb_per_s=[bandwidth["gb_per_s"], after["gb_per_s"]])
        result["bandwidth"] = bandwidth
        bar(f"bandwidth again {after['gb_per_s']:.1f} GB/s")
        rows = []
        for b in backends:
            for batch, context in configs:
                entry = samples[(b.name, batch, context)]
                steps = np.array(entry["steps"])
                p50 = float(np.median(steps))
                mid = context + settings.new_tokens // 2  # the cache length at the median step
                floor_bytes = b.weights + kv_bytes(kv_spec, batch, b.prefix_length + mid)  # KV stays fp32
                # A GPU row's floor is the GPU's bandwidth; unknown (no CUDA in torch) leaves it empty.
                ceiling = bandwidth if b.provider in ("cpu", "torch:cpu") else gpu_bandwidth
                floor_ms = floor_bytes / (ceiling["gb_per_s"] * 1e9) * 1e3 if ceiling else None
                rows.append({"backend": b.name, "kind": b.kind, "layout": b.layout, "precision": b.precision,
                             "provider": b.provider, "batch": batch, "context": context,
                             "prefill_ms": round(float(np.median(entry["prefill"])), 3),
                             "decode_p50_ms": round(p50, 3), "decode_p90_ms": round(float(np.percentile(steps, 90)), 3),
                             "decode_min_ms": round(float(steps.min()), 3),
                             "decode_p50_per_round_ms": [round(x, 3) for x in entry["rounds"]],
                             "tokens_per_s": round(batch * 1e3 / p50, 2), "tokens_row0": entry["tokens_row0"],
                             "floor_ms": round(floor_ms, 6) if floor_ms else None, "bytes_per_token": floor_bytes,
                             "x_floor": round(p50 / floor_ms, 3) if floor_ms else None,
                             "session_s": round(session_s[b.name], 3),
                             "build_s": round(b.build_s, 2),
                             "peak_rss_mb": round(memory_mb[b.name][0], 1),
                             "rss_growth_mb": round(memory_mb[b.name][1], 1),
                             "memory_mb": round(memory_mb[b.name][1] + (model_mb if b.kind == "eager" else 0), 1)})
        if any(r["floor_ms"] is None for r in rows):
            result["notes"].append("no GPU bandwidth (PyTorch without CUDA here): GPU rows have no floor")
        result["rows"] = rows
        result["optimize_decision"] = _optimize_decision(rows, settings)
        if settings.agreement_model is not None and "int8" in settings.precisions:
            result["int8_agreement_embedded"] = embedded_agreement(Path(settings.agreement_model), workdir)
            bar("int8 agreement on the embedded model")
        result["eager_matches_export"] = _eager_matches(rows)
        result["targets"] = evaluate_targets(result)
        result["timeline_s"] = bar.timeline
        result["load_average_after"] = load_average()
        result["total_s"] = round(time.perf_counter() - started, 1)
    finally:
        bar.close()
    (out_dir / BENCH_JSON).write_text(json.dumps(result, indent=2))
    write_plot(result, out_dir / BENCH_PNG)
    result["files"] = {"json": str(out_dir / BENCH_JSON), "plot": str(out_dir / BENCH_PNG)}
    return result


def _graph_meta(graph: Path) -> dict:
    from .graph import read_metadata

    return read_metadata(graph)


def _spec_from_graph(graph: Path):
    """Without the model: the KV facts the floor needs, from the graph's inputs (learned positions unknown)."""
    from .architectures import ArchSpec
    from .runtime import OnnxDecoder, create_session

    decoder = OnnxDecoder(create_session(graph, "cpu"))
    vocab = decoder.session.get_outputs()[0].shape[2]
    return ArchSpec("unknown", decoder.num_layers, decoder.num_kv_heads, decoder.num_kv_heads, decoder.head_dim,
                    decoder.num_kv_heads * decoder.head_dim, int(vocab) if isinstance(vocab, int) else 0, "unknown",
                    None)


def _fused_variants(variants, workdir: Path, spec, peft_model, P: int, settings: BenchSettings, bar) -> list[Variant]:
    from .optimize import fuse

    made = []
    for source in list(variants):
        target = workdir / f"{source.kind}-fused.onnx"
        start = time.perf_counter()
        try:
            report = fuse(source.graph, target, spec.num_attention_heads, spec.hidden_size)
        except Exception as exc:  # noqa: BLE001 - a failed pass is reported, the plain graph stays
            log.warning("fusion of %s failed: %s", source.name, exc)
            bar(f"fuse {source.kind} FAILED")
            continue
        build = time.perf_counter() - start
        info = {"fusion": report.to_dict(), "source": source.name}
        if source.kind == "export" and peft_model is not None:
            info["validation"] = _short_validation(target, peft_model, spec, P, settings.validate_tokens)
        elif source.kind == "base":
            info["validation"] = _check_base_export(target, peft_model.get_base_model(), spec.vocab_size) \
                if peft_model is not None else None
        valid = info.get("validation") is None or info["validation"]["passed"]
        if not valid:
            log.warning("fused %s failed validation; dropped", source.name)
        else:
            made.append(Variant(f"{source.kind} fp32+fused", target, source.kind, "fp32+fused", build, info))
        bar(f"fused {source.kind}")
    return made


def _int8_variants(variants, workdir: Path, bar) -> list[Variant]:
    """int8 from the fused graph when there is a valid one, else from the plain export."""
    from .optimize import agreement, quantize_int8
    from .runtime import OnnxDecoder, create_session

    made = []
    for kind in ("export", "base"):
        candidates = [v for v in variants if v.kind == kind]
        if not candidates:
            continue
        source = next((v for v in candidates if v.precision == "fp32+fused"), candidates[0])
        target = workdir / f"{kind}-int8.onnx"
        start = time.perf_counter()
        info = quantize_int8(source.graph, target)
        build = time.perf_counter() - start
        reference = OnnxDecoder(create_session(source.graph, "cpu"))
        candidate = OnnxDecoder(create_session(target, "cpu"))
        vocab = reference.session.get_outputs()[0].shape[2]
        rng = np.random.default_rng(7)
        prompts = [rng.integers(0, int(vocab), n, dtype=np.int64) for n in (8, 16, 32, 64)]
        info["agreement_random_prompts"] = agreement(reference, candidate, prompts, greedy_tokens=16)
        info["source"] = source.name
        del reference, candidate
        made.append(Variant(f"{kind} int8", target, kind, "int8", build + source.build_s, info))
        bar(f"int8 {kind}")
    return made


def embedded_agreement(folder: Path, workdir: Path, prompts_n: int = 48, greedy_n: int = 16) -> dict:
    """int8 vs fp32 on the embedded default model's task (`folder`: base/, prefix/, test_split.jsonl).

    Top-1 agreement teacher-forced over every position of `prompt + reference target` for the first
    `prompts_n` held-out records, and greedy outputs from the prompt alone (stopping at eos) for the
    first `greedy_n`, compared exactly and against the reference text.
    """
    from .api import export_prefix_model
    from .generate import load_tokenizer
    from .optimize import agreement, quantize_int8
    from .runtime import OnnxDecoder, create_session

    exported = export_prefix_model(str(folder / "base"), str(folder / "prefix"), workdir / "embedded", force=True,
                                   progress=False)
    int8 = workdir / "embedded-int8.onnx"
    quantize_int8(exported.graph, int8)
    tokenizer = load_tokenizer(folder / "base")
    records = [json.loads(line) for line in (folder / "test_split.jsonl").read_text().splitlines() if line.strip()]
    encode = lambda text: np.array(tokenizer(text)["input_ids"], dtype=np.int64)  # noqa: E731
    reference = OnnxDecoder(create_session(exported.graph, "cpu"))
    candidate = OnnxDecoder(create_session(int8, "cpu"))
    result = agreement(reference, candidate, [encode(r["prompt"] + r["target"]) for r in records[:prompts_n]])
    greedy = agreement(reference, candidate, [encode(r["prompt"]) for r in records[:greedy_n]], greedy_tokens=32,
                       eos_token_id=tokenizer.eos_token_id)
    texts = [(tokenizer.decode(g["reference"], skip_special_tokens=True),
              tokenizer.decode(g["candidate"], skip_special_tokens=True)) for g in greedy["greedy"]]
    result.update({"model": str(folder), "greedy_prompts": len(texts), "greedy_equal": greedy["greedy_equal"],
                   "fp32_exact_match": sum(f == r["target"] for (f, _), r in zip(texts, records)),
                   "int8_exact_match": sum(i == r["target"] for (_, i), r in zip(texts, records)),
                   "examples": [{"prompt": r["prompt"], "fp32": f, "int8": i}
                                for (f, i), r in list(zip(texts, records))[:3]]})
    return result


def _fusion_decision(rows, fused: str, plain: str) -> dict | None:
    """Fused vs plain decode p50 as a geometric mean of the ratios over every config both ran."""
    ratios = []
    for row in (r for r in rows if r["backend"] == fused):
        other = _pick(rows, plain, (row["batch"], row["context"]))
        if other is not None:
            ratios.append(row["decode_p50_ms"] / other["decode_p50_ms"])
    if not ratios:
        return None
    ratio = float(np.exp(np.mean(np.log(ratios))))
    return {"kept": bool(ratio < 1.0), "fused_over_plain": round(ratio, 3),
            "why": f"decode p50 fused / plain = {ratio:.3f} (geometric mean over {len(ratios)} configs)"}


def _optimize_decision(rows, settings) -> dict | None:
    """Keep a fused graph when it validated and its decode p50 is lower, as a geometric mean of the
    fused/plain ratios over every measured config (one config alone is too noisy on a shared machine).

    Decided per export backend (folded, cache layout, per provider); the top-level answer is the
    folded CPU one, `by_backend` holds every one, keyed by the plain backend's name. The cache layout
    runs the base graphs, so without its own plain row it is decided by the bare base rows.
    """
    if not settings.optimize:
        return None
    decisions = {}
    for fused in dict.fromkeys(r["backend"] for r in rows if r["kind"] == "export" and r["precision"] == "fp32+fused"):
        plain = fused.replace("fp32+fused", "fp32", 1)
        decision = _fusion_decision(rows, fused, plain)
        if decision is None and fused.startswith("export[cache]"):
            base_fused = fused.replace("export[cache]", "base", 1)
            decision = _fusion_decision(rows, base_fused, base_fused.replace("fp32+fused", "fp32", 1))
            if decision is not None:
                decision["why"] += ", measured on the same graphs without the prefix (the base rows)"
        if decision is not None:
            decisions[plain] = decision
    if not decisions:
        return {"kept": False, "why": "the fused graph failed to build or to validate", "by_backend": {}}
    head = decisions.get("export fp32") or next(iter(decisions.values()))
    return {**head, "by_backend": decisions}


def _headline_config(rows) -> tuple[int, int] | None:
    batch1 = [r for r in rows if r["batch"] == 1] or rows
    if not batch1:
        return None
    context = min({r["context"] for r in batch1}, key=lambda c: abs(c - 32))
    return batch1[0]["batch"], context


def _pick(rows, backend: str, config: tuple[int, int] | None = None) -> dict | None:
    config = config or _headline_config(rows)
    for row in rows:
        if row["backend"] == backend and (row["batch"], row["context"]) == config:
            return row
    return None


def _eager_matches(rows) -> dict | None:
    """Greedy tokens of row 0 from eager vs our fp32 export at each config: is eager really prefixed?"""
    out = {}
    for row in rows:
        if row["kind"] != "eager":
            continue
        suffix = row["backend"][len("eager (PEFT, PyTorch)"):]  # "" or " [cuda]"
        config = (row["batch"], row["context"])
        ours = next((found for name in ("export fp32" + suffix, "export[cache] fp32" + suffix, "export fp32")
                     if (found := _pick(rows, name, config)) is not None), None)
        if ours is not None:
            a, b = row["tokens_row0"], ours["tokens_row0"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            out[f"{suffix.strip()} B={row['batch']} C={row['context']}".strip()] = f"{same}/{len(a)} leading tokens equal"
    return out or None


LAYOUT_PREFIXES = {"folded": "export", "cache": "export[cache]"}


def evaluate_targets(result: dict) -> dict:
    """The issue-5 targets on the CPU rows at the headline config, per layout; the top level is the
    faster layout ("ours"), `by_layout` holds both."""
    rows = result.get("rows", [])
    config = _headline_config(rows)
    if config is None:
        return {}
    decisions = (result.get("optimize_decision") or {}).get("by_backend", {})
    eager = _pick(rows, "eager (PEFT, PyTorch)", config)
    embedded = result.get("int8_agreement_embedded")

    def entry(value, limit, lower_is_better=True):
        return {"value": round(value, 3), "target": limit,
                "met": bool(value <= limit if lower_is_better else value >= limit)}

    by_layout = {}
    for layout, label in LAYOUT_PREFIXES.items():
        kept = decisions.get(f"{label} fp32", {}).get("kept")
        ours_name = f"{label} fp32+fused" if kept else f"{label} fp32"
        ours = _pick(rows, ours_name, config)
        if ours is None:  # the cache layout's plain graph is not run when the fused one is (see _backends)
            ours_name = f"{label} fp32+fused"
            ours = _pick(rows, ours_name, config)
        if ours is None:
            continue
        kept = ours_name.endswith("+fused")
        base = _pick(rows, "base fp32+fused" if kept else "base fp32", config)
        int8 = _pick(rows, f"{label} int8", config)
        targets = {"ours": ours_name, "decode_p50_ms": ours["decode_p50_ms"]}
        if eager:
            targets["export_vs_eager"] = entry(ours["decode_p50_ms"] / eager["decode_p50_ms"],
                                               TARGETS["export_vs_eager"])
        if base:
            targets["prefix_cost"] = entry(ours["decode_p50_ms"] / base["decode_p50_ms"] - 1, TARGETS["prefix_cost"])
        if ours["x_floor"] is not None:
            targets["export_vs_floor"] = entry(ours["x_floor"], TARGETS["export_vs_floor"])
        if int8:
            targets["int8_vs_fp32"] = entry(int8["decode_p50_ms"] / ours["decode_p50_ms"], TARGETS["int8_vs_fp32"])
        if embedded:
            targets["int8_top1_agreement"] = entry(embedded["top1_agreement"], TARGETS["int8_top1_agreement"], False)
        by_layout[layout] = targets
    if not by_layout:
        return {}
    best = min(by_layout, key=lambda layout: by_layout[layout]["decode_p50_ms"])
    return {"config": {"batch": config[0], "context": config[1]}, "layout": best, **by_layout[best],
            "by_layout": by_layout}


# ---- output --------------------------------------------------------------------------------------


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def format_table(result: dict) -> str:
    width = max([24, *(len(r["backend"]) for r in result.get("rows", []))])
    header = (f"{'backend':<{width}} {'B':>2} {'ctx':>5} {'prefill ms':>10} {'decode p50':>10} {'p90':>7} "
              f"{'tok/s':>7} {'floor ms':>8} {'x floor':>7} {'session s':>9} {'build s':>7} {'mem MB':>7}")
    lines = [header, "-" * len(header)]
    for r in result.get("rows", []):
        lines.append(f"{r['backend']:<{width}} {r['batch']:>2} {r['context']:>5} {r['prefill_ms']:>10.1f} "
                     f"{r['decode_p50_ms']:>10.2f} {r['decode_p90_ms']:>7.2f} {r['tokens_per_s']:>7.1f} "
                     f"{_cell(r['floor_ms'], 8)} {_cell(r['x_floor'], 7)} {r['session_s']:>9.2f} {r['build_s']:>7.1f} "
                     f"{r.get('memory_mb', float('nan')):>7.0f}")
    lines.append("decode p50/p90: ms per step over all rounds; floor: (weights read per step + KV cache) / read "
                 "bandwidth; mem MB: RSS growth while the backend was created and run once on the smallest config (eager: + "
                 "its weights), "
                 "approximate: memory freed earlier in the process is reused without showing")
    machine, bandwidth = result.get("machine", {}), result.get("bandwidth", {})
    lines.append("")
    lines.append(f"machine: {machine.get('cpu', machine.get('machine'))}, {machine.get('cpu_count')} cores, "
                 f"{machine.get('memory_gb')} GB; threads {result.get('threads')}; read bandwidth "
                 f"{bandwidth.get('gb_per_s')} GB/s (best of the probes before/after: "
                 f"{bandwidth.get('probes_gb_per_s')}); load average before {result.get('load_average_before')} "
                 f"after {result.get('load_average_after')}")
    gpu = result.get("gpu_bandwidth")
    if gpu:
        lines.append(f"GPU: {gpu['device']}, {gpu['gb_per_s']} GB/s (device-to-device copy, read + write): the "
                     "floor of the GPU rows")
    for variant in result.get("variants", []):
        validation = variant.get("validation")
        status = "" if validation is None else (" validated" if validation.get("passed") else " FAILED validation")
        cache = variant.get("cache_layout_validation")
        if cache is not None:
            status += "; with the prefix as past (cache layout) " + ("validated against PEFT" if cache.get("passed")
                                                                     else "FAILED validation")
        extra = ""
        if "fusion" in variant:
            fusion = variant["fusion"]
            extra = "; fused " + ", ".join(f"{k} {v['matched']}/{v['expected']}" for k, v in fusion["expected"].items())
            extra += f"; nodes {fusion['nodes_before']} -> {fusion['nodes_after']}"
        if "agreement_random_prompts" in variant:
            a = variant["agreement_random_prompts"]
            extra = f"; top-1 agreement with fp32 {a['top1_agreement']:.3f} over {a['positions']} positions " \
                    f"(random prompts), greedy equal {a.get('greedy_equal')}/{a['prompts']}"
        lines.append(f"{variant['name']}: build {variant['build_s']:.1f}s, reads "
                     f"{variant['weights_read_per_token'] / 1e6:.1f} MB of weights per token{status}{extra}")
    lines.extend(f"note: {note}" for note in result.get("notes", []))
    if result.get("optimize_decision"):
        d = result["optimize_decision"]
        for name, each in (d.get("by_backend") or {"export fp32": d}).items():
            lines.append(f"--optimize, {name}: fused graph {'KEPT' if each['kept'] else 'discarded'} ({each['why']})")
    if result.get("eager_matches_export"):
        lines.append("eager vs export greedy tokens: " + "; ".join(f"{k}: {v}" for k, v in
                                                                   result["eager_matches_export"].items()))
    embedded = result.get("int8_agreement_embedded")
    if embedded:
        lines.append(f"int8 on {embedded['model']}: top-1 agreement with fp32 {embedded['top1_agreement']:.3f} "
                     f"over {embedded['positions']} positions (prompt + reference); greedy outputs equal "
                     f"{embedded['greedy_equal']}/{embedded['greedy_prompts']}; exact match with the reference "
                     f"fp32 {embedded['fp32_exact_match']}, int8 {embedded['int8_exact_match']}")
    targets = result.get("targets") or {}
    if targets:
        config = targets["config"]
        lines.append(f"targets (B={config['batch']}, ctx={config['context']}, CPU), per layout; ours = the faster, "
                     f"{targets['layout']} ({targets['ours']}):")
        layouts = targets["by_layout"]
        lines.append(f"  {'target':<20} {'limit':>9}  " + "  ".join(f"{layout + ' (' + t['ours'] + ')':>34}"
                                                                   for layout, t in layouts.items()))
        for key in TARGETS:
            cells = []
            for t in layouts.values():
                value = t.get(key)
                cells.append(f"{'-':>34}" if value is None else
                             f"{value['value']:>26.3f} {'met' if value['met'] else 'MISSED':>7}")
            if any(key in t for t in layouts.values()):
                op = ">=" if key == "int8_top1_agreement" else "<="
                lines.append(f"  {key:<20} {op + ' ' + str(TARGETS[key]):>9}  " + "  ".join(cells))
    return "\n".join(lines)


def write_plot(result: dict, path: Path) -> None:
    """Per-token decode latency (p50) against context length, one line per backend, one panel per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("rows", [])
    batches = sorted({r["batch"] for r in rows}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            points = sorted((r["context"], r["decode_p50_ms"]) for r in rows
                            if r["backend"] == backend and r["batch"] == batch)
            if points:
                ax.plot(*zip(*points), marker="o", label=backend)
        floor = sorted((r["context"], r["floor_ms"]) for r in rows
                       if r["batch"] == batch and r["backend"] in ("export fp32",))
        if floor:
            ax.plot(*zip(*floor), linestyle="--", color="black", label="fp32 bandwidth floor")
        ax.set_xlabel("context length (prompt tokens)")
        ax.set_ylabel("decode latency per step, p50 (ms)")
        ax.set_title(f"batch {batch}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    machine = result.get("machine", {})
    fig.suptitle(f"prefix-export bench: {machine.get('cpu', '')} ({machine.get('cpu_count')} cores), "
                 f"{result.get('bandwidth', {}).get('gb_per_s')} GB/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
