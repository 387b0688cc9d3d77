"""Acceptance of the spine: exported graph, driven by a plain ORT loop, reproduces PEFT token for token.

The loops here are written out in the test on purpose: they follow the I/O contract from the README,
not the package's runtime code, so a bug in either cannot hide behind the other.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prefix_export.api import export_prefix_model
from tests_helpers import PROMPT, ort_greedy, peft_greedy
from tiny_models import make_prefix

GREEDY_TOKENS = 32

CASES = [  # (P, projection, trained, checkpoint kind): covers each setting at least once
    pytest.param(1, False, False, "peft_adapter", id="P1-noproj-random-adapter"),
    pytest.param(4, True, True, "peft_adapter", id="P4-proj-trained-adapter"),
    pytest.param(10, True, True, "raw_safetensors", id="P10-proj-trained-raw_safetensors"),
    pytest.param(7, False, True, "raw_pt", id="P7-noproj-trained-raw_pt"),
]


@pytest.mark.parametrize("num_virtual_tokens, projection, trained, kind", CASES)
def test_export_reproduces_peft_greedy(tmp_path, gpt2_dir, num_virtual_tokens, projection, trained, kind):
    prefix = make_prefix(gpt2_dir, tmp_path / "prefix", num_virtual_tokens, projection, trained, kind)
    result = export_prefix_model(str(gpt2_dir), prefix, tmp_path / "out" / "model.onnx", progress=False)
    assert result.validation.passed, result.validation.table()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The reference, built straight from PEFT for this checkpoint kind.
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    if kind == "peft_adapter":
        reference = PeftModel.from_pretrained(base, prefix).eval()
    else:
        from tests_helpers import load_raw_encoder_into

        reference = load_raw_encoder_into(base, prefix)
    expected, expected_logits = peft_greedy(reference, PROMPT, GREEDY_TOKENS)
    got, got_logits = ort_greedy(result.graph, PROMPT, GREEDY_TOKENS)
    err = np.abs(got_logits - expected_logits)
    print(f"first-step logits: max abs {err.max():.3e}, max rel {(err / (np.abs(expected_logits) + 1e-6)).max():.3e}")
    assert err.max() <= 1e-4
    assert got == expected

    # The prefix matters: the base model alone computes something else.
    with torch.no_grad():
        base_logits = base(input_ids=torch.from_numpy(PROMPT)[None]).logits[0, -1].numpy()
    assert np.abs(base_logits - expected_logits).max() > 1e-3, "the prefix had no effect: the test proves nothing"


def test_export_folder_is_self_contained(tmp_path, gpt2_dir, gpt2_adapter):
    result = export_prefix_model(str(gpt2_dir), gpt2_adapter, tmp_path / "out", progress=False)
    names = {p.name for p in result.folder.iterdir()}
    assert {"model.onnx", "prefix_kv.safetensors", "config.json", "generation_config.json",
            "export_report.json"} <= names
    assert not [n for n in names if n.startswith(".")], names
    report = result.report
    assert report["validation"]["passed"] is True
    assert report["prefix"]["shape"] == [2, 2, 4, 4, 8]
    assert set(report["outputs"]["sha256"]) >= {"model.onnx", "prefix_kv.safetensors"}
    from prefix_export.folder import read_metadata

    metadata = read_metadata(result.graph)
    assert metadata["prefix_export.num_virtual_tokens"] == "4"
    assert "peft" in metadata["prefix_export.versions"]
    from prefix_export.source.prefix_kv import PrefixKV

    kv = PrefixKV.load(result.folder / "prefix_kv.safetensors")
    assert tuple(kv.tensor.shape) == (2, 2, 4, 4, 8)


def test_external_data_forced(tmp_path, gpt2_dir, gpt2_adapter):
    result = export_prefix_model(str(gpt2_dir), gpt2_adapter, tmp_path / "out", external_data=True, progress=False)
    assert (result.folder / "model.onnx.data").is_file()
    assert result.report["graph"]["external_data"] == "model.onnx.data"
    assert result.validation.passed
