"""Bad input: each case exits 2 with a message naming the problem and the fix, and writes nothing."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from tests_helpers import adapter_state, adapter_with_state, copy_adapter, export_args, run_cli
from tiny_models import make_prefix, save_tiny_model, tiny_config




def assert_nothing_written(out_parent):
    leftovers = [p.name for p in out_parent.iterdir()] if out_parent.exists() else []
    assert leftovers == [], f"bad input left {leftovers} behind"


@pytest.fixture
def out(tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent




def _adapter_config(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(fields))


def test_missing_model_path(gpt2_adapter, out, capsys):
    code, text = run_cli(export_args("./no/such/model", gpt2_adapter, out), capsys)
    assert code == 2 and "does not exist" in text
    assert_nothing_written(out)


def test_missing_prefix_path(gpt2_dir, out, capsys):
    code, text = run_cli(export_args(gpt2_dir, "/no/such/prefix", out), capsys)
    assert code == 2 and "--prefix" in text and "does not exist" in text
    assert_nothing_written(out)


def test_uncached_hub_id_offline(gpt2_adapter, out, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, text = run_cli(export_args("prefix-export-tests/not-a-cached-model", gpt2_adapter, out), capsys)
    assert code == 2 and "HF_HUB_OFFLINE" in text and "local folder" in text
    assert_nothing_written(out)


@pytest.mark.parametrize("peft_type, advice", [("LORA", "merge_and_unload"), ("PROMPT_TUNING", "not a prefix"),
                                               ("P_TUNING", "not a prefix")])
def test_other_peft_types_are_named(tmp_path, gpt2_dir, out, capsys, peft_type, advice):
    _adapter_config(tmp_path / "adapter", peft_type=peft_type, task_type="CAUSAL_LM", r=8)
    code, text = run_cli(export_args(gpt2_dir, tmp_path / "adapter", out), capsys)
    assert code == 2 and f"PEFT {peft_type} adapter" in text and advice in text
    assert_nothing_written(out)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_layer=3), r"layers: prefix has 3, model .* needs 2"),
    (dict(n_embd=48, n_head=4), r"hidden size \(token_dim\): prefix has 48, model .* needs 32"),
    (dict(n_head=8), r"heads \(KV heads for GQA\): prefix has 8, model .* needs 4"),
])
def test_prefix_model_mismatch_shows_both_sides(tmp_path, gpt2_dir, out, capsys, overrides, message):
    other = tmp_path / "other_model"
    save_tiny_model(tiny_config("gpt2", **overrides), other)
    prefix = make_prefix(other, tmp_path / "prefix", 3, projection=False, trained=False)
    code, text = run_cli(export_args(gpt2_dir, prefix, out), capsys)
    assert code == 2
    import re

    assert re.search(message, text), text
    assert_nothing_written(out)


def test_truncated_safetensors(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    data = (gpt2_adapter / "adapter_model.safetensors").read_bytes()
    broken = copy_adapter(gpt2_adapter, tmp_path / "broken", weights=data[: len(data) // 2])
    code, text = run_cli(export_args(gpt2_dir, broken, out), capsys)
    assert code == 2 and "truncated or corrupt" in text
    assert_nothing_written(out)


def test_empty_weights_file(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    broken = copy_adapter(gpt2_adapter, tmp_path / "empty", weights=b"")
    code, text = run_cli(export_args(gpt2_dir, broken, out), capsys)
    assert code == 2 and "empty" in text
    assert_nothing_written(out)


def test_nan_in_prefix(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    state = adapter_state(gpt2_adapter)
    state["prompt_embeddings"][0, 3] = float("nan")
    state["prompt_embeddings"][1, 0] = float("inf")
    bad = adapter_with_state(gpt2_adapter, tmp_path / "nan", state)
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert code == 2 and "2 NaN/Inf values" in text
    assert_nothing_written(out)


class _RunsCode:
    """Unpickling this would run a command; it must never be unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_not_run(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    marker = tmp_path / "code-was-run"
    bad = tmp_path / "unsafe"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((gpt2_adapter / "adapter_config.json").read_text())
    with open(bad / "adapter_model.bin", "wb") as handle:
        pickle.dump({"prompt_embeddings": _RunsCode(marker)}, handle)
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert code == 2 and "unsafe unpickling" in text
    assert not marker.exists(), "the pickle was executed"
    assert_nothing_written(out)


def test_safe_bin_adapter_loads(tmp_path, gpt2_dir, gpt2_adapter):
    """The .bin route itself works when the pickle holds only tensors (weights_only=True)."""
    from safetensors.torch import load_file

    from prefix_export.checkpoint import load_prefix_checkpoint

    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((gpt2_adapter / "adapter_config.json").read_text())
    torch.save(load_file(str(gpt2_adapter / "adapter_model.safetensors")), folder / "adapter_model.bin")
    checkpoint = load_prefix_checkpoint(folder)
    assert checkpoint.prompt_embeddings.shape == (4, 2 * 2 * 32)


def test_raw_state_dict_without_config(tmp_path, gpt2_dir, out, capsys):
    prefix = make_prefix(gpt2_dir, tmp_path / "raw", 3, projection=True, trained=False, kind="raw_safetensors")
    (prefix.parent / "prefix_config.json").unlink()
    code, text = run_cli(export_args(gpt2_dir, prefix, out), capsys)
    assert code == 2 and "--prefix-config" in text
    assert_nothing_written(out)


def test_raw_state_dict_with_wrong_keys(tmp_path, gpt2_dir, out, capsys):
    from safetensors.torch import load_file, save_file

    prefix = make_prefix(gpt2_dir, tmp_path / "raw", 3, projection=True, trained=False, kind="raw_safetensors")
    state = load_file(str(prefix))
    del state["transform.2.bias"]
    save_file(state, str(prefix))
    code, text = run_cli(export_args(gpt2_dir, prefix, out), capsys)
    assert code == 2 and "transform.2.bias" in text and "Missing" in text
    assert_nothing_written(out)


def test_unsupported_architecture_lists_supported(tmp_path, gpt2_adapter, out, capsys):
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 32,
                                                    "num_hidden_layers": 2, "vocab_size": 64}))
    code, text = run_cli(export_args(folder, gpt2_adapter, out), capsys)
    assert code == 2 and "'mamba' is not supported" in text and "gpt2" in text
    assert_nothing_written(out)


def test_existing_output_needs_force(gpt2_dir, gpt2_adapter, out, capsys):
    (out / "export").mkdir()
    (out / "export" / "keep.txt").write_text("mine")
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert code == 2 and "--force" in text
    assert (out / "export" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["export"]


def test_output_is_a_file(gpt2_dir, gpt2_adapter, out, capsys):
    (out / "export").write_text("a file")
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert code == 2 and "is a file" in text
    assert (out / "export").read_text() == "a file"


def test_prefix_too_long_for_position_table(tmp_path, out, capsys):
    small = tmp_path / "small_positions"
    save_tiny_model(tiny_config("gpt2", n_positions=16), small)
    prefix = make_prefix(small, tmp_path / "prefix", 16, projection=False, trained=False)
    code, text = run_cli(export_args(small, prefix, out), capsys)
    assert code == 2 and "position table has 16 rows" in text
    assert_nothing_written(out)
