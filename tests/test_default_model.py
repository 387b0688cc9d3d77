"""The embedded default (models/default): the Quickstart's export, and the task visibly solved."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prefix_export.api import export_prefix_model
from prefix_export.cli import main
from prefix_export.source.prefix_kv import PrefixKV

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"
EXAMPLES = json.loads((DEFAULT / "examples.json").read_text())


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "out"
    assert main(["--model", str(DEFAULT / "base"), "--prefix", str(DEFAULT / "prefix"), "--out", str(out),
                 "-q"]) == 0
    return out


def test_quickstart_export_is_complete(default_export):
    names = {p.name for p in default_export.iterdir()}
    assert {"model.onnx", "prefix_kv.safetensors", "config.json", "tokenizer.json", "export_report.json"} <= names
    report = json.loads((default_export / "export_report.json").read_text())
    assert report["validation"]["passed"] and report["prefix"]["num_virtual_tokens"] == 10


def test_generate_solves_the_task(default_export, capsys):
    prompt = EXAMPLES["default_prompt"]
    assert main(["generate", str(default_export), "--prompt", prompt, "--max-new-tokens", "24", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["text"] == EXAMPLES["default_prompt_prefix_output"]
    assert rows[0]["text"] != EXAMPLES["default_prompt_base_output"]


def test_raw_encoder_checkpoint_gives_the_same_prefix(tmp_path, default_export):
    """The PrefixEncoder state dict (projection MLP) and the adapter folder fold to the same KV."""
    result = export_prefix_model(str(DEFAULT / "base"), DEFAULT / "prefix_encoder" / "prefix_encoder.safetensors",
                                 tmp_path / "raw", progress=False)
    assert result.validation.passed
    from_adapter = PrefixKV.load(default_export / "prefix_kv.safetensors").tensor.numpy()
    from_encoder = PrefixKV.load(result.folder / "prefix_kv.safetensors").tensor.numpy()
    np.testing.assert_allclose(from_encoder, from_adapter, atol=1e-5)
