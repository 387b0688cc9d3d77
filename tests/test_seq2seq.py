"""Encoder-decoder families (PEFT SEQ_2_SEQ_LM): export, then reproduce PEFT's forward token for token.

The parity test is parametrised over the registry's seq2seq families, so it is the parity test
test_architectures asks every registered type to have. The ORT loop here is written out from the
contract in seq2seq_contract.py, not taken from the package's runtime, and the reference is a greedy
loop on PeftModelForSeq2SeqLM's forward (never generate()).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from prefix_export.source import architectures
from prefix_export import contract_seq2seq as contract
from prefix_export.api import export_prefix_model, validate_export
from prefix_export.cli import main
from tiny_models import make_prefix, save_tiny_model, tiny_config

SEQ2SEQ = [t for t in architectures.supported_model_types() if architectures.describe(tiny_config(t)).is_seq2seq]
PROMPT = np.array([5, 17, 42, 9, 64, 3, 77, 21], dtype=np.int64)
GREEDY_TOKENS = 16


def test_bart_and_t5_are_registered_as_seq2seq():
    assert {"bart", "t5"} <= set(SEQ2SEQ)
    t5 = architectures.describe(tiny_config("t5", d_kv=16))
    assert (t5.task_type, t5.positions, t5.head_dim, t5.num_layers) == ("SEQ_2_SEQ_LM", "relative", 16, 2)
    bart = architectures.describe(tiny_config("bart"))
    assert (bart.positions, bart.max_positions, bart.decoder_start_token_id) == ("learned", 64, 2)
    assert (bart.num_layers, bart.num_encoder_layers) == (2, 3)  # decoder shallower than the encoder


def peft_greedy(peft_model, prompt: np.ndarray, start: int, steps: int):
    """Greedy on PEFT's forward, whole decoder sequence each step. Returns tokens and first-step logits."""
    input_ids = torch.from_numpy(prompt)[None]
    decoder_ids = torch.tensor([[start]])
    new, first_logits = [], None
    with torch.no_grad():
        for _ in range(steps):
            logits = peft_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                decoder_input_ids=decoder_ids).logits[0, -1]
            if first_logits is None:
                first_logits = logits.numpy()
            new.append(int(logits.argmax()))
            decoder_ids = torch.cat([decoder_ids, torch.tensor([[new[-1]]])], dim=1)
    return new, first_logits


def ort_greedy(folder, prompt: np.ndarray, start: int, steps: int):
    """The contract: encoder once; first decoder step gets encoder_hidden_states and empty pasts, later
    steps get (B, 0, d) encoder_hidden_states and the presents (self and cross) fed back."""
    encoder = ort.InferenceSession(str(folder / "encoder_model.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(folder / "decoder_model.onnx"), providers=["CPUExecutionProvider"])
    mask = np.ones((1, len(prompt)), np.int64)
    hidden = encoder.run(None, {"input_ids": prompt[None], "attention_mask": mask})[0]
    pasts = [i for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
    feeds = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}
    feeds.update(input_ids=np.array([[start]], np.int64), encoder_attention_mask=mask, encoder_hidden_states=hidden)
    names = [o.name for o in decoder.get_outputs()]
    new, first_logits = [], None
    for _ in range(steps):
        outputs = dict(zip(names, decoder.run(None, feeds)))
        logits = outputs["logits"][0, -1]
        if first_logits is None:
            first_logits = logits
        new.append(int(logits.argmax()))
        for past in pasts:
            feeds[past.name] = outputs[past.name.replace("past_key_values", "present")]
        feeds["input_ids"] = np.array([[new[-1]]], np.int64)
        feeds["encoder_hidden_states"] = np.zeros((1, 0, hidden.shape[2]), np.float32)
    return new, first_logits


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for model_type in SEQ2SEQ:
        dirs[model_type] = tmp_path_factory.mktemp(model_type)
        save_tiny_model(tiny_config(model_type), dirs[model_type])
    return dirs


@pytest.mark.parametrize("projection", [True, False], ids=["projection", "no-projection"])
@pytest.mark.parametrize("model_type", SEQ2SEQ)
def test_seq2seq_family_matches_peft(tmp_path, model_dirs, model_type, projection, capsys):
    model_dir = model_dirs[model_type]
    # Trained for a few steps (not init values); the two settings also use the two checkpoint kinds,
    # and the no-projection export goes through the CLI, unchanged from decoder-only use.
    kind = "peft_adapter" if projection else "raw_safetensors"
    prefix = make_prefix(model_dir, tmp_path / "prefix", 5, projection=projection, trained=True, kind=kind)
    out = tmp_path / "out"
    if projection:
        result = export_prefix_model(str(model_dir), prefix, out, progress=False)
        assert result.validation.passed, result.validation.table()
        report = result.report
    else:
        assert main(["--model", str(model_dir), "--prefix", str(prefix), "--out", str(out), "-q"]) == 0
        report = json.loads((out / "export_report.json").read_text())
        assert report["validation"]["passed"]
    settings = report["validation"]["settings"]
    assert settings["decode_steps"] >= 8 and settings["greedy_tokens"] >= 8
    # Judged against PEFT in float64, with PyTorch fp32's own error as the yardstick (like decoders).
    assert settings["rule"] == "noise-relative" and settings["float64_reference"]
    logits_rows = [row for row in report["validation"]["summary"] if row["output"] == "logits"]
    assert logits_rows and all(row["pytorch_vs_fp64"] is not None for row in logits_rows)
    with capsys.disabled():
        print("\n" + "\n".join(f"{model_type} {row['check']} logits: {row['max_abs']:.2e} vs float64, PyTorch fp32 "
                               f"{row['pytorch_vs_fp64']:.2e}, limit {row['atol']:.2e}" for row in logits_rows))
    checks = {row["check"] for row in report["validation"]["summary"]}
    assert {"prefix", "encoder", "prefill", "decode"} <= checks

    # optimum's seq2seq names, one decoder graph, no If node, and the prefix folded in as initializers.
    decoder = onnx.load(str(out / "decoder_model.onnx"))
    L = architectures.describe(tiny_config(model_type)).num_layers
    assert [i.name for i in decoder.graph.input] == contract.decoder_input_names(L)
    assert [o.name for o in decoder.graph.output] == contract.decoder_output_names(L)
    assert "past_key_values.1.encoder.value" in contract.decoder_input_names(L)
    assert not [n for n in decoder.graph.node if n.op_type == "If"]
    assert "prefix_decoder_key_0" in {i.name for i in decoder.graph.initializer}
    encoder = onnx.load(str(out / "encoder_model.onnx"))
    assert [i.name for i in encoder.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in encoder.graph.output] == ["last_hidden_state"]

    # Independently of the package's checks: a plain ORT loop vs a greedy loop on PEFT's forward.
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    if kind == "peft_adapter":
        reference = PeftModel.from_pretrained(base, prefix).eval()
    else:
        from tests_helpers import load_raw_encoder_into

        reference = load_raw_encoder_into(base, prefix)
    assert type(reference).__name__ == "PeftModelForSeq2SeqLM"
    start = base.config.decoder_start_token_id
    expected, expected_logits = peft_greedy(reference, PROMPT, start, GREEDY_TOKENS)
    got, got_logits = ort_greedy(out, PROMPT, start, GREEDY_TOKENS)
    with torch.no_grad():  # the prefix must matter, or this test could not fail
        plain = base(input_ids=torch.from_numpy(PROMPT)[None], decoder_input_ids=torch.tensor([[start]])).logits[0, -1]
    err = float(np.abs(got_logits - expected_logits).max())
    with capsys.disabled():
        print(f"\n{model_type} projection={projection}: export {report['timing_s']['export']:.1f}s, first-step "
              f"logits max abs error {err:.3e}, prefix effect {float(np.abs(plain.numpy() - expected_logits).max()):.3f}")
    assert float(np.abs(plain.numpy() - expected_logits).max()) > 1e-2
    assert err <= 1e-4
    assert got == expected

    # `prefix-export generate` runs the folder: PEFT's tokens, up to the first stop token (eos).
    capsys.readouterr()
    assert main(["generate", str(out), "--token-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                 str(GREEDY_TOKENS), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    cut = len(row["new_token_ids"])
    assert row["new_token_ids"] == expected[:cut]
    assert row["stop_token_id"] is None if cut == GREEDY_TOKENS else row["stop_token_id"] == expected[cut]

    if projection:  # `prefix-export validate OUT` rechecks a seq2seq folder the same way, and can fail
        assert validate_export(out).passed
        _tamper_with_prefix(out / "decoder_model.onnx")
        failed = validate_export(out)
        assert not failed.passed
        failures = "\n".join(failed.failures())
        assert "decoder_model.onnx changed since export" in failures and "prefix_decoder_key_0" in failures


def _tamper_with_prefix(graph_file):
    from onnx import numpy_helper

    model = onnx.load(str(graph_file))
    for init in model.graph.initializer:
        if init.name == "prefix_decoder_key_0":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
    onnx.save(model, str(graph_file))


def _adapter(model_dir, folder, **config):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    peft_model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(model_dir),
                                PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, **config))
    peft_model.save_pretrained(folder)
    return folder


def test_t5_whose_d_kv_is_not_d_model_over_heads_is_refused(tmp_path, capsys):
    """PEFT shapes the prefix as token_dim / heads = 8 per head; this T5's cache holds d_kv = 16."""
    model_dir = tmp_path / "t5_wide_kv"
    save_tiny_model(tiny_config("t5", d_kv=16), model_dir)
    adapter = _adapter(model_dir, tmp_path / "adapter")
    code = main(["--model", str(model_dir), "--prefix", str(adapter), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot prefix-tune this t5 configuration" in err and "4 heads x 8" in err and "4 heads x 16" in err
    assert not (tmp_path / "out").exists()


def test_decoder_deeper_than_encoder_is_refused_because_peft_cannot_tune_it(tmp_path, capsys):
    """PEFT sizes the prefix by the encoder's depth; its own forward fails when the decoder is deeper.
    (The tiny bart in TINY_CONFIGS has the opposite, distilbart-like shape, which exports.)"""
    model_dir = tmp_path / "bart_2_3"
    save_tiny_model(tiny_config("bart", encoder_layers=2, decoder_layers=3), model_dir)
    adapter = _adapter(model_dir, tmp_path / "adapter")
    code = main(["--model", str(model_dir), "--prefix", str(adapter), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot prefix-tune this bart configuration" in err and "for 2 layers (the encoder's depth)" in err


def test_causal_prefix_on_a_seq2seq_model_is_a_mismatch(tmp_path, gpt2_adapter, capsys):
    model_dir = tmp_path / "t5"
    save_tiny_model(tiny_config("t5"), model_dir)
    code = main(["--model", str(model_dir), "--prefix", str(gpt2_adapter), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "trained for task CAUSAL_LM, but t5 model" in err and "takes SEQ_2_SEQ_LM prefixes" in err


def test_inspect_shows_the_seq2seq_plan(tmp_path, capsys):
    model_dir = tmp_path / "t5"
    save_tiny_model(tiny_config("t5"), model_dir)
    adapter = _adapter(model_dir, tmp_path / "adapter")
    assert main(["inspect", str(model_dir), "--prefix", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "t5" and info["positions"] == "relative" and info["prefix (P)"] == 3
    assert info["graphs"] == ["encoder_model.onnx", "decoder_model.onnx"]
    assert info["decoder graph inputs"][:3] == ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]
    assert info["decoder graph inputs"][3].startswith("past_key_values.0.decoder.key ... past_key_values.1.encoder.value")


def test_generate_runs_a_seq2seq_folder_batched_sampled_and_refuses_what_it_cannot(tmp_path, model_dirs, capsys):
    """A batch of prompts of different lengths (right-padded for the encoder) gives each row's tokens
    alone; sampling is reproducible with a seed; TensorRT and --prefix-kv are refused with a reason."""
    from prefix_export.runtime.loop import GenerationConfig
    from prefix_export.runtime.generate import Seq2SeqRunner, open_runner

    model_dir = model_dirs["bart"]
    prefix = make_prefix(model_dir, tmp_path / "prefix", 4, projection=True, trained=True)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--prefix", str(prefix), "--out", str(out), "-q"]) == 0
    runner = open_runner(out)
    assert isinstance(runner, Seq2SeqRunner) and runner.decoder_start_token_id == 2
    rows = [PROMPT.tolist(), PROMPT[:3].tolist()]
    config = GenerationConfig(max_new_tokens=8, stop_token_ids=(), pad_token_id=1)
    together = runner.generate(token_ids=rows, config=config)["rows"]
    for row, alone in zip(together, (runner.generate(token_ids=[r], config=config)["rows"][0] for r in rows)):
        assert row["new_token_ids"] == alone["new_token_ids"]
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=3, stop_token_ids=())
    first, second = (runner.generate(token_ids=rows, config=sampled)["rows"] for _ in range(2))
    assert [r["new_token_ids"] for r in first] == [r["new_token_ids"] for r in second]

    assert main(["generate", str(out), "--token-ids", "5,6", "--provider", "tensorrt"]) == 2
    assert "encoder-decoder export" in capsys.readouterr().err
    assert main(["generate", str(out), "--token-ids", "5,6", "--prefix-kv", str(out / "prefix_kv.safetensors")]) == 2
    assert "--prefix-kv is for decoder-only exports" in capsys.readouterr().err
    assert main(["generate", str(out), "--token-ids", "5,6", "--max-new-tokens", "200"]) == 2
    assert "decoder positions" in capsys.readouterr().err


# ---- the shared machinery holds for seq2seq too: guarded run, disk-full translation ----------------


@pytest.fixture(scope="module")
def bart_export(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("bart-export")
    prefix = make_prefix(model_dirs["bart"], root / "prefix", 4, projection=True, trained=True)
    out = root / "out"
    assert main(["--model", str(model_dirs["bart"]), "--prefix", str(prefix), "--out", str(out), "-q"]) == 0
    return out


def test_onnx_runtime_failure_in_seq2seq_validation_is_a_failed_check(tmp_path, bart_export, capsys):
    """The decoder's token embedding is cut to 3 rows: every decoder run then fails inside ONNX Runtime
    (Gather index out of bounds). `validate` reports it as a failed check (exit 1), not a traceback."""
    import shutil

    from onnx import numpy_helper

    broken = tmp_path / "broken"
    shutil.copytree(bart_export, broken)
    graph = onnx.load(str(broken / "decoder_model.onnx"))
    gather = next(n for n in graph.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    table = next(i for i in graph.graph.initializer if i.name == gather.input[0])
    short = numpy_helper.from_array(numpy_helper.to_array(table)[:3].copy(), table.name + "_cut")
    graph.graph.initializer.append(short)
    gather.input[0] = short.name
    onnx.save(graph, str(broken / "decoder_model.onnx"))
    code = main(["validate", str(broken)])
    captured = capsys.readouterr()
    print(captured.out)
    assert code == 1
    assert "prefill: ONNX Runtime failed running the graph:" in captured.out
    assert "Traceback" not in captured.out + captured.err
    assert "validation FAILED" in captured.out


def test_disk_full_in_the_seq2seq_exporter_is_named_like_a_decoder_export(tmp_path, model_dirs, capsys, monkeypatch):
    """The exporter's writer fails with ENOSPC inside a seq2seq export: exit 2 and the decoder export's
    message (one exporter call, one translation), nothing published."""
    import errno

    def full_disk(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("exporter failed while saving") from exc

    prefix = make_prefix(model_dirs["bart"], tmp_path / "prefix", 4, projection=True, trained=True)
    monkeypatch.setattr(torch.onnx, "export", full_disk)
    out = tmp_path / "out"
    code = main(["--model", str(model_dirs["bart"]), "--prefix", str(prefix), "--out", str(out / "export"), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "OutputError: the disk is full while writing" in err and "nothing was published" in err
    assert "Free space or choose another --out" in err
    assert not out.exists() or list(out.iterdir()) == []
