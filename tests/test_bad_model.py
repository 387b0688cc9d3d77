"""Bad input, the base model (path, hub id, config, weights, dtype): each case exits 2 with a message naming the problem and the fix, and writes
nothing (`out` is an empty parent folder that must stay empty).

Tests run as root in CI, where chmod cannot make a file unreadable or a folder unwritable; those
cases are simulated by making `open` (or `os.access`) fail for exactly one path (`deny_open`), or use
a path under /proc that even root cannot read or write.
"""
from __future__ import annotations

import json

import pytest
import torch

from prefix_export.cli import main
from tests_helpers import assert_nothing_written, assert_refused, export_args, listing, run_cli
from tiny_models import save_tiny_model, tiny_config


def test_missing_model_path(gpt2_adapter, out, capsys):
    code, text = run_cli(export_args("./no/such/model", gpt2_adapter, out), capsys)
    assert code == 2 and "does not exist" in text
    assert_nothing_written(out)


def test_uncached_hub_id_offline(gpt2_adapter, out, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, text = run_cli(export_args("prefix-export-tests/not-a-cached-model", gpt2_adapter, out), capsys)
    assert code == 2 and "HF_HUB_OFFLINE" in text and "local folder" in text
    assert_nothing_written(out)


def test_unsupported_architecture_lists_supported(tmp_path, gpt2_adapter, out, capsys):
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 32,
                                                    "num_hidden_layers": 2, "vocab_size": 64}))
    code, text = run_cli(export_args(folder, gpt2_adapter, out), capsys)
    assert code == 2 and "'mamba' is not supported" in text and "gpt2" in text
    assert_nothing_written(out)


def test_unreadable_model_config(tmp_path, gpt2_dir, gpt2_adapter, out, capsys, deny_open):
    deny_open(gpt2_dir / "config.json")
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"config\.json could not be read", "Permission denied")


def test_model_path_is_a_file(tmp_path, gpt2_adapter, out, capsys):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    code, text = run_cli(export_args(tmp_path / "model.bin", gpt2_adapter, out), capsys)
    assert_refused(code, text, out, "is a file; expected a model folder")


def test_model_folder_without_config(tmp_path, gpt2_adapter, out, capsys):
    (tmp_path / "empty_model").mkdir()
    code, text = run_cli(export_args(tmp_path / "empty_model", gpt2_adapter, out), capsys)
    assert_refused(code, text, out, "has no config.json", "save_pretrained")


def test_model_config_not_json(tmp_path, gpt2_adapter, out, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{ this is not json")
    code, text = run_cli(export_args(tmp_path / "m", gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"config\.json could not be read")


def test_model_folder_without_weights(tmp_path, gpt2_adapter, out, capsys):
    folder = tmp_path / "m"
    save_tiny_model(tiny_config("gpt2"), folder)
    (folder / "model.safetensors").unlink()
    code, text = run_cli(export_args(folder, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, "the weights could not be loaded", "no file named model.safetensors")


def test_truncated_model_weights(tmp_path, gpt2_adapter, out, capsys):
    """safetensors raises its own SafetensorError here, which used to escape as a traceback."""
    folder = tmp_path / "m"
    save_tiny_model(tiny_config("gpt2"), folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, text = run_cli(export_args(folder, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"the weights could not be loaded \(SafetensorError", "Save or download")


def test_nan_in_model_weights(tmp_path, gpt2_adapter, out, capsys):
    folder = tmp_path / "m"
    model = save_tiny_model(tiny_config("gpt2"), folder)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    code, text = run_cli(export_args(folder, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"weight transformer\.h\.1\.mlp\.c_fc\.weight holds NaN or Inf",
                   "Use a finite checkpoint")


def test_unknown_dtype_flag(gpt2_dir, gpt2_adapter, out, capsys):
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in export_args(gpt2_dir, gpt2_adapter, out, "--dtype", "int8")])
    assert exited.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    assert listing(out) == []
