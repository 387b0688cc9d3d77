"""The export pipeline, end to end: checkpoint -> prefix KV -> graph -> validation -> folder.

`export_prefix_model` is what `prefix-export` (and `prefix-export export`) runs; `validate_export`
is what `prefix-export validate OUT_DIR` runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

from . import __version__, contract, export_seq2seq, graph, output, seq2seq_contract
from .base_model import BaseModel, load_base_model
from .checkpoint import PrefixCheckpoint, load_prefix_checkpoint
from .errors import InputError, OutputError, UnsupportedError, ValidationError
from .export import DEFAULT_OPSET, LAYOUTS, export_decoder
from .genai import write_genai_config
from .prefix_kv import PREFIX_KV_FILE, build_peft_model, compute_prefix_kv
from .runtime import CacheLayoutDecoder, OnnxDecoder, create_session, graph_path
from .runtime_seq2seq import OnnxSeq2Seq
from .triton import check_name, model_name, write_triton_entry
from .validate import DEFAULT_ATOL, Tolerances, ValidationReport, validate
from .validate_seq2seq import validate_seq2seq

log = logging.getLogger(__name__)

REPORT_FILE = "export_report.json"


@dataclasses.dataclass
class ExportResult:
    folder: Path
    graph: Path
    report: dict
    validation: ValidationReport | None

    @property
    def passed(self) -> bool:
        return self.validation is None or self.validation.passed


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 1024**2


def _model_files(base: BaseModel) -> list[Path]:
    if base.local_dir is None:
        return []
    patterns = ("config.json", "*.safetensors", "*.bin", "generation_config.json")
    return sorted({p for pattern in patterns for p in base.local_dir.glob(pattern) if p.is_file()})


def _hashes(paths: list[Path], root: Path | None = None) -> dict[str, str]:
    return {str(p.relative_to(root) if root else p): sha256(p) for p in paths}


class _Progress:
    """A stage-level progress bar (tqdm on stderr) that tests and --quiet can switch off."""

    def __init__(self, stages: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=stages, desc="prefix-export", unit="step", leave=False, file=sys.stderr)

    def __call__(self, description: str) -> None:
        if self.bar is not None:
            self.bar.set_description(description)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def export_prefix_model(model: str | BaseModel, prefix: str | Path | PrefixCheckpoint, out: str | Path, *,
                        prefix_config: str | Path | None = None, force: bool = False, run_validation: bool = True,
                        tolerances: Tolerances | None = None, dtype: str | None = None, opset: int = DEFAULT_OPSET,
                        external_data: bool = False, keep_invalid: bool = False, progress: bool = True,
                        command_line: list[str] | None = None, layout: str = "folded",
                        triton: bool | str = False) -> ExportResult:
    """Export `model` + `prefix` to the folder `out` (or `out/NAME.onnx`), validated unless told not to.

    Every input is checked before anything is written; the folder appears only once complete and
    (unless `run_validation=False`) validated. A failed validation raises ValidationError, with the
    export kept beside `out` as `out.invalid/` only when `keep_invalid` is set.
    `layout`: "folded" (prefix inside the graph) or "cache" (the plain base decoder; the runtime feeds
    prefix_kv.safetensors as the first past). A folded decoder-only export also holds genai_config.json
    (onnxruntime-genai); `triton` (True or a model name) adds a Triton repository entry.
    """
    started = time.perf_counter()
    if layout not in LAYOUTS:
        raise InputError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}.")
    folder, graph_name = output.resolve_output(out)
    output.check_destination(folder, force)
    if isinstance(triton, str):
        check_name(triton)
    steps = _Progress(7 if run_validation else 6, progress)
    try:
        base = model if isinstance(model, BaseModel) else load_base_model(model, dtype=dtype)
        if base.spec.is_seq2seq and layout != "folded":
            raise UnsupportedError(f"--layout {layout} is for decoder-only models; {base.spec.model_type} is exported "
                                   "as an encoder + folded-prefix decoder (the default --layout folded).")
        if triton and base.spec.is_seq2seq:
            raise UnsupportedError(f"--triton writes an entry for one decoder graph; {base.spec.model_type} exports "
                                   "an encoder and a decoder graph, which need a Triton ensemble (not written yet).")
        steps("loaded model")
        checkpoint = prefix if isinstance(prefix, PrefixCheckpoint) else load_prefix_checkpoint(prefix, prefix_config)
        steps("loaded prefix")
        peft_model = build_peft_model(base, checkpoint)
        prefix_kv = compute_prefix_kv(peft_model, base.spec)
        steps("computed prefix KV")
        dtype_name = str(prefix_kv.tensor.dtype).replace("torch.", "")
        if tolerances is None:
            tolerances = Tolerances(atol=DEFAULT_ATOL.get(dtype_name, 1e-4))
        prefix_source = "<in-memory>" if isinstance(prefix, PrefixCheckpoint) else str(prefix)
        # Absolute paths too, so `prefix-export validate OUT` works from any working directory.
        inputs = {"model": base.source, "prefix": prefix_source,
                  "model_path": str(Path(base.source).expanduser().resolve()) if Path(base.source).expanduser().exists()
                  else None,
                  "prefix_path": str(Path(prefix_source).expanduser().resolve())
                  if Path(prefix_source).expanduser().exists() else None,
                  "prefix_config": str(prefix_config) if prefix_config else None, "checkpoint_kind": checkpoint.kind,
                  "sha256": _hashes(checkpoint.files + _model_files(base))}
        report = {"tool": "prefix-export", "version": __version__, "command_line": command_line or sys.argv,
                  "created_unix": int(time.time()), "layout": layout, "versions": library_versions(),
                  "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
                  "inputs": inputs,
                  "architecture": dataclasses.asdict(base.spec),
                  "prefix": {"num_virtual_tokens": prefix_kv.num_virtual_tokens, "shape": list(prefix_kv.tensor.shape),
                             "shape_meaning": "(L, 2, H_kv, P, D)", "dtype": dtype_name,
                             "prefix_projection": bool(checkpoint.config.prefix_projection)},
                  "io": (export_seq2seq.io_names(base.spec) if base.spec.is_seq2seq else
                         {"inputs": contract.input_names(base.spec.num_layers),
                          "outputs": contract.output_names(base.spec.num_layers)})}
        metadata = {contract.META_PREFIX_LENGTH: str(prefix_kv.num_virtual_tokens), contract.META_LAYOUT: layout,
                    contract.META_VERSION: __version__, "prefix_export.model_type": base.spec.model_type,
                    "prefix_export.source_sha256": json.dumps(inputs["sha256"], sort_keys=True),
                    "prefix_export.versions": json.dumps(report["versions"], sort_keys=True)}
        try:
            with output.atomic_folder(folder, force) as tmp:
                raw_dir = tmp / ".raw"
                raw_dir.mkdir()
                t0 = time.perf_counter()
                if base.spec.is_seq2seq:  # encoder_model.onnx + decoder_model.onnx (seq2seq_contract.py)
                    graph_name = seq2seq_contract.DECODER_GRAPH
                    graph_info = export_seq2seq.export_graphs(base.model, prefix_kv, base.spec, raw_dir, tmp,
                                                              metadata, opset, external_data)
                    steps("exported graph")
                else:
                    export_decoder(base.model, prefix_kv, base.spec, raw_dir / graph_name, opset=opset, layout=layout)
                    steps("exported graph")
                    graph_info = graph.finalize(raw_dir / graph_name, tmp / graph_name, metadata, external_data)
                report["timing_s"] = {"export": round(time.perf_counter() - t0, 3)}
                shutil.rmtree(raw_dir)
                prefix_kv.save(tmp / PREFIX_KV_FILE, {"model_type": base.spec.model_type})
                _save_model_files(base, tmp)
                if layout == "folded" and not base.spec.is_seq2seq:  # genai's decoder needs the prefix inside
                    write_genai_config(tmp, base.spec, prefix_kv.num_virtual_tokens, graph_name, base.config,
                                       getattr(base.model, "generation_config", None))
                if triton:
                    write_triton_entry(tmp, graph_name, triton if isinstance(triton, str) else model_name(folder))
                steps("wrote folder")
                report["graph"] = graph_info
                validation = None
                if run_validation:
                    t0 = time.perf_counter()
                    if base.spec.is_seq2seq:
                        validation = validate_seq2seq(OnnxSeq2Seq.from_folder(tmp), peft_model, base.spec, tolerances,
                                                      decoder_graph=tmp / graph_name)
                    else:
                        decoder, where = _validation_decoder(tmp / graph_name, layout)
                        validation = validate(decoder, peft_model, base.spec.vocab_size, tolerances,
                                              max_positions=_position_budget(base, prefix_kv.num_virtual_tokens),
                                              **where)
                    report["timing_s"]["validation"] = round(time.perf_counter() - t0, 3)
                    report["validation"] = validation.to_dict()
                    steps("validated")
                else:
                    report["validation"] = {"passed": None, "skipped": "--no-validate"}
                report["timing_s"]["total"] = round(time.perf_counter() - started, 3)
                report["peak_memory_mb"] = round(peak_memory_mb(), 1)
                report["outputs"] = {"sha256": _hashes(sorted(p for p in tmp.rglob("*") if p.is_file()), tmp)}
                (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
                steps("done")
                if validation is not None and not validation.passed:
                    if keep_invalid:
                        _keep_invalid(tmp, folder)
                    raise ValidationError(
                        "the exported graph does not match PEFT's forward:\n" + "\n".join(validation.failures()[:20]),
                        report=validation)
        except OSError as exc:
            raise output.translate_os_error(exc, folder) from exc
    finally:
        steps.close()
    return ExportResult(folder, folder / graph_name, report, validation)


def _validation_decoder(graph_file: Path, layout: str):
    """The decoder validate() drives, and where it finds the prefix to check against PEFT's.

    folded: the graph itself (its prefix initializers). cache: the graph seen through
    CacheLayoutDecoder (prefix fed as the first past), and prefix_kv.safetensors beside it.
    """
    decoder = OnnxDecoder(create_session(graph_file, "cpu"))
    if layout != "cache":
        return decoder, {"graph_file": graph_file}
    from .decoding import load_prefix_file

    prefix_file = graph_file.parent / PREFIX_KV_FILE
    return CacheLayoutDecoder(decoder, load_prefix_file(prefix_file)), {"prefix_kv_file": prefix_file}


def _position_budget(base: BaseModel, num_virtual_tokens: int) -> int | None:
    """User tokens a learned-position model can still take after the prefix's P positions."""
    spec = base.spec
    return spec.max_positions - num_virtual_tokens if spec.positions == "learned" else None


def _keep_invalid(tmp: Path, folder: Path) -> None:
    target = folder.with_name(folder.name + ".invalid")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tmp, target)
    log.warning("the export that failed validation was kept at %s for inspection", target)


def _save_model_files(base: BaseModel, folder: Path) -> None:
    """config.json, generation_config.json and the tokenizer, so the folder stands alone."""
    base.config.save_pretrained(folder)
    generation_config = getattr(base.model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(folder)


def read_report(folder: Path) -> dict:
    path = Path(folder) / REPORT_FILE
    if not path.is_file():
        raise InputError(f"{folder} has no {REPORT_FILE}; it is not an export folder written by prefix-export.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}).") from exc


def check_hashes(folder: Path, report: dict) -> list[str]:
    """Files whose SHA-256 differs from the report, or that are missing."""
    problems = []
    for name, expected in report.get("outputs", {}).get("sha256", {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256(path) != expected:
            problems.append(f"{name} changed since export (SHA-256 differs)")
    return problems


def _existing(path: str | None) -> str | None:
    return path if path and Path(path).exists() else None


def validate_export(folder: str | Path, model: str | None = None, prefix: str | Path | None = None,
                    prefix_config: str | Path | None = None, tolerances: Tolerances | None = None) -> ValidationReport:
    """Recheck an export folder: file hashes, then the graph against PEFT (sources from the report)."""
    folder = Path(folder)
    report = read_report(folder)
    problems = check_hashes(folder, report)
    graph_info = report.get("graph", {})
    # A seq2seq export lists its graphs under `parts`; a decoder-only export has one graph.
    graph_names = list(graph_info.get("parts", {})) or [graph_info.get("graph") or "model.onnx"]
    missing = [name for name in graph_names if not (folder / name).is_file()]
    if missing:
        # Nothing to run; a missing file is a failed check (exit 1), like a changed one.
        return ValidationReport(problems=[f"hash: {p}" for p in problems] or [f"hash: {m} is missing" for m in missing])
    inputs = report.get("inputs", {})
    model = model or _existing(inputs.get("model_path")) or inputs.get("model")
    prefix = prefix or _existing(inputs.get("prefix_path")) or inputs.get("prefix")
    prefix_config = prefix_config or inputs.get("prefix_config")
    if not model or not prefix or prefix == "<in-memory>":
        raise InputError(f"{folder}: the report does not say which model and prefix were exported; pass "
                         "--model and --prefix.")
    base = load_base_model(model)
    checkpoint = load_prefix_checkpoint(prefix, prefix_config)
    peft_model = build_peft_model(base, checkpoint)
    if tolerances is None:
        tolerances = Tolerances(atol=report.get("validation", {}).get("settings", {}).get("atol", 1e-4))
    if base.spec.is_seq2seq:
        result = validate_seq2seq(OnnxSeq2Seq.from_folder(folder), peft_model, base.spec, tolerances,
                                  decoder_graph=folder / seq2seq_contract.DECODER_GRAPH)
        result.problems[:0] = [f"hash: {p}" for p in problems]
        return result
    graph_file = graph_path(folder)
    decoder, where = _validation_decoder(graph_file, report.get("layout", "folded"))
    result = validate(decoder, peft_model, base.spec.vocab_size, tolerances,
                      max_positions=_position_budget(base, checkpoint.num_virtual_tokens), **where)
    result.problems[:0] = [f"hash: {p}" for p in problems]
    return result


__all__ = ["export_prefix_model", "validate_export", "ExportResult", "OutputError"]
