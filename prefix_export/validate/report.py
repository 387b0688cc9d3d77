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

    def decoder_kwargs(self) -> dict:
        return dataclasses.asdict(self)

    def seq2seq_kwargs(self) -> dict:
        return dataclasses.asdict(self)


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
