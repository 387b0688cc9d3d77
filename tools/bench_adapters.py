"""What a swappable prefix costs: one folded export plain and with --swappable-prefix, timed in one run.

    python tools/bench_adapters.py                       # gpt2-small shape, P=20, B=1, 32-token prompt
    python tools/bench_adapters.py --json out.json --rounds 5

Builds a random-weight gpt2-small-shaped model (124M) and two random P=20 prefix-tuning tasks, exports
task A twice (plain; --swappable-prefix), writes task B's adapter file, then measures, round-robin
over `--rounds` rounds in this one process:
  - session creation (ms), each graph;
  - prefill and decode ms/step (B=1, 32-token prompt, 64 new tokens, greedy) for the plain graph,
    the swappable graph with its own prefix, and the swappable graph with task B's adapter active;
  - graph and adapter sizes.
Decode figures are medians over rounds of per-run medians. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(work: Path, layers: int, prefix_length: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_models import make_prefix

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    GPT2LMHeadModel(config).eval().save_pretrained(work / "model")
    return {name: make_prefix(work / "model", work / name, prefix_length, projection=False, trained=False, seed=seed)
            for name, seed in (("A", 0), ("B", 1))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prefix-length", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--keep", help="work folder to keep (default: temporary)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from prefix_export.adapters import make_adapter
    from prefix_export.api import export_prefix_model
    from prefix_export.bench.backends import time_generation
    from prefix_export.folder import ExportFolder
    from prefix_export.runtime.adapters import ActiveAdapter
    from prefix_export.runtime.decoder import OnnxDecoder
    from prefix_export.runtime.loop import Engine
    from prefix_export.runtime.sessions import create_session

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tasks = build(work, args.layers, args.prefix_length)
        exports = {}
        for name, swappable in (("plain", False), ("swappable", True)):
            started = time.perf_counter()
            export_prefix_model(str(work / "model"), tasks["A"], work / name, progress=False, force=True,
                                swappable_prefix=swappable, greedy_tokens=8)
            exports[name] = {"graph": work / name / "model.onnx", "export_s": round(time.perf_counter() - started, 1)}
        adapter = make_adapter(work / "swappable", tasks["B"], work / "B.onnx_adapter", greedy_tokens=8)
        prompt = np.random.default_rng(0).integers(0, 50257, size=(1, args.prompt), dtype=np.int64)

        class Timed:  # what time_generation drives: a stepper factory over one engine
            def __init__(self, engine):
                self.engine = engine

            def stepper(self, input_ids, max_new_tokens):
                return self.engine.stepper(input_ids, None, max_new_tokens)

        rows = {name: {"session_ms": [], "prefill_ms": [], "decode_p50_ms": []}
                for name in ("plain", "swappable (own prefix)", "swappable + adapter B")}
        tokens = {}
        for _ in range(args.rounds):
            for name in rows:
                graph = exports["plain" if name == "plain" else "swappable"]["graph"]
                started = time.perf_counter()
                session = create_session(graph)
                rows[name]["session_ms"].append((time.perf_counter() - started) * 1e3)
                decoder = OnnxDecoder(session)
                if name.endswith("adapter B"):
                    decoder.adapter = ActiveAdapter(work / "B.onnx_adapter")
                timing = time_generation(Timed(Engine(decoder)), prompt, args.new_tokens, warmup_tokens=4)
                rows[name]["prefill_ms"].append(timing["prefill_ms"])
                rows[name]["decode_p50_ms"].append(timing["decode_p50_ms"])
                tokens[name] = timing["tokens_row0"]
        summary = {name: {key: round(statistics.median(values), 3) for key, values in row.items()}
                   for name, row in rows.items()}
        base = summary["plain"]["decode_p50_ms"]
        for row in summary.values():
            row["decode_vs_plain"] = round(row["decode_p50_ms"] / base, 3)
        result = {"machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
                  "shape": {"layers": args.layers, "hidden": 768, "P": args.prefix_length, "batch": 1,
                            "prompt": args.prompt, "new_tokens": args.new_tokens, "rounds": args.rounds},
                  "sizes": {"graph_plain_bytes": ExportFolder.open(work / "plain").graph_bytes(),
                            "graph_swappable_bytes": ExportFolder.open(work / "swappable").graph_bytes(),
                            "adapter_bytes": adapter.report["adapter"]["bytes"]},
                  "adapter_validation_passed": adapter.validation.passed,
                  "tokens_equal_plain_vs_swappable": tokens["plain"] == tokens["swappable (own prefix)"],
                  "tokens_differ_with_adapter": tokens["plain"] != tokens["swappable + adapter B"],
                  "rows": summary, "raw": rows}
        print(f"{'graph':<26} {'session ms':>10} {'prefill ms':>10} {'decode ms/step':>14} {'vs plain':>8}")
        for name, row in summary.items():
            print(f"{name:<26} {row['session_ms']:>10.1f} {row['prefill_ms']:>10.2f} {row['decode_p50_ms']:>14.3f} "
                  f"{row['decode_vs_plain']:>8.3f}")
        sizes = result["sizes"]
        print(f"graph (with its external data) {sizes['graph_plain_bytes'] / 1e6:.1f} MB plain, {sizes['graph_swappable_bytes'] / 1e6:.1f} MB "
              f"swappable; adapter {sizes['adapter_bytes'] / 1e6:.2f} MB "
              f"({sizes['adapter_bytes'] / sizes['graph_swappable_bytes']:.2%} of the graph); adapter validation "
              f"{'PASSED' if result['adapter_validation_passed'] else 'FAILED'}; own-prefix tokens equal to plain: "
              f"{result['tokens_equal_plain_vs_swappable']}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
