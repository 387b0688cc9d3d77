"""The one `torch.onnx.export` (dynamo) call every graph goes through, and the translation of its errors.

A write failure inside the exporter (disk full, read-only, permissions) is re-raised as the OSError
it is, so the pipeline reports it like any other write failure (errors: exit 2, nothing published);
anything else is an ExportFailedError carrying the exporter's own output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import logging
from pathlib import Path

import torch

from ..errors import ExportFailedError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


@dataclasses.dataclass
class GraphPlan:
    """One graph to export: the module, its tracing inputs, its contract's names and dynamic axes."""

    file_name: str  # e.g. model.onnx, encoder_model.onnx
    what: str  # for messages: "decoder", "encoder"
    module: torch.nn.Module
    args: tuple  # tracing inputs; sizes distinct so the exporter cannot confuse the dynamic axes
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict
    overridable: list[str] = dataclasses.field(default_factory=list)  # initializers also listed as inputs


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def os_error_in_chain(exc: BaseException) -> OSError | None:
    """The OSError behind an exporter exception (it wraps what its writer raised), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def release_exporter_state() -> None:
    """Drop what the exporter's libraries keep at module level after an export (found with a referrer
    walk from a leftover torch.fx Node; 180 MB on a 150M-parameter llama, growing with the graph):

    - onnxscript's module-level rewrite rules keep their matcher's last match: an onnx_ir node whose
      metadata holds the torch.fx node, so the whole traced program (FX graph, onnx_ir graph, symbolic
      shapes) stays alive, and with it whatever the program wraps (the model's own parameters);
    - torch's export tracer keeps a fake-tensor -> proxy map (`_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT`).
    Both are state for the next export's matching/tracing only; resetting them is what a fresh import
    would hold. Private names, so each is guarded.
    """
    import gc

    try:
        from torch.fx.experimental import proxy_tensor

        proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT.clear()
    except (ImportError, AttributeError):
        pass
    try:
        from onnxscript.rewriter._basics import MatchResult
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:
        return
    # Collected first: garbage cycles left by torch.compile's tracer hold weak proxies to freed objects,
    # and isinstance() on a dead proxy raises ReferenceError (seen after bench --torch-compile).
    gc.collect()
    for obj in gc.get_objects():
        try:
            matcher = isinstance(obj, SimplePatternMatcher)
        except ReferenceError:
            continue
        if matcher:
            obj._current_node = None
            obj._match = MatchResult()
            for name in ("_graph", "_tracer"):
                if hasattr(obj, name):
                    setattr(obj, name, None)
    gc.collect()


def run_exporter(plan: GraphPlan, path: Path, opset: int, model_type: str) -> None:
    """Export `plan` to `path` (one file; export/graph.py post-processes it)."""
    log.info("torch.onnx.export (dynamo) %s -> %s", plan.what, path)
    captured = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(captured):
            program = torch.onnx.export(plan.module.eval(), plan.args, str(path), dynamo=True, opset_version=opset,
                                        input_names=plan.input_names, output_names=plan.output_names,
                                        dynamic_shapes=plan.dynamic_shapes, optimize=True, external_data=True,
                                        verbose=False)
        # The program's graph wraps the model's own parameters (and its ExportedProgram holds them), and
        # something in the exporter keeps the program alive: cut both, so that releasing the model
        # after validation's references really frees its weights.
        if program is not None:
            program.model = program.exported_program = None
        del program
        release_exporter_state()
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one typed error for users
        disk = os_error_in_chain(exc)
        if disk is not None:
            raise disk from exc  # a write failed (disk full, permissions): the pipeline names it as such
        raise ExportFailedError(f"torch.onnx.export failed for the {plan.what} of {model_type}: "
                                f"{type(exc).__name__}: {exc}\nexporter output:\n{captured.getvalue()[-2000:]}") from exc
    log.debug("exporter output:\n%s", captured.getvalue())
