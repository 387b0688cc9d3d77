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
    num_kv_heads: int  # heads the KV cache holds: < num_attention_heads for grouped/multi-query attention
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


def _head_dim(config, hidden_size: int, heads: int) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else hidden_size // heads


@register("gpt2")
def _gpt2(config) -> ArchSpec:
    return ArchSpec(
        model_type="gpt2", num_layers=config.n_layer, num_attention_heads=config.n_head, num_kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head, hidden_size=config.n_embd, vocab_size=config.vocab_size,
        positions="learned", max_positions=config.n_positions)


@register("gpt_neo")
def _gpt_neo(config) -> ArchSpec:
    # Alternating global/local layers; local layers attend to the last `window_size` positions.
    local = "local" in set(config.attention_layers)
    return ArchSpec(
        model_type="gpt_neo", num_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_kv_heads=config.num_heads, head_dim=config.hidden_size // config.num_heads,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size, positions="learned",
        max_positions=config.max_position_embeddings, sliding_window=config.window_size if local else None)


@register("gptj")
def _gptj(config) -> ArchSpec:
    return ArchSpec(
        model_type="gptj", num_layers=config.n_layer, num_attention_heads=config.n_head, num_kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head, hidden_size=config.n_embd, vocab_size=config.vocab_size,
        positions="rotary", max_positions=None)


@register("gpt_neox")
def _gpt_neox(config) -> ArchSpec:
    return ArchSpec(
        model_type="gpt_neox", num_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_kv_heads=config.num_attention_heads, head_dim=config.hidden_size // config.num_attention_heads,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size, positions="rotary", max_positions=None)


@register("opt")
def _opt(config) -> ArchSpec:
    # OPT's learned table has max_position_embeddings rows after its offset of 2.
    return ArchSpec(
        model_type="opt", num_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_kv_heads=config.num_attention_heads, head_dim=config.hidden_size // config.num_attention_heads,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size, positions="learned",
        max_positions=config.max_position_embeddings)


@register("bloom")
def _bloom(config) -> ArchSpec:
    # ALiBi: the bias comes from the attention mask, so the P prepended ones place the prefix.
    return ArchSpec(
        model_type="bloom", num_layers=config.n_layer, num_attention_heads=config.n_head, num_kv_heads=config.n_head,
        head_dim=config.hidden_size // config.n_head, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        positions="alibi", max_positions=None)


@register("falcon")
def _falcon(config) -> ArchSpec:
    if config.new_decoder_architecture:
        # falcon-40b style: grouped K/V are broadcast to every attention head *before* caching,
        # so the cache (and PEFT's prefix) holds num_attention_heads heads.
        kv_heads = config.num_attention_heads
    else:
        kv_heads = 1 if config.multi_query else config.num_attention_heads
    return ArchSpec(
        model_type="falcon", num_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_kv_heads=kv_heads, head_dim=config.hidden_size // config.num_attention_heads,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        positions="alibi" if config.alibi else "rotary", max_positions=None)


def _llama_like(model_type: str):
    def describe_llama_like(config) -> ArchSpec:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return ArchSpec(
            model_type=model_type, num_layers=config.num_hidden_layers, num_attention_heads=heads,
            num_kv_heads=kv_heads, head_dim=_head_dim(config, config.hidden_size, heads),
            hidden_size=config.hidden_size, vocab_size=config.vocab_size, positions="rotary", max_positions=None,
            sliding_window=getattr(config, "sliding_window", None))

    return describe_llama_like


for _type in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"):
    register(_type)(_llama_like(_type))


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
