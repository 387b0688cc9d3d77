"""The export pipeline, end to end: checkpoint -> prefix KV -> graph(s) -> validation -> folder.

`export_prefix_model` is what `prefix-export` (and `prefix-export export`) runs; `validate_export`
is what `prefix-export validate OUT_DIR` runs; `load_prefix_model` is the first stage on its own (the
model, the checkpoint and PEFT's model built once, for callers that export several times, like bench).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

from . import __version__, contract
from .errors import InputError, UnsupportedError, ValidationError
from .export import graph, output
from .export.exporter import DEFAULT_OPSET, run_exporter
from .export.kinds import ExportKind, check_layout, kind_for
from .folder import ExportFolder, hashes, resolve_output
from .stages import Progress, peak_memory_mb, return_freed_memory
from .source.base_model import BaseModel, load_base_model
from .source.checkpoint import PrefixCheckpoint, load_prefix_checkpoint
from .source.prefix_kv import PrefixKV, build_peft_model, compute_prefix_kv, describe_conversion
from .validate.report import DEFAULT_ATOL, Tolerances, ValidationReport, ValidationSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PrefixModel:
    """The pipeline's input, loaded once: the base model, the checkpoint, PEFT's model and its prefix KV."""

    base: BaseModel
    checkpoint: PrefixCheckpoint
    peft_model: object  # peft.PeftModelForCausalLM / PeftModelForSeq2SeqLM, inference mode
    prefix_kv: PrefixKV
    prefix_source: str  # what the user passed as the prefix, for the report
    prefix_config: str | None = None

    def release(self) -> None:
        """Drop the PyTorch model (PEFT's and the base one); what was computed from it stays."""
        import gc

        self.peft_model = None
        self.base.release()
        gc.collect()
        return_freed_memory()


def load_prefix_model(model: str | Path | BaseModel, prefix: str | Path | PrefixCheckpoint,
                      prefix_config: str | Path | None = None, dtype: str | None = None,
                      task_id: int | None = None) -> PrefixModel:
    """Load and check the model and the prefix (prefix tuning, or prompt tuning / p-tuning / multitask
    prompt tuning, task `task_id`), build PEFT's model, and compute the prefix KV once."""
    base = model if isinstance(model, BaseModel) else load_base_model(model, dtype=dtype)
    checkpoint = prefix if isinstance(prefix, PrefixCheckpoint) else load_prefix_checkpoint(prefix, prefix_config,
                                                                                             task_id)
    peft_model = build_peft_model(base, checkpoint)
    return PrefixModel(base, checkpoint, peft_model, compute_prefix_kv(peft_model, base.spec),
                       "<in-memory>" if isinstance(prefix, PrefixCheckpoint) else str(prefix),
                       str(prefix_config) if prefix_config else None)


@dataclasses.dataclass
class ExportResult:
    folder: Path
    graph: Path
    report: dict
    validation: ValidationReport | None

    @property
    def passed(self) -> bool:
        return self.validation is None or self.validation.passed


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"prefix_export": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                 "safetensors", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def model_files(base: BaseModel) -> list[Path]:
    if base.local_dir is None:
        return []
    # sharded checkpoints: every shard and its index (model.safetensors.index.json)
    patterns = ("config.json", "*.safetensors", "*.bin", "*.index.json", "generation_config.json")
    return sorted({p for pattern in patterns for p in base.local_dir.glob(pattern) if p.is_file()})


def existing_path(path: str | None) -> str | None:
    """The absolute path of `path` when it exists (so `validate OUT` works from any directory)."""
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else None


def _new_report(source: PrefixModel, kind: ExportKind, graph_name: str, command_line: list[str] | None) -> dict:
    base, prefix_kv = source.base, source.prefix_kv
    inputs = {"model": base.source, "prefix": source.prefix_source, "model_path": existing_path(base.source),
              "prefix_path": existing_path(source.prefix_source), "prefix_config": source.prefix_config,
              "checkpoint_kind": source.checkpoint.kind, "task_id": source.checkpoint.task_id,
              "sha256": hashes(source.checkpoint.files + model_files(base))}
    return {"tool": "prefix-export", "version": __version__, "command_line": command_line or sys.argv,
            "created_unix": int(time.time()), "layout": kind.layout, "versions": library_versions(),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
            "inputs": inputs, "architecture": dataclasses.asdict(base.spec),
            "prefix": {"num_virtual_tokens": prefix_kv.num_virtual_tokens, "shape": list(prefix_kv.tensor.shape),
                       "shape_meaning": "(L, 2, H_kv, P, D)", "dtype": str(prefix_kv.tensor.dtype).replace("torch.", ""),
                       **describe_conversion(source.checkpoint)},
            "dtype": (base.dtype_choice.to_dict() if base.dtype_choice is not None else
                      {"checkpoint": None, "exported": str(prefix_kv.tensor.dtype).replace("torch.", ""),
                       "why": "as loaded (the checkpoint's dtype, or --dtype)"}),
            "io": kind.io_names(base.spec, graph_name), "swappable_prefix": bool(getattr(kind, "swappable", False))}


def _graph_metadata(source: PrefixModel, kind: ExportKind, report: dict) -> dict[str, str]:
    metadata = {contract.META_PREFIX_LENGTH: str(source.prefix_kv.num_virtual_tokens), contract.META_LAYOUT: kind.layout,
                contract.META_VERSION: __version__, "prefix_export.model_type": source.base.spec.model_type,
                "prefix_export.method": source.checkpoint.method,
                "prefix_export.source_sha256": json.dumps(report["inputs"]["sha256"], sort_keys=True),
                "prefix_export.versions": json.dumps(report["versions"], sort_keys=True)}
    if getattr(kind, "swappable", False):
        metadata[contract.META_SWAPPABLE] = "1"
    return metadata


def _export_graphs(source: PrefixModel, kind: ExportKind, folder: ExportFolder, metadata: dict[str, str],
                   opset: int, external_data: bool) -> dict:
    """Every graph of `kind` exported into a scratch folder, then finalized into `folder`.

    Returns graph.finalize's info; for several graphs (seq2seq) summed, with each graph's own under `parts`.
    """
    raw_dir = folder.path / ".raw"
    raw_dir.mkdir()
    parts = {}
    for plan in kind.plans(source.base.model, source.prefix_kv, source.base.spec, folder.graph_name):
        run_exporter(plan, raw_dir / plan.file_name, opset, source.base.spec.model_type)
        parts[plan.file_name] = graph.finalize(raw_dir / plan.file_name, folder.path / plan.file_name, metadata,
                                               external_data, plan.overridable)
    shutil.rmtree(raw_dir)
    if len(parts) == 1:
        return next(iter(parts.values()))
    external = [info["external_data"] for info in parts.values() if info["external_data"]]
    return {"graph": " + ".join(parts), "external_data": ", ".join(external) or None,
            "weight_bytes": sum(info["weight_bytes"] for info in parts.values()),
            "nodes": sum(info["nodes"] for info in parts.values()), "opset": parts[folder.graph_name]["opset"],
            "bfloat16_ops_upcast": sum(info["bfloat16_ops_upcast"] for info in parts.values()), "parts": parts}


def _write_side_files(source: PrefixModel, kind: ExportKind, folder: ExportFolder, triton: bool | str,
                      destination: Path) -> None:
    """The prefix file, the model's configs and tokenizer (so the folder stands alone), deploy targets."""
    from .deploy.genai import write_genai_config
    from .deploy.triton import model_name, write_triton_entry

    base = source.base
    source.prefix_kv.save(folder.prefix_file, {"model_type": base.spec.model_type})
    base.config.save_pretrained(folder.path)
    generation_config = getattr(base.model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder.path)
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(folder.path)
    if kind.layout == "folded" and not base.spec.is_seq2seq:  # genai's decoder needs the prefix inside
        write_genai_config(folder.path, base.spec, source.prefix_kv.num_virtual_tokens, folder.graph_name, base.config,
                           generation_config)
    if triton:
        write_triton_entry(folder.path, folder.graph_name, triton if isinstance(triton, str) else model_name(destination))


def export_prefix_model(model: str | Path | BaseModel | PrefixModel, prefix: str | Path | PrefixCheckpoint | None,
                        out: str | Path, *, prefix_config: str | Path | None = None, force: bool = False,
                        run_validation: bool = True, tolerances: Tolerances | None = None, dtype: str | None = None,
                        opset: int = DEFAULT_OPSET, external_data: bool = False, keep_invalid: bool = False,
                        progress: bool = True, command_line: list[str] | None = None, layout: str = "folded",
                        triton: bool | str = False, validation: ValidationSettings | None = None,
                        greedy_tokens: int | None = None, swappable_prefix: bool = False,
                        compile_options=None, ort_format: bool = False, task_id: int | None = None) -> ExportResult:
    """Export `model` + `prefix` to the folder `out` (or `out/NAME.onnx`), validated unless told not to.

    `model` may be a `PrefixModel` already loaded by `load_prefix_model` (then `prefix` is ignored).
    `prefix`: prefix tuning, or prompt tuning / p-tuning / multitask prompt tuning (then `task_id` chooses
    the task), whose virtual tokens become the same static prefix KV (source/prefix_kv.py).
    Every input is checked before anything is written; the folder appears only once complete and
    (unless `run_validation=False`) validated. A failed validation raises ValidationError, with the
    export kept beside `out` as `out.invalid/` only when `keep_invalid` is set.
    `layout`: "folded" (prefix inside the graph) or "cache" (the plain base decoder; the runtime feeds
    prefix_kv.safetensors as the first past). A folded decoder-only export also holds genai_config.json
    (onnxruntime-genai); `triton` (True or a model name) adds a Triton repository entry.
    `swappable_prefix` (folded decoders) lists the prefix initializers as graph inputs too, so that
    `make_adapter`'s files can switch the task at run time (adapters.py).
    `validation` says how much validation runs (default: by model size, `greedy_tokens` overriding
    the greedy check's length); `tolerances` default to the noise-relative rule (validate/report.py).
    `compile_options` (compile/pipeline.CompileOptions: `--optimize`, `--precision`): the folder then
    holds the compiled graph, made from the validated plain export and checked itself (compile_export).
    `ort_format` also writes the graph in ORT format for mobile builds (deploy/ort_format.py).
    """
    from .deploy.triton import check_name

    if compile_options is not None and compile_options.changes_graph:
        if not run_validation:
            raise InputError("--optimize and --precision ship a graph only once it passed its checks; drop "
                             "--no-validate (or export without them).")
        destination, graph_name = resolve_output(out)
        output.check_destination(destination, force)
        source = model if isinstance(model, PrefixModel) else load_prefix_model(model, prefix, prefix_config, dtype,
                                                                                task_id)
        scratch = destination.parent / f".{destination.name}.plain"
        try:
            export_prefix_model(source, None, scratch / graph_name, force=True, tolerances=tolerances, opset=opset,
                                external_data=external_data, progress=progress, command_line=command_line,
                                layout=layout, triton=triton, validation=validation, greedy_tokens=greedy_tokens,
                                swappable_prefix=swappable_prefix)
            return compile_export(scratch, out, compile_options, source=source, force=force,
                                  keep_invalid=keep_invalid, tolerances=tolerances, progress=progress,
                                  command_line=command_line, ort_format=ort_format)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    started = time.perf_counter()
    check_layout(layout)
    if run_validation and dtype in ("bfloat16", "bf16"):  # refused before minutes of loading
        raise UnsupportedError(
            "a bfloat16 graph cannot be validated here: ONNX Runtime's CPU provider has no bfloat16 kernels for "
            "MatMul, Softmax, Expand, Where and more. Export in float16 or float32 (no --dtype: a bfloat16 "
            "checkpoint is exported in float16, or float32 where its activations need it), or, for a GPU target, "
            "pass --dtype bfloat16 --no-validate and check the graph there (`prefix-export validate` needs a "
            "CPU-runnable graph).")
    destination, graph_name = resolve_output(out)
    output.check_destination(destination, force)
    if isinstance(triton, str):
        check_name(triton)
    steps = Progress(5 if run_validation else 4, progress)
    try:
        source = model if isinstance(model, PrefixModel) else load_prefix_model(model, prefix, prefix_config, dtype,
                                                                                task_id)
        spec = source.base.spec
        kind = kind_for(spec, layout, swappable_prefix)
        if ort_format and spec.is_seq2seq:
            raise UnsupportedError(f"--format ort writes one decoder graph; {spec.model_type} exports an "
                                   "encoder-decoder pair, which is not converted (use the ONNX graphs).")
        if triton and spec.is_seq2seq:
            raise UnsupportedError(f"--triton writes an entry for one decoder graph; {spec.model_type} exports "
                                   "an encoder and a decoder graph, which need a Triton ensemble (not written yet).")
        steps("loaded model and prefix")
        dtype_name = str(source.prefix_kv.tensor.dtype).replace("torch.", "")
        if tolerances is None:
            tolerances = Tolerances(fallback_atol=DEFAULT_ATOL.get(dtype_name, 1e-4))
        validation = validation or ValidationSettings.for_model(source.base.num_parameters, greedy_tokens)
        report = _new_report(source, kind, graph_name, command_line)
        metadata = _graph_metadata(source, kind, report)
        try:
            with output.atomic_folder(destination, force) as tmp:
                folder = ExportFolder(tmp, kind.graph_name(graph_name))
                t0 = time.perf_counter()
                report["graph"] = _export_graphs(source, kind, folder, metadata, opset, external_data)
                return_freed_memory()  # the exporter's temporaries, before the references stack on them
                report["timing_s"] = {"export": round(time.perf_counter() - t0, 3)}
                steps("exported graph")
                _write_side_files(source, kind, folder, triton, destination)
                steps("wrote folder")
                result = None
                if run_validation:
                    t0 = time.perf_counter()
                    reference = kind.reference(source.peft_model, spec, tolerances, validation)
                    steps.note("PEFT's references computed")
                    if kind.frees_model and not isinstance(model, PrefixModel):
                        # PEFT's answers are all computed: the PyTorch model is not needed any more,
                        # so ONNX Runtime does not hold the weights beside it.
                        source.release()
                        steps.note("PyTorch model released")
                    result = kind.validate(folder, reference, spec, tolerances)
                    report["timing_s"]["validation"] = round(time.perf_counter() - t0, 3)
                    report["validation"] = result.to_dict()
                    steps("validated")
                else:
                    report["validation"] = {"passed": None, "skipped": "--no-validate"}
                if ort_format and (result is None or result.passed):
                    report["ort_format"] = _write_ort_format(folder)
                report["timing_s"]["total"] = round(time.perf_counter() - started, 3)
                report["peak_memory_mb"] = round(peak_memory_mb(), 1)
                folder.write_report(report)
                steps("done")
                if result is not None and not result.passed:
                    if keep_invalid:
                        _keep_invalid(tmp, destination)
                    raise ValidationError(
                        "the exported graph does not match PEFT's forward:\n" + "\n".join(result.failures()[:20]),
                        report=result)
        except OSError as exc:
            raise output.translate_os_error(exc, destination) from exc
    finally:
        steps.close()
    return ExportResult(destination, destination / folder.graph_name, report, result)


def _write_ort_format(folder: ExportFolder) -> dict:
    from .deploy.ort_format import write_ort_format

    info = write_ort_format(folder)
    log.info("ORT format: %s (%.1f MB; model.onnx %.1f MB), %d operator kinds for a reduced build", info["graph"],
             info["ort_bytes"] / 1e6, info["onnx_bytes"] / 1e6, info["config_operators"])
    return info


def _keep_invalid(tmp: Path, destination: Path) -> None:
    target = destination.with_name(destination.name + ".invalid")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tmp, target)
    log.warning("the export that failed validation was kept at %s for inspection", target)


def validate_export(folder: str | Path, model: str | None = None, prefix: str | Path | None = None,
                    prefix_config: str | Path | None = None, tolerances: Tolerances | None = None) -> ValidationReport:
    """Recheck an export folder: file hashes, then the graph against PEFT (sources from the report)."""
    folder = ExportFolder.from_report(folder)
    report = folder.read_report()
    problems = [f"hash: {p}" for p in folder.check_hashes(report)]
    missing = [name for name in folder.graph_names(report) if not (folder.path / name).is_file()]
    if missing:
        # Nothing to run; a missing file is a failed check (exit 1), like a changed one.
        return ValidationReport(problems=problems or [f"hash: {m} is missing" for m in missing])
    source = _source_from_report(folder, report, model, prefix, prefix_config)
    compiled = report.get("compile")
    if compiled:
        from .compile.pipeline import check_by_agreement, options_from_report, recheck_fusions

        options = options_from_report(compiled)
        if options.optimize:
            problems += recheck_fusions(folder.graph, source.base.spec)
        if options.precision != "fp32":  # judged as at compile time, against PEFT (the fp32 graph is gone)
            result = check_by_agreement(folder, None, source.peft_model, options)
            result.problems[:0] = problems
            return result
    result = _validate_as_recorded(folder, report, source, tolerances, release=True)
    result.problems[:0] = problems
    return result


def _validate_as_recorded(folder: ExportFolder, report: dict, source: PrefixModel, tolerances: Tolerances | None,
                          release: bool) -> ValidationReport:
    """`folder`'s graph against PEFT with the settings and tolerances its report records (unless given);
    `release` frees the PyTorch model once PEFT's references are computed, where the kind allows."""
    recorded = report.get("validation", {}).get("settings", {})
    if tolerances is None:
        tolerances = Tolerances.from_settings(recorded)
    kind = kind_for(source.base.spec, report.get("layout", "folded"))
    settings = ValidationSettings.from_report(recorded, source.base.num_parameters)
    reference = kind.reference(source.peft_model, source.base.spec, tolerances, settings)
    if release and kind.frees_model:
        source.release()
    return kind.validate(folder, reference, source.base.spec, tolerances)


def _source_from_report(folder: ExportFolder, report: dict, model: str | None, prefix: str | Path | None,
                        prefix_config: str | Path | None) -> PrefixModel:
    """The model and prefix an export was made from (as recorded, unless given), loaded."""
    inputs = report.get("inputs", {})
    model = model or existing_path(inputs.get("model_path")) or inputs.get("model")
    prefix = prefix or existing_path(inputs.get("prefix_path")) or inputs.get("prefix")
    prefix_config = prefix_config or inputs.get("prefix_config")
    if not model or not prefix or prefix == "<in-memory>":
        raise InputError(f"{folder.path}: the report does not say which model and prefix were exported; pass "
                         "--model and --prefix.")
    return load_prefix_model(model, prefix, prefix_config, task_id=inputs.get("task_id"))


def compile_export(folder: str | Path, out: str | Path, options, *, model: str | None = None,
                   prefix: str | Path | None = None, prefix_config: str | Path | None = None,
                   source: PrefixModel | None = None, force: bool = False, keep_invalid: bool = False,
                   tolerances: Tolerances | None = None, progress: bool = True,
                   command_line: list[str] | None = None, ort_format: bool = False) -> ExportResult:
    """Compile an export folder into a new folder `out` (compile/pipeline.py): fused and/or at a
    reduced precision, validated (against PEFT, or by agreement), published atomically.

    `source` is the loaded model and prefix (export passes its own); else they are loaded from the
    folder's report (or `model`/`prefix`).
    """
    import copy

    from transformers import AutoConfig

    from .compile.pipeline import (check_by_agreement, check_compilable, compile_graph, copy_side_files,
                                   rotary_table_length)
    from .source.architectures import describe

    started = time.perf_counter()
    given = ExportFolder.open(folder)
    report = given.read_report()
    check_compilable(report, given)
    destination, _ = resolve_output(out)
    if destination.resolve() == given.path.resolve():
        raise InputError(f"compile writes a new folder; --out {out} is the folder being compiled.")
    output.check_destination(destination, force)
    spec = describe(AutoConfig.from_pretrained(str(given.path)))
    steps = Progress(3, progress)
    try:
        source = source or _source_from_report(given, report, model, prefix, prefix_config)
        steps("loaded model and prefix")
        new_report = copy.deepcopy(report)
        new_report["command_line"] = command_line or sys.argv
        new_report["compiled_from"] = {"folder": str(given.path), "graph_sha256": report.get("outputs", {}).get(
            "sha256", {}).get(given.graph_name)}
        with output.atomic_folder(destination, force) as tmp:
            target = ExportFolder(tmp, given.graph_name)
            graph_files = {given.graph_name, given.graph_name + ".data"}
            copy_side_files(given, tmp, graph_files)
            t0 = time.perf_counter()
            info, fp32_graph = compile_graph(given.graph, target.graph, spec, options,
                                             rotary_table_length(given.config, given.num_virtual_tokens),
                                             tmp / ".compile", given.num_virtual_tokens, given.layout)
            new_report["compile"] = {**options.describe(), **info, "seconds": round(time.perf_counter() - t0, 3)}
            new_report["graph"] = {**report.get("graph", {}), "nodes": info.get("fusion", {}).get(
                "nodes_after", report.get("graph", {}).get("nodes")), "weight_bytes": target.graph_bytes(),
                "external_data": (target.graph.name + ".data") if (tmp / (target.graph.name + ".data")).is_file()
                else None}
            steps("compiled graph")
            if options.precision == "fp32":  # the caller's model (bench, export) may serve again: kept
                result = _validate_as_recorded(target, report, source, tolerances, release=False)
            else:
                result = check_by_agreement(target, fp32_graph, source.peft_model, options)
            shutil.rmtree(tmp / ".compile", ignore_errors=True)
            new_report["validation"] = result.to_dict()
            new_report["timing_s"] = {**report.get("timing_s", {}), "compile": new_report["compile"]["seconds"],
                                      "compile_total": round(time.perf_counter() - started, 3)}
            new_report["peak_memory_mb"] = round(peak_memory_mb(), 1)
            if ort_format and result.passed:
                new_report["ort_format"] = _write_ort_format(target)
            target.write_report(new_report)
            steps("validated")
            if not result.passed:
                if keep_invalid:
                    _keep_invalid(tmp, destination)
                raise ValidationError(f"the {options.precision}{' fused' if options.optimize else ''} graph failed "
                                      "its checks:\n" + "\n".join(result.failures()[:20]), report=result)
    except OSError as exc:
        raise output.translate_os_error(exc, destination) from exc
    finally:
        steps.close()
    return ExportResult(destination, destination / given.graph_name, new_report, result)


__all__ = ["export_prefix_model", "validate_export", "compile_export", "load_prefix_model", "ExportResult",
           "PrefixModel"]
