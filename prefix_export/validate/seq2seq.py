"""Validation of an encoder-decoder export on ONNX Runtime against PEFT's `PeftModelForSeq2SeqLM` forward.

Same two phases and report as validate.py (Comparison, compare, ValidationReport). The reference is
PEFT's forward over the whole decoder sequence at every step (no cache, encoder rerun each time),
which shares no code with export_seq2seq.py; greedy decoding on the reference is a loop on that
forward, never `PeftModel.generate()`. Under the default noise-relative rule (report.Tolerances) the
same forward also runs in float64, and the export is judged against that, with PyTorch's own error
as the yardstick.

Checks, in order (each collects its failures; nothing stops at the first):
  0. prefix: the decoder's `prefix_decoder_{key,value}_{i}` initializers equal PEFT's self-attention
     prefix, and PEFT's cross-attention prefix is empty (what the graph assumes);
  1. encoder: last_hidden_state of a right-padded batch of prompts of different lengths;
  2. prefill: the first decoder step, several decoder tokens, cross K/V computed in the graph;
  3. decode: N incremental steps feeding the graph's own presents back;
  4. greedy: new tokens token for token against a greedy loop on PEFT's forward.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .. import contract_seq2seq as contract
from ..runtime.decoder import OnnxSeq2Seq
from ..runtime.loop import GenerationConfig, Seq2SeqStepper, generate
from ..source import architectures
from .guard import Guarded, GraphRunFailed, record_failure
from .reference import reference_greedy, seq2seq_forward
from .report import (PREFIX_ATOL, Tolerances, ValidationReport, ValidationSettings, check_shapes_and_finite, compare,
                     make_prompts)

log = logging.getLogger(__name__)

_DEFAULTS = ValidationSettings()


# ---- the checks ----------------------------------------------------------------------------------


def check_folded_prefix(report: ValidationReport, decoder_graph, peft_model, num_layers: int,
                        tolerances: Tolerances) -> None:
    """Check 0: every `prefix_decoder_{key,value}_{i}` equals PEFT's self-attention prefix of layer i.

    PEFT provisions the prefix for the encoder's depth; a shallower decoder uses its first layers."""
    from ..folder import read_initializers

    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1)
    self_layers, cross_layers = architectures.encoder_decoder_cache_tensors(cache)
    self_layers = self_layers[:num_layers]
    if any(key.shape[2] for key, _ in cross_layers):
        report.problems.append("prefix: PEFT puts prefix positions into the cross-attention cache; the graph folds "
                               "the prefix into decoder self-attention only")
    owners = contract.prefix_owners(self_layers)  # layers with identical prefixes share initializers
    names = [contract.prefix_initializer_name(i, kind) for i in sorted(set(owners)) for kind in contract.KINDS]
    found = read_initializers(decoder_graph, names)
    missing = [n for n in names if n not in found]
    if missing:
        report.problems.append(f"prefix: the decoder graph has no initializers {missing[:4]}"
                               f"{'...' if len(missing) > 4 else ''}; it is not a folded export, or a pass renamed them")
        return
    atol = tolerances.per_output.get("prefix", PREFIX_ATOL)
    for i, (key, value) in enumerate(self_layers):
        for kind, reference in (("key", key), ("value", value)):
            name = contract.prefix_initializer_name(owners[i], kind)
            if tuple(found[name].shape) != tuple(reference.shape):
                report.problems.append(f"prefix: {name} has shape {tuple(found[name].shape)}, PEFT's prefix for "
                                       f"layer {i} is {tuple(reference.shape)} (1, H, P, D)")
                continue
            label = name if owners[i] == i else f"{name} (layer {i})"
            report.comparisons.append(compare("prefix", label, found[name], reference.float().numpy(), atol))


def _check_decoder_step(report, check, model: OnnxSeq2Seq, tolerances, logits, presents, reference, reference64,
                        encoder_mask: np.ndarray, vocab: int) -> bool:
    """Names, shapes, finiteness, then values; logits compared at the last len(logits) positions.

    `reference` and `reference64` are seq2seq_forward's (logits, presents) in the model's dtype and in
    float64 (None under the absolute rule)."""
    ref_logits, ref_presents = reference
    ref64_logits, ref64_presents = reference64 if reference64 is not None else (None, [None] * len(ref_presents))
    L = model.num_layers
    expected_names = contract.decoder_output_names(L)
    if model.decoder_output_names != expected_names:
        report.problems.append(f"{check}: decoder output names {model.decoder_output_names} differ from the contract "
                               f"{expected_names}")
        return False
    batch, seq = ref_logits.shape[0], logits.shape[1]
    total, encoder_length = ref_presents[0].shape[2], encoder_mask.shape[1]
    shapes = {contract.LOGITS: (batch, seq, vocab)}
    shapes.update({n: (batch, model.num_heads, total, model.head_dim) for n in contract.present_names(L, "decoder")})
    shapes.update({n: (batch, model.num_heads, encoder_length, model.head_dim)
                   for n in contract.present_names(L, "encoder")})
    if not check_shapes_and_finite(report, check, expected_names, [logits, *presents], shapes):
        return False
    report.comparisons.append(compare(check, contract.LOGITS, logits, ref_logits[:, -seq:],
                                      tolerances.for_output(contract.LOGITS), None,
                                      None if ref64_logits is None else ref64_logits[:, -seq:], tolerances))
    cross_where = encoder_mask[:, None, :, None].astype(bool)
    if len(ref_presents) != len(presents):
        report.problems.append(f"{check}: PEFT's cache has {len(ref_presents)} tensors, the graph returns "
                               f"{len(presents)} presents")
        return False
    for name, actual, ref, ref64 in zip(expected_names[1:], presents, ref_presents, ref64_presents):
        if actual.shape != ref.shape:
            report.problems.append(f"{check}: {name} has shape {actual.shape}, PEFT's cache {ref.shape}")
            continue
        where = cross_where if ".encoder." in name else None
        report.comparisons.append(compare(check, name, actual, ref, tolerances.for_output(name), where, ref64,
                                          tolerances))
    return True


def validate_seq2seq(model: OnnxSeq2Seq, peft_model, spec: architectures.ArchSpec,
                     tolerances: Tolerances | None = None, prompt_lengths: tuple[int, ...] = _DEFAULTS.prompt_lengths,
                     first_step_tokens: int = 3, decode_steps: int = _DEFAULTS.decode_steps,
                     greedy_tokens: int = _DEFAULTS.greedy_tokens, greedy_prompts: int = _DEFAULTS.greedy_prompts,
                     seed: int = _DEFAULTS.seed, decoder_graph=None, progress=None) -> ValidationReport:
    """Run every check; never raises on a mismatch (the caller decides), returns the report.

    With learned decoder positions (BART) the decoder can take `max_positions - P` tokens; the decode
    and greedy checks are shortened to fit.
    """
    tolerances = tolerances or Tolerances()
    P = peft_model.active_peft_config.num_virtual_tokens
    start = spec.decoder_start_token_id if spec.decoder_start_token_id is not None else 0
    if spec.positions == "learned" and spec.max_positions is not None:
        budget = spec.max_positions - P
        decode_steps = max(0, min(decode_steps, budget - first_step_tokens))
        greedy_tokens = max(1, min(greedy_tokens, budget - 1))
        prompt_lengths = tuple(min(n, spec.max_positions) for n in prompt_lengths)
    report = ValidationReport(settings={"prompt_lengths": list(prompt_lengths), "first_step_tokens": first_step_tokens,
                                        "decode_steps": decode_steps, "greedy_tokens": greedy_tokens, "seed": seed,
                                        "decoder_start_token_id": start, **tolerances.describe(),
                                        "float64_reference": tolerances.relative})
    tick = progress or (lambda *_: None)
    if decoder_graph is not None:
        check_folded_prefix(report, decoder_graph, peft_model, spec.num_layers, tolerances)

    guarded = Guarded(model)
    guarded.stage = "encoder"
    try:
        _run_checks(report, guarded, peft_model, spec, tolerances, prompt_lengths, first_step_tokens, decode_steps,
                    greedy_tokens, greedy_prompts, seed, start, tick)
    except GraphRunFailed as exc:
        record_failure(report, guarded, exc)
    report.pool_noise(tolerances)
    return report


def _run_checks(report, model, peft_model, spec, tolerances, prompt_lengths, first_step_tokens, decode_steps,
                greedy_tokens, greedy_prompts, seed, start, tick) -> None:
    """Checks 1-4; `model` is the guarded OnnxSeq2Seq, whose `stage` names the check running."""
    vocab = spec.vocab_size

    def reference64(ids, mask, decoder_ids) -> tuple:
        """PEFT's forward in float64 (logits, encoder output, presents) when the noise-relative rule
        judges; Nones under the absolute rule. The encoder batch is right-padded, which float64 takes:
        every query position has a real key, so no softmax row is all masked (see decoder._rows_alone)."""
        if not tolerances.relative:
            return None, None, None
        return seq2seq_forward(peft_model, ids, mask, decoder_ids, spec.num_layers, float64=True)

    # 1. encoder: right-padded batch; only real positions are compared.
    # Right-padded (the seq2seq convention); ids from 3 up, clear of bart/t5's special tokens.
    ids, mask, prompts = make_prompts(vocab, prompt_lengths, seed, side="right", lowest_token_id=3)
    batch = ids.shape[0]
    if model.encoder_output_names != contract.encoder_output_names():
        report.problems.append(f"encoder: output names {model.encoder_output_names} differ from the contract "
                               f"{contract.encoder_output_names()}")
        return
    hidden = model.encode(ids, mask)
    rng = np.random.default_rng(seed + 1)
    decoder_ids = np.concatenate([np.full((batch, 1), start, np.int64),
                                  rng.integers(3, vocab, size=(batch, first_step_tokens - 1), dtype=np.int64)], axis=1)
    ref_logits, ref_hidden, ref_presents = seq2seq_forward(peft_model, ids, mask, decoder_ids, spec.num_layers)
    ref64_logits, ref64_hidden, ref64_presents = reference64(ids, mask, decoder_ids)
    if check_shapes_and_finite(report, "encoder", [contract.LAST_HIDDEN_STATE], [hidden],
                     {contract.LAST_HIDDEN_STATE: ref_hidden.shape}):
        report.comparisons.append(compare("encoder", contract.LAST_HIDDEN_STATE, hidden, ref_hidden,
                                          tolerances.for_output(contract.LAST_HIDDEN_STATE),
                                          mask[:, :, None].astype(bool), ref64_hidden, tolerances))
    tick("encoder")

    # 2. prefill: the first decoder step computes the cross-attention K/V from the encoder output.
    model.stage = "prefill"
    logits, past = model.decode(decoder_ids, mask, hidden, model.empty_past(batch))
    ok = _check_decoder_step(report, "prefill", model, tolerances, logits, past, (ref_logits, ref_presents),
                             None if ref64_logits is None else (ref64_logits, ref64_presents), mask, vocab)
    tick("prefill")

    # 3. decode: feed the graph's own presents back, no new encoder states; fixed random next tokens.
    no_states = model.no_new_encoder_states(batch)
    for step in range(decode_steps if ok and not report.problems else 0):
        model.stage = f"decode[{step}]"
        next_ids = rng.integers(3, vocab, size=(batch, 1), dtype=np.int64)
        decoder_ids = np.concatenate([decoder_ids, next_ids], axis=1)
        logits, past = model.decode(next_ids, mask, no_states, past)
        ref_logits, _, ref_presents = seq2seq_forward(peft_model, ids, mask, decoder_ids, spec.num_layers)
        ref64_logits, _, ref64_presents = reference64(ids, mask, decoder_ids)
        if not _check_decoder_step(report, f"decode[{step}]", model, tolerances, logits, past,
                                   (ref_logits, ref_presents),
                                   None if ref64_logits is None else (ref64_logits, ref64_presents), mask, vocab):
            break
        tick(f"decode[{step}]")

    # 4. greedy, token for token, one prompt at a time (batch 1, no padding).
    for index, prompt in enumerate(prompts[:greedy_prompts]):
        model.stage = f"greedy[{index}]"
        expected = reference_greedy(peft_model, prompt, greedy_tokens, decoder_start_token_id=start)
        stepper = Seq2SeqStepper(model, prompt[None, :], np.ones((1, len(prompt)), np.int64), start)
        got = generate(stepper, GenerationConfig.greedy(greedy_tokens))[0]
        report.record_greedy(index, len(prompt), expected, got)
        tick(f"greedy[{index}]")
