"""The external-data path (what > 2 GB graphs take), forced on a tiny model: checker by path, ORT,
and the folder still works after being moved (external data is referenced relatively)."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
from onnx import external_data_helper

from prefix_export.api import export_prefix_model
from prefix_export.folder import ExportFolder
from prefix_export.runtime.decoder import OnnxDecoder
from prefix_export.runtime.sessions import create_session


def _prefill_logits(graph):
    decoder = OnnxDecoder(create_session(graph))
    ids = np.array([[5, 17, 42, 9]], np.int64)
    logits, _ = decoder.run(ids, np.ones_like(ids), np.arange(4, dtype=np.int64)[None], decoder.empty_past(1))
    return logits


def test_forced_external_data_is_self_contained(tmp_path, gpt2_dir, gpt2_adapter):
    result = export_prefix_model(str(gpt2_dir), gpt2_adapter, tmp_path / "out", external_data=True, progress=False)
    assert result.validation.passed
    graph = result.folder / "model.onnx"
    onnx.checker.check_model(str(graph))  # by path, as for > 2 GB graphs

    model = onnx.load(str(graph), load_external_data=False)
    external = [t for t in model.graph.initializer if external_data_helper.uses_external_data(t)]
    assert external, "nothing was written as external data"
    locations = {next(e.value for e in t.external_data if e.key == "location") for t in external}
    assert locations == {"model.onnx.data"}, locations  # relative, beside the graph
    data_bytes = (result.folder / "model.onnx.data").stat().st_size
    assert data_bytes >= sum(t.dims[0] * t.dims[-1] * 4 for t in external if len(t.dims) == 2) * 0.99
    before = _prefill_logits(graph)

    moved = tmp_path / "somewhere" / "else"
    moved.parent.mkdir()
    shutil.move(str(result.folder), str(moved))
    assert not (tmp_path / "out").exists()
    assert ExportFolder.open(moved).check_hashes() == []
    onnx.checker.check_model(str(moved / "model.onnx"))
    np.testing.assert_array_equal(_prefill_logits(moved / "model.onnx"), before)
