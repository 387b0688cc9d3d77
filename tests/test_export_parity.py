"""Acceptance of the spine: exported graph, driven by a plain ORT loop, reproduces PEFT token for token.

The loops here are written out in the test on purpose: they follow the I/O contract from the README,
not the package's runtime code, so a bug in either cannot hide behind the other.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from prefix_export.api import export_prefix_model
from tiny_models import make_prefix

GREEDY_TOKENS = 32
PROMPT = np.array([5, 17, 42, 9, 64, 3, 77], dtype=np.int64)

CASES = [  # (P, projection, trained, checkpoint kind): covers each setting at least once
    pytest.param(1, False, False, "peft_adapter", id="P1-noproj-random-adapter"),
    pytest.param(4, True, True, "peft_adapter", id="P4-proj-trained-adapter"),
    pytest.param(10, True, True, "raw_safetensors", id="P10-proj-trained-raw_safetensors"),
    pytest.param(7, False, True, "raw_pt", id="P7-noproj-trained-raw_pt"),
]


def peft_greedy(peft_model, prompt: np.ndarray, steps: int):
    """Greedy on PEFT's forward, whole sequence each step. Returns tokens and first-step logits."""
    tokens = torch.from_numpy(prompt)[None]
    new, first_logits = [], None
    with torch.no_grad():
        for _ in range(steps):
            logits = peft_model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[0, -1]
            if first_logits is None:
                first_logits = logits.numpy()
            next_token = int(logits.argmax())
            new.append(next_token)
            tokens = torch.cat([tokens, torch.tensor([[next_token]])], dim=1)
    return new, first_logits


def ort_greedy(graph_path, prompt: np.ndarray, steps: int):
    """A plain ORT loop following the contract: user tokens only, positions from 0, presents fed back."""
    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feeds = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}
    ids = prompt[None]
    mask = np.ones((1, len(prompt)), np.int64)
    positions = np.arange(len(prompt), dtype=np.int64)[None]
    output_names = [o.name for o in session.get_outputs()]
    new, first_logits = [], None
    for _ in range(steps):
        feeds.update(input_ids=ids, attention_mask=mask, position_ids=positions)
        outputs = dict(zip(output_names, session.run(None, feeds)))
        logits = outputs["logits"][0, -1]
        if first_logits is None:
            first_logits = logits
        next_token = int(logits.argmax())
        new.append(next_token)
        for past in pasts:
            feeds[past.name] = outputs[past.name.replace("past_key_values", "present")]
        ids = np.array([[next_token]], np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, [[1]]], axis=1)
    return new, first_logits


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
    from prefix_export.graph import read_metadata

    metadata = read_metadata(result.graph)
    assert metadata["prefix_export.num_virtual_tokens"] == "4"
    assert "peft" in metadata["prefix_export.versions"]
    from prefix_export.prefix_kv import PrefixKV

    kv = PrefixKV.load(result.folder / "prefix_kv.safetensors")
    assert tuple(kv.tensor.shape) == (2, 2, 4, 4, 8)


def test_external_data_forced(tmp_path, gpt2_dir, gpt2_adapter):
    result = export_prefix_model(str(gpt2_dir), gpt2_adapter, tmp_path / "out", external_data=True, progress=False)
    assert (result.folder / "model.onnx.data").is_file()
    assert result.report["graph"]["external_data"] == "model.onnx.data"
    assert result.validation.passed
