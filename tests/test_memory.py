"""Peak memory of export + validation, measured on a ~150M-parameter model in a subprocess.

The bound (issue 13): peak RSS at most 1.5x the model's weight bytes above a fixed overhead. The fixed
overhead is measured the same way on the tiny GPT-2 (the libraries alone: torch, transformers, PEFT,
the exporter, ONNX Runtime). Each export runs in a fresh wrapper process whose only child is the
export, so its ru_maxrss is that export's peak and nothing else's.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Issue 13: peak RSS <= 1.5x the weight bytes plus a fixed few hundred MB. The fixed part is the
# libraries' own footprint, measured as the tiny GPT-2 export's peak (about 500 MB: torch,
# transformers, PEFT, the exporter, ONNX Runtime), plus SLACK_MB for what grows with the number of
# graph nodes rather than with the weights (the exporter's state: about +100 MB for this 16-layer
# graph over the tiny one's) and the allocator's run-to-run spread (about 60 MB, measured).
# Measured on this model after the exporter-state and reference-copy fixes: 1.15-1.29 with the slack,
# 1.38-1.52 without (was 3.3x before issue 13's changes).
BOUND = 1.5
SLACK_MB = 128

WRAPPER = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
           "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_mb(args: list[str]) -> float:
    command = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "prefix_export.cli", *map(str, args), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    code, peak_kb = result.stdout.split()[-2:]
    assert code == "0", result.stdout[-3000:] + result.stderr[-3000:]
    return int(peak_kb) / 1024


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A llama-shaped model of 150M parameters in float32 (600 MB), random weights, and a P=20 prefix."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("mid")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(root / "base")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)).save_pretrained(
        root / "prefix")
    return root / "base", root / "prefix", weight_bytes


def test_peak_memory_of_export_and_validation_stays_within_the_bound(tmp_path, gpt2_dir, gpt2_adapter, mid_model):
    base, prefix, weight_bytes = mid_model
    overhead = peak_mb(["--model", gpt2_dir, "--prefix", gpt2_adapter, "--out", tmp_path / "tiny"])
    peak = peak_mb(["--model", base, "--prefix", prefix, "--out", tmp_path / "mid"])
    report = json.loads((tmp_path / "mid" / "export_report.json").read_text())
    assert report["validation"]["passed"] is True and report["validation"]["settings"]["rule"] == "noise-relative"
    ratio = (peak - overhead - SLACK_MB) * 1024**2 / weight_bytes
    bare = (peak - overhead) * 1024**2 / weight_bytes
    print(f"weights {weight_bytes / 1e6:.0f} MB; peak RSS {peak:.0f} MB; libraries (tiny export) {overhead:.0f} MB; "
          f"(peak - libraries - {SLACK_MB} MB) / weights = {ratio:.2f} (bound {BOUND}); without the slack {bare:.2f}; "
          f"peak / weights = {peak * 1024**2 / weight_bytes:.2f}")
    assert ratio <= BOUND, (f"peak {peak:.0f} MB is {ratio:.2f}x the weights above {overhead:.0f} + {SLACK_MB} MB "
                            f"(bound {BOUND})")
