"""Compile one export folder at several settings and put speed beside agreement, one run, one table.

For choosing quantization defaults from measurements (issue 12): each variant is made by the compile
path (what `prefix-export compile` ships, validated by agreement: top-1 and greedy against PEFT and
the fp32 graph), then every variant's decode step is timed in turn on the same prompt.

    python tools/compile_table.py EXPORT_DIR --work /tmp/ct \\
        fp32+opt int8+opt int4+opt "int4+opt:keep=*down_proj" "int4:lm_head=0,acc=0" [--json rows.json]

A variant is PRECISION[+opt][:key=value,...] with keys block, acc (accuracy level), lm_head (0/1),
algo (rtn/hqq), keep (fnmatch patterns kept at 8 bits, '|'-separated), fp32 (patterns not quantized),
sym (0/1), method (int8: nbits/dynamic).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_variant(text: str):
    from prefix_export.compile.pipeline import CompileOptions
    from prefix_export.compile.quantize import QuantizationSettings

    head, _, rest = text.partition(":")
    precision, _, opt = head.partition("+")
    values = dict(item.split("=", 1) for item in rest.split(",") if item)
    settings = QuantizationSettings(
        precision=precision, method=values.get("method", "nbits"), block_size=int(values.get("block", 32)),
        accuracy_level=int(values.get("acc", 4)), algorithm=values.get("algo", "rtn"),
        quantize_lm_head=values.get("lm_head", "1") == "1",
        keep_8bit=tuple(p for p in values.get("keep", "").split("|") if p),
        keep_fp32=tuple(p for p in values.get("fp32", "").split("|") if p),
        symmetric=values.get("sym", "1") == "1")
    from prefix_export.compile.agreement import Thresholds

    # Thresholds 0: every variant is kept and timed; the table shows its agreement beside its speed.
    return CompileOptions(optimize=opt == "opt", quantization=settings, thresholds=Thresholds(0.0, 0.0),
                          prompts=int(values.get("prompts", 16)),
                          greedy_prompts=int(values.get("greedy", 8)), greedy_tokens=32,
                          task_file=values.get("task"))


def time_decode(graph: Path, prefix, steps: int, prompt_len: int, rounds: int, threads: int) -> list[float]:
    import numpy as np

    from prefix_export.runtime.decoder import OnnxDecoder
    from prefix_export.runtime.loop import DecoderStepper
    from prefix_export.runtime.sessions import create_session

    decoder = OnnxDecoder(create_session(graph, "cpu", threads=threads), prefix)
    ids = np.random.default_rng(0).integers(3, decoder.vocab_size or 1000, (1, prompt_len), dtype=np.int64)
    medians = []
    for _ in range(rounds):
        stepper = DecoderStepper(decoder, ids, None, steps + 1)
        logits = stepper.step(stepper.first_tokens)
        times = []
        for _ in range(steps):
            token = logits[:, -1:].argmax(-1).astype(np.int64)
            start = time.perf_counter()
            logits = stepper.step(token)
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times)) * 1e3)
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("variants", nargs="*")
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--retime", metavar="JSON", help="skip compiling: time the graphs of an earlier --json "
                                                         "again (for a quiet machine), keeping its agreement figures")
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from prefix_export.api import _source_from_report, compile_export
    from prefix_export.bench.probes import measure_bandwidth, weights_read_per_token
    from prefix_export.errors import PrefixExportError
    from prefix_export.folder import ExportFolder

    given = ExportFolder.open(args.export_dir)
    work = Path(args.work)
    rows = []
    if args.retime:
        rows = [{k: v for k, v in row.items() if k not in ("decode_rounds_ms", "decode_ms", "x_floor")}
                for row in json.loads(Path(args.retime).read_text())["rows"]]
        args.variants = []
    source = _source_from_report(given, given.read_report(), None, None, None) if args.variants else None
    for text in args.variants:
        options = parse_variant(text)
        started = time.perf_counter()
        row = {"variant": text}
        if text == "fp32":
            row.update(graph=str(given.graph), passed=True)
        else:
            target = work / text.replace(":", "_").replace("*", "").replace("|", "_")
            try:
                if (target / "export_report.json").is_file():  # compiled by an earlier run: reuse it
                    from prefix_export.validate.report import ValidationReport

                    report = json.loads((target / "export_report.json").read_text())
                    result = type("Reused", (), {"graph": target / given.graph_name, "validation": ValidationReport(
                        problems=report["validation"].get("problems", []),
                        agreement=report["validation"].get("agreement"))})()
                else:
                    result = compile_export(given.path, target, options, source=source, force=True, progress=False)
                row.update(graph=str(result.graph), passed=result.validation.passed)
                agreement = result.validation.agreement
                if agreement:
                    for label, a in agreement["against"].items():
                        row[f"top1 {label}"] = round(a["top1_agreement"], 3)
                        row[f"greedy {label}"] = f"{a['greedy_equal']}/{agreement['greedy_prompts']}"
                    if agreement.get("task"):
                        row["exact_match"] = agreement["task"]["exact_match"]
                        row["fp32_exact_match"] = agreement["task"]["reference_exact_match"]
            except PrefixExportError as exc:
                report = getattr(exc, "report", None)
                row.update(passed=False, error=str(exc)[:300])
                if report is not None and report.agreement:
                    for label, a in report.agreement["against"].items():
                        row[f"top1 {label}"] = round(a["top1_agreement"], 3)
                        row[f"greedy {label}"] = f"{a['greedy_equal']}/{report.agreement['greedy_prompts']}"
                row["graph"] = None
        row["build_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del source
    threads = os.cpu_count() or 1
    bandwidth = measure_bandwidth(1024, 5, threads)["gb_per_s"]
    prefix = given.read_prefix() if given.layout == "cache" else None
    timed = [r for r in rows if r.get("graph")] if args.rounds > 0 else []  # --rounds 0: agreement only
    for round_index in range(args.rounds):  # every variant in turn, per round: measured minutes apart at most
        for row in timed if round_index % 2 == 0 else timed[::-1]:
            row.setdefault("decode_rounds_ms", []).extend(
                time_decode(Path(row["graph"]), prefix, args.steps, args.prompt_length, 1, threads))
    fp32_ms = None
    for row in timed:
        import numpy as np

        row["decode_ms"] = round(float(np.median(row["decode_rounds_ms"])), 3)
        row["weights_read_mb"] = round(weights_read_per_token(Path(row["graph"])) / 1e6, 1)
        row["x_floor"] = round(row["decode_ms"] / (row["weights_read_mb"] * 1e6 / (bandwidth * 1e9) * 1e3), 2)
        if row["variant"] == "fp32":
            fp32_ms = row["decode_ms"]
    print(f"\nbandwidth {bandwidth:.1f} GB/s, {threads} threads, B=1, prompt {args.prompt_length}, median of "
          f"{args.rounds} rounds x {args.steps} steps\n")
    print("| variant | decode ms | x fp32 | x floor (weights) | top-1 vs PEFT | top-1 vs fp32 graph | greedy vs fp32 graph "
          "| exact match (fp32) | passed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ratio = f"{row['decode_ms'] / fp32_ms:.2f}" if fp32_ms and "decode_ms" in row else "-"
        em = f"{row['exact_match']:.3f} ({row['fp32_exact_match']:.3f})" if "exact_match" in row else "-"
        print(f"| {row['variant']} | {row.get('decode_ms', '-')} | {ratio} | {row.get('x_floor', '-')} | "
              f"{row.get('top1 PEFT', '-')} | {row.get('top1 fp32 graph', '-')} | {row.get('greedy fp32 graph', '-')} "
              f"| {em} | {row['passed']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gb_s": bandwidth, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
