"""`--triton`: a Triton model repository entry whose config.pbtxt parses with Triton's own ModelConfig proto."""
from __future__ import annotations

import os

import onnxruntime as ort
import pytest

from prefix_export import contract
from prefix_export.api import export_prefix_model
from prefix_export.cli import main
from prefix_export.errors import ExportFailedError, InputError, UnsupportedError
from prefix_export.deploy.triton import CONFIG_FILE, load_model_config_proto, parse_config


def _proto():
    proto = load_model_config_proto()
    if proto is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("tritonclient is not installed (.ci/run installs it with --no-deps)")
        pytest.skip("tritonclient is not installed: pip install --no-deps tritonclient")
    return proto


@pytest.fixture(scope="module")
def triton_export(tmp_path_factory, gpt2_dir, gpt2_adapter):
    out = tmp_path_factory.mktemp("triton") / "prefix gpt2"  # a space: the model name must be cleaned
    return export_prefix_model(str(gpt2_dir), gpt2_adapter, out, progress=False, triton=True)


def test_triton_entry_layout_and_syntax(triton_export):
    proto = _proto()
    entry = triton_export.folder / "triton" / "prefix_gpt2"
    assert (entry / "1" / "model.onnx").is_file()
    # A hard link (or copy) of the validated graph, byte for byte.
    assert (entry / "1" / "model.onnx").read_bytes() == triton_export.graph.read_bytes()
    config = parse_config((entry / CONFIG_FILE).read_text(), proto)
    assert config.name == "prefix_gpt2"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 0
    session = ort.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    types = {"tensor(int64)": proto.TYPE_INT64, "tensor(float)": proto.TYPE_FP32}
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [t.name for t in actual]
        for tensor, value in zip(declared, actual):
            assert list(tensor.dims) == [d if isinstance(d, int) else -1 for d in value.shape], tensor.name
            assert tensor.data_type == types[value.type], tensor.name
    assert [t.name for t in config.input] == contract.input_names(2)
    past = next(t for t in config.input if t.name == contract.past_name(0, "key"))
    assert list(past.dims) == [-1, 4, -1, 8]  # (B, H_kv, past, D) of the tiny GPT-2
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP32"  # the graph's own dtype


def test_triton_syntax_check_rejects_a_broken_config():
    proto = _proto()
    with pytest.raises(ExportFailedError, match="does not parse as Triton's ModelConfig"):
        parse_config('name: "x"\nmax_batch_size: "many"\n', proto)
    with pytest.raises(ExportFailedError, match="does not parse"):
        parse_config('name: "x"\nno_such_field: 1\n', proto)


def test_triton_name_is_checked_before_any_work(tmp_path, gpt2_dir, gpt2_adapter, capsys):
    with pytest.raises(InputError, match=r"--triton '\.\./x': expected a model name"):
        export_prefix_model(str(gpt2_dir), gpt2_adapter, tmp_path / "out", progress=False, triton="../x")
    assert not (tmp_path / "out").exists()
    code = main(["--model", str(gpt2_dir), "--prefix", str(gpt2_adapter), "--out", str(tmp_path / "out"),
                 "--triton", "a/b", "-q"])
    assert code == 2
    assert "expected a model name" in capsys.readouterr().err


def test_triton_refuses_seq2seq_before_exporting(tmp_path):
    from tiny_models import make_prefix, save_tiny_model, tiny_config

    save_tiny_model(tiny_config("t5"), tmp_path / "t5")
    make_prefix(tmp_path / "t5", tmp_path / "prefix", num_virtual_tokens=2, projection=False, trained=False)
    with pytest.raises(UnsupportedError, match="--triton writes an entry for one decoder graph; t5 exports"):
        export_prefix_model(str(tmp_path / "t5"), tmp_path / "prefix", tmp_path / "out", progress=False, triton=True)
    assert not (tmp_path / "out").exists()
