"""Prompt tuning, p-tuning and multitask prompt tuning: their virtual tokens become the static prefix KV
of one base-model forward, on every registered decoder family, in both layouts, against PEFT's own forward.

Every export is validated by the library (PEFT's forward for that method: the user's positions only,
the padded batch at the contract's positions) and checked again here independently: the README's
contract driven by hand on ONNX Runtime, against a greedy loop on `PeftModel.from_pretrained` (or PEFT's
training-mode model for a raw encoder), first-step logits within 1e-4 and 16 greedy tokens equal.

Runtime (an export is ~6 s of the exporter; a full matrix of them took 6.5 minutes on one core): each
family's two graphs are exported once, with its prompt-tuning adapter, and the other checkpoints use
them as the product lets any task use them:
- folded: the export is made with --swappable-prefix, and p-tuning's prefix is an ONNX Runtime adapter
  file on it (`make_adapter`, validated against PEFT's p-tuning forward through the adapter API; the
  hand-driven check feeds the adapter's tensors as the graph's prefix inputs). The default folded
  export (prefix constant) is run by the multitask and genai tests;
- cache: the graph is the plain base decoder, the same whatever the prompt (one graph serves every
  task, README "Two layouts"), so a checkpoint is validated on it with its own prefix_kv, exactly as
  the library validates a cache-layout export (kinds.DecoderCache: PEFT's references, then the checks).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from prefix_export.adapters import make_adapter
from prefix_export.api import export_prefix_model, load_prefix_model
from prefix_export.cli import main
from prefix_export.export.kinds import kind_for
from prefix_export.folder import ExportFolder, read_metadata, read_prefix_file
from prefix_export.runtime.adapters import read_adapter
from prefix_export.source import architectures
from prefix_export.validate.report import Tolerances, ValidationSettings
from tests_helpers import PROMPT, assert_refused, export_args, genai_greedy, run_cli
from tiny_models import make_virtual_tokens, save_tiny_model, save_word_tokenizer, tiny_config

DECODERS = [t for t in architectures.supported_model_types() if not architectures.describe(tiny_config(t)).is_seq2seq]
SEQ2SEQ = [t for t in architectures.supported_model_types() if t not in DECODERS]
METHODS = ["prompt_tuning", "p_tuning"]
P = 6  # below the tiny sliding windows (8) and above them with the prompt: both sides of the window
GREEDY = 16
LOGITS_ATOL = 1e-4  # fp32 on tiny models: ONNX Runtime and PyTorch differ by ~1e-7


# ---- shared models, adapters, exports --------------------------------------------------------------


class Store:
    """Made once per module, on first use: tiny models, adapters, cache-layout graphs, PEFT's answers."""

    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, Path] = {}
        self.adapters: dict[tuple, Path] = {}
        self.cache_exports: dict[str, Path] = {}
        self.folded_exports: dict[str, tuple] = {}

    def model(self, model_type: str) -> Path:
        if model_type not in self.models:
            folder = self.root / "models" / model_type
            save_tiny_model(tiny_config(model_type), folder)
            self.models[model_type] = folder
        return self.models[model_type]

    def adapter(self, model_type: str, method: str, **options) -> Path:
        key = (model_type, method, tuple(sorted(options.items())))
        if key not in self.adapters:
            name = "-".join([model_type, method, *(f"{k}={v}" for k, v in sorted(options.items()))])
            self.adapters[key] = make_virtual_tokens(self.model(model_type), self.root / "adapters" / name, method, P,
                                                     **options)
        return self.adapters[key]

    def folded_export(self, model_type: str):
        """(folder, validation) of the family's folded export with its prompt-tuning adapter, swappable."""
        if model_type not in self.folded_exports:
            result = export_prefix_model(str(self.model(model_type)), self.adapter(model_type, "prompt_tuning"),
                                         self.root / "folded" / model_type, progress=False, swappable_prefix=True)
            assert result.validation.passed, result.validation.table()
            assert result.report["prefix"]["method"] == "prompt_tuning"
            assert "virtual token embeddings" in result.report["prefix"]["conversion"]
            assert read_metadata(result.graph)["prefix_export.method"] == "prompt_tuning"
            self.folded_exports[model_type] = (result.folder, result.validation)
        return self.folded_exports[model_type]

    def cache_export(self, model_type: str) -> Path:
        """The family's cache-layout export (the plain base decoder), made with its prompt-tuning adapter."""
        if model_type not in self.cache_exports:
            out = self.root / "cache" / model_type
            result = export_prefix_model(str(self.model(model_type)), self.adapter(model_type, "prompt_tuning"), out,
                                         layout="cache", progress=False)
            assert result.validation.passed, result.validation.table()
            self.cache_exports[model_type] = out
        return self.cache_exports[model_type]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("virtual-tokens"))


def validate_on_cache_graph(store: Store, model_type: str, prefix: Path, tmp_path: Path, **load):
    """The library's validation of `prefix` on the family's cache-layout graph, fed its own prefix_kv
    (what `export_prefix_model(..., layout="cache")` would check, without exporting the same graph again)."""
    source = load_prefix_model(str(store.model(model_type)), prefix, **load)
    folder = tmp_path / "cache"
    shutil.copytree(store.cache_export(model_type), folder)
    source.prefix_kv.save(ExportFolder.open(folder).prefix_file)
    spec = source.base.spec
    kind, tolerances = kind_for(spec, "cache"), Tolerances()
    reference = kind.reference(source.peft_model, spec, tolerances, ValidationSettings())
    return kind.validate(ExportFolder.open(folder), reference, spec, tolerances), folder


# ---- independent checks: PEFT's own model, the contract driven by hand -------------------------------


def peft_reference(model_dir: Path, prefix: Path, task_id: int | None = None):
    """(greedy tokens, first-step logits, the base model's first-step logits) from PEFT alone: an adapter
    folder through PeftModel.from_pretrained, a raw p-tuning encoder through get_peft_model (training mode,
    so PEFT runs the MLP/LSTM itself)."""
    from peft import PeftModel, PromptEncoderConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        base_logits = base(input_ids=torch.from_numpy(PROMPT)[None]).logits[0, -1].numpy()
    if prefix.is_dir():
        model = PeftModel.from_pretrained(base, prefix).eval()
    else:
        from safetensors.torch import load_file

        config = json.loads((prefix.parent / "prefix_config.json").read_text())
        fields = ("num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers")
        model = get_peft_model(base, PromptEncoderConfig(task_type="CAUSAL_LM", **{k: config[k] for k in fields}))
        model.prompt_encoder["default"].load_state_dict(load_file(str(prefix)), strict=True)
        model.eval()
    tokens = torch.from_numpy(PROMPT)[None]
    extra = {} if task_id is None else {"task_ids": torch.tensor([task_id])}
    new, first = [], None
    with torch.no_grad():
        for _ in range(GREEDY):
            logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), **extra).logits[0, -1]
            first = logits.numpy() if first is None else first
            new.append(int(logits.argmax()))
            tokens = torch.cat([tokens, torch.tensor([[new[-1]]])], dim=1)
    return new, first, base_logits


def contract_greedy(folder: Path, prompt: np.ndarray, steps: int, overrides: dict | None = None):
    """Greedy through the README's contract, written out here: folded, an empty first past and positions
    from 0 (`overrides`: another task's prefix tensors fed to a swappable graph's prefix inputs); cache,
    prefix_kv.safetensors (L, 2, H_kv, P, D) as the first past, the mask over P + the prompt, positions
    from P. Returns the new tokens and the first step's logits."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    layout = read_metadata(folder / "model.onnx")["prefix_export.layout"]
    prefix = read_prefix_file(folder / "prefix_kv.safetensors")
    offset = prefix.shape[3] if layout == "cache" else 0
    feeds = {}
    for i in range(prefix.shape[0]):
        for j, kind in enumerate(("key", "value")):
            first = prefix[i, j][None] if layout == "cache" else np.zeros((1, *prefix.shape[2:3], 0, prefix.shape[4]),
                                                                            np.float32)
            feeds[f"past_key_values.{i}.{kind}"] = first
    ids, mask = prompt[None], np.ones((1, offset + len(prompt)), np.int64)
    positions = np.arange(offset, offset + len(prompt), dtype=np.int64)[None]
    names = [o.name for o in session.get_outputs()]
    new, first_logits = [], None
    for _ in range(steps):
        outputs = dict(zip(names, session.run(None, {**feeds, **(overrides or {}), "input_ids": ids,
                                                      "attention_mask": mask, "position_ids": positions})))
        logits = outputs["logits"][0, -1]
        first_logits = logits if first_logits is None else first_logits
        new.append(int(logits.argmax()))
        feeds = {name: outputs[name.replace("past_key_values", "present")] for name in feeds}
        ids, positions = np.array([[new[-1]]], np.int64), positions[:, -1:] + 1
        mask = np.concatenate([mask, [[1]]], axis=1)
    return new, first_logits


def check_against_peft(folder: Path, model_dir: Path, prefix: Path, label: str, task_id: int | None = None,
                       overrides: dict | None = None) -> float:
    expected, expected_logits, base_logits = peft_reference(model_dir, prefix, task_id)
    got, got_logits = contract_greedy(folder, PROMPT, GREEDY, overrides)
    err = float(np.abs(got_logits - expected_logits).max())
    print(f"{label}: first-step logits max abs error {err:.2e}; greedy {'equal' if got == expected else 'DIFFERENT'}")
    assert err <= LOGITS_ATOL, f"{label}: {err}"
    assert got == expected, f"{label}: export {got} != PEFT {expected}"
    assert np.abs(base_logits - expected_logits).max() > 1e-3, f"{label}: the prompt had no effect"
    return err


def validation_logits_error(validation) -> float:
    """The export's largest logits error against PEFT's model-dtype forward over the validation's checks
    (the padded batch and every decode step), whichever rule judged."""
    return max(c.max_abs_vs_reference for c in validation.comparisons if c.output == "logits")


# ---- every family, both methods, both layouts ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", DECODERS)
def test_folded(store, tmp_path, model_type, method):
    model_dir, adapter = store.model(model_type), store.adapter(model_type, method)
    folder, validation = store.folded_export(model_type)  # prompt tuning's own export
    overrides = None
    if method != "prompt_tuning":  # another task on the same folded graph, as an adapter file
        made = make_adapter(folder, adapter, tmp_path / f"{method}.onnx_adapter")
        assert made.report["inputs"]["method"] == method
        validation, overrides = made.validation, read_adapter(made.path)
    assert validation.passed, validation.table()
    err = check_against_peft(folder, model_dir, adapter, f"{model_type} {method} folded", overrides=overrides)
    print(f"ROW {model_type} {method} folded validation-logits {validation_logits_error(validation):.2e} "
          f"first-step {err:.2e}")
    assert validation_logits_error(validation) <= LOGITS_ATOL


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", DECODERS)
def test_cache(store, tmp_path, model_type, method):
    model_dir, adapter = store.model(model_type), store.adapter(model_type, method)
    validation, folder = validate_on_cache_graph(store, model_type, adapter, tmp_path)
    assert validation.passed, validation.table()
    err = check_against_peft(folder, model_dir, adapter, f"{model_type} {method} cache")
    print(f"ROW {model_type} {method} cache validation-logits {validation_logits_error(validation):.2e} "
          f"first-step {err:.2e}")
    assert validation_logits_error(validation) <= LOGITS_ATOL


# ---- the ways a checkpoint is made ------------------------------------------------------------------


@pytest.mark.parametrize("init", ["TEXT", "SAMPLE_VOCAB", "RANDOM"])
def test_prompt_tuning_init(store, tmp_path, init):
    """Every prompt_tuning_init exports; TEXT reads its tokenizer when the adapter is created, never after."""
    tokenizer = save_word_tokenizer(tmp_path / "tokenizer") if init == "TEXT" else None
    adapter = make_virtual_tokens(store.model("llama"), tmp_path / "adapter", "prompt_tuning", P, init=init,
                                  tokenizer_dir=tokenizer, seed=3)
    assert json.loads((adapter / "adapter_config.json").read_text())["prompt_tuning_init"] == init
    if tokenizer is not None:
        shutil.rmtree(tokenizer)
    validation, folder = validate_on_cache_graph(store, "llama", adapter, tmp_path)
    assert validation.passed, validation.table()
    check_against_peft(folder, store.model("llama"), adapter, f"llama prompt tuning {init}")


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_encoders(store, tmp_path, encoder):
    """Both reparameterisations, from an adapter folder (PEFT saved the encoder's output) and from a raw
    PromptEncoder state dict (its MLP/LSTM run once at load): the same virtual tokens, and the raw one
    exports against PEFT running the encoder itself."""
    from prefix_export.source.checkpoint import load_prefix_checkpoint

    model_dir = store.model("qwen2")
    adapter = make_virtual_tokens(model_dir, tmp_path / "adapter", "p_tuning", P, encoder=encoder, seed=4)
    raw = make_virtual_tokens(model_dir, tmp_path / "raw", "p_tuning", P, encoder=encoder, seed=4,
                              kind="raw_safetensors")
    from_adapter, from_raw = load_prefix_checkpoint(adapter), load_prefix_checkpoint(raw)
    assert from_raw.kind == "prompt_encoder_state_dict"
    torch.testing.assert_close(from_raw.prompt_embeddings, from_adapter.prompt_embeddings, atol=1e-6, rtol=0)
    validation, folder = validate_on_cache_graph(store, "qwen2", raw, tmp_path)
    assert validation.passed, validation.table()
    check_against_peft(folder, model_dir, raw, f"qwen2 p-tuning {encoder} raw encoder")


def test_multitask_prompt_tuning_one_task_per_export(store, tmp_path, capsys):
    """--task-id picks the task; the tasks' prefixes differ; the report keeps the task for `validate`."""
    model_dir = store.model("gpt2")
    adapter = make_virtual_tokens(model_dir, tmp_path / "adapter", "multitask_prompt_tuning", P, seed=5)
    kv = [load_prefix_model(str(model_dir), adapter, task_id=t).prefix_kv.tensor for t in (0, 1)]
    assert (kv[0] - kv[1]).abs().max() > 1e-3
    code, text = run_cli(export_args(model_dir, adapter, tmp_path, "--task-id", "1", "--json"), capsys)
    assert code == 0, text
    report = json.loads(text[text.index("{"):])
    assert report["prefix"]["method"] == "multitask_prompt_tuning" and report["prefix"]["task_id"] == 1
    assert report["inputs"]["task_id"] == 1
    check_against_peft(tmp_path / "export", model_dir, adapter, "gpt2 multitask task 1", task_id=1)
    code, text = run_cli(["validate", tmp_path / "export", "-q"], capsys)
    assert code == 0 and "validation PASSED" in text, text


def test_inspect_shows_the_method(store, capsys):
    adapter = store.adapter("llama", "p_tuning")
    assert main(["inspect", str(store.model("llama")), "--prefix", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "p_tuning" and info["prefix (P)"] == P
    assert "positions 0..P-1" in info["conversion"] and "encoder reparameterization type MLP" in \
        info["prefix checkpoint"]


# ---- the validation has teeth -------------------------------------------------------------------------


def test_a_wrong_conversion_fails_validation(store, tmp_path, monkeypatch):
    """The virtual tokens run at positions 1..P instead of 0..P-1: a plausible bug the checks must catch."""
    from prefix_export.source import prefix_kv

    original = prefix_kv.virtual_tokens_kv

    def shifted(peft_model):
        def plus_one(module, args, kwargs):
            kwargs["position_ids"] = kwargs["position_ids"] + 1
            return args, kwargs

        handle = peft_model.get_base_model().register_forward_pre_hook(plus_one, with_kwargs=True)
        try:
            return original(peft_model)
        finally:
            handle.remove()

    monkeypatch.setattr(prefix_kv, "virtual_tokens_kv", shifted)
    validation, _ = validate_on_cache_graph(store, "llama", store.adapter("llama", "prompt_tuning"), tmp_path)
    assert not validation.passed
    failed = {c.check for c in validation.comparisons if not c.passed}
    assert {"prefix", "prefill"} <= failed, validation.table()


# ---- deploy ---------------------------------------------------------------------------------------------


def test_genai_runs_a_prompt_tuned_folded_export(tmp_path, lively_model):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                                                    "'prefix-export[deploy]')")
    adapter = make_virtual_tokens(lively_model, tmp_path / "adapter", "prompt_tuning", 4, seed=6)
    result = export_prefix_model(str(lively_model), adapter, tmp_path / "out", progress=False)
    assert result.validation.passed, result.validation.table()
    assert (result.folder / "genai_config.json").is_file()
    expected, _, _ = peft_reference(lively_model, adapter)
    got = genai_greedy(result.folder, PROMPT.tolist(), GREEDY)
    assert got == expected[:len(got)] and len(got) >= GREEDY // 2, f"genai {got} != PEFT {expected}"
    assert len(set(expected)) >= 3, f"the continuation {expected} is too uniform to tell anything"


# ---- refused: where the virtual tokens are not a static prefix ------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", SEQ2SEQ)
def test_seq2seq_prompt_tuning_is_refused(tmp_path, out, capsys, model_type, method):
    """PEFT puts a seq2seq model's virtual tokens into the encoder, which attends both ways: the reason
    is in the message, exit 2, nothing written; and the evidence, that the encoder states at the
    virtual positions change with the user's tokens, is checked on PEFT itself."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    model_dir = tmp_path / "model"
    save_tiny_model(tiny_config(model_type), model_dir)
    adapter = make_virtual_tokens(model_dir, tmp_path / "adapter", method, 4, trained=False)
    code, text = run_cli(export_args(model_dir, adapter, out), capsys)
    assert_refused(code, text, out, f"{method.replace('_', ' ')} cannot be exported for {model_type}",
                   "encoder input, whose attention is bidirectional", "depend on the user's tokens",
                   "Prefix tuning .* exports for")
    peft_model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model_dir), adapter).eval()
    states = []
    for ids in ([[5, 17, 42]], [[9, 64, 3]]):
        ids = torch.tensor(ids)
        with torch.no_grad():
            out_ = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=torch.tensor([[0]]))
        states.append(out_.encoder_last_hidden_state[0, :4])  # the 4 virtual positions
    assert (states[0] - states[1]).abs().max() > 1e-4
