"""Mutation tests: export with a deliberately broken wrapper; validation must fail, naming the output.

Each mutant is a PrefixFoldedDecoder with one bug a real implementation could have. The export
pipeline must raise ValidationError (exit 1), publish nothing, and its report must name the output
that differs and how. Then the structural checks: names, shapes and NaN/Inf are checked before any
value, on a real graph (renamed output, NaN weights) and on fake decoders.
"""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from prefix_export.export import wrappers as export
from prefix_export.source import architectures
from prefix_export.api import export_prefix_model, validate_export
from prefix_export.errors import ValidationError
from prefix_export.source.prefix_kv import PrefixKV


class Mutant(export.PrefixFoldedDecoder):
    """The folded decoder with one bug, chosen by `mutation`."""

    mutation = "none"

    def __init__(self, model, prefix_kv, num_layers=None):
        tensor = prefix_kv.tensor.clone()  # (L, 2, H_kv, P, D)
        if self.mutation == "truncate_prefix":
            tensor = tensor[:, :, :, 1:]  # one virtual token lost
        elif self.mutation == "swap_layers":
            tensor = tensor[[1, 0]]
        elif self.mutation == "perturb_1e-3":
            tensor[1, 0, 2, 3, 5] += 1e-3  # layer 1 key, head 2, token 3, dim 5
        super().__init__(model, PrefixKV(tensor.contiguous()), num_layers)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        batch = input_ids.shape[0]
        P = self.num_virtual_tokens
        layers = []
        for i in range(self.num_layers):
            key = getattr(self, f"prefix_key_{i}").expand(batch, -1, -1, -1)  # (B, H_kv, P, D)
            value = getattr(self, f"prefix_value_{i}").expand(batch, -1, -1, -1)
            layers.append((torch.cat([key, past_key_values[2 * i]], dim=2),
                           torch.cat([value, past_key_values[2 * i + 1]], dim=2)))
        cache = architectures.make_cache(layers, self.model.config)
        if self.mutation == "no_mask_extension":
            # The prefix's P mask columns are zeros: the cache holds the prefix but nothing attends to it.
            ones = torch.zeros(batch, P, dtype=attention_mask.dtype)
        else:
            ones = torch.ones(batch, P, dtype=attention_mask.dtype)
        mask = torch.cat([ones, attention_mask], dim=1)
        shift = 0 if self.mutation == "no_position_shift" else P
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids + shift, use_cache=True,
                         return_dict=True, **architectures.cache_kwargs(self.model, cache))
        presents = []
        for key, value in architectures.cache_to_tensors(architectures.output_cache(out)):
            presents += [key[:, :, P:], value[:, :, P:]]
        return (out.logits, *presents)


MUTATIONS = {
    # mutation: patterns that must appear in report.failures()
    "no_position_shift": [r"^prefill +logits .*FAILED"],
    "no_mask_extension": [r"^prefill +logits .*FAILED"],
    "truncate_prefix": [r"prefix: prefix_key_0 has shape \(1, 4, 3, 8\), PEFT's prefix for layer 0 is \(1, 4, 4, 8\)"],
    "swap_layers": [r"^prefix +prefix_key_0 .*FAILED", r"^prefix +prefix_value_1 .*FAILED",
                    r"^prefill +logits .*FAILED"],
    "perturb_1e-3": [r"^prefix +prefix_key_1 +max_abs 1\.000e-03.*FAILED"],
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutant_fails_validation(tmp_path, gpt2_dir, gpt2_adapter, monkeypatch, mutation):
    import re

    monkeypatch.setattr(Mutant, "mutation", mutation)
    monkeypatch.setattr(export, "PrefixFoldedDecoder", Mutant)
    out = tmp_path / "out"
    with pytest.raises(ValidationError) as raised:
        export_prefix_model(str(gpt2_dir), gpt2_adapter, out, progress=False)
    failures = raised.value.report.failures()
    print("\n".join(failures))
    assert "does not match PEFT's forward" in str(raised.value)
    for pattern in MUTATIONS[mutation]:
        assert any(re.search(pattern, line) for line in failures), f"{pattern!r} not among:\n" + "\n".join(failures)
    assert raised.value.exit_code == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [], "a graph that failed validation was published"
    if mutation == "perturb_1e-3":  # exactly the one tensor that was touched
        assert [c.output for c in raised.value.report.comparisons if c.check == "prefix" and not c] == ["prefix_key_1"]


def test_unmutated_wrapper_passes(tmp_path, gpt2_dir, gpt2_adapter, monkeypatch):
    """The control: the test's copy of the wrapper, unmutated, validates (so the mutants fail for their bug)."""
    monkeypatch.setattr(Mutant, "mutation", "none")
    monkeypatch.setattr(export, "PrefixFoldedDecoder", Mutant)
    result = export_prefix_model(str(gpt2_dir), gpt2_adapter, tmp_path / "out", progress=False)
    assert result.validation.passed, result.validation.table()


# ---- names and shapes before values; NaN/Inf -----------------------------------------------------


@pytest.fixture(scope="module")
def good_export(tmp_path_factory, gpt2_dir, gpt2_adapter):
    folder = tmp_path_factory.mktemp("good") / "out"
    export_prefix_model(str(gpt2_dir), gpt2_adapter, folder, progress=False)
    return folder


def test_renamed_output_is_caught_before_values(tmp_path, good_export):
    copy = tmp_path / "renamed"
    shutil.copytree(good_export, copy)
    model = onnx.load(str(copy / "model.onnx"))
    for node in model.graph.node:
        node.output[:] = ["present.1.v" if name == "present.1.value" else name for name in node.output]
    next(o for o in model.graph.output if o.name == "present.1.value").name = "present.1.v"
    onnx.save(model, str(copy / "model.onnx"))
    report = validate_export(copy)
    assert not report.passed
    assert any("output names" in p and "present.1.v" in p and "differ from the contract" in p for p in report.problems)
    assert not [c for c in report.comparisons if c.check != "prefix"], "values were compared despite wrong names"


def test_nan_weights_in_the_graph_are_caught(tmp_path, good_export):
    copy = tmp_path / "nan"
    shutil.copytree(good_export, copy)
    model = onnx.load(str(copy / "model.onnx"))
    # The token embedding table (vocab, hidden) = (128, 32): NaN in one row reaches every output
    # of a prompt that uses that token.
    table = next(i for i in model.graph.initializer if list(i.dims) == [128, 32])
    values = numpy_helper.to_array(table).copy()
    values[:, 0] = np.nan
    table.CopyFrom(numpy_helper.from_array(values, table.name))
    onnx.save(model, str(copy / "model.onnx"))
    report = validate_export(copy)
    assert not report.passed
    assert any(p.startswith("prefill: logits holds") and "NaN/Inf values" in p for p in report.problems), report.problems
    assert not [c for c in report.comparisons if c.check.startswith("prefill")], "NaN outputs were compared as values"


@pytest.fixture(scope="module")
def peft_model(gpt2_dir, gpt2_adapter):
    from prefix_export.source.base_model import load_base_model
    from prefix_export.source.checkpoint import load_prefix_checkpoint
    from prefix_export.source.prefix_kv import build_peft_model

    return build_peft_model(load_base_model(str(gpt2_dir)), load_prefix_checkpoint(gpt2_adapter))


class FakeDecoder:
    """Stands where OnnxDecoder stands; returns PEFT's own answers, edited by `edit`."""

    def __init__(self, peft_model, edit, output_names=None):
        from prefix_export import contract

        self.peft_model, self.edit = peft_model, edit
        self.num_layers, self.num_kv_heads, self.head_dim = 2, 4, 8
        self.output_names = output_names or contract.output_names(2)

    def empty_past(self, batch):
        return [np.zeros((batch, 4, 0, 8), np.float32) for _ in range(4)]

    def run(self, input_ids, attention_mask, position_ids, past):
        from prefix_export.validate.reference import decoder_forward as _reference_forward

        if past[0].shape[2]:  # decode: PEFT needs the whole sequence; keep it simple and fail loudly
            raise RuntimeError("the fake decoder only prefills")
        logits, presents = _reference_forward(self.peft_model, input_ids, attention_mask, position_ids)
        return self.edit(logits, presents)


def _validate(decoder, peft_model):
    from prefix_export.validate.decoder import validate

    return validate(decoder, peft_model, 128, decode_steps=0, greedy_prompts=0)


def test_fake_decoder_control_passes(peft_model):
    report = _validate(FakeDecoder(peft_model, lambda logits, presents: (logits, presents)), peft_model)
    assert report.passed, report.table()


def test_wrong_shape_is_reported_without_comparing_values(peft_model):
    report = _validate(FakeDecoder(peft_model, lambda logits, presents: (logits[..., :-1], presents)), peft_model)
    assert "prefill: logits has shape (3, 9, 127), expected (3, 9, 128)" in report.problems
    assert report.comparisons == []


def test_inf_in_a_present_is_reported(peft_model):
    def edit(logits, presents):
        presents[3][0, 1, 4, 2] = np.inf
        return logits, presents

    report = _validate(FakeDecoder(peft_model, edit), peft_model)
    assert "prefill: present.1.value holds 1 NaN/Inf values" in report.problems
    assert not report.passed


def test_missing_output_name_is_reported(peft_model):
    from prefix_export import contract

    names = contract.output_names(2)[:-1]
    report = _validate(FakeDecoder(peft_model, lambda logits, presents: (logits, presents[:-1]), names), peft_model)
    assert any("output names" in p and "differ from the contract" in p for p in report.problems)
    assert report.comparisons == []


def test_runtime_failure_is_a_failed_validation(peft_model):
    def crash(logits, presents):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Gather out of bounds")

    report = _validate(FakeDecoder(peft_model, crash), peft_model)
    assert report.problems == ["prefill: ONNX Runtime failed running the graph: RuntimeError: [ONNXRuntimeError] "
                               ": 2 : INVALID_ARGUMENT : Gather out of bounds"]
