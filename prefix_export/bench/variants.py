"""The graphs bench measures, each built through the public pipeline and checked before it is timed.

    export fp32        `export_prefix_model` (the user's layout), validated against PEFT (shortened)
    base fp32          `export_prefix_model(layout="cache")`: the plain base decoder; checked against
                       the base model's forward, and, fed the prefix, validated against PEFT (that is
                       the cache layout, measured as `export[cache]`)
    ... fp32+fused     compile.passes.fuse of each, validated the same way (dropped if it fails)
    ... int8           compile.passes.quantize_int8 of the best fp32 graph, checked by top-1 agreement

Graphs made here live in `OUT/graphs/<name>/` with the export's prefix file beside them, so each is
an export folder the validators can open like any other.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
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
            "greedy": [{k: g[k] for k in ("new_tokens", "matching")} for g in report.greedy]}


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


def _graph_folder(workdir: Path, name: str, prefix_file: Path | None) -> ExportFolder:
    """A fresh `workdir/name/` for a derived graph, with the export's prefix file beside it."""
    path = workdir / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    if prefix_file is not None and prefix_file.is_file():
        shutil.copy2(prefix_file, path / prefix_file.name)
    return ExportFolder(path)


def export_variants(source, export_dir: Path | None, workdir: Path, settings, bar) -> tuple[list[Variant], ExportFolder]:
    """The fp32 export (made here, or the user's `export_dir`) and the base graph; both checked."""
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
    bar("exported")
    if settings.base and source is not None:
        spec = source.base.spec
        if folder.layout == "cache":  # the user's cache-layout graph is the base graph already
            base_graph, build_s, cache_validation = folder.graph, fp32.build_s, fp32.info.get("validation")
        else:
            cache = export_prefix_model(source, None, workdir / "cache", force=True, progress=False, layout="cache",
                                        validation=short)
            base_graph, build_s = cache.graph, cache.report["timing_s"]["export"]
            cache_validation = summarize(cache.validation)
        info = {"validation": check_base_export(base_graph, source.base.model, spec.vocab_size)}
        if settings.cache_layout:
            info["cache_layout_validation"] = cache_validation
        variants.append(Variant("base fp32", base_graph, "base", "fp32", build_s, info))
        bar("exported base")
    return variants, folder


def fused_variants(variants, workdir: Path, spec, source, export_layout: str, prefix_file: Path | None,
                   settings, bar) -> list[Variant]:
    from ..compile.passes import fuse

    made = []
    for plain in list(variants):
        folder = _graph_folder(workdir, f"{plain.kind}-fused", prefix_file)
        start = time.perf_counter()
        try:
            report = fuse(plain.graph, folder.graph, spec.num_attention_heads, spec.hidden_size)
        except Exception as exc:  # noqa: BLE001 - a failed pass is reported, the plain graph stays
            log.warning("fusion of %s failed: %s", plain.name, exc)
            bar(f"fuse {plain.kind} FAILED")
            continue
        build = time.perf_counter() - start
        info = {"fusion": report.to_dict(), "source": plain.name}
        if source is not None:
            if plain.kind == "export":
                info["validation"] = _validate(folder, export_layout, source, settings.validate_tokens)
            else:
                info["validation"] = check_base_export(folder.graph, source.base.model, spec.vocab_size)
                if settings.cache_layout and prefix_file is not None:
                    info["cache_layout_validation"] = _validate(folder, "cache", source, settings.validate_tokens)
        if info.get("validation") is not None and not info["validation"]["passed"]:
            log.warning("fused %s failed validation; dropped", plain.name)
        else:
            made.append(Variant(f"{plain.kind} fp32+fused", folder.graph, plain.kind, "fp32+fused", build, info))
        bar(f"fused {plain.kind}")
    return made


def int8_variants(variants, workdir: Path, bar) -> list[Variant]:
    """int8 from the fused graph when there is a valid one, else from the plain export."""
    from ..compile.passes import agreement, quantize_int8
    from ..runtime.decoder import OnnxDecoder
    from ..runtime.sessions import create_session

    made = []
    for kind in ("export", "base"):
        candidates = [v for v in variants if v.kind == kind]
        if not candidates:
            continue
        source = next((v for v in candidates if v.precision == "fp32+fused"), candidates[0])
        target = workdir / f"{kind}-int8" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        info = quantize_int8(source.graph, target)
        build = time.perf_counter() - start
        reference = OnnxDecoder(create_session(source.graph, "cpu"))
        candidate = OnnxDecoder(create_session(target, "cpu"))
        rng = np.random.default_rng(7)
        prompts = [rng.integers(0, reference.vocab_size, n, dtype=np.int64) for n in (8, 16, 32, 64)]
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
    from ..api import export_prefix_model
    from ..compile.passes import agreement, quantize_int8
    from ..runtime.decoder import OnnxDecoder
    from ..runtime.sessions import create_session

    exported = export_prefix_model(str(folder / "base"), str(folder / "prefix"), workdir / "embedded", force=True,
                                   progress=False)
    int8 = workdir / "embedded-int8.onnx"
    quantize_int8(exported.graph, int8)
    tokenizer = ExportFolder(exported.folder).load_tokenizer()
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
