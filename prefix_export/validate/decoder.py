"""Validation of a decoder-only export (either layout) on ONNX Runtime against PEFT's own forward.

Two phases, as in Polygraphy, and in that order so the PyTorch model can be freed in between:
  1. `compute_reference`: everything PEFT computes for the checks (its prefix cache; the prefill,
     decode and greedy references), in the model's dtype and, for the noise-relative tolerance, in
     float64 (reference.in_float64: one module's weights in float64 at a time);
  2. `validate_graph`: the graph on the same feeds, compared with the stored references.
The reference shares no code with the export wrapper, so a bug in one cannot hide in the other.

Checks, in order (each collects its failures; nothing stops at the first):
  0. prefix: the prefix initializers folded into the graph equal PEFT's own prefix cache (a folded
     prefix's effect on logits can be far below any logit tolerance, so it is checked directly);
  1. names and shapes of every output, and no NaN/Inf;
  2. prefill: a left-padded batch of prompts of different lengths, explicit position ids;
  3. decode: N incremental steps feeding the graph's own presents back;
  4. greedy: new tokens token for token against a greedy loop on PEFT's forward.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .. import contract
from ..runtime.decoder import OnnxDecoder, positions_from_mask
from ..runtime.loop import greedy_generate
from .guard import Guarded, GraphRunFailed, record_failure
from .reference import decoder_forward, in_float64, reference_greedy, reference_prefix_layers
from .report import (PREFIX_ATOL, Tolerances, ValidationReport, ValidationSettings, check_shapes_and_finite, compare,
                     make_prompts)

log = logging.getLogger(__name__)

_DEFAULTS = ValidationSettings()


@dataclasses.dataclass
class DecoderReference:
    """Phase 1's result: the feeds, and what PEFT computes on them (numpy, float64 arrays)."""

    settings: dict  # the effective prompt lengths, decode steps, greedy tokens and prompts, seed
    vocab_size: int
    prefix_layers: list[tuple[np.ndarray, np.ndarray]]  # PEFT's prefix cache, per layer (1, H_kv, P, D)
    ids: np.ndarray  # (B, S) left-padded prompts
    mask: np.ndarray  # (B, S)
    prompts: list[np.ndarray]
    decode_ids: list[np.ndarray]  # the next token of every row, (B, 1) per decode step
    prefill: tuple  # (logits (B, S, V), presents [(B, H_kv, S, D)]) in the model's dtype
    decode: list[tuple]  # per step: (logits (B, 1, V), presents) in the model's dtype
    greedy: list[np.ndarray]  # PEFT's greedy tokens per prompt
    greedy_logits: list[np.ndarray]  # PEFT's logits at each greedy step (T, V), for near-ties
    prefill64: tuple | None = None  # the same in float64 (noise-relative rule only)
    decode64: list[tuple] | None = None
    dtype: str = "float32"  # the model's


def _effective_settings(prompt_lengths, decode_steps, greedy_tokens, greedy_prompts, seed, max_positions) -> dict:
    if max_positions is not None:
        # A learned position table of max_positions rows (after P): prompts longer than that would
        # index past it, in the graph and in PEFT alike.
        prompt_lengths = tuple(max(1, min(n, max_positions)) for n in prompt_lengths)
        longest = max(prompt_lengths)
        decode_steps = max(0, min(decode_steps, max_positions - longest))
        greedy_tokens = max(1, min(greedy_tokens, max_positions - longest))
    return {"prompt_lengths": list(prompt_lengths), "decode_steps": decode_steps, "greedy_tokens": greedy_tokens,
            "greedy_prompts": greedy_prompts, "seed": seed}


def compute_reference(peft_model, vocab_size: int, float64: bool = True,
                      prompt_lengths: tuple[int, ...] = _DEFAULTS.prompt_lengths,
                      decode_steps: int = _DEFAULTS.decode_steps, greedy_tokens: int = _DEFAULTS.greedy_tokens,
                      greedy_prompts: int = _DEFAULTS.greedy_prompts, seed: int = _DEFAULTS.seed,
                      max_positions: int | None = None, progress=None) -> DecoderReference:
    """Phase 1: PEFT's answers for every check; `max_positions` (learned tables minus P) shortens them."""
    settings = _effective_settings(prompt_lengths, decode_steps, greedy_tokens, greedy_prompts, seed, max_positions)
    tick = progress or (lambda *_: None)
    prefix_layers = reference_prefix_layers(peft_model)
    ids, mask, prompts = make_prompts(vocab_size, tuple(settings["prompt_lengths"]), seed)
    batch = ids.shape[0]
    # The decode steps' tokens are fixed random draws, so every reference can be computed up front.
    rng = np.random.default_rng(seed + 1)
    decode_ids = [rng.integers(0, vocab_size, size=(batch, 1), dtype=np.int64) for _ in range(settings["decode_steps"])]
    feeds = [(ids, mask)]
    for next_ids in decode_ids:
        all_ids, all_mask = feeds[-1]
        feeds.append((np.concatenate([all_ids, next_ids], axis=1),
                      np.concatenate([all_mask, np.ones((batch, 1), np.int64)], axis=1)))

    def run_all() -> list[tuple]:
        results = []
        for index, (all_ids, all_mask) in enumerate(feeds):
            logits, presents = decoder_forward(peft_model, all_ids, all_mask, positions_from_mask(all_mask))
            # a decode step's last position only, as a copy: a view would keep all (B, S, V) alive
            results.append((logits if index == 0 else logits[:, -1:].copy(), presents))
        return results

    in_dtype = run_all()
    tick("reference")
    in_f64 = None
    if float64:
        with in_float64(peft_model):
            in_f64 = [_rows_alone(peft_model, all_ids, all_mask, like, index > 0)
                      for index, ((all_ids, all_mask), like) in enumerate(zip(feeds, in_dtype))]
        tick("float64 reference")
    greedy_runs = [reference_greedy(peft_model, prompt, settings["greedy_tokens"], with_logits=True)
                   for prompt in prompts[:settings["greedy_prompts"]]]
    greedy, greedy_logits = [tokens for tokens, _ in greedy_runs], [logits for _, logits in greedy_runs]
    tick("greedy reference")
    dtype = str(next(peft_model.parameters()).dtype).replace("torch.", "")
    return DecoderReference(settings, vocab_size, prefix_layers, ids, mask, prompts, decode_ids, in_dtype[0],
                            in_dtype[1:], greedy, greedy_logits, in_f64[0] if in_f64 else None, in_f64[1:] if in_f64 else None,
                            dtype)


def _rows_alone(peft_model, ids: np.ndarray, mask: np.ndarray, like: tuple, last_only: bool) -> tuple:
    """PEFT's forward for each row of a left-padded batch alone (its real tokens, positions from 0),
    laid out like the batched reference `like` (logits, presents); padded positions hold zeros.

    In float64 a padded batch is not usable: masked scores reach finfo(float64).min and overflow to
    -inf, padding rows become NaN, and 0 x NaN spreads into the real rows (gemma2's soft-capped
    attention, seen). A row alone computes what the batch computes at its real positions.
    """
    like_logits, like_presents = like
    logits = np.zeros(like_logits.shape, np.float64)
    presents = [np.zeros(p.shape, np.float64) for p in like_presents]
    total = ids.shape[1]
    for row in range(ids.shape[0]):
        real = ids[row, mask[row] == 1][None]  # left padding: the real tokens are the row's last ones
        row_mask = np.ones_like(real)
        row_logits, row_presents = decoder_forward(peft_model, real, row_mask, positions_from_mask(row_mask))
        n = real.shape[1]
        if last_only:
            logits[row] = row_logits[0, -1:]
        else:
            logits[row, total - n:] = row_logits[0]
        for target, present in zip(presents, row_presents):
            # (H_kv, n or its window, D) at the end of the row's (H_kv, T, D) cache; then the batch's
            # last `kept` positions (fewer than T for a sliding-window layer)
            full = np.zeros((present.shape[1], total, present.shape[3]), np.float64)
            full[:, total - present.shape[2]:] = present[0]
            target[row] = full[:, total - target.shape[2]:]
    return logits, presents


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


def _compare_step(report, check, tolerances, logits, presents, reference, reference64, mask_new, mask_total, names,
                  rows_alone=False):
    """Logits over the rows' real positions, then every present over the positions the reference holds.
    `rows_alone`: the decoder computes each row unpadded (shared-KV-buffer graphs; see report.compare)."""
    ref_logits, ref_presents = reference
    ref64_logits, ref64_presents = reference64 if reference64 is not None else (None, [None] * len(ref_presents))
    report.comparisons.append(compare(check, contract.LOGITS, logits, ref_logits,
                                      tolerances.for_output(contract.LOGITS), mask_new[:, :, None].astype(bool),
                                      ref64_logits, tolerances, rows_alone))
    where = mask_total[:, None, :, None].astype(bool)
    for name, actual, ref, ref64 in zip(names, presents, ref_presents, ref64_presents):
        kept = ref.shape[2]
        if kept < actual.shape[2]:
            # A sliding-window layer's cache in transformers keeps only its last window of positions
            # (after dropping the prefix, the trailing `kept` user positions); the graph keeps the
            # whole cache and masks instead, so compare the positions both hold.
            actual, layer_where = actual[:, :, actual.shape[2] - kept:], where[:, :, where.shape[2] - kept:]
        else:
            layer_where = where
        report.comparisons.append(compare(check, name, actual, ref, tolerances.for_output(name), layer_where, ref64,
                                          tolerances, rows_alone))


def check_folded_prefix(report: ValidationReport, graph_file, reference: DecoderReference, tolerances: Tolerances,
                        prefix_kv_file=None) -> None:
    """Check 0: every `prefix_{key,value}_{i}` initializer equals PEFT's prefix cache for layer i.

    For the cache layout the prefix is not in the graph: `prefix_kv_file` (L, 2, H_kv, P, D), the
    runtime's first past, is checked instead, under the same names; so is an array of that shape
    (an adapter's prefix, which replaces the graph's at run time).
    """
    from ..folder import read_initializers, read_prefix_file

    layers = reference.prefix_layers
    names = [contract.prefix_initializer_name(i, kind) for i in range(len(layers)) for kind in ("key", "value")]
    if prefix_kv_file is not None:
        # (L, 2, H_kv, P, D)
        stacked = prefix_kv_file if isinstance(prefix_kv_file, np.ndarray) else read_prefix_file(prefix_kv_file)
        found = {contract.prefix_initializer_name(i, kind): stacked[i, j][None]
                 for i in range(stacked.shape[0]) for j, kind in enumerate(("key", "value"))}
    else:
        found = read_initializers(graph_file, names)
    missing = [n for n in names if n not in found]
    if missing:
        report.problems.append(f"prefix: the graph has no initializers {missing[:4]}{'...' if len(missing) > 4 else ''}"
                               "; it is not a folded export, or a pass renamed them")
        return
    atol = tolerances.per_output.get("prefix", PREFIX_ATOL)
    for i, (key, value) in enumerate(layers):
        for kind, expected in (("key", key), ("value", value)):
            name = contract.prefix_initializer_name(i, kind)
            actual = found[name]
            if tuple(actual.shape) != tuple(expected.shape):
                report.problems.append(f"prefix: {name} has shape {tuple(actual.shape)}, PEFT's prefix for layer {i} "
                                       f"is {tuple(expected.shape)} (1, H_kv, P, D)")
                continue
            report.comparisons.append(compare("prefix", name, actual, expected, atol))


def validate_graph(decoder: OnnxDecoder, reference: DecoderReference, tolerances: Tolerances | None = None,
                   graph_file=None, prefix_kv_file=None, progress=None) -> ValidationReport:
    """Phase 2: run every check on `decoder` against `reference`; never raises on a mismatch.

    The prefix check reads `graph_file`'s initializers, or `prefix_kv_file` (a prefix_kv.safetensors,
    or an (L, 2, H_kv, P, D) array) when given."""
    tolerances = tolerances or Tolerances()
    report = ValidationReport(settings={**reference.settings, **tolerances.describe(),
                                        "float64_reference": reference.prefill64 is not None})
    # 0. the prefix itself: the graph's initializers (folded), prefix_kv.safetensors (cache layout) or
    # the adapter's tensors.
    if graph_file is not None or prefix_kv_file is not None:
        check_folded_prefix(report, graph_file, reference, tolerances, prefix_kv_file)
    guarded = Guarded(decoder)
    try:
        _run_checks(report, guarded, reference, tolerances, progress or (lambda *_: None))
    except GraphRunFailed as exc:
        record_failure(report, guarded, exc)
    report.pool_noise(tolerances)
    return report


def validate(decoder: OnnxDecoder, peft_model, vocab_size: int, tolerances: Tolerances | None = None,
             prompt_lengths: tuple[int, ...] = _DEFAULTS.prompt_lengths, decode_steps: int = _DEFAULTS.decode_steps,
             greedy_tokens: int = _DEFAULTS.greedy_tokens, greedy_prompts: int = _DEFAULTS.greedy_prompts,
             seed: int = _DEFAULTS.seed, max_positions: int | None = None,
             graph_file=None, progress=None, prefix_kv_file=None) -> ValidationReport:
    """Both phases: PEFT's references, then the graph's checks; returns the report.

    `max_positions` is how many user tokens the model can take (learned position tables minus P);
    the decode and greedy checks are shortened to fit it.
    """
    tolerances = tolerances or Tolerances()
    reference = compute_reference(peft_model, vocab_size, tolerances.relative, prompt_lengths, decode_steps,
                                  greedy_tokens, greedy_prompts, seed, max_positions, progress)
    return validate_graph(decoder, reference, tolerances, graph_file, prefix_kv_file, progress)


def _run_checks(report, decoder, reference: DecoderReference, tolerances, tick) -> None:
    """Checks 1-4 (names/shapes/finiteness are checked on every step before its values)."""
    names = contract.present_names(decoder.num_layers)
    vocab_size = reference.vocab_size
    rows_alone = bool(getattr(decoder, "runs_rows_alone", False))
    if rows_alone:
        report.settings["rows_alone"] = True
    # 2. prefill: left-padded batch, positions from the mask.
    ids, mask = reference.ids, reference.mask
    positions = positions_from_mask(mask)
    batch, seq = ids.shape
    logits, presents = decoder.run(ids, mask, positions, decoder.empty_past(batch))
    structure_ok = _check_outputs(report, "prefill", decoder, logits, presents, batch, seq, seq, vocab_size)
    if structure_ok:
        _compare_step(report, "prefill", tolerances, logits, presents, reference.prefill, reference.prefill64, mask,
                      mask, names, rows_alone)
    tick("prefill")

    # 3. decode: feed the graph's own presents back; the reference's fixed random next tokens.
    all_mask, past = mask, presents
    for step, next_ids in enumerate(reference.decode_ids if not report.problems else []):
        all_mask = np.concatenate([all_mask, np.ones((batch, 1), np.int64)], axis=1)
        check = f"decode[{step}]"
        decoder.stage = check
        logits, past = decoder.run(next_ids, all_mask, positions_from_mask(all_mask)[:, -1:], past)
        if not _check_outputs(report, check, decoder, logits, past, batch, 1, all_mask.shape[1], vocab_size):
            break
        _compare_step(report, check, tolerances, logits, past, reference.decode[step],
                      reference.decode64[step] if reference.decode64 else None, np.ones((batch, 1), np.int64),
                      all_mask, names, rows_alone)
        tick(check)

    # 4. greedy, token for token, one prompt at a time (batch 1, no padding).
    # (skipped when the outputs' names or shapes are already wrong: their values mean nothing)
    greedy_tokens = reference.settings["greedy_tokens"]
    # Two tokens whose logits PEFT itself puts closer than the logits' own limit are a tie at this
    # precision: greedy may take either, and the sequences part there without either being wrong.
    logit_limits = [c.atol for c in report.comparisons if c.output == contract.LOGITS]
    tie_limit = max(logit_limits) if logit_limits else 0.0
    runs = zip(reference.prompts, reference.greedy, reference.greedy_logits) if structure_ok else []
    for index, (prompt, expected, step_logits) in enumerate(runs):
        decoder.stage = f"greedy[{index}]"
        got = greedy_generate(decoder, prompt[None, :], np.ones((1, len(prompt)), np.int64), greedy_tokens)[0]
        report.record_greedy(index, len(prompt), expected, got, step_logits, tie_limit)
        tick(f"greedy[{index}]")
