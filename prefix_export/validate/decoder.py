"""Validation: the exported graph on ONNX Runtime against PEFT's own `PeftModel` forward.

Two phases, as in Polygraphy: run the reference and the graph on the same feeds, then compare.
The reference is PEFT's forward over the whole sequence at every step (no cache), which shares no
code with the export wrapper, so a bug in one cannot hide in the other. Note: with transformers 5.24
and peft 0.21.2, `PeftModel.generate()` was seen to ignore the prefix, so the greedy reference is a
loop on `forward`, never `generate()`.

Checks, in order (each collects its failures; nothing stops at the first):
  0. prefix: the prefix initializers folded into the graph equal PEFT's own prefix cache (a folded
     prefix's effect on logits can be far below any logit tolerance, so it is checked directly);
  1. names and shapes of every output, and no NaN/Inf;
  2. prefill: a left-padded batch of prompts of different lengths, explicit position ids;
  3. decode: N incremental steps feeding the graph's own presents back;
  4. greedy: new tokens token for token against a greedy loop on PEFT's forward.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .. import contract
from ..runtime.decoder import OnnxDecoder, positions_from_mask
from ..runtime.loop import greedy_generate
from .guard import Guarded, GraphRunFailed, record_failure
from .reference import decoder_forward, reference_greedy
from .report import (PREFIX_ATOL, Tolerances, ValidationReport, ValidationSettings, check_shapes_and_finite, compare,
                     make_prompts)

log = logging.getLogger(__name__)

# ---- the checks ----------------------------------------------------------------------------------


def _check_outputs(report: ValidationReport, check: str, decoder: OnnxDecoder, logits, presents,
                   batch: int, seq: int, total: int, vocab: int) -> bool:
    """Names, then shapes, then finiteness; returns False when values cannot be compared."""
    expected_names = contract.output_names(decoder.num_layers)
    if decoder.output_names != expected_names:
        report.problems.append(f"{check}: output names {decoder.output_names} differ from the contract "
                               f"{expected_names}")
        return False
    want = {contract.LOGITS: (batch, seq, vocab)}
    want.update({name: (batch, decoder.num_kv_heads, total, decoder.head_dim)
                 for name in contract.present_names(decoder.num_layers)})
    return check_shapes_and_finite(report, check, expected_names, [logits, *presents], want)


def _compare_step(report, check, tolerances, logits, presents, ref_logits, ref_presents, mask_new, mask_total,
                  names):
    report.comparisons.append(compare(check, contract.LOGITS, logits, ref_logits,
                                      tolerances.for_output(contract.LOGITS), mask_new[:, :, None].astype(bool)))
    where = mask_total[:, None, :, None].astype(bool)
    for name, actual, ref in zip(names, presents, ref_presents):
        kept = ref.shape[2]
        if kept < actual.shape[2]:
            # A sliding-window layer's cache in transformers keeps only its last window of positions
            # (after dropping the prefix, the trailing `kept` user positions); the graph keeps the
            # whole cache and masks instead, so compare the positions both hold.
            actual, layer_where = actual[:, :, actual.shape[2] - kept:], where[:, :, where.shape[2] - kept:]
        else:
            layer_where = where
        report.comparisons.append(compare(check, name, actual, ref, tolerances.for_output(name), layer_where))


def check_folded_prefix(report: ValidationReport, graph_file, peft_model, tolerances: Tolerances,
                        prefix_kv_file=None) -> None:
    """Check 0: every `prefix_{key,value}_{i}` initializer equals PEFT's prefix cache for layer i.

    For the cache layout the prefix is not in the graph: `prefix_kv_file` (L, 2, H_kv, P, D), the
    runtime's first past, is checked instead, under the same names.
    """
    from ..folder import read_initializers, read_prefix_file
    from ..source.architectures import cache_to_tensors

    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1, max_cache_len=peft_model.active_peft_config.num_virtual_tokens)
    layers = cache_to_tensors(cache)
    names = [contract.prefix_initializer_name(i, kind) for i in range(len(layers)) for kind in ("key", "value")]
    if prefix_kv_file is not None:
        stacked = read_prefix_file(prefix_kv_file)  # (L, 2, H_kv, P, D)
        found = {contract.prefix_initializer_name(i, kind): stacked[i, j][None]
                 for i in range(stacked.shape[0]) for j, kind in enumerate(("key", "value"))}
    else:
        found = read_initializers(graph_file, names)
    missing = [n for n in names if n not in found]
    if missing:
        report.problems.append(f"prefix: the graph has no initializers {missing[:4]}{'...' if len(missing) > 4 else ''}"
                               "; it is not a folded export, or a pass renamed them")
        return
    for i, (key, value) in enumerate(layers):
        for kind, reference in (("key", key), ("value", value)):
            name = contract.prefix_initializer_name(i, kind)
            actual = found[name]
            if tuple(actual.shape) != tuple(reference.shape):
                report.problems.append(f"prefix: {name} has shape {tuple(actual.shape)}, PEFT's prefix for layer {i} "
                                       f"is {tuple(reference.shape)} (1, H_kv, P, D)")
                continue
            atol = tolerances.per_output.get("prefix", PREFIX_ATOL)
            report.comparisons.append(compare("prefix", name, actual, reference.float().numpy(), atol))


_DEFAULTS = ValidationSettings()


def validate(decoder: OnnxDecoder, peft_model, vocab_size: int, tolerances: Tolerances | None = None,
             prompt_lengths: tuple[int, ...] = _DEFAULTS.prompt_lengths, decode_steps: int = _DEFAULTS.decode_steps,
             greedy_tokens: int = _DEFAULTS.greedy_tokens, greedy_prompts: int = _DEFAULTS.greedy_prompts,
             seed: int = _DEFAULTS.seed, max_positions: int | None = None,
             graph_file=None, progress=None, prefix_kv_file=None) -> ValidationReport:
    """Run every check; never raises on a mismatch (the caller decides), returns the report.

    `max_positions` is how many user tokens the model can take (learned position tables minus P);
    the decode and greedy checks are shortened to fit it.
    """
    tolerances = tolerances or Tolerances()
    if max_positions is not None:
        # A learned position table of max_positions rows (after P): prompts longer than that would
        # index past it, in the graph and in PEFT alike.
        prompt_lengths = tuple(max(1, min(n, max_positions)) for n in prompt_lengths)
        longest = max(prompt_lengths)
        decode_steps = max(0, min(decode_steps, max_positions - longest))
        greedy_tokens = max(1, min(greedy_tokens, max_positions - longest))
    report = ValidationReport(settings={"prompt_lengths": list(prompt_lengths), "decode_steps": decode_steps,
                                        "greedy_tokens": greedy_tokens, "seed": seed, "atol": tolerances.atol,
                                        "per_output_atol": tolerances.per_output})
    tick = progress or (lambda *_: None)

    # 0. the prefix itself: the graph's initializers (folded) or prefix_kv.safetensors (cache layout).
    if graph_file is not None or prefix_kv_file is not None:
        check_folded_prefix(report, graph_file, peft_model, tolerances, prefix_kv_file)
    guarded = Guarded(decoder)
    try:
        _run_checks(report, guarded, peft_model, vocab_size, tolerances, prompt_lengths, decode_steps,
                    greedy_tokens, greedy_prompts, seed, tick)
    except GraphRunFailed as exc:
        record_failure(report, guarded, exc)
    return report


def _run_checks(report, decoder, peft_model, vocab_size, tolerances, prompt_lengths, decode_steps, greedy_tokens,
                greedy_prompts, seed, tick) -> None:
    """Checks 1-4 (names/shapes/finiteness are checked on every step before its values)."""
    names = contract.present_names(decoder.num_layers)
    # 2. prefill: left-padded batch, positions from the mask.
    ids, mask, prompts = make_prompts(vocab_size, prompt_lengths, seed)
    positions = positions_from_mask(mask)
    batch, seq = ids.shape
    logits, presents = decoder.run(ids, mask, positions, decoder.empty_past(batch))
    ref_logits, ref_presents = decoder_forward(peft_model, ids, mask, positions)
    structure_ok = _check_outputs(report, "prefill", decoder, logits, presents, batch, seq, seq, vocab_size)
    if structure_ok:
        _compare_step(report, "prefill", tolerances, logits, presents, ref_logits, ref_presents, mask, mask, names)
    tick("prefill")

    # 3. decode: feed the graph's own presents back; fixed random next tokens.
    rng = np.random.default_rng(seed + 1)
    all_ids, all_mask, past = ids, mask, presents
    for step in range(decode_steps if not report.problems else 0):
        next_ids = rng.integers(0, vocab_size, size=(batch, 1), dtype=np.int64)
        all_ids = np.concatenate([all_ids, next_ids], axis=1)
        all_mask = np.concatenate([all_mask, np.ones((batch, 1), np.int64)], axis=1)
        step_positions = positions_from_mask(all_mask)[:, -1:]
        check = f"decode[{step}]"
        decoder.stage = check
        logits, past = decoder.run(next_ids, all_mask, step_positions, past)
        total = all_ids.shape[1]
        if not _check_outputs(report, check, decoder, logits, past, batch, 1, total, vocab_size):
            break
        ref_logits, ref_presents = decoder_forward(peft_model, all_ids, all_mask, positions_from_mask(all_mask))
        _compare_step(report, check, tolerances, logits, past, ref_logits[:, -1:], ref_presents,
                      np.ones((batch, 1), np.int64), all_mask, names)
        tick(check)

    # 4. greedy, token for token, one prompt at a time (batch 1, no padding).
    # (skipped when the outputs' names or shapes are already wrong: their values mean nothing)
    for index, prompt in enumerate(prompts[:greedy_prompts] if structure_ok else []):
        decoder.stage = f"greedy[{index}]"
        expected = reference_greedy(peft_model, prompt, greedy_tokens)
        got = greedy_generate(decoder, prompt[None, :], np.ones((1, len(prompt)), np.int64), greedy_tokens)[0]
        report.record_greedy(index, len(prompt), expected, got)
        tick(f"greedy[{index}]")
