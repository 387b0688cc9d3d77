"""One-call GPU check: ORT providers, CUDA/TensorRT against CPU and PEFT, and a latency table.

Run it where a GPU is lent, in ONE device call of a few minutes (tools/gpu_check.sh sets the paths):

    bash tools/gpu_check.sh                       # default model + gpt2-small, every GPU provider found
    bash tools/gpu_check.sh --providers cpu       # the CPU-only path (what can be tried without a GPU)
    bash tools/gpu_check.sh --bench               # then `bench --provider cuda` on gpt2-small (~2 min more)
    bash tools/gpu_check.sh --models '' --bench   # the bench alone

What it does:
  1. lists ONNX Runtime's providers; if CUDAExecutionProvider is missing, installs an onnxruntime-gpu
     wheel from `.whl/` (whole, or in parts, see below) into /tmp/ort-gpu and re-runs itself with it
     first on PYTHONPATH (the machine's own onnxruntime is left alone);
  2. exports, with the package, the embedded default model (models/default/base + models/default/prefix)
     and a GPT-2-small-shaped random model with a random P=20 prefix, in both layouts (validated
     against PEFT on the CPU, as every export is);
  3. per model, layout and provider (cpu, cuda, tensorrt when installed; TensorRT on the cache layout
     only, whose past is never zero-length): max |logits - CPU logits| at prefill, greedy tokens equal
     to the CPU's and to PEFT's forward (PyTorch), prefill ms and ms/token at batch 1 and 4;
  4. prints the table and writes gpu_check.json (into $OUT when set, else --json);
  5. with --bench: `prefix-export bench` with the GPU providers (eager PyTorch on the GPU too, the
     cache layout beside the folded one), bench.json/.png/.txt beside gpu_check.json;
  6. the decode-path table (tools/gpu_decode.py; on by default where CUDA runs, --no-decode-paths to
     skip): fused fp32, shared-KV-buffer fp32 and fp16 graphs, both layouts and the base, with and
     without CUDA graphs, PyTorch eager and torch.compile(reduce-overhead), fp16 tokens against fp32's
     with the margin where they part, `generate` against the lean loop; gpu_decode.json.
Run on an H100 on 2026-11-26 (README, "Checked on a GPU"): twice 4 device calls (3 wheel parts, then
the run), 6.6 minutes of device time together; `--bench` took 174 s, `--models '' --bench` 108 s.

The wheel, carried in parts (a device call carries at most 64 MiB; the machine keeps /tmp while warm):
    here, once:  pip download onnxruntime-gpu==1.31.1 --no-deps --only-binary=:all: \
                     --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl/
                 split -b 60m .whl/onnxruntime_gpu-*.whl .whl/parts/$(basename .whl/onnxruntime_gpu-*.whl).part-
                 (the 256 MB wheel of 1.31.1 makes 5 parts; each call also carries the repository, about
                 3.2 MiB on 2026-12-02, so 60 MiB parts stay under the 64 MiB limit while it stays under 4 MiB)
    then one device call per part but the last, back to back (a machine idle for 30 s is given back,
    /tmp with it), each with carry [".whl/parts/NAME.part-aX"]:
                 bash tools/gpu_check.sh --stash-only
    and the last part with the check itself:  bash tools/gpu_check.sh [--bench]
onnxruntime-gpu 1.31.1 on PyPI is built for CUDA 13 (its build info says so), which matches the image.
The device image has CUDA 13 libraries (through PyTorch's nvidia-* packages); the CUDA provider of a
wheel built for another CUDA major fails to load there, which this script reports (it does not hide
it behind a CPU fallback).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STASH = Path("/tmp/prefix-export-whl")
ORT_TARGET = Path("/tmp/ort-gpu")
REEXEC_FLAG = "PREFIX_EXPORT_GPU_CHECK_REEXEC"


# ---- 1. onnxruntime-gpu ------------------------------------------------------------------------


def stash_parts(sources=(ROOT / ".whl",), stash: Path = STASH) -> list[Path]:
    """Copy carried wheel parts (and whole wheels) into /tmp, where they outlive this call."""
    stash.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in sources:
        for path in sorted(glob.glob(str(Path(source) / "**" / "onnxruntime_gpu-*"), recursive=True)):
            target = stash / Path(path).name
            if not target.exists():
                shutil.copyfile(path, target)
                copied.append(target)
    return copied


def assemble_wheel(stash: Path = STASH) -> Path | None:
    """A whole onnxruntime_gpu wheel from the stash: as is, or its `.part-aa`, `.part-ab`, ... joined."""
    wheels = sorted(stash.glob("onnxruntime_gpu-*.whl"))
    if wheels:
        return wheels[-1]
    parts = sorted(stash.glob("onnxruntime_gpu-*.whl.part-*"))
    if not parts:
        return None
    names = {p.name.rsplit(".part-", 1)[0] for p in parts}
    if len(names) != 1:
        raise SystemExit(f"wheel parts of several wheels in {stash}: {sorted(names)}; keep one")
    wheel = stash / names.pop()
    with open(wheel, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    import zipfile

    if not zipfile.is_zipfile(wheel):
        wheel.unlink()
        raise SystemExit(f"the parts in {stash} ({[p.name for p in parts]}) do not make a whole wheel; a part is "
                         "missing (carry each part once with --stash-only, the last with the check)")
    return wheel


def ensure_gpu_ort(skip_install: bool) -> None:
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}: providers {ort.get_available_providers()}")
    if "CUDAExecutionProvider" in ort.get_available_providers() or skip_install or os.environ.get(REEXEC_FLAG):
        return
    stash_parts()
    wheel = assemble_wheel()
    if wheel is None:
        print("CUDAExecutionProvider is not installed and no onnxruntime-gpu wheel is in .whl/ or "
              f"{STASH}: GPU rows will be skipped (see --help for carrying the wheel)")
        return
    print(f"installing {wheel.name} into {ORT_TARGET}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                    "--target", str(ORT_TARGET), str(wheel)], check=True)
    env = dict(os.environ, **{REEXEC_FLAG: "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(ORT_TARGET), str(ROOT), env.get("PYTHONPATH", "")])
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def preload_cuda() -> None:
    """Load the CUDA/cuDNN libraries PyTorch ships before ORT looks for them."""
    try:
        import torch  # noqa: F401 - its import loads libcudart/libcublas/libcudnn

        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        print(f"preloading CUDA libraries: {type(exc).__name__}: {exc}")


# ---- 2. models ---------------------------------------------------------------------------------


def prepare_models(work: Path, which: list[str]) -> dict[str, tuple[Path, Path]]:
    """name -> (base model folder, PEFT prefix folder)."""
    models = {}
    if "default" in which:
        base, prefix = ROOT / "models/default/base", ROOT / "models/default/prefix"
        if (base / "config.json").is_file() and prefix.exists():
            models["default"] = (base, prefix)
        else:
            print(f"models/default is not there yet ({base}, {prefix}); skipping it")
    if "gpt2-small" in which:
        from loop_overhead import build_model

        models["gpt2-small"] = build_model(work, 20)
    if "tiny" in which:
        from tiny_models import make_prefix, save_tiny_model, tiny_config

        base, prefix = work / "tiny", work / "tiny-prefix"
        if not (base / "config.json").is_file():
            save_tiny_model(tiny_config("gpt2", initializer_range=0.3), base, seed=1)
            make_prefix(base, prefix, 4, projection=True, trained=True)
        models["tiny"] = (base, prefix)
    return models


def export_layouts(work: Path, name: str, base: Path, prefix: Path) -> dict[str, dict]:
    from prefix_export.api import export_prefix_model
    from prefix_export.folder import ExportFolder

    exports = {}
    for layout in ("folded", "cache"):
        out = work / f"{name}-{layout}"
        if not (out / "export_report.json").is_file():
            t0 = time.perf_counter()
            export_prefix_model(str(base), prefix, out, layout=layout, progress=False, force=True)
            print(f"{name}: exported {layout} in {time.perf_counter() - t0:.0f}s (validated against PEFT on CPU)")
        report = ExportFolder.open(out).read_report()
        exports[layout] = {"folder": out, "validation_passed": report["validation"]["passed"]}
    return exports


# ---- 3. checks ---------------------------------------------------------------------------------


def first_logits(engine, prompt: np.ndarray) -> np.ndarray:
    """Prefill logits of the last position (1, V), through the engine's own KV path."""
    from prefix_export.runtime.loop import BoundKV, HostKV

    past, prefix_mask, prefix_lengths = engine.decoder.first_past(1)
    ids = prompt[None]
    mask = np.concatenate([prefix_mask, np.ones_like(ids)], axis=1)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None] + prefix_lengths[:, None]
    kv = (BoundKV if engine.io_binding else HostKV)(engine.decoder, past, 1, mask.shape[1], engine.device,
                                                    engine.device_id)
    return np.array(kv.step(ids, mask, positions)[:, -1], dtype=np.float32)


def peft_tokens(base: Path, prefix: Path, prompt: np.ndarray, steps: int) -> list[int]:
    from prefix_export.source.base_model import load_base_model
    from prefix_export.source.checkpoint import load_prefix_checkpoint
    from prefix_export.source.prefix_kv import build_peft_model
    from prefix_export.validate.reference import reference_greedy

    model = build_peft_model(load_base_model(str(base)), load_prefix_checkpoint(prefix))
    return reference_greedy(model, prompt, steps).tolist()


def timed(fn, repeats: int) -> float:
    values = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        values.append(time.perf_counter() - t0)
    return statistics.median(values)


def check_one(folder: Path, provider: str, prompt: np.ndarray, cpu: dict | None, reference: list[int],
              args) -> tuple[dict, dict]:
    from prefix_export.runtime.loop import GenerationConfig
    from prefix_export.runtime.generate import ExportRunner
    from prefix_export.runtime.sessions import SessionSettings

    row = {"provider": provider}
    t0 = time.perf_counter()
    settings = SessionSettings(provider=provider, max_batch=max(args.batches),
                               max_total_length=min(args.max_length, 10_000))
    runner = ExportRunner(folder, settings)
    engine = runner.engine
    row.update(provider_used=runner.provider, io_binding=engine.io_binding)
    greedy = GenerationConfig(max_new_tokens=args.tokens)
    tokens = engine.generate(prompt[None], None, greedy)[0].tolist()  # also builds TensorRT engines
    row["first_run_s"] = round(time.perf_counter() - t0, 2)
    logits = first_logits(engine, prompt)
    row["tokens_equal_peft"] = f"{sum(a == b for a, b in zip(tokens, reference))}/{len(reference)}"
    if cpu is not None:
        row["max_abs_logits_vs_cpu"] = float(np.abs(logits - cpu["logits"]).max())
        row["tokens_equal_cpu"] = f"{sum(a == b for a, b in zip(tokens, cpu['tokens']))}/{len(tokens)}"
    one = GenerationConfig(max_new_tokens=1)
    row["prefill_ms"] = round(timed(lambda: engine.generate(prompt[None], None, one), args.repeats) * 1e3, 2)
    for batch in args.batches:
        ids = np.repeat(prompt[None], batch, axis=0)
        seconds = timed(lambda: engine.generate(ids, None, greedy), args.repeats)
        row[f"ms_per_token_b{batch}"] = round(seconds / args.tokens * 1e3, 2)
    return row, {"logits": logits, "tokens": tokens}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="default,gpt2-small", help="comma list of default, gpt2-small, tiny")
    parser.add_argument("--providers", default="cpu,cuda,tensorrt", help="those not installed are skipped")
    parser.add_argument("--work", default="/tmp/prefix-export-gpu-check")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=256, help="TensorRT profile: longest P + prompt + new")
    parser.add_argument("--skip-install", action="store_true", help="never install onnxruntime-gpu")
    parser.add_argument("--stash-only", action="store_true", help="copy carried wheel parts to /tmp and exit")
    parser.add_argument("--json", help="result file (default $OUT/gpu_check.json, else WORK/gpu_check.json)")
    parser.add_argument("--bench", action="store_true",
                        help="then `prefix-export bench` on the gpt2-small model with the GPU providers (eager "
                             "PyTorch on the GPU too); bench.json/bench.png/bench.txt beside gpu_check.json")
    parser.add_argument("--bench-contexts", default="32,128,512")
    parser.add_argument("--bench-model", default="gpt2-small", help="default, gpt2-small or tiny")
    parser.add_argument("--no-decode-paths", action="store_true",
                        help="skip the decode-path table (tools/gpu_decode.py), run by default where CUDA is")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.stash_only:
        copied = stash_parts()
        print(f"stashed {[p.name for p in copied]}; {STASH} holds {sorted(p.name for p in STASH.iterdir())}")
        return 0
    ensure_gpu_ort(args.skip_install)
    wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
    if any(p != "cpu" for p in wanted):
        preload_cuda()
    import onnxruntime as ort

    from prefix_export.errors import RuntimeSetupError
    from prefix_export.runtime.providers import ALIASES, ort_package

    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__} ({ort_package()}), device {ort.get_device()}, providers {available}")
    providers = [p for p in wanted if ALIASES.get(p, p) in available]
    skipped = [p for p in wanted if p not in providers]
    if skipped:
        print(f"not installed, skipped: {skipped}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, failures = [], []
    for name, (base, prefix) in prepare_models(work, args.models.split(",")).items():
        exports = export_layouts(work, name, base, prefix)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(base)).vocab_size
        prompt = rng.integers(0, vocab, size=args.prompt_length, dtype=np.int64)
        reference = peft_tokens(base, prefix, prompt, args.tokens)
        for layout, info in exports.items():
            cpu = None
            for provider in ["cpu"] + [p for p in providers if p != "cpu"]:
                if provider in ("tensorrt", "trt") and layout == "folded":
                    continue  # zero-length first past: TensorRT runs the cache layout
                try:
                    row, outputs = check_one(info["folder"], provider, prompt, cpu, reference, args)
                except RuntimeSetupError as exc:  # the provider's libraries did not load: unavailable here
                    row, outputs = {"provider": provider, "unavailable": str(exc)[:400]}, None
                except Exception as exc:  # noqa: BLE001 - a failed provider is a row, not the end of the check
                    row, outputs = {"provider": provider, "error": f"{type(exc).__name__}: {exc}"[:400]}, None
                    failures.append(f"{name}/{layout}/{provider}: {row['error']}")
                if provider == "cpu":
                    cpu = outputs
                row.update(model=name, layout=layout, export_validated=info["validation_passed"])
                rows.append(row)
                print(json.dumps(row))
    print_table(rows, args)
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version()},
              "onnxruntime": ort.__version__, "package": ort_package(), "providers_available": available,
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows,
              "failures": failures}
    try:
        import torch

        if torch.cuda.is_available():
            result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    path = Path(args.json) if args.json else Path(os.environ.get("OUT") or work) / "gpu_check.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    if "cuda" in providers and not args.no_decode_paths:
        import gpu_decode

        try:
            gpu_decode.main(["--models", args.models, "--provider", "cuda", "--work", str(work),
                             "--tokens", str(args.tokens), "--json", str(path.parent / "gpu_decode.json")])
        except Exception as exc:  # noqa: BLE001 - the check's results are already written
            print(f"decode paths failed: {type(exc).__name__}: {exc}")
            failures.append(f"decode paths: {type(exc).__name__}: {exc}"[:400])
    if args.bench:
        run_gpu_bench(work, path.parent, [p for p in providers if p != "cpu"] or ["cpu"], args)
    mismatched = [r for r in rows if "tokens_equal_peft" in r
                  and r["tokens_equal_peft"].split("/")[0] != r["tokens_equal_peft"].split("/")[1]]
    return 1 if failures or mismatched else 0


def run_gpu_bench(work: Path, out: Path, providers: list[str], args) -> None:
    """`prefix-export bench` on --bench-model with the GPU providers (and eager PyTorch on the GPU)."""
    from prefix_export.bench.report import format_table
    from prefix_export.bench.run import BenchSettings, run_bench

    base, prefix = prepare_models(work, [args.bench_model])[args.bench_model]
    providers = [p for p in providers if p not in ("tensorrt", "trt")] or ["cpu"]  # folded graph: no TensorRT
    settings = BenchSettings(batch_sizes=tuple(args.batches),
                             contexts=tuple(int(c) for c in args.bench_contexts.split(",")),
                             providers=tuple(providers), optimize=True, kv_buffer_shared=True,
                             cuda_graph="cuda" in providers, torch_compile=True)
    t0 = time.perf_counter()
    try:
        result = run_bench(work / "bench", model=str(base), prefix=str(prefix), settings=settings, progress=False)
    except Exception as exc:  # noqa: BLE001 - the check's results are already written
        print(f"bench failed: {type(exc).__name__}: {exc}")
        return
    table = format_table(result)
    print(table)
    print(f"bench took {time.perf_counter() - t0:.0f}s")
    (out / "bench.txt").write_text(table + "\n")
    for name in ("bench.json", "bench.png"):
        shutil.copyfile(work / "bench" / name, out / name)


def print_table(rows: list[dict], args) -> None:
    columns = ["model", "layout", "provider", "io_binding", "max_abs_logits_vs_cpu", "tokens_equal_cpu",
               "tokens_equal_peft", "prefill_ms", *[f"ms_per_token_b{b}" for b in args.batches], "first_run_s"]
    print()
    print("  ".join(f"{c:>12}" if i > 2 else f"{c:<10}" for i, c in enumerate(columns)))
    for row in rows:
        if "error" in row or "unavailable" in row:
            label = "ERROR" if "error" in row else "UNAVAILABLE"
            print(f"{row['model']:<10}  {row['layout']:<10}  {row['provider']:<10}  {label} "
                  f"{row.get('error', row.get('unavailable'))[:150]}")
            continue
        cells = []
        for i, c in enumerate(columns):
            value = row.get(c, "")
            if isinstance(value, float) and c.startswith("max_abs"):
                value = f"{value:.2e}"
            cells.append(f"{value!s:>12}" if i > 2 else f"{value!s:<10}")
        print("  ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
