"""The bad-input catalogue, part two (part one is test_bad_input.py): exit code 2, a message that
says what happened and what to do, and nothing written.

Tests run as root in CI, where chmod cannot make a file unreadable or a folder unwritable; those
cases are simulated by making `open` (or `os.access`) fail for exactly one path, or use a path under
/proc that even root cannot read or write.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from prefix_export.cli import main
from tests_helpers import adapter_state, adapter_with_state, copy_adapter, export_args, run_cli
from tiny_models import make_prefix, save_tiny_model, tiny_config




def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def out(tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent




def assert_refused(code, text, out, *patterns):
    """Exit 2, every pattern in the message, and nothing at all under the output parent."""
    assert code == 2, text
    for pattern in patterns:
        assert re.search(pattern, text), f"{pattern!r} not in:\n{text}"
    assert "Traceback" not in text
    assert listing(out) == [], f"bad input left {listing(out)} behind"


@pytest.fixture
def deny_open(monkeypatch):
    """deny_open(path): opening `path` raises PermissionError, as for a mode-000 file and a non-root user."""
    denied: set[str] = set()
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)  # pathlib's read_text/open go through io.open
    return lambda path: denied.add(os.path.abspath(path))


# ---- paths ---------------------------------------------------------------------------------------


def test_unreadable_model_config(tmp_path, gpt2_dir, gpt2_adapter, out, capsys, deny_open):
    deny_open(gpt2_dir / "config.json")
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"config\.json could not be read", "Permission denied")


def test_unreadable_prefix_weights(tmp_path, gpt2_dir, gpt2_adapter, out, capsys, deny_open):
    deny_open(gpt2_adapter / "adapter_model.safetensors")
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"adapter_model\.safetensors cannot be read \(PermissionError",
                   "Check its permissions")


def test_unreadable_adapter_config(tmp_path, gpt2_dir, gpt2_adapter, out, capsys, deny_open):
    deny_open(gpt2_adapter / "adapter_config.json")
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"adapter_config\.json could not be read", "Permission denied")


def test_prefix_config_that_even_root_cannot_read(tmp_path, gpt2_dir, out, capsys):
    """/proc/self/mem opens but fails on read (EIO) for every user: a real unreadable file."""
    prefix = make_prefix(gpt2_dir, tmp_path / "raw", 3, projection=True, trained=False, kind="raw_safetensors")
    code, text = run_cli(export_args(gpt2_dir, prefix, out, "--prefix-config", "/proc/self/mem"), capsys)
    assert_refused(code, text, out, r"/proc/self/mem could not be read")


def test_missing_prefix_config(tmp_path, gpt2_dir, out, capsys):
    prefix = make_prefix(gpt2_dir, tmp_path / "raw", 3, projection=True, trained=False, kind="raw_safetensors")
    code, text = run_cli(export_args(gpt2_dir, prefix, out, "--prefix-config", tmp_path / "nope.json"), capsys)
    assert_refused(code, text, out, r"--prefix-config .*nope\.json does not exist")


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


# ---- the checkpoint ------------------------------------------------------------------------------


def test_corrupt_safetensors_header(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    garbage = (1 << 40).to_bytes(8, "little") + b"not a header at all" * 10  # header length beyond the file
    bad = copy_adapter(gpt2_adapter, tmp_path / "bad", weights=garbage)
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, "not a readable safetensors file", "truncated or corrupt")


def test_duplicate_keys(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    state = adapter_state(gpt2_adapter)
    state["base_model.prompt_embeddings"] = state["prompt_embeddings"].clone()
    bad = adapter_with_state(gpt2_adapter, tmp_path / "dup", state)
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, r"both mean 'prompt_embeddings'", "one tensor per PrefixEncoder parameter")


def test_missing_prefix_key(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    state = adapter_state(gpt2_adapter)
    bad = adapter_with_state(gpt2_adapter, tmp_path / "renamed", {"lora_A.weight": state["prompt_embeddings"]})
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, "no prefix found", r"lora_A\.weight", "expected 'prompt_embeddings'")


def test_prefix_rows_disagree_with_config(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    state = adapter_state(gpt2_adapter)
    bad = adapter_with_state(gpt2_adapter, tmp_path / "short", {"prompt_embeddings": state["prompt_embeddings"][:3]})
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, r"shape \(3, 128\)", r"implies \(4, 128\)", "do not belong together")


def test_adapter_without_weights(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    bad = tmp_path / "config_only"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((gpt2_adapter / "adapter_config.json").read_text())
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, "has no adapter_model.safetensors or adapter_model.bin")


def test_adapter_config_not_json(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    bad = copy_adapter(gpt2_adapter, tmp_path / "bad")
    (bad / "adapter_config.json").write_text("peft_type: PREFIX_TUNING")
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, "is not valid JSON", "PrefixTuningConfig")


def test_config_without_filled_in_fields(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    config = json.loads((gpt2_adapter / "adapter_config.json").read_text())
    config["num_layers"] = None
    bad = copy_adapter(gpt2_adapter, tmp_path / "bad", config=config)
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, "num_layers is None", "positive integer")


def test_prefix_for_another_task(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    config = json.loads((gpt2_adapter / "adapter_config.json").read_text())
    config["task_type"] = "SEQ_2_SEQ_LM"
    bad = copy_adapter(gpt2_adapter, tmp_path / "bad", config=config)
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, "trained for task SEQ_2_SEQ_LM", "takes CAUSAL_LM prefixes")


def test_integer_prefix_tensor(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    state = adapter_state(gpt2_adapter)
    bad = adapter_with_state(gpt2_adapter, tmp_path / "int",
                             {"prompt_embeddings": state["prompt_embeddings"].round().to(torch.int64)})
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, "dtype int64", "expected floating point")


def test_inf_in_projection_weights(tmp_path, gpt2_dir, out, capsys):
    """A raw PrefixEncoder whose MLP holds Inf: refused before the projection runs."""
    from safetensors.torch import load_file, save_file

    prefix = make_prefix(gpt2_dir, tmp_path / "raw", 3, projection=True, trained=False, kind="raw_safetensors")
    state = load_file(str(prefix))
    state["transform.0.weight"][2, 1] = float("-inf")
    save_file(state, str(prefix))
    code, text = run_cli(export_args(gpt2_dir, prefix, out), capsys)
    assert_refused(code, text, out, r"transform\.0\.weight holds 1 NaN/Inf values", "diverged")


def test_nan_in_model_weights(tmp_path, gpt2_adapter, out, capsys):
    folder = tmp_path / "m"
    model = save_tiny_model(tiny_config("gpt2"), folder)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    code, text = run_cli(export_args(folder, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"weight transformer\.h\.1\.mlp\.c_fc\.weight holds NaN or Inf",
                   "Use a finite checkpoint")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_as_raw_state_dict(tmp_path, gpt2_dir, out, capsys):
    """The raw-state-dict route (.pt + --prefix-config) refuses code-running pickles too."""
    raw = make_prefix(gpt2_dir, tmp_path / "raw", 3, projection=True, trained=False, kind="raw_pt")
    marker = tmp_path / "code-was-run"
    with open(raw, "wb") as handle:
        pickle.dump({"embedding.weight": _RunsCode(marker)}, handle)
    code, text = run_cli(export_args(gpt2_dir, raw, out), capsys)
    assert_refused(code, text, out, "needs unsafe unpickling", "could run code", "Re-save only the tensors")
    assert not marker.exists(), "the pickle was executed"


def test_pickle_of_a_list_not_a_state_dict(tmp_path, gpt2_dir, out, capsys):
    raw = make_prefix(gpt2_dir, tmp_path / "raw", 3, projection=True, trained=False, kind="raw_pt")
    torch.save([torch.zeros(3, 4)], raw)
    code, text = run_cli(export_args(gpt2_dir, raw, out), capsys)
    assert_refused(code, text, out, "holds a list, expected a state dict of tensors")


# ---- prefix vs model -----------------------------------------------------------------------------

GQA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)


def test_kv_heads_mismatch_gqa(tmp_path, out, capsys):
    """A prefix trained for 4 KV heads on a model with 2 (same hidden size): both sides shown."""
    from transformers import LlamaConfig

    model = tmp_path / "llama_gqa"
    save_tiny_model(LlamaConfig(**GQA), model)
    other = tmp_path / "llama_mha"
    save_tiny_model(LlamaConfig(**{**GQA, "num_key_value_heads": 4}), other)
    prefix = make_prefix(other, tmp_path / "prefix", 3, projection=False, trained=False)
    code, text = run_cli(export_args(model, prefix, out), capsys)
    assert_refused(code, text, out, r"heads \(KV heads for GQA\): prefix has 4, model .* needs 2",
                   r"token_dim\): prefix has 32, model .* needs 16")


def test_prefix_values_overflow_model_dtype(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    """A float32 prefix with values beyond float16's range, exported with --dtype float16."""
    state = adapter_state(gpt2_adapter)
    state["prompt_embeddings"][0, :5] = 1e5  # finite in float32, Inf in float16 (max 65504)
    config = json.loads((gpt2_adapter / "adapter_config.json").read_text())
    config["prefix_projection"] = False  # so the stored tensor is the KV itself
    bad = adapter_with_state(gpt2_adapter, tmp_path / "big", state)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    code, text = run_cli(export_args(gpt2_dir, bad, out, "--dtype", "float16"), capsys)
    assert_refused(code, text, out, "does not fit the model's dtype", "cast to float16 it holds 5 Inf/NaN",
                   "1e\\+05 in float32", "--dtype float32")


def test_unknown_dtype_flag(gpt2_dir, gpt2_adapter, out, capsys):
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in export_args(gpt2_dir, gpt2_adapter, out, "--dtype", "int8")])
    assert exited.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    assert listing(out) == []


# ---- the output ----------------------------------------------------------------------------------


def test_output_not_writable(gpt2_dir, gpt2_adapter, out, capsys, monkeypatch):
    """What a non-root user meets on a read-only folder: os.access says no."""
    from prefix_export import output

    real_access = os.access
    monkeypatch.setattr(output.os, "access",
                        lambda path, mode, **kw: False if Path(path) == out else real_access(path, mode, **kw))
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"outputs is not writable; choose another output folder")


def test_output_where_even_root_cannot_write(tmp_path, gpt2_dir, gpt2_adapter, capsys):
    """os.access says yes to root for /proc, but no file can be made there: the write probe catches it."""
    code, text = run_cli(["--model", gpt2_dir, "--prefix", gpt2_adapter, "--out", "/proc/prefix-export-out", "-q"],
                         capsys)
    assert code == 2 and re.search(r"(nothing can be written in|is not writable).*/proc", text), text
    assert not Path("/proc/prefix-export-out").exists()


def test_output_under_a_file(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    (out / "afile").write_text("x")
    code, text = run_cli(["--model", gpt2_dir, "--prefix", gpt2_adapter, "--out", out / "afile" / "sub" / "exp",
                          "-q"], capsys)
    assert code == 2 and "afile is a file, so no folder can be made under it" in text, text
    assert listing(out) == ["afile"] and (out / "afile").read_text() == "x"


def test_disk_full_in_the_exporter(gpt2_dir, gpt2_adapter, out, capsys, monkeypatch):
    """The exporter's writer fails with ENOSPC (wrapped, as torch.onnx wraps it): named, nothing left."""
    def full_disk(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("exporter failed while saving") from exc

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, "OutputError", "the disk is full", "nothing was published", "Free space")


def test_disk_full_while_saving_the_graph(gpt2_dir, gpt2_adapter, out, capsys, monkeypatch):
    """onnx.save_model writes half the graph, then the disk is full: no temp folder or lock remains."""
    import onnx

    def half_then_full(model, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(model.SerializeToString()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx, "save_model", half_then_full)
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, "the disk is full while writing", "nothing was published")


def _fake_export_folder(folder: Path) -> Path:
    """The smallest folder `generate` accepts up to choosing a provider: one graph, one config."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir()
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    model = helper.make_model(graph)
    for key, value in (("prefix_export.num_virtual_tokens", "2"), ("prefix_export.layout", "folded")):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "config.json").write_text(json.dumps({"n_positions": 64}))
    return folder


def test_unknown_provider(tmp_path, capsys):
    folder = _fake_export_folder(tmp_path / "exported")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, text = run_cli(["generate", folder, "--token-ids", "1,2,3", "--provider", "foo"], capsys)
    assert code == 2, text
    assert "RuntimeSetupError" in text and "execution provider 'foo'" in text and "Installed:" in text
    assert "CPUExecutionProvider" in text
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
