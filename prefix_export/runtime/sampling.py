"""Next-token choice from the last position's logits: greedy, or sampling with temperature/top-k/top-p."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise InputError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise InputError(f"--top-k must be >= 0 (0 = off), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Callable (B, V) logits -> (B,) int64 tokens; one seeded generator for the whole generation."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.config.greedy:
            return logits.argmax(-1)
        return self._sample(logits)

    def _sample(self, logits: np.ndarray) -> np.ndarray:
        config = self.config
        scores = logits.astype(np.float64) / config.temperature  # (B, V)
        vocab = scores.shape[-1]
        if 0 < config.top_k < vocab:
            # the k-th largest score per row; everything below it is dropped
            kth = np.partition(scores, vocab - config.top_k, axis=-1)[:, vocab - config.top_k, None]
            scores = np.where(scores < kth, -np.inf, scores)
        if config.top_p < 1.0:
            order = np.argsort(-scores, axis=-1)  # (B, V) best first
            sorted_scores = np.take_along_axis(scores, order, axis=-1)
            probs = _softmax(sorted_scores)
            # keep the smallest prefix whose mass reaches top_p: a token stays when the mass before it < top_p
            drop_sorted = (np.cumsum(probs, axis=-1) - probs) >= config.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=-1)
            scores = np.where(drop, -np.inf, scores)
        probs = _softmax(scores)
        draws = self.rng.random((probs.shape[0], 1))
        tokens = (np.cumsum(probs, axis=-1) < draws).sum(-1)
        # rounding can leave the total mass just under a draw near 1: take the last allowed token then
        last_allowed = vocab - 1 - (probs[:, ::-1] > 0).argmax(-1)
        return np.minimum(tokens, last_allowed)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)
