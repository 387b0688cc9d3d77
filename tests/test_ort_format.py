"""`--format ort`: model.ort and required_operators_and_types.config beside model.onnx, for mobile and
reduced-size ONNX Runtime builds; ONNX Runtime runs model.ort to the tokens of model.onnx."""
from __future__ import annotations

import json

from tests_helpers import assert_refused, run_cli
from tiny_models import make_prefix, save_tiny_model, tiny_config


def _tokens(capsys, graph_or_folder):
    code, text = run_cli(["generate", graph_or_folder, "--token-ids", "5,17,42,9", "--max-new-tokens", "8", "--json"],
                         capsys)
    assert code == 0, text
    return json.loads(text)["rows"][0]["new_token_ids"]


def test_export_and_compile_write_an_ort_format_graph_with_the_same_tokens(tmp_path, gpt2_dir, gpt2_adapter, capsys):
    out = tmp_path / "o"
    code, text = run_cli(["--model", gpt2_dir, "--prefix", gpt2_adapter, "--out", out, "--format", "ort", "-q"],
                         capsys)
    assert code == 0, text and "ort format" in text
    assert (out / "model.ort").is_file() and (out / "model.onnx").is_file()
    config = (out / "required_operators_and_types.config").read_text()
    assert "ai.onnx;" in config and "MatMul" in config and ".tmp-" not in config
    report = json.loads((out / "export_report.json").read_text())
    info = report["ort_format"]
    assert info["ort_bytes"] > 0 and info["onnx_bytes"] > 0 and info["config_operators"] >= 10
    assert info["tokens"]["equal"] and "model.ort" in report["outputs"]["sha256"]
    assert _tokens(capsys, out / "model.ort") == _tokens(capsys, out)  # the runner on the ORT format graph
    # compile --format ort: the shipped int8 graph in ORT format, same tokens as its model.onnx
    code, text = run_cli(["compile", out, "--out", tmp_path / "int8", "--precision", "int8", "--format", "ort", "-q"],
                         capsys)
    assert code == 0, text
    assert _tokens(capsys, tmp_path / "int8" / "model.ort") == _tokens(capsys, tmp_path / "int8")
    code, text = run_cli(["validate", tmp_path / "int8"], capsys)
    assert code == 0, text


def test_cache_layout_ort_format_feeds_the_prefix(tmp_path, gpt2_dir, gpt2_adapter, capsys):
    out = tmp_path / "c"
    code, text = run_cli(["--model", gpt2_dir, "--prefix", gpt2_adapter, "--out", out, "--layout", "cache",
                          "--format", "ort", "-q"], capsys)
    assert code == 0, text
    assert _tokens(capsys, out / "model.ort") == _tokens(capsys, out)


def test_ort_format_of_a_seq2seq_export_is_refused_before_writing(tmp_path, capsys):
    model = tmp_path / "bart"
    save_tiny_model(tiny_config("bart"), model)
    prefix = make_prefix(model, tmp_path / "prefix", 3, projection=False, trained=False)
    out = tmp_path / "out"
    out.mkdir()
    code, text = run_cli(["--model", model, "--prefix", prefix, "--out", out / "x", "--format", "ort", "-q"], capsys)
    assert_refused(code, text, out, r"encoder-decoder")
