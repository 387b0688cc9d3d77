"""The decode-path table of the GPU issue: fp16, the shared KV buffer and CUDA graphs against PyTorch.

Called by tools/gpu_check.py (`--decode-paths`, on by default where CUDA is) or alone:

    PYTHONPATH=.:tools python tools/gpu_decode.py --models gpt2-small,default --provider cuda
    PYTHONPATH=.:tools python tools/gpu_decode.py --models tiny --provider cpu     # the dry run here

Per model (gpt2-small shape with a random P=20 prefix; the embedded default), from its plain exports
(both layouts, validated against PEFT on the CPU when exported), builds with the library's compile pass
(compile_graph; on the device the CUDA tokens are the check, so the CPU validation is not repeated):

    fused fp32          --optimize (the cache grows by concatenation)
    shared fp32 / fp16  --optimize --kv-buffer shared [--precision fp16]

and measures at batch 1, a --prompt-length prompt, --tokens new tokens:

    decode ms/step (p50, bench's time_generation: warm-up, then timed steps) of each graph, folded and
      cache layout, and the base model (the cache-layout graph without a prefix), shared graphs with
      and without CUDA graphs; PyTorch eager and torch.compile(mode="reduce-overhead") on the PEFT model;
    greedy tokens against PEFT's forward (32), and fp16's against fp32's with the margin (fp32's top-1
      minus top-2 logit) where they first part;
    `generate` (ExportRunner.generate, what the CLI runs) ms/token against the lean loop's ms/step.

Writes gpu_decode.json and prints the table and the issue's targets.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

VARIANTS = {  # name -> CompileOptions keyword arguments
    "fused fp32": dict(optimize=True),
    "shared fp32": dict(optimize=True, kv_buffer="shared"),
    "shared fp16": dict(optimize=True, kv_buffer="shared", precision="fp16"),
}


def build_variant(plain: Path, target: Path, name: str) -> Path:
    """The compiled folder of `plain` for VARIANTS[name], written by the compile pass (no CPU validation)."""
    from prefix_export.compile.pipeline import CompileOptions, compile_graph, copy_side_files, rotary_table_length
    from prefix_export.compile.quantize import QuantizationSettings
    from prefix_export.folder import ExportFolder
    from prefix_export.source.architectures import describe
    from transformers import AutoConfig

    if (target / "export_report.json").is_file():
        return target
    kwargs = dict(VARIANTS[name])
    precision = kwargs.pop("precision", "fp32")
    options = CompileOptions(quantization=QuantizationSettings(precision=precision), **kwargs)
    source = ExportFolder.open(plain)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    copy_side_files(source, target, {source.graph_name, source.graph_name + ".data"})
    spec = describe(AutoConfig.from_pretrained(str(plain)))
    t0 = time.perf_counter()
    info, _ = compile_graph(source.graph, target / source.graph_name, spec, options,
                            rotary_table_length(source.config, source.num_virtual_tokens), target / ".compile",
                            source.num_virtual_tokens, source.layout)
    shutil.rmtree(target / ".compile", ignore_errors=True)
    report = source.read_report()
    report["compile"] = {**options.describe(), **info, "validated_on_device_only": True}
    (target / "export_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"  built {name} ({source.layout}) in {time.perf_counter() - t0:.0f}s")
    return target


class _Lean:
    """A bench-style backend over one session: `stepper(ids, n)` from the engine (the lean loop)."""

    def __init__(self, folder: Path, provider: str, cuda_graph: bool, with_prefix: bool = True):
        from prefix_export.folder import ExportFolder
        from prefix_export.runtime.decoder import make_decoder
        from prefix_export.runtime.loop import Engine
        from prefix_export.runtime.providers import cuda_options, device_of
        from prefix_export.runtime.sessions import create_session

        folder = ExportFolder.open(folder)
        options = {**cuda_options(), "enable_cuda_graph": "1"} if cuda_graph else None
        self.session = create_session(folder.graph, provider, options)
        prefix = folder.read_prefix() if folder.layout == "cache" and with_prefix else None
        self.engine = Engine(make_decoder(self.session, prefix), device_of(self.session.get_providers()[0]),
                             cuda_graph=cuda_graph)

    def stepper(self, input_ids: np.ndarray, max_new_tokens: int):
        return self.engine.stepper(input_ids, None, max_new_tokens)


def greedy_with_margins(engine, prompt: np.ndarray, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens from the logits (not the graph's argmax) and each step's top-1 minus top-2 logit."""
    stepper = engine.stepper(prompt[None], None, steps)
    tokens, margins, current = [], [], prompt[None]
    for _ in range(steps):
        logits = np.asarray(stepper.step(current)[0, -1], np.float32)
        top2 = np.partition(logits, -2)[-2:]
        tokens.append(int(logits.argmax()))
        margins.append(float(top2[1] - top2[0]))
        current = np.array([[tokens[-1]]], np.int64)
    return tokens, margins


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def time_generate(folder: Path, provider: str, cuda_graph: bool, prompt: np.ndarray, tokens: int,
                  repeats: int) -> float:
    """ms per new token of ExportRunner.generate (the CLI's path), prefill excluded: (t(N) - t(1)) / (N - 1)."""
    from prefix_export.runtime.generate import ExportRunner
    from prefix_export.runtime.loop import GenerationConfig
    from prefix_export.runtime.sessions import SessionSettings

    runner = ExportRunner(folder, SessionSettings(provider=provider, cuda_graph=cuda_graph))
    ids = [prompt.tolist()]

    def run(n):
        config = GenerationConfig(max_new_tokens=n)
        t0 = time.perf_counter()
        runner.generate(token_ids=ids, config=config)
        return time.perf_counter() - t0

    run(tokens)  # warm-up (and capture)
    many = statistics.median(run(tokens) for _ in range(repeats))
    one = statistics.median(run(1) for _ in range(repeats))
    return (many - one) / (tokens - 1) * 1e3


def measure_model(name: str, base: Path, prefix: Path, work: Path, args) -> list[dict]:
    from gpu_check import export_layouts, peft_tokens

    from prefix_export.bench.backends import EagerBackend, TorchCompileBackend, time_generation
    from prefix_export.source.base_model import load_base_model
    from prefix_export.source.checkpoint import load_prefix_checkpoint
    from prefix_export.source.prefix_kv import build_peft_model
    from transformers import AutoConfig

    rows = []
    exports = export_layouts(work, name, base, prefix)
    vocab = AutoConfig.from_pretrained(str(base)).vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, size=args.prompt_length, dtype=np.int64)
    reference = peft_tokens(base, prefix, prompt, args.tokens)
    device = "cuda" if args.provider == "cuda" else "cpu"
    ids = prompt[None]

    def timing(backend) -> dict:
        runs = [time_generation(backend, ids, args.tokens, 4) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["decode_p50_ms"])
        return {"decode_ms": best["decode_p50_ms"], "prefill_ms": best["prefill_ms"],
                "tokens": best["tokens_row0"][:args.tokens]}

    peft_model = build_peft_model(load_base_model(str(base)), load_prefix_checkpoint(prefix))
    for label, make in (("PyTorch eager", lambda: EagerBackend(peft_model, os.cpu_count() or 1, device)),
                        ("torch.compile reduce-overhead" if device == "cuda" else "torch.compile default",
                         lambda: TorchCompileBackend(peft_model, os.cpu_count() or 1, device, args.tokens + 5))):
        try:
            t0 = time.perf_counter()
            backend = make()
            row = {"model": name, "graph": label, "layout": "-", "cuda_graph": label.endswith("overhead"),
                   **timing(backend), "setup_s": round(time.perf_counter() - t0, 1)}
            backend.close()
        except Exception as exc:  # noqa: BLE001 - a row, not the end of the check
            row = {"model": name, "graph": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}))
    peft_model = None  # the GPU copies are closed; the CPU model is not needed any more

    fp32_tokens: dict[str, list[int]] = {}
    for variant in VARIANTS:
        for layout, info in exports.items():
            uncaptured = None  # this graph's export backend without CUDA graphs (the token comparison uses it)
            folder = build_variant(info["folder"], work / f"{name}-{layout}-{variant.replace(' ', '-')}", variant)
            graph_modes = [False, True] if variant.startswith("shared") and device == "cuda" else [False]
            runs = [("export", True)] + ([("base", False)] if layout == "cache" else [])
            for kind, with_prefix in runs:
                for captured in graph_modes:
                    row = {"model": name, "graph": variant, "layout": layout if kind == "export" else "base",
                           "cuda_graph": captured}
                    try:
                        lean = _Lean(folder, args.provider, captured, with_prefix)
                        if kind == "export" and not captured:
                            uncaptured = lean  # its session serves the token comparison below too
                        row.update(timing(lean))
                        if kind == "export":
                            row["tokens_equal_peft"] = f"{sum(a == b for a, b in zip(row['tokens'], reference))}/" \
                                                       f"{len(reference)}"
                            if captured == graph_modes[-1]:
                                row["generate_ms_per_token"] = round(time_generate(
                                    folder, args.provider, captured, prompt, args.tokens, args.repeats), 3)
                                row["generate_over_lean"] = round(row["generate_ms_per_token"] / row["decode_ms"], 3)
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "tokens"}))
            if uncaptured is None:
                continue  # its row holds the error
            if variant == "shared fp32":
                fp32_tokens[layout] = greedy_with_margins(uncaptured.engine, prompt, args.tokens)
            if variant == "shared fp16" and layout in fp32_tokens:  # fp16 against fp32, with fp32's margin where they first part
                tokens16, _ = greedy_with_margins(uncaptured.engine, prompt, args.tokens)
                tokens32, margins32 = fp32_tokens[layout]
                at = first_divergence(tokens16, tokens32)
                rows.append({"model": name, "graph": "fp16 vs fp32 (shared)", "layout": layout,
                             "tokens_equal": f"{at if at is not None else len(tokens32)}/{len(tokens32)} leading",
                             "first_divergence": at, "fp32_margin_there": None if at is None else
                             round(margins32[at], 4)})
                print(json.dumps(rows[-1]))
    return rows


def targets(rows: list[dict]) -> dict:
    """The issue's targets, from the rows of the gpt2-small model (else the first model)."""
    model = "gpt2-small" if any(r["model"] == "gpt2-small" for r in rows) else rows[0]["model"]
    ok = [r for r in rows if r["model"] == model and "decode_ms" in r]

    def pick(graph, layout, captured):
        return next((r["decode_ms"] for r in ok if (r["graph"], r["layout"], r["cuda_graph"]) == (graph, layout,
                                                                                                captured)), None)

    eager = next((r["decode_ms"] for r in ok if r["graph"] == "PyTorch eager"), None)
    captured = any(r["cuda_graph"] and r["graph"].startswith("shared") for r in ok)
    best = min((r for r in ok if r["graph"] == "shared fp16" and r["layout"] != "base"
                and r["cuda_graph"] == captured), key=lambda r: r["decode_ms"], default=None)
    out = {"model": model}
    if best:
        base = pick("shared fp16", "base", captured)
        out.update(best_layout=best["layout"], cuda_graph=captured, decode_ms=best["decode_ms"],
                   decode_ms_target=0.5, vs_eager=round(best["decode_ms"] / eager, 3) if eager else None,
                   vs_eager_target=0.11, prefix_cost=round(best["decode_ms"] / base, 3) if base else None,
                   prefix_cost_target=1.05)
    generate = [r["generate_over_lean"] for r in ok if "generate_over_lean" in r and r["graph"] == "shared fp16"]
    if generate:
        out.update(generate_over_lean=max(generate), generate_over_lean_target=1.10)
    return out


def print_table(rows: list[dict]) -> None:
    columns = ["model", "graph", "layout", "cuda_graph", "decode_ms", "prefill_ms", "tokens_equal_peft",
               "generate_ms_per_token", "generate_over_lean"]
    print("  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        if "error" in row:
            print(f"{row['model']:>14}  {row['graph']:>14}  ERROR {row['error'][:160]}")
        elif "tokens_equal" in row:
            print(f"{row['model']:>14}  {row['graph']:>14}  {row['layout']:>14}  {row['tokens_equal']} "
                  f"(fp32 margin at the first difference: {row['fp32_margin_there']})")
        else:
            print("  ".join(f"{row.get(c, '')!s:>14}" for c in columns))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="gpt2-small,default")
    parser.add_argument("--provider", default="cuda")
    parser.add_argument("--work", default="/tmp/prefix-export-gpu-check")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="result file (default $OUT/gpu_decode.json, else WORK/gpu_decode.json)")
    args = parser.parse_args(argv)
    from gpu_check import prepare_models

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (base, prefix) in prepare_models(work, args.models.split(",")).items():
        rows += measure_model(name, base, prefix, work, args)
    print_table(rows)
    summary = targets(rows)
    print("targets:", json.dumps(summary))
    path = Path(args.json) if args.json else Path(os.environ.get("OUT") or work) / "gpu_decode.json"
    path.write_text(json.dumps({"rows": rows, "targets": summary, "settings": vars(args)}, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
