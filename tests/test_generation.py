"""Generation on CPU: batching, both layouts against PEFT, per-row prefixes, sampling, stops, streaming.

The reference is PEFT's own forward (a greedy loop over the whole sequence, no cache), built from the
adapter folder with PEFT's public API, never from the package's export code.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prefix_export.cli import main
from prefix_export.folder import read_prefix_file as load_prefix_file
from prefix_export.runtime.loop import GenerationConfig
from prefix_export.runtime.generate import ExportRunner
from prefix_export.folder import read_metadata

PROMPTS = [[5, 17, 42, 9, 64, 3, 77], [11, 2], [90, 33, 7, 120]]
NEW = 12


@pytest.fixture(scope="module")
def prefix_files(tmp_path_factory, lively_model, adapters):
    """prefix_kv.safetensors for B and C, computed by the package from the adapters (no export)."""
    from prefix_export.source.base_model import load_base_model
    from prefix_export.source.checkpoint import load_prefix_checkpoint
    from prefix_export.source.prefix_kv import build_peft_model, compute_prefix_kv

    root = tmp_path_factory.mktemp("prefix_kv")
    base = load_base_model(str(lively_model))
    files = {}
    for name in ("B", "C"):
        kv = compute_prefix_kv(build_peft_model(base, load_prefix_checkpoint(adapters[name])), base.spec)
        files[name] = root / f"{name}.safetensors"
        kv.save(files[name])
    return files


def peft_greedy(model_dir, adapter, prompt, steps=NEW) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    tokens = torch.tensor([prompt])
    new = []
    with torch.no_grad():
        for _ in range(steps):
            next_token = int(model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[0, -1].argmax())
            new.append(next_token)
            tokens = torch.cat([tokens, torch.tensor([[next_token]])], dim=1)
    return new


def greedy(runner, rows, prefixes=None, steps=NEW):
    config = GenerationConfig(max_new_tokens=steps)  # no stop tokens: always `steps` tokens
    return [r["new_token_ids"] for r in runner.generate(token_ids=rows, config=config, prefixes=prefixes)["rows"]]


def test_layout_recorded(exports):
    for layout, folder in exports.items():
        assert read_metadata(folder / "model.onnx")["prefix_export.layout"] == layout
        report = json.loads((folder / "export_report.json").read_text())
        assert report["layout"] == layout and report["validation"]["passed"] is True
    # the cache-layout graph has no prefix inside: smaller by exactly nothing but holds no prefix_* initializer
    import onnx

    names = {i.name for i in onnx.load(str(exports["cache"] / "model.onnx")).graph.initializer}
    assert not [n for n in names if n.startswith("prefix_")]


@pytest.mark.parametrize("layout", ["folded", "cache"])
def test_both_layouts_match_peft(exports, lively_model, adapters, layout):
    runner = ExportRunner(exports[layout])
    got = greedy(runner, [PROMPTS[0], PROMPTS[2]])
    expected = [peft_greedy(lively_model, adapters["A"], p) for p in (PROMPTS[0], PROMPTS[2])]
    assert got == expected
    assert len(set(got[0])) > 2, f"degenerate continuation {got[0]}: the comparison proves little"


@pytest.mark.parametrize("io_binding", [False, True], ids=["host", "bound"])
@pytest.mark.parametrize("layout", ["folded", "cache"])
def test_batched_left_padded_equals_rows_alone(exports, layout, io_binding):
    runner = ExportRunner(exports[layout], io_binding=io_binding)
    batched = greedy(runner, PROMPTS)
    alone = [greedy(runner, [p])[0] for p in PROMPTS]
    assert batched == alone


def test_bound_cache_matches_host_logits(exports):
    """The IO-binding path (buffers allocated once, ping-pong) computes what plain session.run computes."""
    from prefix_export.runtime.loop import BoundKV, HostKV

    decoder = ExportRunner(exports["cache"]).engine.decoder
    past, prefix_mask, _ = decoder.first_past(1)
    P, S, steps = prefix_mask.shape[1], len(PROMPTS[0]), 6
    host, bound = HostKV(decoder, past, 1, P + S + steps), BoundKV(decoder, past, 1, P + S + steps)
    assert bound.buffers[0][0].shape() == [1 * 4 * (P + S + steps) * 8]  # B * H_kv * T_max * D, allocated once
    mask = np.ones((1, P + S + steps), np.int64)
    tokens, positions = np.array([PROMPTS[0]], np.int64), np.arange(S, dtype=np.int64)[None] + P
    for t in range(steps):
        expected = host.step(tokens, mask[:, :P + S + t], positions).copy()
        got = bound.step(tokens, mask[:, :P + S + t], positions)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        tokens, positions = expected[:, -1].argmax(-1)[:, None].astype(np.int64), positions[:, -1:] + 1
    assert bound.past_length == P + S + steps - 1


def test_rows_with_different_prefixes_equal_each_alone(exports, lively_model, adapters, prefix_files):
    runner = ExportRunner(exports["cache"])
    A = load_prefix_file(exports["cache"])
    B, C = load_prefix_file(prefix_files["B"]), load_prefix_file(prefix_files["C"])
    assert C.shape[3] == 2 and A.shape[3] == 4
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    batched = greedy(runner, rows, prefixes=[A, prefix_files["B"], C])  # arrays and paths both accepted
    alone = [greedy(runner, [rows[0]], [A])[0], greedy(runner, [rows[1]], [B])[0], greedy(runner, [rows[2]], [C])[0]]
    assert batched == alone
    # and each row is what PEFT computes with that row's own adapter
    assert alone[1] == peft_greedy(lively_model, adapters["B"], rows[1])
    assert alone[2] == peft_greedy(lively_model, adapters["C"], rows[2])
    assert alone[0] != greedy(runner, [rows[0]], [B])[0], "prefixes A and B give the same tokens: proves nothing"


def test_sampling_seeded_and_truncated(exports):
    runner = ExportRunner(exports["folded"])
    base = dict(max_new_tokens=10)
    first = greedy_tokens = greedy(runner, [PROMPTS[0]], steps=10)[0]
    sample = lambda **kw: runner.generate(token_ids=[PROMPTS[0]], config=GenerationConfig(**base, **kw))["rows"][0][
        "new_token_ids"]
    assert sample(temperature=1.0, seed=3) == sample(temperature=1.0, seed=3)
    draws = {tuple(sample(temperature=2.0, seed=s)) for s in range(4)}
    assert len(draws) > 1, "sampling at temperature 2 gave the same tokens for 4 seeds"
    assert sample(temperature=1.0, top_k=1, seed=5) == greedy_tokens
    assert sample(temperature=0.7, top_p=1e-6, seed=5) == first  # only the best token survives top-p


def test_sampler_top_k_top_p_sets():
    from prefix_export.runtime.sampling import Sampler, SamplingConfig

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    top_k = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=0))(logits)
    assert set(top_k.tolist()) == {0, 1}
    top_p = Sampler(SamplingConfig(temperature=1.0, top_p=0.75, seed=0))(logits)  # 0.5 + 0.3 reaches 0.75
    assert set(top_p.tolist()) == {0, 1}
    plain = Sampler(SamplingConfig(temperature=1.0, seed=0))(logits)
    assert abs((plain == 0).mean() - 0.5) < 0.05 and set(plain.tolist()) == {0, 1, 2, 3}


def test_stop_tokens_and_padding(exports):
    runner = ExportRunner(exports["folded"])
    full = greedy(runner, PROMPTS)
    stop = full[0][3]  # row 0 stops at its 4th token
    config = GenerationConfig(max_new_tokens=NEW, stop_token_ids=(stop,), pad_token_id=0)
    new = runner.engine.generate(*_batch(PROMPTS), config)
    k = full[0].index(stop)
    assert new[0, :k + 1].tolist() == full[0][:k + 1] and (new[0, k + 1:] == 0).all()
    result = runner.generate(token_ids=PROMPTS, config=config)
    assert result["rows"][0]["new_token_ids"] == full[0][:k] and result["rows"][0]["stop_token_id"] == stop
    # every row stopping ends the loop early
    one = runner.engine.generate(*_batch([PROMPTS[0]]), config)
    assert one.shape == (1, k + 1)


def test_streaming_yields_each_token(exports):
    runner = ExportRunner(exports["cache"])
    config = GenerationConfig(max_new_tokens=8)
    steps = [step.tokens.copy() for step in runner.stream(token_ids=PROMPTS, config=config)]
    assert len(steps) == 8
    assert np.stack(steps, axis=1).tolist() == greedy(runner, PROMPTS, steps=8)


def test_cli_generate_streams_token_ids(exports, capsys):
    code = main(["generate", str(exports["cache"]), "--token-ids", ",".join(map(str, PROMPTS[0])),
                 "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0
    expected = greedy(ExportRunner(exports["cache"]), [PROMPTS[0]], steps=5)[0]
    eos = 2  # tiny config's eos: the CLI stops there
    if eos in expected:
        expected = expected[:expected.index(eos)]
    assert out.split() == [str(t) for t in expected]


def test_cli_generate_json_per_row_prefixes(exports, prefix_files, capsys):
    code = main(["generate", str(exports["cache"]), "--token-ids", "5,6,7", "--token-ids", "8,9", "--json",
                 "--prefix-kv", str(exports["cache"]), "--prefix-kv", str(prefix_files["C"]),
                 "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "1", "--stop", "3"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["layout"] == "cache" and len(result["rows"]) == 2


def _batch(rows):
    from prefix_export.runtime.decoder import pad_batch

    return pad_batch(rows, 0, "left")


def test_validate_command_on_cache_layout(exports, prefix_files, tmp_path, capsys):
    """`prefix-export validate` drives the cache layout through its prefix file, and notices a wrong one."""
    import shutil

    assert main(["validate", str(exports["cache"])]) == 0
    assert "validation PASSED" in capsys.readouterr().out
    tampered = tmp_path / "tampered"
    shutil.copytree(exports["cache"], tampered)
    shutil.copyfile(prefix_files["B"], tampered / "prefix_kv.safetensors")  # another task's prefix, same shape
    assert main(["validate", str(tampered)]) == 1
    out = capsys.readouterr().out
    assert "prefix_kv.safetensors changed since export" in out
    assert "prefix    prefix_* (worst)" in out and "FAILED" in out.split("prefix_* (worst)")[1].splitlines()[0]
    assert "tokens differ" in out or "greedy" in out


def test_cache_layout_on_a_rotary_multi_query_model(tmp_path):
    """Not GPT-2 only: qwen3 (rotary, one KV head, head_dim set apart from hidden/heads), cache layout."""
    from prefix_export.api import export_prefix_model
    from tiny_models import make_prefix, save_tiny_model, tiny_config

    save_tiny_model(tiny_config("qwen3"), tmp_path / "model")
    make_prefix(tmp_path / "model", tmp_path / "prefix", 3, projection=True, trained=True)
    result = export_prefix_model(str(tmp_path / "model"), tmp_path / "prefix", tmp_path / "out", layout="cache",
                                 progress=False)
    assert result.validation.passed, result.validation.table()
    runner = ExportRunner(result.folder)
    rows = [PROMPTS[0], PROMPTS[1]]
    batched = greedy(runner, rows, steps=8)
    assert batched == [greedy(runner, [r], steps=8)[0] for r in rows]
    assert batched[0] == peft_greedy(tmp_path / "model", tmp_path / "prefix", rows[0], steps=8)


def test_token_id_outside_the_vocabulary_exits_2_naming_its_size(exports, capsys):
    code = main(["generate", str(exports["folded"]), "--token-ids", "1,2,99999"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "InputError" in err and "[99999]" in err and "vocabulary of 128 tokens" in err
    assert "Traceback" not in err
    assert main(["generate", str(exports["cache"]), "--token-ids=-1,2"]) == 2
    assert "vocabulary of 128 tokens" in capsys.readouterr().err
