"""Export + validate the gpt2-small architecture (124M, random weights) and report time and memory.

A benchmark-style acceptance check, not a test: it takes a minute or two on a laptop CPU.
    python tools/check_gpt2_small.py [--prefix-length 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix-length", type=int, default=20)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--keep", help="keep the model, prefix and export under this folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import GPT2Config

    from prefix_export.api import export_prefix_model, peak_memory_mb
    from tiny_models import make_prefix, save_tiny_model

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpt2-small-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = save_tiny_model(GPT2Config(), work / "model")  # GPT2Config() defaults = gpt2-small, 124M
    params = sum(p.numel() for p in model.parameters())
    del model
    prefix = make_prefix(work / "model", work / "prefix", args.prefix_length, projection=True, trained=False)
    setup_s = time.perf_counter() - t0
    result = export_prefix_model(str(work / "model"), prefix, work / "out", force=True, progress=True)
    report = result.report
    figures = {
        "machine": report["machine"], "versions": report["versions"], "parameters": params,
        "prefix_length": args.prefix_length, "setup_s": round(setup_s, 1),
        "export_s": report["timing_s"]["export"], "validation_s": report["timing_s"]["validation"],
        "total_s": report["timing_s"]["total"], "peak_memory_mb": round(peak_memory_mb(), 1),
        "graph_mb": round(sum(p.stat().st_size for p in result.folder.glob("model.onnx*")) / 1e6, 1),
        "validation_passed": result.validation.passed,
        "summary": report["validation"]["summary"],
    }
    print(result.validation.table())
    print(json.dumps({k: v for k, v in figures.items() if k not in ("summary", "versions")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if result.validation.passed else 1


if __name__ == "__main__":
    sys.exit(main())
