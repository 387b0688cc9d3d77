"""Loading and saving the graphs the compile passes rewrite, and the invariants every pass keeps:
the folded prefix initializers by name, and the export's metadata."""
from __future__ import annotations

import collections
from pathlib import Path

from .. import contract
from ..errors import ExportFailedError
from ..export.graph import tensor_bytes as initializer_bytes
from ..export.graph import too_large_for_one_file

__all__ = ["load", "save", "op_counts", "check_prefix_kept", "copy_metadata", "initializer_bytes", "keep_io"]


def load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save(model, path: Path) -> None:
    """Single file below 2 GB, else one external data file beside it (`NAME.onnx.data`)."""
    import onnx

    if too_large_for_one_file(initializer_bytes(model)):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(path).name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def op_counts(model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def check_prefix_kept(before, after, what: str) -> None:
    """Validation's check 0 (and adapters) read the folded prefix initializers by name; a pass that
    renamed or dropped them produced a graph nobody can check."""
    names = {t.name for t in before.graph.initializer if t.name.startswith("prefix_")}
    kept = {t.name for t in after.graph.initializer} | {i.name for i in after.graph.input}
    lost = sorted(names - kept)
    if lost:
        raise ExportFailedError(f"{what} removed or renamed the folded prefix initializers {lost[:4]}; validation "
                                f"needs them by name ({contract.prefix_initializer_name(0, 'key')}, ...).")


def copy_metadata(source, target, extra: dict[str, str] | None = None) -> None:
    values = {prop.key: prop.value for prop in source.metadata_props}  # first: `source` may be `target`
    values.update(extra or {})
    del target.metadata_props[:]
    for key, value in values.items():
        target.metadata_props.add(key=key, value=value)


def keep_io(before, after, what: str) -> None:
    """The graph's I/O contract unchanged by a pass: inputs the pass dropped because nothing reads them
    (BLOOM's position_ids: ALiBi needs none) are put back, unused, in their place; outputs must match."""
    names = [i.name for i in after.graph.input]
    if [o.name for o in before.graph.output] != [o.name for o in after.graph.output]:
        raise ExportFailedError(f"{what} changed the graph's outputs; the export's contract needs them as they were.")
    if names == [i.name for i in before.graph.input]:
        return
    kept = {i.name: i for i in after.graph.input}
    restored = [kept.get(i.name, i) for i in before.graph.input]
    extra = [i for i in after.graph.input if i.name not in {r.name for r in restored}]
    del after.graph.input[:]
    after.graph.input.extend(restored + extra)
