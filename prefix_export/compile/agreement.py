"""Validation of a reduced-precision graph by agreement: how often it picks the token its reference
picks. A quantized graph cannot meet the fp32 tolerances, so it is judged on what users see.

    top-1     teacher-forced over every position of every prompt in a fixed set: the share of
              positions whose argmax equals the reference's
    greedy    greedy continuations of the first prompts, compared token for token: the share of
              prompts whose continuation is equal, and where each first diverged (with the
              reference's margin there: a divergence at a near-tie is rounding, not a bug)
    task      (with a prompt/target JSONL) greedy answers' exact match, candidate against reference

The references are PEFT's own forward (always; `validate` has only this one) and, at compile time,
the fp32 graph the candidate was made from. The prompt set is natural text when the folder has a
tokenizer (chat-formatted questions and prose; random token ids hide quantization error on real
weights), seeded random ids otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The least agreement a precision must reach (exit 1 below): top-1 share, greedy-equal share,
    and how much exact match on a task file may drop against the reference."""

    top1: float
    greedy: float
    exact_match_drop: float = 0.05
    top1_decided: float = 0.0  # top-1 where the reference is >= DECIDED_MARGIN ahead (not a near-tie)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DECIDED_MARGIN = 1.0  # logits: a position whose reference top-2 gap is below this is a near-tie

# Chosen from measurements (README "Compile"; SmolLM2-135M with a trained prefix, 16 natural-text
# prompts): near-ties make raw top-1 a weak signal on real weights (fp16 0.954, yet 1.000 where the
# reference is >= 1 logit ahead, and 8/8 greedy continuations equal), so each precision has a loose
# raw limit and a tight one on the decided positions, which separated good settings (int8 asymmetric:
# 0.995-1.000) from bad ones (int8 per-tensor dynamic 0.54, int4 round-to-nearest 0.31).
DEFAULT_THRESHOLDS = {"fp16": Thresholds(top1=0.9, greedy=0.5, top1_decided=0.99),
                      "int8": Thresholds(top1=0.85, greedy=0.25, top1_decided=0.98),
                      "int4": Thresholds(top1=0.6, greedy=0.0, top1_decided=0.85)}

_QUESTIONS = ("What is the capital of France?", "Explain photosynthesis in one sentence.",
              "Give me three tips for staying focused while studying.", "How do I reverse a list in Python?",
              "Why is the sky blue?", "Write a haiku about autumn.", "What does a compiler do?",
              "Summarize the plot of Romeo and Juliet.")
_PROSE = ("The history of the city begins in the twelfth century, when a small market grew up at the crossing of two "
          "trade routes. Over the next hundred years",
          "To make a good cup of tea, start with freshly drawn water and warm the pot first. Then",
          "In machine learning, overfitting happens when a model learns the noise in its training data rather than",
          "The committee met on Tuesday to discuss the budget for the coming year. After a long debate, the members",
          "Rivers shape the land around them by carrying sediment from the mountains to the sea, and over millions of",
          "She opened the letter slowly, unsure whether the news inside would change everything. The first line read",
          "Solar panels convert sunlight into electricity using semiconductor cells, which",
          "A balanced diet includes a variety of foods from each of the main groups, such as")


def prompt_set(tokenizer, vocab_size: int, count: int = 16, seed: int = 0) -> list[np.ndarray]:
    """`count` prompts (token id arrays): natural text through the tokenizer (questions in its chat
    template when it has one, then prose), or seeded random ids of lengths 8..64 without one."""
    if tokenizer is None:
        rng = np.random.default_rng(seed)
        lengths = [8, 16, 32, 64] * (count // 4 + 1)
        return [rng.integers(3, vocab_size, n, dtype=np.int64) for n in lengths[:count]]
    texts = []
    for question in _QUESTIONS:
        if getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                       add_generation_prompt=True))
        else:
            texts.append(f"Question: {question}\nAnswer:")
    texts += list(_PROSE)
    prompts = []
    for text in (texts * (count // len(texts) + 1))[:count]:
        ids = np.array(tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"],
                       dtype=np.int64)
        prompts.append(ids[ids < vocab_size] if ids.size else np.array([1], np.int64))
    return prompts


class GraphScorer:
    """An ONNX decoder (OnnxDecoder) as a reference or a candidate."""

    def __init__(self, decoder, label: str):
        self.decoder, self.label = decoder, label

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """(S, V) float32 logits of the one prompt `ids` (S,)."""
        batch = ids[None, :]
        mask = np.ones_like(batch)
        logits, _ = self.decoder.run(batch, mask, np.arange(ids.size, dtype=np.int64)[None], self.decoder.empty_past(1))
        return logits[0].astype(np.float32)

    def greedy(self, ids: np.ndarray, steps: int, eos: int | None) -> np.ndarray:
        from ..runtime.loop import greedy_generate

        return greedy_generate(self.decoder, ids[None, :], np.ones((1, ids.size), np.int64), steps, eos)[0]


class PeftScorer:
    """PEFT's own forward (float32): teacher-forced logits over the whole prompt, and greedy with PEFT's
    KV cache (validate.reference.PeftCachedStepper; never `generate()`)."""

    label = "PEFT"

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def logits(self, ids: np.ndarray) -> np.ndarray:
        from ..runtime.decoder import positions_from_mask
        from ..validate.reference import decoder_forward

        batch = ids[None, :]
        mask = np.ones_like(batch)
        logits, _ = decoder_forward(self.peft_model, batch, mask, positions_from_mask(mask))
        return logits[0].astype(np.float32)

    def greedy(self, ids: np.ndarray, steps: int, eos: int | None) -> np.ndarray:
        from ..runtime.loop import GenerationConfig, generate
        from ..validate.reference import PeftCachedStepper

        return generate(PeftCachedStepper(self.peft_model, ids[None, :]), GenerationConfig.greedy(steps, eos))[0]


def _greedy_row(reference: np.ndarray, got: np.ndarray, reference_logits: np.ndarray | None) -> dict:
    n = min(len(reference), len(got))
    diverged = next((i for i in range(n) if reference[i] != got[i]), None)
    row = {"equal": bool(len(reference) == len(got) and diverged is None), "new_tokens": int(len(reference)),
           "first_divergence": diverged}
    if diverged is not None and reference_logits is not None:
        top = np.sort(reference_logits)[-2:]
        row["reference_margin"] = float(top[1] - top[0])  # at the prompt's last position only (cheap)
    return row


def measure(candidate, references: list, prompts: list[np.ndarray], greedy_prompts: int = 8,
            greedy_tokens: int = 32, eos: int | None = None) -> dict:
    """Top-1 and greedy agreement of `candidate` with each reference scorer, over `prompts`."""
    result = {"prompts": len(prompts), "positions": int(sum(p.size for p in prompts)),
              "greedy_prompts": min(greedy_prompts, len(prompts)), "greedy_tokens": greedy_tokens, "against": {}}
    cand_logits = [candidate.logits(p) for p in prompts]
    cand_greedy = [candidate.greedy(p, greedy_tokens, eos) for p in prompts[:greedy_prompts]]
    for reference in references:
        same = decided = decided_same = 0
        for prompt, got in zip(prompts, cand_logits):
            expected = reference.logits(prompt)
            equal = expected.argmax(-1) == got.argmax(-1)
            same += int(equal.sum())
            top = np.sort(expected, axis=-1)[:, -2:]
            clear = (top[:, 1] - top[:, 0]) >= DECIDED_MARGIN
            decided += int(clear.sum())
            decided_same += int(equal[clear].sum())
        rows = [_greedy_row(reference.greedy(p, greedy_tokens, eos), got, None)
                for p, got in zip(prompts[:greedy_prompts], cand_greedy)]
        result["against"][reference.label] = {
            "top1_agreement": same / max(result["positions"], 1),
            # where the reference's top two logits are >= DECIDED_MARGIN apart (near-ties flip under any
            # perturbation: on SmolLM2 even fp16 flips 2.6% of natural-text positions)
            "top1_agreement_decided": decided_same / max(decided, 1), "decided_positions": decided,
            "greedy_equal": sum(r["equal"] for r in rows), "greedy_rate": sum(r["equal"] for r in rows) / max(len(rows), 1),
            "greedy": rows}
        log.info("agreement with %s: top-1 %.3f, greedy equal %d/%d", reference.label,
                 result["against"][reference.label]["top1_agreement"], result["against"][reference.label]["greedy_equal"],
                 len(rows))
    return result


def read_task_file(path: str | Path, limit: int = 40) -> list[dict]:
    """prompt/target records (JSON lines with "prompt" and "target"), the first `limit`."""
    path = Path(path)
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"--task-file {path}: {exc}") from exc
    if not records or not all("prompt" in r and "target" in r for r in records):
        raise InputError(f"--task-file {path}: expected JSON lines with \"prompt\" and \"target\".")
    return records[:limit]


def task_exact_match(candidate, reference, tokenizer, records: list[dict], max_new_tokens: int = 32) -> dict:
    """Greedy answers to each record's prompt, decoded, equal to its target: candidate vs reference."""
    if tokenizer is None:
        raise InputError("--task-file needs a tokenizer in the export folder.")
    eos = tokenizer.eos_token_id
    hits = {"reference": 0, "candidate": 0}
    examples = []
    for record in records:
        ids = np.array(tokenizer(record["prompt"])["input_ids"], dtype=np.int64)
        answers = {}
        for name, scorer in (("reference", reference), ("candidate", candidate)):
            tokens = scorer.greedy(ids, max_new_tokens, eos)
            answers[name] = tokenizer.decode(tokens, skip_special_tokens=True)
            hits[name] += answers[name] == record["target"]
        if len(examples) < 3:
            examples.append({"prompt": record["prompt"], **answers, "target": record["target"]})
    n = len(records)
    return {"records": n, "reference_label": reference.label, "reference_exact_match": hits["reference"] / n,
            "exact_match": hits["candidate"] / n, "examples": examples}


def judge(result: dict, thresholds: Thresholds, task: dict | None = None) -> list[str]:
    """What falls below `thresholds` (empty: passed). Every reference must be met."""
    failures = []
    for label, against in result["against"].items():
        if against["top1_agreement"] < thresholds.top1:
            failures.append(f"top-1 agreement with {label} {against['top1_agreement']:.3f} < {thresholds.top1}")
        decided = against.get("top1_agreement_decided", 1.0)
        if against.get("decided_positions") and decided < thresholds.top1_decided:
            failures.append(f"top-1 agreement with {label} where it is >= {DECIDED_MARGIN:g} logit ahead "
                            f"{decided:.3f} < {thresholds.top1_decided}")
        if against["greedy_rate"] < thresholds.greedy:
            failures.append(f"greedy continuations equal to {label}'s {against['greedy_equal']}/"
                            f"{result['greedy_prompts']} = {against['greedy_rate']:.2f} < {thresholds.greedy}")
    if task is not None and task["exact_match"] < task["reference_exact_match"] - thresholds.exact_match_drop:
        failures.append(f"task exact match {task['exact_match']:.3f} < {task['reference_label']}'s "
                        f"{task['reference_exact_match']:.3f} - {thresholds.exact_match_drop}")
    return failures
