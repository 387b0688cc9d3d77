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

import dataclasses
import fnmatch
import logging

import numpy as np
import torch

from . import contract
from .runtime import OnnxDecoder, greedy_generate, pad_batch, positions_from_mask

log = logging.getLogger(__name__)

DEFAULT_ATOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
# The folded prefix is a copy of PEFT's tensors: anything beyond rounding is a wrong prefix.
PREFIX_ATOL = 1e-6


@dataclasses.dataclass
class Tolerances:
    """Absolute tolerance per output: `per_output` maps a name or glob (`present.*`) to an atol."""

    atol: float = 1e-4
    per_output: dict[str, float] = dataclasses.field(default_factory=dict)

    def for_output(self, name: str) -> float:
        for pattern, value in self.per_output.items():
            if fnmatch.fnmatch(name, pattern) or name.startswith(pattern + "."):
                return value
        return self.atol


@dataclasses.dataclass
class Comparison:
    """One output of one check; truthy when it passed."""

    check: str
    output: str
    max_abs: float
    mean_abs: float
    median_abs: float
    max_rel: float
    atol: float
    passed: bool

    def __bool__(self) -> bool:
        return self.passed

    def line(self) -> str:
        return (f"{self.check:<10} {self.output:<22} max_abs {self.max_abs:.3e}  max_rel {self.max_rel:.3e}  "
                f"atol {self.atol:.0e}  {'ok' if self.passed else 'FAILED'}")


def compare(check: str, output: str, actual: np.ndarray, reference: np.ndarray, atol: float,
            where: np.ndarray | None = None) -> Comparison:
    """Element-wise |actual - reference| over the positions `where` selects (broadcastable bool)."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    diff = np.abs(actual - reference)
    rel = diff / (np.abs(reference) + 1e-6)
    if where is not None:
        select = np.broadcast_to(where, diff.shape)
        diff, rel = diff[select], rel[select]
    if diff.size == 0:
        return Comparison(check, output, 0.0, 0.0, 0.0, 0.0, atol, True)
    finite = bool(np.isfinite(diff).all())
    max_abs = float(np.nanmax(diff)) if finite else float("inf")
    return Comparison(check, output, max_abs, float(np.nanmean(diff)), float(np.nanmedian(diff)),
                      float(np.nanmax(rel)) if finite else float("inf"), atol, finite and max_abs <= atol)


@dataclasses.dataclass
class ValidationReport:
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)  # names, shapes, NaN, token mismatches
    greedy: list[dict] = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems and all(self.comparisons)

    def __bool__(self) -> bool:
        return self.passed

    def record_greedy(self, index: int, prompt_length: int, expected: np.ndarray, got: np.ndarray) -> None:
        """Token-for-token comparison of one greedy run (T,), and a problem at the first mismatch."""
        equal = got == expected if len(got) == len(expected) else np.zeros(len(expected), dtype=bool)
        matching = int(equal.sum())
        first_diff = None if equal.all() else int(np.argmin(equal))
        self.greedy.append({"prompt": index, "prompt_length": int(prompt_length), "new_tokens": len(expected),
                            "matching": matching, "first_mismatch": first_diff,
                            "reference": expected.tolist(), "onnx": got.tolist()})
        if first_diff is not None:
            got_token = got[first_diff] if first_diff < len(got) else "nothing"
            self.problems.append(f"greedy prompt {index}: tokens differ from step {first_diff} on "
                                 f"(onnx {got_token} vs PEFT {expected[first_diff]})")

    def failures(self) -> list[str]:
        return self.problems + [c.line() for c in self.comparisons if not c]

    def worst(self, output_glob: str) -> Comparison | None:
        matching = [c for c in self.comparisons if fnmatch.fnmatch(c.output, output_glob)]
        return max(matching, key=lambda c: c.max_abs / c.atol) if matching else None

    def summary_rows(self) -> list[tuple[str, str, float, float, float, bool]]:
        """Per check: logits, and the worst present tensor. (check, output, max_abs, max_rel, atol, ok)."""
        rows = []
        for check in dict.fromkeys(c.check.split("[")[0] for c in self.comparisons):
            group = [c for c in self.comparisons if c.check.split("[")[0] == check]
            for glob, label in (("last_hidden_state", "last_hidden_state"), (contract.LOGITS, "logits"),
                                ("present.*", "present.* (worst)"), ("prefix_*", "prefix_* (worst)")):
                members = [c for c in group if fnmatch.fnmatch(c.output, glob)]
                if members:
                    worst = max(members, key=lambda c: c.max_abs / c.atol)
                    rows.append((check, label, max(c.max_abs for c in members), max(c.max_rel for c in members),
                                 worst.atol, all(members)))
        return rows

    def table(self) -> str:
        lines = [f"{'check':<9} {'output':<19} {'max abs err':>12} {'max rel err':>12} {'atol':>8}  result"]
        for check, output, max_abs, max_rel, atol, ok in self.summary_rows():
            lines.append(f"{check:<9} {output:<19} {max_abs:>12.3e} {max_rel:>12.3e} {atol:>8.0e}  "
                         f"{'ok' if ok else 'FAILED'}")
        for item in self.greedy:
            lines.append(f"greedy    prompt {item['prompt']} ({item['prompt_length']} tok): "
                         f"{item['matching']}/{item['new_tokens']} tokens equal  "
                         f"{'ok' if item['matching'] == item['new_tokens'] else 'FAILED'}")
        lines.extend(f"PROBLEM: {p}" for p in self.problems)
        lines.append(f"validation {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "settings": self.settings, "problems": self.problems,
                "summary": [dict(zip(("check", "output", "max_abs", "max_rel", "atol", "passed"), row))
                            for row in self.summary_rows()],
                "greedy": self.greedy, "comparisons": [dataclasses.asdict(c) for c in self.comparisons]}


# ---- reference: PEFT's own forward ---------------------------------------------------------------


def _reference_forward(peft_model, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
    """PEFT forward over the whole sequence: logits (B, S, V) and the user part of the cache.

    PEFT prepends its prefix cache, extends the mask by P and shifts the positions we give by P.
    The cache it returns holds P + S positions per layer; the user's part is [P:].
    """
    from .architectures import cache_to_tensors, output_cache

    P = peft_model.active_peft_config.num_virtual_tokens
    with torch.no_grad():
        out = peft_model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                         position_ids=torch.from_numpy(position_ids), use_cache=True, return_dict=True)
    presents = []
    for key, value in cache_to_tensors(output_cache(out)):
        presents += [key[:, :, P:].float().numpy(), value[:, :, P:].float().numpy()]
    return out.logits.float().numpy(), presents


def reference_greedy(peft_model, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy tokens (T,) from PEFT's forward, recomputing the whole sequence each step (no cache)."""
    tokens = prompt.astype(np.int64)[None, :]
    new = []
    for _ in range(max_new_tokens):
        mask = np.ones_like(tokens)
        logits, _ = _reference_forward(peft_model, tokens, mask, positions_from_mask(mask))
        next_token = int(logits[0, -1].argmax())
        new.append(next_token)
        tokens = np.concatenate([tokens, [[next_token]]], axis=1)
    return np.array(new, dtype=np.int64)


# ---- the checks ----------------------------------------------------------------------------------


def make_prompts(vocab_size: int, lengths: tuple[int, ...], seed: int = 0, pad_token_id: int = 0,
                 side: str = "left", lowest_token_id: int = 0):
    """Random prompts padded into one batch: ids (B, S_max), mask (B, S_max), the raw prompts.

    Decoders are padded on the left (every row's last token at the end); encoders on the right.
    """
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(lowest_token_id, vocab_size, size=n, dtype=np.int64) for n in lengths]
    ids, mask = pad_batch(prompts, pad_token_id, side)
    return ids, mask, prompts


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


def check_shapes_and_finite(report: ValidationReport, check: str, names: list[str], arrays: list[np.ndarray],
                            expected: dict[str, tuple]) -> bool:
    """Each array's shape, then its finiteness; records problems, returns False if any."""
    ok = True
    for name, array in zip(names, arrays):
        if tuple(array.shape) != expected[name]:
            report.problems.append(f"{check}: {name} has shape {tuple(array.shape)}, expected {expected[name]}")
            ok = False
        elif not np.isfinite(array).all():
            report.problems.append(f"{check}: {name} holds {int((~np.isfinite(array)).sum())} NaN/Inf values")
            ok = False
    return ok


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
    from .architectures import cache_to_tensors
    from .graph import read_initializers

    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1, max_cache_len=peft_model.active_peft_config.num_virtual_tokens)
    layers = cache_to_tensors(cache)
    names = [contract.prefix_initializer_name(i, kind) for i in range(len(layers)) for kind in ("key", "value")]
    if prefix_kv_file is not None:
        from .decoding import load_prefix_file

        stacked = load_prefix_file(prefix_kv_file)  # (L, 2, H_kv, P, D)
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


def validate(decoder: OnnxDecoder, peft_model, vocab_size: int, tolerances: Tolerances | None = None,
             prompt_lengths: tuple[int, ...] = (9, 5, 1), decode_steps: int = 8, greedy_tokens: int = 32,
             greedy_prompts: int = 2, seed: int = 0, max_positions: int | None = None,
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
    guarded = _GuardedDecoder(decoder)
    try:
        _run_checks(report, guarded, peft_model, vocab_size, tolerances, prompt_lengths, decode_steps,
                    greedy_tokens, greedy_prompts, seed, tick)
    except _GraphRunFailed as exc:
        # A graph that ONNX Runtime cannot run on valid feeds is a failed validation, not a crash.
        report.problems.append(f"{guarded.stage}: ONNX Runtime failed running the graph: {exc}")
    return report


class _GraphRunFailed(Exception):
    pass


class _GuardedDecoder:
    """The decoder, with ONNX Runtime's own exceptions turned into _GraphRunFailed."""

    def __init__(self, decoder: OnnxDecoder):
        self._decoder = decoder
        self.stage = "prefill"

    def __getattr__(self, name):
        return getattr(self._decoder, name)

    def run(self, *args):
        try:
            return self._decoder.run(*args)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise _GraphRunFailed(f"{type(exc).__name__}: {str(exc)[:500]}") from exc


def _run_checks(report, decoder, peft_model, vocab_size, tolerances, prompt_lengths, decode_steps, greedy_tokens,
                greedy_prompts, seed, tick) -> None:
    """Checks 1-4 (names/shapes/finiteness are checked on every step before its values)."""
    names = contract.present_names(decoder.num_layers)
    # 2. prefill: left-padded batch, positions from the mask.
    ids, mask, prompts = make_prompts(vocab_size, prompt_lengths, seed)
    positions = positions_from_mask(mask)
    batch, seq = ids.shape
    logits, presents = decoder.run(ids, mask, positions, decoder.empty_past(batch))
    ref_logits, ref_presents = _reference_forward(peft_model, ids, mask, positions)
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
        ref_logits, ref_presents = _reference_forward(peft_model, all_ids, all_mask, positions_from_mask(all_mask))
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
