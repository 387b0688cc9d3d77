"""Real checkpoints: bfloat16 weights exported with no flags, sharded safetensors, validation that scales.

Every registered family is saved in bfloat16 (as most released LLMs are) and exported with no flags:
the export must choose a CPU-runnable dtype from the model's own numbers, record why, and validate.
"""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from prefix_export.cli import main
from prefix_export.source import architectures
from tiny_models import make_prefix, save_tiny_model, tiny_config

REGISTERED = architectures.supported_model_types()


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    """{model_type: (bfloat16 model folder, prefix trained on the same weights in float32)}."""
    root = tmp_path_factory.mktemp("bf16")
    made = {}
    for model_type in REGISTERED:
        fp32 = root / f"{model_type}-fp32"
        model = save_tiny_model(tiny_config(model_type), fp32)
        prefix = make_prefix(fp32, root / f"{model_type}-prefix", 3, projection=True, trained=True)
        bf16 = root / f"{model_type}-bf16"
        model.to(torch.bfloat16).save_pretrained(bf16)
        made[model_type] = (bf16, prefix)
    return made


@pytest.mark.parametrize("model_type", REGISTERED)
def test_bf16_checkpoint_exports_with_no_flags_and_validates(tmp_path, bf16_models, model_type, capsys):
    model, prefix = bf16_models[model_type]
    assert json.loads((model / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    out = tmp_path / "out"
    code = main(["--model", str(model), "--prefix", str(prefix), "--out", str(out), "-q"])
    text = capsys.readouterr()
    print(text.out[-3000:], text.err[-3000:])
    assert code == 0, text.err
    report = json.loads((out / "export_report.json").read_text())
    choice = report["dtype"]
    assert choice["checkpoint"] == "bfloat16" and choice["exported"] in ("float16", "float32")
    unsafe = architectures.describe(tiny_config(model_type)).float16_unsafe
    if unsafe:  # the registry's evidence (bart, t5): float32, and the reason is given
        assert choice["exported"] == "float32" and unsafe in choice["why"]
    else:  # measured evidence
        assert "calibration batch" in choice["why"] and choice["peak_activation"] > 0
    assert report["prefix"]["dtype"] == choice["exported"]
    assert report["validation"]["passed"] is True
    assert "from a bfloat16 checkpoint" in text.out  # the summary says what was chosen and why
    graph_file = out / ("decoder_model.onnx" if "parts" in report["graph"] else "model.onnx")
    graph = onnx.load(str(graph_file), load_external_data=False)
    kv = next(i for i in graph.graph.input if i.name.startswith("past_key_values."))
    expected = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT}[choice["exported"]]
    assert kv.type.tensor_type.elem_type == expected


def test_bfloat16_on_request_refuses_validation_and_names_the_fix(tmp_path, bf16_models, capsys):
    model, prefix = bf16_models["llama"]
    out = tmp_path / "out"
    code = main(["--model", str(model), "--prefix", str(prefix), "--out", str(out), "--dtype", "bfloat16", "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no bfloat16 kernels" in err and "float16" in err and "--no-validate" in err
    assert not out.exists()
    # For a GPU target: exported unvalidated, and the report says so.
    assert main(["--model", str(model), "--prefix", str(prefix), "--out", str(out), "--dtype", "bfloat16", "-q",
                 "--no-validate"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["prefix"]["dtype"] == "bfloat16" and report["validation"]["passed"] is None


def test_sharded_checkpoint_loads_hashes_every_shard_and_validates(tmp_path, gpt2_adapter):
    model = save_tiny_model(tiny_config("gpt2"), tmp_path / "unsharded")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="60KB")
    shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file(), sorted(p.name for p in sharded.iterdir())
    out = tmp_path / "out"
    assert main(["--model", str(sharded), "--prefix", str(gpt2_adapter), "--out", str(out), "-q"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    hashed = {name.rsplit("/", 1)[-1] for name in report["inputs"]["sha256"]}
    assert set(shards) | {"model.safetensors.index.json", "config.json"} <= hashed
    assert report["validation"]["passed"] is True


def test_greedy_tokens_option_is_recorded_and_never_zero(tmp_path, gpt2_dir, gpt2_adapter, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(gpt2_dir), "--prefix", str(gpt2_adapter), "--out", str(out), "-q",
                 "--greedy-tokens", "5"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["validation"]["settings"]["greedy_tokens"] == 5
    assert [g["new_tokens"] for g in report["validation"]["greedy"]] == [5, 5]
    assert main(["--model", str(gpt2_dir), "--prefix", str(gpt2_adapter), "--out", str(tmp_path / "zero"), "-q",
                 "--greedy-tokens", "0"]) == 2
    assert "--greedy-tokens must be >= 1" in capsys.readouterr().err
