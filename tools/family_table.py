"""Export every registered architecture's tiny model with a trained prefix; print a markdown table.

For the closing notes of architecture work: max logit error against PEFT (prefill and decode),
greedy agreement and export time per family, from one run on this machine.
    python tools/family_table.py [--json families.json] [--optimize] [TYPE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("types", nargs="*", help="model types (default: the whole registry)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--optimize", action="store_true",
                        help="compile each export (--optimize) in both layouts: fusion counts against the registry's, "
                             "the fused graph's max logit error and greedy agreement")
    args = parser.parse_args()
    if args.optimize:
        return optimized_table(args)
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from prefix_export.source import architectures
    from prefix_export.api import export_prefix_model
    from prefix_export.errors import PrefixExportError
    from tiny_models import make_prefix, save_tiny_model, tiny_config

    rows = []
    print("| family | projection | max logit err (prefill / decode) | greedy | export s |")
    print("| --- | --- | --- | --- | --- |")
    for model_type in args.types or architectures.supported_model_types():
        for projection in (True, False):
            work = Path(tempfile.mkdtemp(prefix=f"{model_type}-"))
            row = {"family": model_type, "projection": projection}
            try:
                save_tiny_model(tiny_config(model_type), work / "model")
                prefix = make_prefix(work / "model", work / "prefix", 5, projection=projection, trained=True)
                result = export_prefix_model(str(work / "model"), prefix, work / "out", progress=False)
                summary = {(r["check"], r["output"]): r["max_abs"] for r in result.report["validation"]["summary"]}
                greedy = result.report["validation"]["greedy"]
                row.update(prefill=summary.get(("prefill", "logits")), decode=summary.get(("decode", "logits")),
                           greedy=f"{sum(g['matching'] for g in greedy)}/{sum(g['new_tokens'] for g in greedy)}",
                           export_s=result.report["timing_s"]["export"], passed=result.validation.passed)
            except PrefixExportError as exc:
                row.update(error=f"{type(exc).__name__}: {str(exc)[:200]}", passed=False)
            rows.append(row)
            if "error" in row:
                print(f"| {model_type} | {projection} | {row['error']} | | |")
            else:
                print(f"| {model_type} | {'on' if projection else 'off'} | {row['prefill']:.1e} / {row['decode']:.1e} "
                      f"| {row['greedy']} | {row['export_s']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["passed"] for r in rows) else 1


def optimized_table(args) -> int:
    """`--optimize`: per family and layout, the fused counts (matched/expected), the reasons for what
    cannot fuse, the fused graph's validation (max logit error, greedy tokens) and the node counts."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from prefix_export.api import export_prefix_model
    from prefix_export.compile.pipeline import CompileOptions
    from prefix_export.errors import PrefixExportError
    from prefix_export.source import architectures
    from tiny_models import make_prefix, save_tiny_model, tiny_config

    rows = []
    print("| family | layout | fused (matched/expected) | not fused (why) | nodes | max logit err (prefill / decode) "
          "| greedy | passed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    families = args.types or [t for t in architectures.supported_model_types()
                              if not architectures.describe(tiny_config(t)).is_seq2seq]
    for model_type in families:
        work = Path(tempfile.mkdtemp(prefix=f"{model_type}-"))
        save_tiny_model(tiny_config(model_type), work / "model")
        prefix = make_prefix(work / "model", work / "prefix", 5, projection=True, trained=True)
        for layout in ("folded", "cache"):
            row = {"family": model_type, "layout": layout}
            try:
                result = export_prefix_model(str(work / "model"), prefix, work / layout, layout=layout, progress=False,
                                             compile_options=CompileOptions(optimize=True))
                fusion = result.report["compile"]["fusion"]
                summary = {(r["check"], r["output"]): r["max_abs"] for r in result.report["validation"]["summary"]}
                greedy = result.report["validation"]["greedy"]
                row.update(fused={k: f"{v['matched']}/{v['expected']}" for k, v in fusion["expected"].items()},
                           not_fused=list(fusion["not_fusable"]), nodes=f"{fusion['nodes_before']} -> "
                           f"{fusion['nodes_after']}", prefill=summary.get(("prefill", "logits")),
                           decode=summary.get(("decode", "logits")), passed=result.validation.passed,
                           greedy=f"{sum(g['matching'] for g in greedy)}/{sum(g['new_tokens'] for g in greedy)}")
                print(f"| {model_type} | {layout} | {', '.join(f'{k} {v}' for k, v in row['fused'].items())} | "
                      f"{', '.join(row['not_fused']) or '-'} | {row['nodes']} | {row['prefill']:.1e} / "
                      f"{row['decode']:.1e} | {row['greedy']} | {row['passed']} |", flush=True)
            except PrefixExportError as exc:
                row.update(error=f"{type(exc).__name__}: {str(exc)[:200]}", passed=False)
                print(f"| {model_type} | {layout} | {row['error']} | | | | | False |", flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
