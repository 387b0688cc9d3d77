"""Bad input, the prefix checkpoint (files, formats, values) and its fit to the model: each case exits 2 with a message naming the problem and the fix, and writes
nothing (`out` is an empty parent folder that must stay empty).

Tests run as root in CI, where chmod cannot make a file unreadable or a folder unwritable; those
cases are simulated by making `open` (or `os.access`) fail for exactly one path (`deny_open`), or use
a path under /proc that even root cannot read or write.
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from tests_helpers import (RunsCode, adapter_state, adapter_with_state, assert_nothing_written, assert_refused,
                           copy_adapter, export_args, run_cli)
from tiny_models import make_prefix, save_tiny_model, tiny_config


def _adapter_config(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(fields))


def test_missing_prefix_path(gpt2_dir, out, capsys):
    code, text = run_cli(export_args(gpt2_dir, "/no/such/prefix", out), capsys)
    assert code == 2 and "--prefix" in text and "does not exist" in text
    assert_nothing_written(out)


@pytest.mark.parametrize("peft_type, advice", [
    ("LORA", "LoRA changes the model's weights.*merge_and_unload"),
    ("IA3", "IA3 changes the model's weights.*merge_and_unload"),
    ("ADALORA", "ADALORA changes the model's weights.*merge_and_unload"),
    ("ADAPTION_PROMPT", "gated attention"),
    ("CPT", "not exported yet; prompt tuning \\(PROMPT_TUNING\\) is"),
    ("SOMETHING_NEW", "which prefix-export does not export\\. It exports"),
])
def test_other_peft_types_are_named(tmp_path, gpt2_dir, out, capsys, peft_type, advice):
    """Methods that are not exported: named, with what to do instead, and the list of what is exported
    (prompt tuning and p-tuning are exported: tests/test_prompt_tuning.py)."""
    _adapter_config(tmp_path / "adapter", peft_type=peft_type, task_type="CAUSAL_LM", r=8)
    code, text = run_cli(export_args(gpt2_dir, tmp_path / "adapter", out), capsys)
    assert_refused(code, text, out, f"PEFT {peft_type} adapter", advice,
                   "It exports prefix tuning, prompt tuning, p-tuning and multitask prompt tuning")


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


def test_unsafe_pickle_is_refused_not_run(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    marker = tmp_path / "code-was-run"
    bad = tmp_path / "unsafe"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((gpt2_adapter / "adapter_config.json").read_text())
    with open(bad / "adapter_model.bin", "wb") as handle:
        pickle.dump({"prompt_embeddings": RunsCode(marker)}, handle)
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert code == 2 and "unsafe unpickling" in text
    assert not marker.exists(), "the pickle was executed"
    assert_nothing_written(out)


def test_safe_bin_adapter_loads(tmp_path, gpt2_dir, gpt2_adapter):
    """The .bin route itself works when the pickle holds only tensors (weights_only=True)."""
    from safetensors.torch import load_file

    from prefix_export.source.checkpoint import load_prefix_checkpoint

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


def test_prefix_too_long_for_position_table(tmp_path, out, capsys):
    small = tmp_path / "small_positions"
    save_tiny_model(tiny_config("gpt2", n_positions=16), small)
    prefix = make_prefix(small, tmp_path / "prefix", 16, projection=False, trained=False)
    code, text = run_cli(export_args(small, prefix, out), capsys)
    assert code == 2 and "position table has 16 rows" in text
    assert_nothing_written(out)


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


def test_unsafe_pickle_as_raw_state_dict(tmp_path, gpt2_dir, out, capsys):
    """The raw-state-dict route (.pt + --prefix-config) refuses code-running pickles too."""
    raw = make_prefix(gpt2_dir, tmp_path / "raw", 3, projection=True, trained=False, kind="raw_pt")
    marker = tmp_path / "code-was-run"
    with open(raw, "wb") as handle:
        pickle.dump({"embedding.weight": RunsCode(marker)}, handle)
    code, text = run_cli(export_args(gpt2_dir, raw, out), capsys)
    assert_refused(code, text, out, "needs unsafe unpickling", "could run code", "Re-save only the tensors")
    assert not marker.exists(), "the pickle was executed"


def test_pickle_of_a_list_not_a_state_dict(tmp_path, gpt2_dir, out, capsys):
    raw = make_prefix(gpt2_dir, tmp_path / "raw", 3, projection=True, trained=False, kind="raw_pt")
    torch.save([torch.zeros(3, 4)], raw)
    code, text = run_cli(export_args(gpt2_dir, raw, out), capsys)
    assert_refused(code, text, out, "holds a list, expected a state dict of tensors")


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


# ---- virtual-token methods (prompt tuning, p-tuning, multitask): what is refused, and why ----------


@pytest.fixture(scope="module")
def prompt_adapter(tmp_path_factory, gpt2_dir):
    from tiny_models import make_virtual_tokens

    return make_virtual_tokens(gpt2_dir, tmp_path_factory.mktemp("prompt"), "prompt_tuning", 4, trained=False)


def test_multitask_without_task_id(tmp_path, gpt2_dir, out, capsys):
    from tiny_models import make_virtual_tokens

    adapter = make_virtual_tokens(gpt2_dir, tmp_path / "mpt", "multitask_prompt_tuning", 3, trained=False)
    code, text = run_cli(export_args(gpt2_dir, adapter, out), capsys)
    assert_refused(code, text, out, "multitask prompt-tuning checkpoint with 3 tasks", r"--task-id \(0\.\.2\)")
    code, text = run_cli(export_args(gpt2_dir, adapter, out, "--task-id", "3"), capsys)
    assert_refused(code, text, out, r"--task-id \(0\.\.2\), not 3")


def test_task_id_for_a_single_prompt(gpt2_dir, prompt_adapter, out, capsys):
    code, text = run_cli(export_args(gpt2_dir, prompt_adapter, out, "--task-id", "1"), capsys)
    assert_refused(code, text, out, "--task-id 1 chooses a task of a multitask", "is prompt tuning", "Drop --task-id")


def test_virtual_tokens_for_another_hidden_size(tmp_path, out, capsys):
    from tiny_models import make_virtual_tokens

    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    save_tiny_model(tiny_config("gpt2", n_embd=48), wide)
    save_tiny_model(tiny_config("gpt2"), narrow)
    adapter = make_virtual_tokens(wide, tmp_path / "prompt", "prompt_tuning", 4, trained=False)
    code, text = run_cli(export_args(narrow, adapter, out), capsys)
    assert_refused(code, text, out, r"virtual token embeddings are 48 wide \(token_dim\)", "embeds tokens in 32")


def test_virtual_tokens_disagree_with_config(tmp_path, gpt2_dir, prompt_adapter, out, capsys):
    state = adapter_state(prompt_adapter)
    bad = adapter_with_state(prompt_adapter, tmp_path / "short", {"prompt_embeddings": state["prompt_embeddings"][:3]})
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, r"embeddings have shape \(3, 32\)", r"implies \(4, 32\)", "do not belong together")


def test_nan_in_virtual_tokens(tmp_path, gpt2_dir, prompt_adapter, out, capsys):
    state = adapter_state(prompt_adapter)
    state["prompt_embeddings"][2, 5] = float("nan")
    bad = adapter_with_state(prompt_adapter, tmp_path / "nan", state)
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, "virtual token embeddings holds 1 NaN/Inf values", "diverged")


def test_prompt_adapter_with_modules_to_save(tmp_path, gpt2_dir, prompt_adapter, out, capsys):
    config = json.loads((prompt_adapter / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    bad = copy_adapter(prompt_adapter, tmp_path / "bad", config=config)
    code, text = run_cli(export_args(gpt2_dir, bad, out), capsys)
    assert_refused(code, text, out, r"also trains base-model modules \(\['lm_head'\]", "modules_to_save")


def test_p_tuning_encoder_with_wrong_keys(tmp_path, gpt2_dir, out, capsys):
    from safetensors.torch import load_file, save_file

    from tiny_models import make_virtual_tokens

    raw = make_virtual_tokens(gpt2_dir, tmp_path / "raw", "p_tuning", 3, trained=False, kind="raw_safetensors")
    state = load_file(str(raw))
    del state["mlp_head.4.bias"]
    save_file(state, str(raw))
    code, text = run_cli(export_args(gpt2_dir, raw, out), capsys)
    assert_refused(code, text, out, r"PromptEncoder \(MLP\) keys do not match", r"mlp_head\.4\.bias")
