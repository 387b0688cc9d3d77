"""The architecture registry: the only place that names model types or checks library versions.

Each supported `model_type` maps to one small function that reads a transformers config and returns
an `ArchSpec`, the few facts the exporter and validator need. Everything else in the package is
written against `ArchSpec`, never against a model type name.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import transformers
from packaging import version

from .errors import UnsupportedError

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
# transformers 4.56 introduced `DynamicCache(layers)` with `.layers[i].keys/.values`, which PEFT also
# relies on; older releases have a different cache API and are not supported.
MIN_TRANSFORMERS = version.parse("4.56.0")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What differs between decoder architectures, as far as prefix export is concerned."""

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int  # < num_attention_heads for grouped/multi-query attention
    head_dim: int
    hidden_size: int
    vocab_size: int
    # How token positions enter the model: "learned" (a position table of `max_positions` rows,
    # so P + the user's tokens must fit in it), "rotary" or "alibi" (no table; any length works).
    positions: str
    max_positions: int | None
    sliding_window: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(H_kv, D): the per-layer key/value shape the model's cache holds for one token."""
        return (self.num_kv_heads, self.head_dim)


_REGISTRY: dict[str, Callable[[object], ArchSpec]] = {}


def register(*model_types: str):
    def decorate(fn: Callable[[object], ArchSpec]):
        for model_type in model_types:
            _REGISTRY[model_type] = fn
        return fn

    return decorate


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def describe(config) -> ArchSpec:
    """The ArchSpec of a transformers config; raises UnsupportedError for unknown types."""
    if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
        raise UnsupportedError(
            f"transformers {transformers.__version__} is installed; prefix-export needs "
            f">= {MIN_TRANSFORMERS} (its cache API). Upgrade with `pip install -U transformers`."
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedError(
            f"model type {model_type!r} is not supported. Supported: {', '.join(supported_model_types())}. "
            "Adding one needs an entry in prefix_export/architectures.py (layers, KV heads, head dim, "
            "position kind) and a parity test against PEFT."
        )
    return _REGISTRY[model_type](config)


@register("gpt2")
def _gpt2(config) -> ArchSpec:
    return ArchSpec(
        model_type="gpt2",
        num_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        hidden_size=config.n_embd,
        vocab_size=config.vocab_size,
        positions="learned",
        max_positions=config.n_positions,
    )


# ---- cache compatibility (kept here so version checks live in one place) -------------------------


def make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], config=None):
    """A transformers DynamicCache holding per-layer (key, value), each (B, H_kv, T, D)."""
    return transformers.DynamicCache(layers)


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The forward() keyword for a cache: `cache` in newer transformers 5.x, `past_key_values` before."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in parameters else {"past_key_values": cache}


def output_cache(output):
    """The cache a forward returned (`output.cache` in newer 5.x, `output.past_key_values` before)."""
    if "cache" in output:
        return output["cache"]
    return output["past_key_values"]


def cache_to_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) tensors of a DynamicCache or a legacy tuple cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]
