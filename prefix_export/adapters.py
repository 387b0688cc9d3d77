"""Many tasks, one folded graph: another task's prefix as an adapter file, validated against PEFT.

`make_adapter` is what `prefix-export adapter OUT --prefix TASK --out task.onnx_adapter` runs: it checks
that the task fits the export (same base model by its files' hashes, same layers, prefix length, KV
heads, head dim and dtype), runs the task's PrefixEncoder through PEFT into the prefix KV
(L, 2, H_kv, P, D), writes it as an ONNX Runtime adapter file (runtime/adapters.py), validates the
export *with that adapter active* against PEFT with that task's prefix (logits and greedy tokens,
the same checks as an export's), and only then publishes the file, with its report
`task.onnx_adapter.json` beside it. `validate_adapter` rechecks a published adapter.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from . import __version__
from .api import PrefixModel, existing_path, model_files, library_versions, load_prefix_model
from .errors import InputError, MismatchError, OutputError, UnsupportedError, ValidationError
from .export.kinds import DecoderFolded
from .folder import ExportFolder, hashes, sha256
from .runtime import adapters
from .source.checkpoint import load_prefix_checkpoint
from .validate.report import DEFAULT_ATOL, Tolerances, ValidationReport, ValidationSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AdapterResult:
    path: Path
    report: dict
    validation: ValidationReport | None


def _swappable_export(export_dir: str | Path) -> tuple[ExportFolder, dict]:
    """The export folder and its report, refused unless it is a swappable folded decoder export."""
    folder = ExportFolder.from_report(export_dir)
    report = folder.read_report()
    if folder.is_seq2seq:
        raise UnsupportedError(f"{folder.path} is an encoder-decoder export; adapters are for decoder-only exports.")
    if report.get("layout") == "cache":
        raise UnsupportedError(f"{folder.path} has the cache layout, which already takes any task's prefix as its "
                               "first past: export the task on its own and pass its prefix_kv.safetensors to "
                               "`prefix-export generate --prefix-kv`.")
    if not report.get("swappable_prefix"):
        raise UnsupportedError(f"{folder.path}'s graph keeps its prefix constant (exported without "
                               "--swappable-prefix), so no adapter can replace it; re-export it with --swappable-prefix.")
    return folder, report


def _check_task_fits(checkpoint, report: dict, export_dir: Path) -> None:
    """Before the model is loaded: the task's layers and prefix length against the export's."""
    config, arch, prefix = checkpoint.config, report["architecture"], report["prefix"]
    problems = []
    if config.num_layers is not None and int(config.num_layers) != int(arch["num_layers"]):
        problems.append(f"{config.num_layers} layers, the export's model has {arch['num_layers']}")
    if int(config.num_virtual_tokens) != int(prefix["num_virtual_tokens"]):
        problems.append(f"P={config.num_virtual_tokens} virtual tokens, the export's graph is built for "
                        f"P={prefix['num_virtual_tokens']} (its attention mask and cache length are fixed in the "
                        "graph); export this task on its own, or train it with the same P")
    if problems:
        raise MismatchError(f"the task's prefix does not fit {export_dir}: it has " + "; ".join(problems) + ".")


def _check_trained_on(checkpoint, report: dict, export_dir: Path) -> None:
    """A task whose adapter_config.json names a local model folder other than the export's must be that
    same model, file for file (a prefix trained on other weights computes another task, silently)."""
    named = getattr(checkpoint.config, "base_model_name_or_path", None)
    folder = Path(named).expanduser() if named else None
    exported = report["inputs"].get("model_path")
    if folder is None or not folder.is_dir() or (exported and folder.resolve() == Path(exported).resolve()):
        return
    recorded = _recorded_hashes(report)
    differing = [path.name for path in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
                 if path.is_file() and path.name in recorded and sha256(path) != recorded[path.name]]
    if differing:
        raise MismatchError(f"the task was trained on {folder} (its adapter config's base_model_name_or_path), whose "
                            f"{', '.join(differing[:3])} differ from the files {export_dir} was exported from "
                            f"({report['inputs'].get('model')}); a prefix only means something on its own base model.")


def _recorded_hashes(report: dict) -> dict[str, str]:
    """{file name: sha256} of the sources an export's report records."""
    return {Path(path).name: digest for path, digest in report.get("inputs", {}).get("sha256", {}).items()}


def _check_same_model(prefix_model: PrefixModel, report: dict, export_dir: Path) -> dict[str, str]:
    """The model loaded now must be, file for file, the one the export was made from (its report's hashes).
    Returns the model files' hashes ({path: sha256}), computed once here for the adapter's report."""
    recorded = _recorded_hashes(report)
    files = model_files(prefix_model.base)
    digests = hashes(files)
    differing = []
    for path in files:
        digest = digests[str(path)]
        if recorded.get(path.name) != digest:
            differing.append(f"{path.name}: sha256 {digest[:12]}… here, "
                             f"{(recorded.get(path.name) or 'absent')[:12]}… in the export")
    if differing:
        raise MismatchError(f"{prefix_model.base.source} is not the model {export_dir} was exported from "
                            f"({export_dir / 'export_report.json'} records its files' hashes): "
                            + "; ".join(differing[:4]) + ". Pass the export's own model (--model).")
    if not files:
        log.warning("the model %s has no local files to compare with the export's hashes; trusting its name",
                    prefix_model.base.source)
    return digests


def _check_destination(path: Path, force: bool) -> None:
    if path.exists() and not path.is_file():
        raise OutputError(f"--out {path} exists and is not a file.")
    if path.exists() and not force:
        raise OutputError(f"--out {path} already exists; pass --force to replace it.")


@contextlib.contextmanager
def _atomic_file(path: Path, force: bool):
    """Yield a temporary sibling of `path` to write; it replaces `path` only when the block succeeds."""
    _check_destination(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"--out {path}: nothing can be written in {path.parent} ({exc.strerror or exc}).") from exc
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes it private; the published file gets the usual mode
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def make_adapter(export_dir: str | Path, prefix: str | Path, out: str | Path, *, model: str | Path | None = None,
                 prefix_config: str | Path | None = None, force: bool = False, run_validation: bool = True,
                 tolerances: Tolerances | None = None, greedy_tokens: int | None = None,
                 command_line: list[str] | None = None, task_id: int | None = None) -> AdapterResult:
    """Write task `prefix`'s adapter file for the swappable export `export_dir` at `out`, validated
    against PEFT through ONNX Runtime's adapter API unless told not to. Nothing is written on failure."""
    started = time.perf_counter()
    out = Path(out)
    if out.suffix != adapters.ADAPTER_SUFFIX:
        raise InputError(f"--out {out}: an adapter file's name ends in {adapters.ADAPTER_SUFFIX} (onnxruntime-genai "
                         "and ONNX Runtime look for it).")
    _check_destination(out, force)  # before minutes of loading
    folder, report = _swappable_export(export_dir)
    checkpoint = load_prefix_checkpoint(prefix, prefix_config, task_id)
    _check_task_fits(checkpoint, report, folder.path)
    _check_trained_on(checkpoint, report, folder.path)
    model = model or existing_path(report["inputs"].get("model_path")) or report["inputs"].get("model")
    source = load_prefix_model(model, checkpoint, dtype=report["prefix"]["dtype"])
    model_hashes = _check_same_model(source, report, folder.path)
    source.prefix_source = str(prefix)
    prefix_kv = source.prefix_kv.tensor.numpy()  # (L, 2, H_kv, P, D), the export's dtype
    with _atomic_file(out, force) as tmp:
        info = adapters.write_adapter(tmp, prefix_kv)
        # The adapter must fit the graph before minutes of validation (shapes, dtype, names).
        adapters.check_adapter_fits(adapters.read_adapter(tmp), _graph_prefix_inputs(folder), str(out),
                                    str(folder.graph))
        adapter_report = {
            "tool": "prefix-export adapter", "version": __version__, "command_line": command_line,
            "created_unix": int(time.time()), "versions": library_versions(),
            "export": {"folder": str(folder.path.resolve()), "graph": folder.graph.name,
                       "graph_sha256": sha256(folder.graph)},
            "inputs": {"model": source.base.source, "prefix": str(prefix), "prefix_path": existing_path(str(prefix)),
                       "prefix_config": str(prefix_config) if prefix_config else None,
                       "checkpoint_kind": checkpoint.kind, "method": checkpoint.method, "task_id": task_id,
                       "sha256": {**hashes(checkpoint.files), **model_hashes}},
            "adapter": {"file": out.name, "sha256": sha256(tmp), **info,
                        "prefix_shape": list(prefix_kv.shape), "shape_meaning": "(L, 2, H_kv, P, D)",
                        "dtype": str(prefix_kv.dtype), "graph_bytes": folder.graph_bytes()}}
        result = None
        if run_validation:
            t0 = time.perf_counter()
            result = _validate(folder, tmp, source, report, tolerances, greedy_tokens)
            adapter_report["validation"] = result.to_dict()
            adapter_report["timing_s"] = {"validation": round(time.perf_counter() - t0, 3)}
            if not result.passed:
                raise ValidationError(f"the export with adapter {out.name} active does not match PEFT with that task's "
                                      "prefix:\n" + "\n".join(result.failures()[:20]), report=result)
        else:
            adapter_report["validation"] = {"passed": None, "skipped": "--no-validate"}
        adapter_report.setdefault("timing_s", {})["total"] = round(time.perf_counter() - started, 3)
        try:
            adapters.report_path(out).write_text(json.dumps(adapter_report, indent=2) + "\n")
            os.replace(tmp, out)
        except OSError as exc:
            adapters.report_path(out).unlink(missing_ok=True)
            raise OutputError(f"--out {out}: the adapter could not be written ({exc.strerror or exc}).") from exc
    log.info("wrote %s (%d bytes; the graph is %d bytes)", out, info["bytes"], folder.graph_bytes())
    return AdapterResult(out, adapter_report, result)


def _graph_prefix_inputs(folder: ExportFolder) -> dict:
    """{name: (shape, dtype)} of the graph's overridable prefix inputs, read without its weights."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(folder.graph), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return {i.name: (tuple(d.dim_value for d in i.type.tensor_type.shape.dim),
                     helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in graph.input if i.name.startswith("prefix_") and i.name in initializers}


def _validate(folder: ExportFolder, adapter_file: Path, source: PrefixModel, report: dict,
              tolerances: Tolerances | None, greedy_tokens: int | None) -> ValidationReport:
    """PEFT's references for the task, the PyTorch model freed, then the graph with the adapter active."""
    dtype = report["prefix"]["dtype"]
    tolerances = tolerances or Tolerances(fallback_atol=DEFAULT_ATOL.get(dtype, 1e-4))
    kind = DecoderFolded(swappable=True)
    settings = ValidationSettings.for_model(source.base.num_parameters, greedy_tokens)
    reference = kind.reference(source.peft_model, source.base.spec, tolerances, settings)
    source.release()
    return kind.validate_adapter(folder, adapter_file, reference, tolerances)


def validate_adapter(adapter_file: str | Path, export_dir: str | Path | None = None, model: str | None = None,
                     prefix: str | Path | None = None, prefix_config: str | Path | None = None,
                     tolerances: Tolerances | None = None) -> ValidationReport:
    """Recheck a published adapter: its file and its export's graph against the hashes in its report,
    then the export with it active against PEFT with its task's prefix (sources from the report)."""
    adapter_file = Path(adapter_file)
    adapters.read_adapter(adapter_file)  # a missing, truncated or foreign file is an input error, as everywhere
    report_file = adapters.report_path(adapter_file)
    if not report_file.is_file():
        raise InputError(f"{adapter_file}: no report {report_file.name} beside it, so its export and task are unknown; "
                         "remake it with `prefix-export adapter`.")
    recorded = json.loads(report_file.read_text())
    folder, export_report = _swappable_export(export_dir or recorded["export"]["folder"])
    problems = []
    if sha256(adapter_file) != recorded["adapter"]["sha256"]:
        problems.append(f"hash: {adapter_file.name} changed since it was made")
    if sha256(folder.graph) != recorded["export"]["graph_sha256"]:
        problems.append(f"hash: {folder.graph} changed since the adapter was made")
    inputs = recorded["inputs"]
    prefix = prefix or inputs.get("prefix_path") or inputs.get("prefix")
    checkpoint = load_prefix_checkpoint(prefix, prefix_config or inputs.get("prefix_config"), inputs.get("task_id"))
    source = load_prefix_model(model or inputs["model"], checkpoint, dtype=export_report["prefix"]["dtype"])
    _check_same_model(source, export_report, folder.path)
    if tolerances is None:
        tolerances = Tolerances.from_settings(recorded.get("validation", {}).get("settings", {}))
    greedy_tokens = recorded.get("validation", {}).get("settings", {}).get("greedy_tokens")
    result = _validate(folder, adapter_file, source, export_report, tolerances, greedy_tokens)
    result.problems[:0] = problems
    return result


__all__ = ["make_adapter", "validate_adapter", "AdapterResult"]
