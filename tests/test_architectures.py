"""Every registered architecture: export + validate against PEFT, with and without projection.

Parametrised over the registry itself, so a newly registered model type without a tiny config (and
hence without a parity test) fails `test_every_registered_type_has_a_parity_test`.
"""
from __future__ import annotations

import numpy as np
import pytest

from prefix_export.source import architectures
from prefix_export.api import export_prefix_model
from prefix_export.cli import main
from tests_helpers import PROMPT, ort_greedy, peft_greedy
from tiny_models import TINY_CONFIGS, make_prefix, save_tiny_model, tiny_config

REGISTERED = architectures.supported_model_types()
# Encoder-decoder types have their parity test in test_seq2seq.py; together the two cover the registry.
DECODERS = [t for t in REGISTERED if not architectures.describe(tiny_config(t)).is_seq2seq]


def test_every_registered_type_has_a_parity_test():
    missing = sorted(set(REGISTERED) - set(TINY_CONFIGS))
    assert not missing, f"registered without a tiny config, so without a parity test: {missing}"
    assert sorted(TINY_CONFIGS) == REGISTERED


def test_tiny_configs_cover_the_features_that_differ():
    """GQA, MQA, rotary, ALiBi, learned positions, sliding windows, tied and untied embeddings."""
    specs = {t: architectures.describe(tiny_config(t)) for t in REGISTERED}
    configs = {t: tiny_config(t) for t in REGISTERED}
    longest_test_sequence = 9 + 8  # validation: prompt of 9, then 8 decode steps
    assert any(1 < s.num_kv_heads < s.num_attention_heads for s in specs.values()), "grouped-query attention"
    assert any(s.num_kv_heads == 1 < s.num_attention_heads for s in specs.values()), "multi-query attention"
    assert {s.positions for s in specs.values()} == {"learned", "rotary", "alibi", "relative"}
    assert any(s.sliding_window and s.sliding_window < longest_test_sequence for s in specs.values())
    tied = {t for t, c in configs.items() if c.tie_word_embeddings}
    assert tied and tied != set(REGISTERED), "both tied and untied embeddings"


def test_unknown_type_lists_the_supported_ones():
    from transformers import AutoConfig

    from prefix_export.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=r"'mamba' is not supported\. Supported: .*gpt2.*llama"):
        architectures.describe(AutoConfig.for_model("mamba"))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {}


def _model_dir(model_dirs, tmp_path_factory, model_type):
    if model_type not in model_dirs:
        folder = tmp_path_factory.mktemp(model_type)
        save_tiny_model(tiny_config(model_type), folder)
        model_dirs[model_type] = folder
    return model_dirs[model_type]


@pytest.mark.parametrize("projection", [True, False], ids=["projection", "no-projection"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_family_exports_and_matches_peft(tmp_path, tmp_path_factory, model_dirs, model_type, projection):
    model_dir = _model_dir(model_dirs, tmp_path_factory, model_type)
    # Trained for a few steps, not init values; the two settings also use the two checkpoint kinds.
    kind = "peft_adapter" if projection else "raw_safetensors"
    prefix = make_prefix(model_dir, tmp_path / "prefix", 5, projection=projection, trained=True, kind=kind)
    result = export_prefix_model(str(model_dir), prefix, tmp_path / "out", progress=False)
    print(f"{model_type} projection={projection}: export {result.report['timing_s']['export']:.1f}s")
    print(result.validation.table())
    assert result.validation.passed

    # Independently of the package's own checks: a plain ORT loop vs a greedy loop on PEFT's forward.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if kind == "peft_adapter":
        reference = PeftModel.from_pretrained(base, prefix).eval()
    else:
        from tests_helpers import load_raw_encoder_into

        reference = load_raw_encoder_into(base, prefix)
    expected, expected_logits = peft_greedy(reference, PROMPT, 16)
    got, got_logits = ort_greedy(result.graph, PROMPT, 16)
    err = np.abs(got_logits - expected_logits).max()
    print(f"first-step logits max abs error {err:.3e}")
    assert err <= 1e-4
    assert got == expected


def test_multi_query_falcon_is_refused_because_peft_cannot_tune_it(tmp_path, capsys):
    """PEFT provisions falcon prefixes with every attention head; falcon-7b-style MQA caches one."""
    model_dir = tmp_path / "falcon_mqa"
    save_tiny_model(tiny_config("falcon", new_decoder_architecture=False, multi_query=True), model_dir)
    adapter = tmp_path / "adapter"
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    peft_model.save_pretrained(adapter)
    code = main(["--model", str(model_dir), "--prefix", str(adapter), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot prefix-tune this falcon configuration" in err and "1 KV heads" in err
    assert not (tmp_path / "out").exists()


def test_falcon_with_alibi_exports(tmp_path):
    model_dir = tmp_path / "falcon_alibi"
    save_tiny_model(tiny_config("falcon", alibi=True, new_decoder_architecture=False, multi_query=False,
                                num_kv_heads=4), model_dir)
    assert architectures.describe(tiny_config("falcon", alibi=True)).positions == "alibi"
    prefix = make_prefix(model_dir, tmp_path / "prefix", 4, projection=False, trained=True)
    result = export_prefix_model(str(model_dir), prefix, tmp_path / "out", progress=False)
    assert result.validation.passed, result.validation.table()


def test_inspect_shows_the_plan(tmp_path, tmp_path_factory, model_dirs, capsys):
    model_dir = _model_dir(model_dirs, tmp_path_factory, "llama")
    prefix = make_prefix(model_dir, tmp_path / "prefix", 6, projection=True, trained=False)
    assert main(["inspect", str(model_dir), "--prefix", str(prefix), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["KV heads"] == 2 and info["attention heads"] == 4
    assert info["prefix (P)"] == 6 and info["head dim"] == 8
    assert info["prefix KV bytes"] == 2 * 2 * 2 * 6 * 8 * 4  # L * 2 * H_kv * P * D * fp32
