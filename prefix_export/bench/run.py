"""`prefix-export bench`: PEFT eager vs our export vs the base model, the same prompts, one run.

What is measured, per backend (backends.py), batch size B and context length C (the prompt's length):
  prefill   one forward over the prompt (B, C), from an empty cache (or the prefix, cache layout);
  decode    each of `new_tokens` greedy steps (B, 1) after it, feeding the cache back; p50/p90 over
            the steps, tokens/s = B / p50. Warm-up (one prefill + a few steps per shape) is excluded.
Rounds run every backend in turn on one configuration before the next, so that the backends being
compared are measured seconds apart; with a GPU provider, eager also runs on the GPU. The floor
(probes.py) is printed beside each decode figure. bench.json and bench.png go to OUT.
`--torch-compile` adds PEFT with torch.compile decode steps wherever eager runs (backends.py); it compiles
every configuration's shape before the rounds, so no compile is timed (its session_s is the compile time).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from .backends import CUDA_GRAPH, PEERS, Backend, time_generation
from .probes import (PeakMemory, kv_bytes, load_average, machine_info, measure_bandwidth, measure_gpu_bandwidth,
                     weights_read_per_token)
from .report import eager_matches, evaluate_targets, optimize_decision, peers_match, write_plot
from .variants import compiled_variants, embedded_agreement, export_variants

log = logging.getLogger(__name__)

BENCH_JSON = "bench.json"
BENCH_PNG = "bench.png"
# Backends whose failure to run is a finding (recorded, the row skipped), not a crash.
FALLIBLE = (*PEERS, "torch_compile")
EXTRAS = ("matplotlib", "psutil")  # the `bench` extra: the plot, and the memory sampling


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
    peers: bool = False  # also run onnxruntime-genai and OpenVINO on every export graph (peers.py)
    torch_compile: bool = False  # also PEFT with torch.compile decode steps where eager runs (minutes on big models)
    kv_buffer_shared: bool = False  # also the shared-KV-buffer graphs (fp32; fp16 on a GPU) of export and base
    cuda_graph: bool = False  # those graphs on CUDA also with their decode steps as captured CUDA graphs
    threads: int | None = None  # ORT intra-op and torch threads; default: all cores
    bandwidth_mb: int = 1024
    bandwidth_passes: int = 5
    validate_tokens: int = 8  # greedy tokens in the (shortened) validation of each variant
    agreement_model: Path | None = None  # an embedded-style folder (base/, prefix/, test_split.jsonl)
    targets: dict | None = None  # {measure: limit} (report.MEASURES); None: ratios without verdicts
    seed: int = 0


def check_extras() -> None:
    """Refuse before any work when the `bench` extra is missing (a run takes minutes)."""
    import importlib.util

    from ..errors import InputError

    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"bench needs {', '.join(missing)} (the plot and the memory sampling), which is not "
                         "installed; install the bench extra: pip install -e \".[bench]\" (or "
                         "pip install 'prefix-export[bench]').")


def load_targets(path: str | Path) -> dict:
    """{measure: limit} from a JSON file (tools/bench_targets.json holds the team's)."""
    from ..errors import InputError
    from .report import MEASURES

    try:
        targets = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"--targets {path}: not a readable JSON file ({exc}).") from exc
    unknown = sorted(set(targets) - set(MEASURES)) if isinstance(targets, dict) else ["(not an object)"]
    if unknown:
        raise InputError(f"--targets {path}: unknown measures {unknown}; expected some of {list(MEASURES)}.")
    return {key: float(value) for key, value in targets.items()}


def _backends(variants, settings: BenchSettings, peft_model, P: int, prefix_file: Path | None, export_layout: str,
              on_gpu: bool) -> list[Backend]:
    """Every backend to measure, in measuring order: eager (and torch.compile), then each graph on each
    provider; the base graphs run twice, bare ("base": what the prefix costs) and with the prefix as past
    ("export[cache]")."""
    from ..folder import read_prefix_file

    prefix = read_prefix_file(prefix_file) if prefix_file is not None else None

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
            backends.append(Backend("eager", "-", "fp32", f"torch:{device}", None, fp32_weights, P, 0.0))
    if settings.torch_compile and peft_model is not None:
        for device in eager_devices:
            backends.append(Backend("torch_compile", "-", "fp32", f"torch:{device}", None, fp32_weights, P, 0.0))
    cache_runs = []
    for variant in variants:
        for provider in settings.providers:
            if variant.precision == "int8" and provider != "cpu":
                continue  # dynamic int8 MatMuls are CPU kernels; on a GPU they would fall back to it
            # shared-buffer graphs on CUDA: also as captured CUDA graphs (their own rows, "+cuda-graph")
            graph_modes = [False] + ([True] if settings.cuda_graph and "+shared" in variant.precision
                                     and provider in ("cuda", "CUDAExecutionProvider") else [])
            if variant.kind == "export":
                cache_export = export_layout == "cache"  # an existing cache-layout folder: feed its prefix
                for captured in graph_modes:
                    backends.append(Backend("export", export_layout, variant.precision + CUDA_GRAPH * captured,
                                            provider, variant.graph, variant.weights_read, P, variant.build_s,
                                            prefix if cache_export else None, cuda_graph=captured))
                continue
            for captured in graph_modes:
                backends.append(Backend("base", "-", variant.precision + CUDA_GRAPH * captured, provider,
                                        variant.graph, variant.weights_read, 0, variant.build_s, cuda_graph=captured))
            validated = variant.precision == "int8" or cache_validated(variant)
            superseded = variant.precision == "fp32" and fused_cache
            if settings.cache_layout and prefix is not None and export_layout != "cache" and validated \
                    and not superseded:
                for captured in graph_modes:
                    cache_runs.append(Backend("export", "cache", variant.precision + CUDA_GRAPH * captured, provider,
                                              variant.graph, variant.weights_read, P, variant.build_s, prefix,
                                              cuda_graph=captured))
    return backends + cache_runs + (_peer_backends(variants, P, prefix, export_layout) if settings.peers else [])


def _peer_backends(variants, P: int, prefix, export_layout: str) -> list[Backend]:
    """genai (folded exports: it needs the folder's genai_config.json) and OpenVINO (both layouts) on
    each export graph bench has: the plain fp32 one and every compiled one."""
    import importlib.util

    peers = []
    for variant in variants:
        if variant.kind != "export":
            continue
        if export_layout == "folded" and importlib.util.find_spec("onnxruntime_genai") is not None \
                and (variant.graph.parent / "genai_config.json").is_file():
            peers.append(Backend("genai", "folded", variant.precision, "cpu", variant.graph, variant.weights_read, P,
                                 variant.build_s))
        if importlib.util.find_spec("openvino") is not None:
            peers.append(Backend("openvino", export_layout, variant.precision, "cpu", variant.graph,
                                 variant.weights_read, P, variant.build_s,
                                 prefix if export_layout == "cache" else None))
    return peers


def torch_compile_matches(rows) -> dict | None:
    """Greedy tokens of row 0 from torch.compile vs eager on the same device and config: the same model, so
    they should be equal."""
    out = {}
    for row in (r for r in rows if r["kind"] == "torch_compile"):
        eager = next((r for r in rows if r["kind"] == "eager" and r["provider"] == row["provider"]
                      and (r["batch"], r["context"]) == (row["batch"], row["context"])), None)
        if eager is not None:
            a, b = row["tokens_row0"], eager["tokens_row0"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            out[f"{row['backend']} B={row['batch']} C={row['context']}"] = f"{same}/{len(a)} leading tokens equal"
    return out or None


def _short_error(exc: Exception) -> str:
    """The line of a runtime's error that says what failed (OpenVINO's run to pages)."""
    text = str(exc)
    for marker in ("No conversion rule", "Failed operations detailed log:", "Unsupported"):
        if marker in text:
            return " ".join(text[text.index(marker):].split())[:300]
    return " ".join(text.split())[:300]


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


def _spec_from_graph(graph: Path):
    """Without the model: the KV facts the floor needs, from the graph's inputs (learned positions unknown)."""
    from ..runtime.decoder import OnnxDecoder
    from ..runtime.sessions import create_session
    from ..source.architectures import ArchSpec

    decoder = OnnxDecoder(create_session(graph, "cpu"))
    return ArchSpec("unknown", decoder.num_layers, decoder.num_kv_heads, decoder.num_kv_heads, decoder.head_dim,
                    decoder.num_kv_heads * decoder.head_dim, decoder.vocab_size or 0, "unknown", None)


def run_bench(out_dir: str | Path, *, model: str | None = None, prefix: str | Path | None = None,
              export_dir: str | Path | None = None, settings: BenchSettings | None = None,
              progress: bool = True) -> dict:
    """Build what is to be compared, measure every backend on the same prompts, write bench.json + bench.png.

    Give `model` + `prefix` (the export is made here, timed), or `export_dir` (an existing export
    folder; its report names the model and prefix for the eager and base backends).
    """
    from .. import __version__
    from ..api import library_versions, load_prefix_model
    from ..errors import InputError
    from ..folder import ExportFolder

    check_extras()
    settings = settings or BenchSettings()
    out_dir = Path(out_dir)
    threads = settings.threads or os.cpu_count() or 1
    started = time.perf_counter()
    result = {"tool": "prefix-export bench", "version": __version__, "created_unix": int(time.time()),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()},
              "machine": machine_info(), "versions": library_versions(), "load_average_before": load_average(),
              "threads": threads, "notes": []}
    report = ExportFolder.open(export_dir).read_report() if export_dir is not None else {}  # an existing export's
    if export_dir is not None:
        model = model or report.get("inputs", {}).get("model")
        prefix = prefix or report.get("inputs", {}).get("prefix")
    if model is None or prefix is None or prefix == "<in-memory>":
        if export_dir is None:
            raise InputError("bench needs --model and --prefix, or an export folder.")
        result["notes"].append("model/prefix unknown: eager and base backends skipped")
    out_dir.mkdir(parents=True, exist_ok=True)
    n_configs = len(settings.batch_sizes) * len(settings.contexts)
    n_graph_variants = (1 + int(settings.optimize) + len(set(settings.precisions) - {"fp32"})
                        + 2 * int(settings.kv_buffer_shared)) * (1 + int(settings.base))
    n_torch = int(settings.eager) + int(settings.torch_compile)
    bar = _Bar(4 + n_graph_variants + settings.rounds * n_configs * (n_graph_variants * len(settings.providers)
                                                                     + n_torch),
               progress)
    try:
        bandwidth = measure_bandwidth(settings.bandwidth_mb, settings.bandwidth_passes, threads)
        result["bandwidth"] = bandwidth
        bar(f"bandwidth {bandwidth['gb_per_s']:.1f} GB/s")
        gpu_bandwidth = None
        if any(p.lower() not in ("cpu", "cpuexecutionprovider") for p in settings.providers):
            gpu_bandwidth = measure_gpu_bandwidth(settings.bandwidth_mb)
            result["gpu_bandwidth"] = gpu_bandwidth

        source = None
        if model is not None and prefix is not None and prefix != "<in-memory>":
            source = load_prefix_model(str(model), prefix)  # loaded once, for every export and validation
        peft_model = source.peft_model if source is not None else None
        bar("loaded model")

        workdir = out_dir / "graphs"
        workdir.mkdir(exist_ok=True)
        variants, export_folder, folders = export_variants(source, Path(export_dir) if export_dir else None,
                                                           workdir, settings, bar)
        export_layout = export_folder.layout
        P = export_folder.num_virtual_tokens
        spec = source.base.spec if source is not None else _spec_from_graph(export_folder.graph)
        # The cache layout feeds the export's own prefix file to the base graphs (and their fused / int8
        # versions); validated against PEFT like an export.
        prefix_file = export_folder.prefix_file if export_folder.prefix_file.is_file() else None
        if source is not None:  # what --optimize / --precision ship, through the compile path
            compiled, failed = compiled_variants([v for v in variants if v.kind in folders], folders, workdir,
                                                 settings, source, bar)
            variants += compiled
            result["failed_variants"] = failed
        elif settings.optimize or settings.precisions != ("fp32",):
            result["notes"].append("model/prefix unknown: compiled variants (which validate against PEFT) skipped")
        for variant in variants:
            variant.weights_read = weights_read_per_token(variant.graph)
        result["variants"] = [{"name": v.name, "graph": str(v.graph), "kind": v.kind, "precision": v.precision,
                               "build_s": round(v.build_s, 2), "weights_read_per_token": v.weights_read, **v.info}
                              for v in variants]

        prompts = {(b, c): np.random.default_rng([settings.seed, b, c]).integers(0, spec.vocab_size, (b, c),
                                                                                  dtype=np.int64)
                   for b in settings.batch_sizes for c in settings.contexts}
        backends = _backends(variants, settings, peft_model, P, prefix_file, export_layout, gpu_bandwidth is not None)
        result["backends"] = [{**b.key(), "graph": str(b.graph) if b.graph else None} for b in backends]
        # eager's and torch.compile's weights were loaded before their measurement started: add them.
        model_mb = sum(p.numel() * p.element_size() for p in source.base.model.parameters()) / 1024**2 \
            if source is not None else 0.0
        configs = [(b, c) for (b, c) in prompts
                   if spec.positions != "learned"
                   or c + settings.new_tokens + settings.warmup_tokens + P <= spec.max_positions]
        skipped = sorted(set(prompts) - set(configs))
        if skipped:
            result["notes"].append(f"configs {skipped} skipped: P + context + new tokens exceed the model's positions")
        if bar.bar is not None:  # the real count of measurements, now that the backends are known
            bar.bar.total = bar.bar.n + (settings.rounds * len(configs) + 1) * len(backends)
            bar.bar.refresh()
        # Every backend is created first (its memory: RSS growth over creation and one short run at
        # the smallest config; torch.compile runs every config, compiling each shape before any timing).
        # Then, per round and per config, every backend runs in turn, so that backends compared on one
        # config are measured seconds apart, not minutes, on a machine whose speed drifts; odd rounds run
        # the backends in reverse order. One backend at a time: ONNX Runtime's spinning worker threads
        # make sessions run step-by-step in alternation about 2x slower.
        live, memory_mb, samples, session_s = {}, {}, {}, {}
        smallest = min(configs, key=lambda c: c[0] * c[1])
        max_new_tokens = max(settings.new_tokens, settings.warmup_tokens) + 1  # the most a run asks for
        for b in list(backends):
            gc.collect()
            with PeakMemory() as memory:
                try:
                    live[b.name] = b.open(peft_model, threads, max_new_tokens)
                    for config in (configs if b.kind == "torch_compile" else [smallest]):
                        time_generation(live[b.name], prompts[config], settings.warmup_tokens, 0)
                except Exception as exc:  # noqa: BLE001 - a peer (or torch.compile) that cannot run it is a finding
                    if b.kind not in FALLIBLE and not b.cuda_graph:  # a capture that fails is a finding too
                        raise
                    backends.remove(b)
                    failed = live.pop(b.name, None)
                    if failed is not None:
                        failed.close()
                    error = f"{type(exc).__name__}: {_short_error(exc)}"
                    if b.kind in PEERS:
                        result.setdefault("peers_failed", []).append(
                            {"backend": b.name, "graph": str(b.graph), "error": error})
                    else:
                        result.setdefault("backends_failed", []).append({**b.key(), "error": error})
                        log.warning("%s cannot run: %s", b.name, error)
                    bar(f"{b.name} cannot run it")
                    continue
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
                floor_bytes = b.weights + kv_bytes(spec, batch, b.prefix_length + mid)  # KV stays fp32
                # A GPU row's floor is the GPU's bandwidth; unknown (no CUDA in torch) leaves it empty.
                ceiling = bandwidth if b.provider in ("cpu", "torch:cpu") else gpu_bandwidth
                floor_ms = floor_bytes / (ceiling["gb_per_s"] * 1e9) * 1e3 if ceiling else None
                rows.append({**b.key(), "batch": batch, "context": context,
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
                             "memory_mb": round(memory_mb[b.name][1]
                                                + (model_mb if b.kind in ("eager", "torch_compile") else 0), 1)})
        if any(r["floor_ms"] is None for r in rows):
            result["notes"].append("no GPU bandwidth (PyTorch without CUDA here): GPU rows have no floor")
        result["rows"] = rows
        result["optimize_decision"] = optimize_decision(rows, settings.optimize)
        reduced = [p for p in settings.precisions if p in ("int8", "int4")]
        if settings.agreement_model is not None and reduced:
            result["agreement_embedded"] = embedded_agreement(Path(settings.agreement_model), workdir, reduced,
                                                              settings.optimize)
            bar("agreement on the embedded model")
        result["eager_matches_export"] = eager_matches(rows)
        result["torch_compile_matches_eager"] = torch_compile_matches(rows)
        result["peers_match_export"] = peers_match(rows)
        result["targets"] = evaluate_targets(result, settings.targets)
        result["timeline_s"] = bar.timeline
        result["load_average_after"] = load_average()
        result["total_s"] = round(time.perf_counter() - started, 1)
    finally:
        bar.close()
    (out_dir / BENCH_JSON).write_text(json.dumps(result, indent=2))
    write_plot(result, out_dir / BENCH_PNG)
    result["files"] = {"json": str(out_dir / BENCH_JSON), "plot": str(out_dir / BENCH_PNG)}
    return result
