"""The graphs bench measures, each built through the public pipeline and checked before it is timed.

    export fp32        `export_prefix_model` (the user's layout), validated against PEFT (shortened)
    base fp32          `export_prefix_model(layout="cache")`: the plain base decoder; checked against
                       the base model's forward, and, fed the prefix, validated against PEFT (that is
                       the cache layout, measured as `export[cache]`)
    ... fp32+fused     `compile_export(optimize=True)` of each folder: what `--optimize` ships, validated
                       as compile validates it (dropped, and reported, if it fails)
    ... int8/int4/fp16 `compile_export(precision=...)` (fused too with --optimize), validated by
                       agreement with PEFT and the fp32 graph (fp16 only with a GPU provider)

Graphs made here live in `OUT/graphs/<name>/`: each is an export folder like the ones users ship.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from ..folder import ExportFolder
from ..validate.report import Tolerances, ValidationSettings

log = logging.getLogger(__name__)

SHORT_ATOL = 1e-4


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


def short_settings(greedy_tokens: int) -> ValidationSettings:
    return ValidationSettings(decode_steps=2, greedy_tokens=greedy_tokens, greedy_prompts=1)


def summarize(report) -> dict:
    """A ValidationReport as bench.json keeps it."""
    return {"passed": report.passed, "failures": report.failures()[:10], "summary": report.to_dict()["summary"],
            "greedy": [{k: g[k] for k in ("new_tokens", "matching")} for g in report.greedy],
            "agreement": report.agreement}


def _validate(folder: ExportFolder, layout: str, source, greedy_tokens: int) -> dict:
    """`folder`'s graph against PEFT as an export of `layout` (cache: fed the prefix file beside it)."""
    from ..export.kinds import kind_for

    kind = kind_for(source.base.spec, layout)
    tolerances = Tolerances(atol=SHORT_ATOL)
    reference = kind.reference(source.peft_model, source.base.spec, tolerances, short_settings(greedy_tokens))
    return summarize(kind.validate(folder, reference, source.base.spec, tolerances))


def check_base_export(graph: Path, model, vocab_size: int) -> dict:
    """The base graph (no prefix) against the base model's own forward on one prompt (logits)."""
    import torch

    from ..runtime.decoder import OnnxDecoder
    from ..runtime.sessions import create_session

    decoder = OnnxDecoder(create_session(graph, "cpu"))
    ids = np.random.default_rng(1).integers(0, vocab_size, (1, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    logits, _ = decoder.run(ids, mask, np.arange(9, dtype=np.int64)[None], decoder.empty_past(1))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()
    diff = float(np.abs(logits - ref).max())
    return {"max_abs_logits": diff, "passed": diff <= 1e-3}


def export_variants(source, export_dir: Path | None, workdir: Path, settings,
                    bar) -> tuple[list[Variant], ExportFolder, dict[str, Path]]:
    """The fp32 export (made here, or the user's `export_dir`) and the base graph; both checked.
    Also returns the folder of each ({"export": ..., "base": ...}), which compiled variants start from."""
    from ..api import export_prefix_model

    short = short_settings(settings.validate_tokens)
    if export_dir is None:
        start = time.perf_counter()
        exported = export_prefix_model(source, None, workdir / "export", force=True, progress=False, validation=short)
        folder = ExportFolder.open(exported.folder)
        fp32 = Variant("export fp32", folder.graph, "export", "fp32", exported.report["timing_s"]["export"],
                       {"validation": summarize(exported.validation)})
        log.info("exported and validated in %.1fs", time.perf_counter() - start)
    else:
        folder = ExportFolder.open(export_dir)
        fp32 = Variant("export fp32", folder.graph, "export", "fp32", folder.report.get("timing_s", {}).get("export", 0.0))
        if source is not None:
            fp32.info["validation"] = _validate(folder, folder.layout, source, settings.validate_tokens)
    variants = [fp32]
    folders = {"export": folder.path}
    bar("exported")
    if settings.base and source is not None:
        spec = source.base.spec
        if folder.layout == "cache":  # the user's cache-layout graph is the base graph already
            base_graph, build_s, cache_validation = folder.graph, fp32.build_s, fp32.info.get("validation")
            folders["base"] = folder.path
        else:
            cache = export_prefix_model(source, None, workdir / "cache", force=True, progress=False, layout="cache",
                                        validation=short)
            base_graph, build_s = cache.graph, cache.report["timing_s"]["export"]
            cache_validation = summarize(cache.validation)
            folders["base"] = cache.folder
        info = {"validation": check_base_export(base_graph, source.base.model, spec.vocab_size)}
        if settings.cache_layout:
            info["cache_layout_validation"] = cache_validation
        variants.append(Variant("base fp32", base_graph, "base", "fp32", build_s, info))
        bar("exported base")
    return variants, folder, folders


def _compiled(plain_folder: Path, target: Path, options, source, what: str, bar) -> tuple[object, dict] | None:
    """`compile_export` of a folder bench made (or was given): (result, info), or None when it failed."""
    from ..api import compile_export
    from ..errors import PrefixExportError

    start = time.perf_counter()
    try:
        result = compile_export(plain_folder, target, options, source=source, force=True, progress=False)
    except PrefixExportError as exc:  # a graph that fails its checks is reported, and not measured
        log.warning("compiling %s failed: %s", what, exc)
        bar(f"{what} FAILED")
        report = getattr(exc, "report", None)
        return None, {"failed": f"{type(exc).__name__}: {str(exc)[:300]}",
                      "validation": summarize(report) if report is not None else None}
    info = {"compile": {k: v for k, v in result.report["compile"].items() if k != "conversion"},
            "validation": summarize(result.validation), "build_s": round(time.perf_counter() - start, 2)}
    bar(what)
    return result, info


def compiled_variants(plain: list[Variant], folders: dict[str, Path], workdir: Path, settings, source,
                      bar) -> tuple[list[Variant], list[dict]]:
    """The shipped artifacts, made by the compile path (`prefix-export compile`): for the export and
    the base (cache-layout) folder, the fused fp32 graph (`optimize`) and each reduced precision
    (fused too when `optimize`), each validated as compile validates it. Returns them and the failures."""
    from ..compile.agreement import DEFAULT_THRESHOLDS, Thresholds, judge
    from ..compile.pipeline import CompileOptions
    from ..compile.quantize import QuantizationSettings

    made, failed = [], []
    on_gpu = any(p.lower() not in ("cpu", "cpuexecutionprovider") for p in settings.providers)
    precisions = [p for p in settings.precisions if p != "fp32" and (p != "fp16" or on_gpu)]
    # Reduced precisions are compiled with the agreement thresholds off and judged here instead: a
    # random-weight model on random prompts can fall below them, and its speed is still the question
    # (such a row is labelled, in bench.json and the table, as below its thresholds).
    jobs = ([("fp32+fused", CompileOptions(optimize=True))] if settings.optimize else []) + [
        (precision, CompileOptions(optimize=settings.optimize, quantization=QuantizationSettings(precision=precision),
                                   thresholds=Thresholds(0.0, 0.0)))
        for precision in precisions]
    if settings.kv_buffer_shared:  # the GPU artifact: GroupQueryAttention on one KV buffer
        jobs.append(("fp32+shared", CompileOptions(optimize=True, kv_buffer="shared")))
        if on_gpu:
            fp16 = QuantizationSettings(precision="fp16")
            jobs.append(("fp16+shared", CompileOptions(optimize=True, kv_buffer="shared", quantization=fp16,
                                                       thresholds=Thresholds(0.0, 0.0))))
    for variant in plain:
        for label, options in jobs:
            name = f"{variant.kind} {label}"
            result, info = _compiled(folders[variant.kind], workdir / name.replace(" ", "-"), options, source,
                                     f"compiled {name}", bar)
            if result is None:
                failed.append({"name": name, **info})
                continue
            agreement = (info.get("validation") or {}).get("agreement")
            if agreement:
                below = judge(agreement, DEFAULT_THRESHOLDS[options.precision])
                info["meets_default_thresholds"] = not below
                info["below_thresholds"] = below
            if variant.kind == "base":  # compiled from the cache-layout folder: validated as that layout
                info["cache_layout_validation"] = info["validation"]
            made.append(Variant(name, result.graph, variant.kind, label, variant.build_s + info["build_s"], info))
    return made, failed


def embedded_agreement(folder: Path, workdir: Path, precisions: list[str], optimize: bool) -> dict:
    """Each reduced precision on the embedded default model's task (`folder`: base/, prefix/,
    test_split.jsonl): compiled like a user would, with the task file, so its report holds top-1
    agreement, greedy equality and the held-out exact match against the fp32 graph's."""
    from ..api import export_prefix_model, load_prefix_model
    from ..compile.pipeline import CompileOptions
    from ..compile.quantize import QuantizationSettings

    source = load_prefix_model(str(folder / "base"), str(folder / "prefix"))
    exported = export_prefix_model(source, None, workdir / "embedded", force=True, progress=False)
    results = {"model": str(folder)}
    for precision in precisions:
        options = CompileOptions(optimize=optimize, quantization=QuantizationSettings(precision=precision),
                                 task_file=str(folder / "test_split.jsonl"))
        result, info = _compiled(exported.folder, workdir / f"embedded-{precision}", options, source,
                                 f"embedded {precision}", lambda _: None)
        agreement = (result.validation.agreement if result is not None else
                     ((info.get("validation") or {}).get("agreement")))
        results[precision] = {"passed": result is not None, "agreement": agreement, **(
            {"failed": info["failed"]} if result is None else {})}
    return results
