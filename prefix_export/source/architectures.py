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

from ..errors import UnsupportedError

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
# transformers 4.56 introduced `DynamicCache(layers)` with `.layers[i].keys/.values`, which PEFT also
# relies on; older releases have a different cache API and are not supported.
MIN_TRANSFORMERS = version.parse("4.56.0")


FAMILY_DECODER = "decoder"  # decoder-only causal LM (PEFT task CAUSAL_LM): one folded graph
FAMILY_SEQ2SEQ = "seq2seq"  # encoder-decoder (PEFT task SEQ_2_SEQ_LM): encoder graph + folded decoder graph
_TASK_TYPES = {FAMILY_DECODER: "CAUSAL_LM", FAMILY_SEQ2SEQ: "SEQ_2_SEQ_LM"}


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What differs between architectures, as far as prefix export is concerned.

    For a seq2seq model the layer/head/position facts describe the *decoder*, the part that takes
    the prefix; `num_encoder_layers` is the encoder's depth.
    """

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int  # heads the KV cache holds: < num_attention_heads for grouped/multi-query attention
    head_dim: int
    hidden_size: int
    vocab_size: int
    # How token positions enter the model: "learned" (a position table of `max_positions` rows,
    # so P + the user's tokens must fit in it), "rotary", "alibi" or "relative" (T5's bucketed
    # relative bias; no table; any length works).
    positions: str
    max_positions: int | None
    sliding_window: int | None = None
    notes: tuple[str, ...] = ()
    # Why a float16 export of this family cannot be trusted (None: it can, when the measured numbers
    # allow; see source/dtypes.py). A bfloat16 checkpoint of such a family is exported in float32.
    float16_unsafe: str | None = None
    family: str = FAMILY_DECODER
    num_encoder_layers: int | None = None  # seq2seq only
    decoder_start_token_id: int | None = None  # seq2seq only: the first decoder token
    # What the compile step's fusions should find (compile/fusions.expected_fusions): the norm kind
    # ("layernorm" or "rmsnorm"), normalizations per layer and outside the layers (final norm, BLOOM's
    # embedding norm), the MLP activation ("gelu_tanh", "gelu_erf", "relu", "silu"), and for each
    # fusion that cannot apply to this family, why (kind -> reason).
    norm: str = "layernorm"
    norms_per_layer: int = 2
    extra_norms: int = 1
    activation: str = "gelu_tanh"
    unfusable: tuple[tuple[str, str], ...] = ()
    # Why PEFT prompt tuning / p-tuning cannot become a static KV prefix here: the virtual tokens' keys
    # and values would depend on the user's tokens (bidirectional attention over them). None: attention
    # is causal, so one forward over the virtual tokens alone gives their keys/values (prefix_kv.py).
    virtual_tokens_unfoldable: str | None = None

    @property
    def is_seq2seq(self) -> bool:
        return self.family == FAMILY_SEQ2SEQ

    @property
    def task_type(self) -> str:
        """The PEFT task type whose prefix this architecture takes (CAUSAL_LM or SEQ_2_SEQ_LM)."""
        return _TASK_TYPES[self.family]

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


def _multi_head(model_type: str, layers: int, heads: int, hidden: int, vocab: int, positions: str,
                max_positions: int | None, **extra) -> ArchSpec:
    """Plain multi-head attention: every head has its own K/V, each hidden / heads wide."""
    return ArchSpec(model_type=model_type, num_layers=layers, num_attention_heads=heads, num_kv_heads=heads,
                    head_dim=hidden // heads, hidden_size=hidden, vocab_size=vocab, positions=positions,
                    max_positions=max_positions, **extra)


def _activation(name: str | None) -> str:
    """A transformers activation name as the fusion it becomes (tanh-approximated gelu -> FastGelu, ...)."""
    kinds = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_tanh": "gelu_tanh", "gelu": "gelu_erf", "relu": "relu", "silu": "silu", "swish": "silu"}
    return kinds.get(name or "", name or "unknown")


def _head_dim(config, hidden_size: int, heads: int) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else hidden_size // heads


@register("gpt2")
def _gpt2(config) -> ArchSpec:
    return _multi_head("gpt2", config.n_layer, config.n_head, config.n_embd, config.vocab_size, "learned",
                       config.n_positions, activation=_activation(config.activation_function))


@register("gpt_neo")
def _gpt_neo(config) -> ArchSpec:
    # Alternating global/local layers; local layers attend to the last `window_size` positions.
    local = "local" in set(config.attention_layers)
    return _multi_head("gpt_neo", config.num_layers, config.num_heads, config.hidden_size, config.vocab_size,
                       "learned", config.max_position_embeddings,
                       sliding_window=config.window_size if local else None,
                       activation=_activation(config.activation_function),
                       unfusable=(("attention", "GPT-Neo scores attention without the 1/sqrt(D) scale and applies "
                                                "its causal mask with Where before the additive mask; onnxscript's "
                                                "SDPA patterns (0.7) do not match that, so it stays MatMul/Softmax"),))


@register("gptj")
def _gptj(config) -> ArchSpec:
    # One norm per layer: attention and MLP run in parallel on the same normalized input.
    return _multi_head("gptj", config.n_layer, config.n_head, config.n_embd, config.vocab_size, "rotary", None,
                       norms_per_layer=1, activation=_activation(config.activation_function),
                       unfusable=(("gelu", "ONNX Runtime 1.32's transformer optimizer breaks GPT-J's parallel "
                                           "attention/MLP block (the graph it writes is not a DAG), and onnxscript's "
                                           "gelu pattern does not match; the tanh gelu stays elementwise"),
                                 ("rotary", "GPT-J rotates interleaved pairs (rotate_every_two) of the first "
                                            "rotary_dim dims; onnxscript's rotary patterns match rotate_half only")))


@register("gpt_neox")
def _gpt_neox(config) -> ArchSpec:
    return _multi_head("gpt_neox", config.num_hidden_layers, config.num_attention_heads, config.hidden_size,
                       config.vocab_size, "rotary", None, activation=_activation(config.hidden_act))


@register("opt")
def _opt(config) -> ArchSpec:
    # OPT's learned table has max_position_embeddings rows after its offset of 2.
    # opt-350m style (do_layer_norm_before=False) normalizes after each block and has no final norm.
    return _multi_head("opt", config.num_hidden_layers, config.num_attention_heads, config.hidden_size,
                       config.vocab_size, "learned", config.max_position_embeddings,
                       extra_norms=1 if config.do_layer_norm_before else 0,
                       activation=_activation(config.activation_function))


@register("bloom")
def _bloom(config) -> ArchSpec:
    # ALiBi: the bias comes from the attention mask, so the P prepended ones place the prefix.
    # Its own tanh gelu; a LayerNorm on the word embeddings besides the final one.
    return _multi_head("bloom", config.n_layer, config.n_head, config.hidden_size, config.vocab_size, "alibi", None,
                       extra_norms=2, activation="gelu_tanh",
                       unfusable=(("attention", "ALiBi adds a per-head bias to the scores (baddbmm) that onnxscript's "
                                                "SDPA patterns (0.7) do not take into MultiHeadAttention's "
                                                "attention_bias; it stays MatMul/Softmax"),))


@register("falcon")
def _falcon(config) -> ArchSpec:
    if config.new_decoder_architecture:
        # falcon-40b style: grouped K/V are broadcast to every attention head *before* caching,
        # so the cache (and PEFT's prefix) holds num_attention_heads heads.
        kv_heads = config.num_attention_heads
    else:
        kv_heads = 1 if config.multi_query else config.num_attention_heads
    if config.new_decoder_architecture:
        norms = getattr(config, "num_ln_in_parallel_attn", None) or 2
    else:
        norms = 1 if config.parallel_attn else 2
    return ArchSpec(
        model_type="falcon", num_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_kv_heads=kv_heads, head_dim=config.hidden_size // config.num_attention_heads,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        positions="alibi" if config.alibi else "rotary", max_positions=None, norms_per_layer=norms,
        activation=_activation(getattr(config, "activation", "gelu")))


# Per-layer RMSNorms beyond the two around attention and MLP: Qwen3's q/k norms, Gemma-2's post-norms.
_EXTRA_LAYER_NORMS = {"qwen3": 2, "gemma2": 2}
_UNFUSABLE = {"gemma2": (("attention", "Gemma-2 soft-caps the attention scores (tanh) before the softmax; "
                                       "MultiHeadAttention has no soft-cap, so attention stays MatMul/Softmax"),)}


def _llama_like(model_type: str):
    def describe_llama_like(config) -> ArchSpec:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return ArchSpec(
            model_type=model_type, num_layers=config.num_hidden_layers, num_attention_heads=heads,
            num_kv_heads=kv_heads, head_dim=_head_dim(config, config.hidden_size, heads),
            hidden_size=config.hidden_size, vocab_size=config.vocab_size, positions="rotary", max_positions=None,
            sliding_window=getattr(config, "sliding_window", None), norm="rmsnorm",
            norms_per_layer=2 + _EXTRA_LAYER_NORMS.get(model_type, 0),
            activation=_activation(getattr(config, "hidden_activation", None) or config.hidden_act),
            unfusable=_UNFUSABLE.get(model_type, ()))

    return describe_llama_like


for _type in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"):
    register(_type)(_llama_like(_type))


# ---- encoder-decoder (PEFT SEQ_2_SEQ_LM) ---------------------------------------------------------
# What PEFT 0.21 does with a seq2seq prefix (PeftModelForSeq2SeqLM.forward + get_prompt, checked
# against transformers 5.24): the prefix becomes an EncoderDecoderCache whose *self-attention* cache
# holds P positions per decoder layer, and whose cross-attention cache is replaced by an empty one
# (so cross-attention sees the encoder output only, no prefix); the encoder takes no prefix. The
# decoder's positions follow its cache length, so they start at P (BART's learned table, T5's
# relative bias). prefix_kv.compute_prefix_kv checks the cross-attention part really is empty.
# Prompt tuning and p-tuning are another matter: PEFT prepends their virtual tokens to the encoder's
# input (and, with num_transformer_submodules=2, to the decoder's), where they are attended both ways.
_SEQ2SEQ_VIRTUAL_TOKENS = (
    "PEFT puts a seq2seq model's virtual tokens into the encoder input, whose attention is bidirectional: their "
    "encoder states, and everything the decoder reads from them, depend on the user's tokens, so there are no "
    "static keys/values to fold (a prompt-tuned encoder would have to run the virtual embeddings with every input)")


@register("bart")
def _bart(config) -> ArchSpec:
    # Learned positions with BART's offset of 2: the table has max_position_embeddings usable rows.
    return _multi_head("bart", config.decoder_layers, config.decoder_attention_heads, config.d_model,
                       config.vocab_size, "learned", config.max_position_embeddings, family=FAMILY_SEQ2SEQ,
                       num_encoder_layers=config.encoder_layers, decoder_start_token_id=config.decoder_start_token_id,
                       virtual_tokens_unfoldable=_SEQ2SEQ_VIRTUAL_TOKENS,
                       float16_unsafe="BartEncoderLayer clamps float16 overflow behind a data-dependent `if` that "
                                      "torch.export cannot trace (transformers 5.24)")


@register("t5")
def _t5(config) -> ArchSpec:
    # Heads have their own width d_kv (not always d_model / num_heads); relative position bias.
    return ArchSpec(
        model_type="t5", num_layers=config.num_decoder_layers, num_attention_heads=config.num_heads,
        num_kv_heads=config.num_heads, head_dim=config.d_kv, hidden_size=config.d_model,
        vocab_size=config.vocab_size, positions="relative", max_positions=None, family=FAMILY_SEQ2SEQ,
        num_encoder_layers=config.num_layers, decoder_start_token_id=config.decoder_start_token_id,
        virtual_tokens_unfoldable=_SEQ2SEQ_VIRTUAL_TOKENS,
        float16_unsafe="T5's feed-forward activations overflow float16 in released checkpoints (transformers "
                       "clamps them to float16's range in float16, which changes the result)")


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


def make_encoder_decoder_cache(self_layers: list[tuple[torch.Tensor, torch.Tensor]],
                               cross_layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """An EncoderDecoderCache whose cross-attention layers are *extended* by the next forward.

    Each cross-attention layer is marked not updated, so the attention projects the
    `encoder_hidden_states` it is given and appends them to the (possibly empty) cached keys/values.
    """
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(self_layers),
                                             transformers.DynamicCache(cross_layers))
    for index in range(len(cross_layers)):
        cache.is_updated[index] = False
    return cache


def cross_attention_mask(model: torch.nn.Module, inputs_embeds: torch.Tensor, mask: torch.Tensor):
    """What a seq2seq model must be given as its encoder `attention_mask` so that cross-attention is
    masked by `mask` (B, S_cross) even when its `encoder_hidden_states` are shorter (empty).

    transformers 5.x sizes the cross-attention mask from encoder_hidden_states
    (masking_utils.create_bidirectional_mask) but passes a ready 4D mask through, so the model's own
    function builds it here with the right length; 4.x models expand the 2D mask by its own length.
    """
    from transformers import masking_utils

    if not hasattr(masking_utils, "create_bidirectional_mask"):  # transformers 4.x
        return mask
    batch, length = mask.shape
    return masking_utils.create_bidirectional_mask(
        config=model.config, inputs_embeds=inputs_embeds, attention_mask=mask,
        encoder_hidden_states=inputs_embeds.new_zeros(batch, length, 1), allow_is_bidirectional_skip=False)


def encoder_decoder_cache_tensors(cache) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                   list[tuple[torch.Tensor, torch.Tensor]]]:
    """(self-attention layers, cross-attention layers) of an EncoderDecoderCache, each [(key, value)]."""
    return cache_to_tensors(cache.self_attention_cache), cache_to_tensors(cache.cross_attention_cache)


def cache_to_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) tensors of a DynamicCache or a legacy tuple cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]
