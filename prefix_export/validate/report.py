"""What validation produces: tolerances, one comparison per output and check, the report, the settings.

Two phases, as in Polygraphy: run the reference and the graph on the same feeds, then compare. A
`Comparison` is truthy when it passed and carries max/mean/median abs and max rel error; the report
collects every failure (problems: names, shapes, NaN, tokens; comparisons: values) before judging.
"""
from __future__ import annotations

import dataclasses
import fnmatch

import numpy as np

from .. import contract
from ..runtime.decoder import pad_batch

DEFAULT_ATOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
# The folded prefix is a copy of PEFT's tensors: anything beyond rounding is a wrong prefix.
PREFIX_ATOL = 1e-6


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    """How much validation runs: prompts (a padded batch), decode steps, greedy tokens and prompts."""

    prompt_lengths: tuple[int, ...] = (9, 5, 1)
    decode_steps: int = 8
    greedy_tokens: int = 32
    greedy_prompts: int = 2
    seed: int = 0

    @classmethod
    def for_model(cls, num_parameters: int, greedy_tokens: int | None = None) -> "ValidationSettings":
        """Defaults by size: every check runs in full up to ~1.5B parameters; larger models run fewer
        decode steps and greedy tokens (never zero), since each reference step reruns the whole model."""
        if num_parameters <= 1_500_000_000:
            settings = cls()
        elif num_parameters <= 4_000_000_000:
            settings = cls(decode_steps=4, greedy_tokens=16)
        else:
            settings = cls(decode_steps=2, greedy_tokens=8, greedy_prompts=1)
        if greedy_tokens is not None:
            settings = dataclasses.replace(settings, greedy_tokens=greedy_tokens)
        if settings.greedy_tokens < 1:
            from ..errors import InputError

            raise InputError(f"--greedy-tokens must be >= 1 (the greedy check never runs zero tokens), got "
                             f"{settings.greedy_tokens}.")
        return settings

    @classmethod
    def from_report(cls, recorded: dict, num_parameters: int) -> "ValidationSettings":
        """What an export's validation ran (its report's settings), for `prefix-export validate`."""
        defaults = cls.for_model(num_parameters)
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items() if k in fields}
        return dataclasses.replace(defaults, **values)

    def kwargs(self) -> dict:
        """As keyword arguments of either validator (validate.decoder, validate.seq2seq)."""
        return dataclasses.asdict(self)


# The default rule (see Tolerances): the export's error against a float64 run of the reference may be at
# most NOISE_FACTOR times the reference's own error in the model's dtype, plus NOISE_FLOOR. Measured
# (helper study, 2026-12-01, SmolLM2-135M and tiny models): ONNX Runtime fp32 is 0.5-1.7 x PyTorch
# fp32's own error against float64, so 4 leaves a margin of 2.3 over the worst output seen.
NOISE_FACTOR = 4.0
NOISE_FLOOR = 1e-6
# PyTorch's own error against float64 above this share of the output's magnitude is not rounding: the
# float64 run computed something else there (a row alone vs a left-padded batch under a sliding window:
# the window counts the pad slots; seen on mistral and gpt_neo, where it reached 0.63 on logits of
# about 1). A limit of 4x that would pass real bugs, so such an output is judged against the model-dtype
# reference with the fixed tolerance instead. float16's own error is about 1e-3 of the magnitude.
IMPLAUSIBLE_NOISE = 1e-2


@dataclasses.dataclass
class Tolerances:
    """How close the graph must be to PEFT's forward, per output.

    By default (`atol` None) the rule is relative to the reference's own noise: the reference runs
    twice, in the model's dtype and in float64, and an output passes when
        max |onnx - ref64| <= noise_factor * max |ref - ref64| + floor,
    i.e. when the export is within a small factor of how far PyTorch itself is from the exact result.
    A fixed absolute tolerance (`atol`, or `per_output` for names or globs like `present.*`) compares
    with the model-dtype reference instead, as `--atol` asks; `fallback_atol` is the limit reported
    where no float64 reference was computed.
    """

    atol: float | None = None
    per_output: dict[str, float] = dataclasses.field(default_factory=dict)
    noise_factor: float = NOISE_FACTOR
    floor: float = NOISE_FLOOR
    fallback_atol: float = 1e-4

    @property
    def relative(self) -> bool:
        """True when some output is judged by the noise-relative rule (a float64 reference is needed)."""
        return self.atol is None

    def absolute_for(self, name: str) -> float | None:
        """The fixed tolerance for `name`, or None when the noise-relative rule judges it."""
        for pattern, value in self.per_output.items():
            if fnmatch.fnmatch(name, pattern) or name.startswith(pattern + "."):
                return value
        return self.atol

    def for_output(self, name: str) -> float:
        """The absolute tolerance for `name` (the fallback where the relative rule applies)."""
        value = self.absolute_for(name)
        return self.fallback_atol if value is None else value

    @classmethod
    def from_settings(cls, recorded: dict) -> "Tolerances":
        """The tolerances an export's validation used (its report's settings)."""
        if recorded.get("rule", "absolute") == "noise-relative":
            return cls(per_output=dict(recorded.get("per_output_atol") or {}),
                       noise_factor=recorded.get("noise_factor", NOISE_FACTOR), floor=recorded.get("floor", NOISE_FLOOR),
                       fallback_atol=recorded.get("atol") or 1e-4)
        return cls(atol=recorded.get("atol", 1e-4), per_output=dict(recorded.get("per_output_atol") or {}))

    def describe(self) -> dict:
        return {"rule": "noise-relative" if self.relative else "absolute",
                "atol": self.fallback_atol if self.atol is None else self.atol, "per_output_atol": self.per_output,
                "noise_factor": self.noise_factor, "floor": self.floor}


@dataclasses.dataclass
class Comparison:
    """One output of one check; truthy when it passed.

    `max_abs` is the error that was judged against `atol` (the limit): against the float64 reference
    under the noise-relative rule, else against the model-dtype reference. `noise` is the reference's
    own error against float64 (None under the absolute rule); `max_abs_vs_reference` the error
    against the model-dtype reference, whichever rule judged.
    """

    check: str
    output: str
    max_abs: float
    mean_abs: float
    median_abs: float
    max_rel: float
    atol: float
    passed: bool
    noise: float | None = None
    max_abs_vs_reference: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        if self.noise is None:
            return (f"{self.check:<10} {self.output:<22} max_abs {self.max_abs:.3e}  max_rel {self.max_rel:.3e}  "
                    f"atol {self.atol:.0e}  {verdict}")
        return (f"{self.check:<10} {self.output:<22} max_abs {self.max_abs:.3e} vs fp64 (PyTorch's own "
                f"{self.noise:.3e})  limit {self.atol:.2e}  {verdict}")


def _differences(actual: np.ndarray, reference: np.ndarray, where: np.ndarray | None):
    diff = np.abs(np.asarray(actual, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    rel = diff / (np.abs(np.asarray(reference, dtype=np.float64)) + 1e-6)
    if where is not None:
        select = np.broadcast_to(where, diff.shape)
        diff, rel = diff[select], rel[select]
    return diff, rel


def compare(check: str, output: str, actual: np.ndarray, reference: np.ndarray, atol: float,
            where: np.ndarray | None = None, reference64: np.ndarray | None = None,
            tolerances: Tolerances | None = None, rows_alone: bool = False) -> Comparison:
    """Element-wise |actual - reference| over the positions `where` selects (broadcastable bool).

    With `reference64` (the same reference in float64) and `tolerances` whose rule for `output` is the
    noise-relative one, the judged error is |actual - reference64| and the limit
    noise_factor * max |reference - reference64| + floor; otherwise |actual - reference| <= atol.
    `rows_alone`: the graph ran each row of a padded batch unpadded, as the float64 reference does (one row
    at a time); where the padded batch itself differs from that (IMPLAUSIBLE_NOISE: a sliding window that
    counts the pad slots) the graph is judged against the float64 reference, with the fixed tolerance.
    """
    diff, rel = _differences(actual, reference, where)
    if diff.size == 0:
        return Comparison(check, output, 0.0, 0.0, 0.0, 0.0, atol, True)
    finite = bool(np.isfinite(diff).all())
    against_reference = float(np.nanmax(diff)) if finite else float("inf")
    noise = None
    if reference64 is not None and tolerances is not None and tolerances.absolute_for(output) is None:
        noise_diff, _ = _differences(reference, reference64, where)
        noise = float(noise_diff.max())
        selected = reference64 if where is None else np.where(np.broadcast_to(where, reference64.shape), reference64, 0)
        scale = float(np.nanmax(np.abs(selected)))
        if noise > IMPLAUSIBLE_NOISE * scale + tolerances.floor:
            noise = None  # not rounding (see IMPLAUSIBLE_NOISE): the fixed tolerance against the reference
            atol = tolerances.fallback_atol
            if rows_alone:
                diff, rel = _differences(actual, reference64, where)
                finite = bool(np.isfinite(diff).all())
        else:
            atol = tolerances.noise_factor * noise + tolerances.floor
            diff, rel = _differences(actual, reference64, where)
            finite = bool(np.isfinite(diff).all())
    max_abs = float(np.nanmax(diff)) if finite else float("inf")
    return Comparison(check, output, max_abs, float(np.nanmean(diff)), float(np.nanmedian(diff)),
                      float(np.nanmax(rel)) if finite else float("inf"), atol, finite and max_abs <= atol,
                      noise, against_reference)


@dataclasses.dataclass
class ValidationReport:
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)  # names, shapes, NaN, token mismatches
    greedy: list[dict] = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)
    # A reduced-precision graph is judged by agreement instead (compile/agreement.py): its figures
    agreement: dict | None = None

    @property
    def passed(self) -> bool:
        return not self.problems and all(self.comparisons)

    def __bool__(self) -> bool:
        return self.passed

    def record_greedy(self, index: int, prompt_length: int, expected: np.ndarray, got: np.ndarray,
                      reference_logits: np.ndarray | None = None, tie_limit: float = 0.0) -> None:
        """Token-for-token comparison of one greedy run (T,), and a problem at the first mismatch, unless
        PEFT's own logits (T, V) at that step put the two tokens within `tie_limit`: a tie at this
        precision, recorded with its gap (the runs part there; nothing after it is compared)."""
        equal = got == expected if len(got) == len(expected) else np.zeros(len(expected), dtype=bool)
        matching = int(equal.sum())
        first_diff = None if equal.all() else int(np.argmin(equal))
        entry = {"prompt": index, "prompt_length": int(prompt_length), "new_tokens": len(expected),
                 "matching": matching, "first_mismatch": first_diff, "reference": expected.tolist(),
                 "onnx": got.tolist()}
        self.greedy.append(entry)
        if first_diff is not None and reference_logits is not None and first_diff < len(got):
            step = reference_logits[first_diff]
            gap = float(step[expected[first_diff]] - step[got[first_diff]])
            if gap <= tie_limit:
                entry["tie"] = {"step": first_diff, "logit_gap": gap, "limit": tie_limit}
                return
        if first_diff is not None:
            got_token = got[first_diff] if first_diff < len(got) else "nothing"
            self.problems.append(f"greedy prompt {index}: tokens differ from step {first_diff} on "
                                 f"(onnx {got_token} vs PEFT {expected[first_diff]})")

    def pool_noise(self, tolerances: Tolerances) -> None:
        """Judge every noise-relative comparison of an output by the largest error PyTorch itself showed
        for that output over all steps (prefill and decode), not by that one step's.

        The float32 noise is the model's, not a step's: where PyTorch happened to land close to float64
        at one step, the limit there would be tighter than the computation's real scatter (seen: a tiny
        llama with large weights, decode[2] logits: PyTorch 4.3e-6 there, 1.6e-5 at prefill, ONNX
        Runtime 2.1e-5 — within PyTorch's own scatter, yet failed by the per-step rule). Call it once,
        after every check ran."""
        pooled: dict[str, float] = {}
        for c in self.comparisons:
            if c.noise is not None:
                pooled[c.output] = max(pooled.get(c.output, 0.0), c.noise)
        for c in self.comparisons:
            if c.noise is not None:
                c.noise = pooled[c.output]
                c.atol = tolerances.noise_factor * c.noise + tolerances.floor
                c.passed = bool(np.isfinite(c.max_abs)) and c.max_abs <= c.atol

    def failures(self) -> list[str]:
        return self.problems + [c.line() for c in self.comparisons if not c]

    def worst(self, output_glob: str) -> Comparison | None:
        matching = [c for c in self.comparisons if fnmatch.fnmatch(c.output, output_glob)]
        return max(matching, key=lambda c: c.max_abs / max(c.atol, 1e-30)) if matching else None

    def summary_rows(self) -> list[tuple]:
        """Per check: logits, and the worst present tensor (the one closest to its limit).
        (check, output, max_abs, max_rel, atol, ok, noise): max_abs and atol of the worst member;
        noise is PyTorch's own error against float64 there (None under an absolute tolerance)."""
        rows = []
        for check in dict.fromkeys(c.check.split("[")[0] for c in self.comparisons):
            group = [c for c in self.comparisons if c.check.split("[")[0] == check]
            for glob, label in (("last_hidden_state", "last_hidden_state"), (contract.LOGITS, "logits"),
                                ("present.*", "present.* (worst)"), ("prefix_*", "prefix_* (worst)")):
                members = [c for c in group if fnmatch.fnmatch(c.output, glob)]
                if members:
                    worst = max(members, key=lambda c: c.max_abs / max(c.atol, 1e-30))
                    rows.append((check, label, worst.max_abs, max(c.max_rel for c in members), worst.atol,
                                 all(members), worst.noise))
        return rows

    def table(self) -> str:
        lines = [f"{'check':<9} {'output':<19} {'max abs err':>12} {'PyTorch err':>12} {'limit':>9}  result",
                 "  (max abs err: against float64 where PyTorch err is given, the limit "
                 f"{self.settings.get('noise_factor', NOISE_FACTOR):g} x PyTorch err + "
                 f"{self.settings.get('floor', NOISE_FLOOR):g}; else against PyTorch, the limit a fixed atol."
                 "\n   PyTorch err: PyTorch fp32's own largest error against float64 for that output, over all steps)"]
        if self.settings.get("rows_alone"):
            lines.append("  (this graph runs each row of a padded batch alone: where PyTorch's padded batch differs "
                         "from that, a sliding window counting the pad slots, the error is against float64 row by "
                         "row, the limit a fixed atol)")
        if not self.comparisons and self.agreement:  # judged by agreement only: no tolerance table
            lines = []
        for check, output, max_abs, _, atol, ok, noise in self.summary_rows():
            shown = "-" if noise is None else f"{noise:.3e}"
            lines.append(f"{check:<9} {output:<19} {max_abs:>12.3e} {shown:>12} {atol:>9.2e}  "
                         f"{'ok' if ok else 'FAILED'}")
        for item in self.greedy:
            tie = item.get("tie")
            if tie:
                lines.append(f"greedy    prompt {item['prompt']} ({item['prompt_length']} tok): equal up to step "
                             f"{tie['step']}, a near-tie in PEFT's own logits there (gap {tie['logit_gap']:.2e} <= "
                             f"{tie['limit']:.2e})  ok")
                continue
            lines.append(f"greedy    prompt {item['prompt']} ({item['prompt_length']} tok): "
                         f"{item['matching']}/{item['new_tokens']} tokens equal  "
                         f"{'ok' if item['matching'] == item['new_tokens'] else 'FAILED'}")
        lines.extend(self._agreement_lines())
        lines.extend(f"PROBLEM: {p}" for p in self.problems)
        lines.append(f"validation {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)

    def _agreement_lines(self) -> list[str]:
        if not self.agreement:
            return []
        a, limits = self.agreement, self.agreement.get("thresholds", {})
        lines = [f"agreement over {a['prompts']} prompts ({a['positions']} positions), greedy {a['greedy_tokens']} "
                 f"tokens on {a['greedy_prompts']}; limits: top-1 >= {limits.get('top1')} (>= "
                 f"{limits.get('top1_decided', 0)} where >= 1 logit ahead), greedy equal >= {limits.get('greedy')}"]
        for label, row in a["against"].items():
            lines.append(f"  vs {label:<11} top-1 {row['top1_agreement']:.3f} (where it is >= 1 logit ahead: "
                         f"{row.get('top1_agreement_decided', float('nan')):.3f})   greedy equal {row['greedy_equal']}/"
                         f"{a['greedy_prompts']}")
        task = a.get("task")
        if task:
            lines.append(f"  task exact match {task['exact_match']:.3f} ({task['reference_label']}: "
                         f"{task['reference_exact_match']:.3f}) over {task['records']} records")
        return lines

    def to_dict(self) -> dict:
        return {"passed": self.passed, "settings": self.settings, "problems": self.problems,
                "agreement": self.agreement,
                "summary": [dict(zip(("check", "output", "max_abs", "max_rel", "atol", "passed", "pytorch_vs_fp64"),
                                     row)) for row in self.summary_rows()],
                "greedy": self.greedy, "comparisons": [dataclasses.asdict(c) for c in self.comparisons]}


def make_prompts(vocab_size: int, lengths: tuple[int, ...], seed: int = 0, pad_token_id: int = 0,
                 side: str = "left", lowest_token_id: int = 0):
    """Random prompts padded into one batch: ids (B, S_max), mask (B, S_max), the raw prompts.

    Decoders are padded on the left (every row's last token at the end); encoders on the right.
    """
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(lowest_token_id, vocab_size, size=n, dtype=np.int64) for n in lengths]
    ids, mask = pad_batch(prompts, pad_token_id, side)
    return ids, mask, prompts


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
