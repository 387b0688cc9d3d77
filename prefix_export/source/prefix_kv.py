"""Checkpoint -> static per-layer prefix keys/values `(L, 2, H_kv, P, D)`, computed by PEFT and the model.

Prefix tuning: PEFT's `get_prompt` owns the layout rules (view as (P, 2L, H, D), GQA head counts,
per-model post-processing), so we ask it for the cache it would feed the model and read the tensors
back, rather than re-deriving them.

Prompt tuning, p-tuning, multitask prompt tuning: PEFT prepends P virtual token embeddings to the
input embeddings. They sit at positions 0..P-1 and, under causal attention, nothing after them changes
their keys and values; so one base-model forward over the virtual embeddings alone (positions
0..P-1, mask of ones) gives a per-layer KV prefix, and the model then runs exactly as a prefix-tuned
one: the user's tokens at positions P.., the mask extended by P. Every layout and runtime downstream
takes it unchanged. The registry says where attention is not causal over them (seq2seq encoders).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from . import architectures
from .base_model import BaseModel
from .checkpoint import MULTITASK, PrefixCheckpoint
from ..errors import CheckpointError, MismatchError, UnsupportedError
from ..folder import PREFIX_KV_TENSOR, prefix_file_metadata

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PrefixKV:
    tensor: torch.Tensor  # (L, 2, H_kv, P, D); [:, 0] keys, [:, 1] values, in the model's dtype

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.tensor.shape[3])

    @property
    def num_layers(self) -> int:
        return int(self.tensor.shape[0])

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) of one layer, each (H_kv, P, D)."""
        return self.tensor[index, 0], self.tensor[index, 1]

    def save(self, path: Path, extra_metadata: dict[str, str] | None = None) -> None:
        """Write the prefix file (folder.py owns its format: one tensor, metadata describing it)."""
        from safetensors.torch import save_file

        dtype = str(self.tensor.dtype).replace("torch.", "")
        save_file({PREFIX_KV_TENSOR: self.tensor.contiguous()}, str(path),
                  metadata=prefix_file_metadata(tuple(self.tensor.shape), dtype, extra_metadata))

    @classmethod
    def load(cls, path: Path) -> "PrefixKV":
        """A prefix file as torch (its own dtype, bfloat16 too); folder.read_prefix_file reads it as numpy."""
        from safetensors.torch import load_file

        try:
            return cls(load_file(str(path))[PREFIX_KV_TENSOR])
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing error
            raise CheckpointError(f"{path} is not a prefix_kv file written by prefix-export ({exc}).") from exc


def expected_prefix_config(base: BaseModel, num_virtual_tokens: int):
    """The PrefixTuningConfig PEFT would create for this model (layers, heads, token_dim filled in)."""
    from peft import PrefixTuningConfig
    from peft.utils.other import _prepare_prompt_learning_config

    config = PrefixTuningConfig(task_type=base.spec.task_type, num_virtual_tokens=num_virtual_tokens)
    return _prepare_prompt_learning_config(config, base.config)


def _peft_version() -> str:
    import peft

    return peft.__version__


def check_fits(base: BaseModel, checkpoint: PrefixCheckpoint) -> None:
    """Raise MismatchError, showing both sides, when the prefix was trained for another shape."""
    task_type = checkpoint.config.task_type
    if task_type is not None and str(getattr(task_type, "value", task_type)) != base.spec.task_type:
        raise MismatchError(f"the prefix was trained for task {getattr(task_type, 'value', task_type)}, but "
                            f"{base.spec.model_type} model {base.source!r} takes {base.spec.task_type} prefixes; use "
                            "the base model the prefix was trained on.")
    if not checkpoint.is_prefix:
        _check_virtual_tokens_fit(base, checkpoint)
        return
    expected = expected_prefix_config(base, checkpoint.num_virtual_tokens)
    if base.spec.is_seq2seq:
        _check_seq2seq_fits(base, expected)
    diffs = []
    for field, label in (("num_layers", "layers"), ("num_attention_heads", "heads (KV heads for GQA)"),
                         ("token_dim", "hidden size (token_dim)")):
        got, want = getattr(checkpoint.config, field), getattr(expected, field)
        if got != want:
            diffs.append(f"{label}: prefix has {got}, model {base.source!r} needs {want}")
    if not diffs and expected.num_attention_heads != base.spec.num_kv_heads:
        raise UnsupportedError(
            f"PEFT {_peft_version()} cannot prefix-tune this {base.spec.model_type} configuration: it provisions the "
            f"prefix with {expected.num_attention_heads} heads, but the model's cache has {base.spec.num_kv_heads} "
            "KV heads (multi-query or grouped-query attention that PEFT does not detect for this architecture), "
            "so PEFT's own forward fails. There is nothing correct to export; use a configuration with one KV head "
            "per attention head, or an architecture PEFT supports for GQA (llama, mistral, qwen2, ...).")
    if diffs:
        raise MismatchError("the prefix does not fit the model: " + "; ".join(diffs) +
                            ". Use the base model the prefix was trained on (adapter_config.json "
                            f"base_model_name_or_path: {checkpoint.config.base_model_name_or_path!r}).")
    _check_position_table(base, checkpoint)


def _check_position_table(base: BaseModel, checkpoint: PrefixCheckpoint) -> None:
    spec = base.spec
    if spec.positions == "learned" and checkpoint.num_virtual_tokens >= spec.max_positions:
        raise MismatchError(f"the prefix has P={checkpoint.num_virtual_tokens} virtual tokens but the model's "
                            f"position table has {spec.max_positions} rows; PEFT shifts positions by P, so P must "
                            "be well below it.")


def _check_virtual_tokens_fit(base: BaseModel, checkpoint: PrefixCheckpoint) -> None:
    """Prompt tuning and friends: the architecture must be causal over the virtual tokens, and their
    embeddings as wide as the model's input embeddings."""
    spec, method = base.spec, checkpoint.method.replace("_", " ")
    if spec.virtual_tokens_unfoldable:
        raise UnsupportedError(
            f"{method} cannot be exported for {spec.model_type}: {spec.virtual_tokens_unfoldable}. Prefix tuning "
            f"(PEFT PrefixTuningConfig), whose keys/values are static, exports for {spec.model_type}.")
    width = base.model.get_input_embeddings().embedding_dim
    if checkpoint.config.token_dim != width:
        raise MismatchError(f"the {method} checkpoint's virtual token embeddings are {checkpoint.config.token_dim} "
                            f"wide (token_dim), but model {base.source!r} embeds tokens in {width}; use the base model "
                            f"it was trained on (base_model_name_or_path: "
                            f"{checkpoint.config.base_model_name_or_path!r}).")
    _check_position_table(base, checkpoint)


def _check_seq2seq_fits(base: BaseModel, expected) -> None:
    """PEFT provisions a seq2seq prefix from the *encoder's* facts; refuse what its own forward cannot run."""
    spec = base.spec
    peft_head_dim = expected.token_dim // expected.num_attention_heads
    if (expected.num_attention_heads, peft_head_dim) != (spec.num_kv_heads, spec.head_dim):
        raise UnsupportedError(
            f"PEFT {_peft_version()} cannot prefix-tune this {spec.model_type} configuration: it shapes the prefix as "
            f"{expected.num_attention_heads} heads x {peft_head_dim} (token_dim {expected.token_dim} / heads), but the "
            f"decoder's self-attention cache holds {spec.num_kv_heads} heads x {spec.head_dim} (e.g. T5's d_kv is not "
            "d_model / num_heads), so PEFT's own forward fails. There is nothing correct to export.")
    if expected.num_layers < spec.num_layers:
        # A shallower decoder (distilbart-12-6 style) is fine: PEFT's extra prefix layers go unused.
        raise UnsupportedError(
            f"PEFT {_peft_version()} cannot prefix-tune this {spec.model_type} configuration: it provisions the prefix "
            f"for {expected.num_layers} layers (the encoder's depth), but the decoder, which takes it, has "
            f"{spec.num_layers}, so PEFT's own forward fails (IndexError in its cache). There is nothing correct "
            "to export; only models whose decoder is at most as deep as the encoder can be prefix-tuned.")


def build_peft_model(base: BaseModel, checkpoint: PrefixCheckpoint):
    """PEFT's own PeftModel for this base model, with the checkpoint's prompt loaded (inference mode).

    A multitask prompt-tuning model answers for the checkpoint's chosen task: its forward is given that
    `task_ids` whenever the caller gives none (the validation's references call it like any other)."""
    from peft import PeftModelForCausalLM, PeftModelForSeq2SeqLM
    from peft.tuners.multitask_prompt_tuning.config import MultitaskPromptTuningInit

    check_fits(base, checkpoint)
    # In inference mode PEFT's encoders are plain tables: the projected prefix (prefix tuning) or the
    # virtual token embeddings (the others), which is exactly what `checkpoint.prompt_embeddings` is.
    changes = dict(inference_mode=True, task_type=base.spec.task_type)
    if checkpoint.method == MULTITASK:
        changes["prompt_tuning_init"] = MultitaskPromptTuningInit.RANDOM  # the others read files at init
    config = dataclasses.replace(checkpoint.config, **changes)
    # The task class, not plain PeftModel: only the task classes' forward prepends the prompt.
    task_class = PeftModelForSeq2SeqLM if base.spec.is_seq2seq else PeftModelForCausalLM
    peft_model = task_class(base.model, config)
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(checkpoint.prompt_embeddings.to(encoder.embedding.weight.dtype))
        for name, tensor in checkpoint.task_tensors.items():
            getattr(encoder, name).copy_(tensor.to(getattr(encoder, name).dtype))
    if checkpoint.task_id is not None:
        _bind_task(peft_model, checkpoint.task_id)
    return peft_model.eval()


def _bind_task(peft_model, task_id: int) -> None:
    def with_task(module, args, kwargs):
        if kwargs.get("task_ids") is None:
            ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
            kwargs["task_ids"] = torch.full((ids.shape[0],), task_id, dtype=torch.long)
        return args, kwargs

    peft_model.register_forward_pre_hook(with_task, with_kwargs=True)
    peft_model.prefix_export_task_id = task_id


def compute_prefix_kv(peft_model, spec: architectures.ArchSpec) -> PrefixKV:
    """Ask PEFT for the cache it prepends for a batch of one (prefix tuning), or run the model over
    PEFT's virtual token embeddings (the other methods), and stack it to (L, 2, H_kv, P, D)."""
    if not is_prefix_tuning(peft_model):
        layers = virtual_tokens_kv(peft_model)
    else:
        with torch.no_grad():
            cache = peft_model.get_prompt(batch_size=1,
                                          max_cache_len=peft_model.active_peft_config.num_virtual_tokens)
        if spec.is_seq2seq:
            layers = seq2seq_self_attention_prefix(cache, spec)[:spec.num_layers]  # PEFT: encoder depth >= decoder's
        else:
            layers = architectures.cache_to_tensors(cache)
    if len(layers) != spec.num_layers:
        raise MismatchError(f"PEFT produced a prefix for {len(layers)} layers; the model has {spec.num_layers}.")
    stacked = []
    for index, (key, value) in enumerate(layers):
        # each (1, H_kv, P, D)
        if tuple(key.shape[1:2]) + tuple(key.shape[3:]) != spec.kv_shape:
            raise MismatchError(f"layer {index}: PEFT's prefix keys have shape {tuple(key.shape)}, the model's "
                                f"cache needs (1, {spec.num_kv_heads}, P, {spec.head_dim}) (H_kv, D).")
        stacked.append(torch.stack([key[0], value[0]]))
    tensor = torch.stack(stacked).detach().contiguous()  # (L, 2, H_kv, P, D)
    if not torch.isfinite(tensor).all():
        # The checkpoint itself was checked finite, so this is the cast to the model's dtype overflowing.
        source = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
        bad = int((~torch.isfinite(tensor)).sum())
        raise MismatchError(
            f"the prefix does not fit the model's dtype: cast to {str(tensor.dtype).replace('torch.', '')} it holds "
            f"{bad} Inf/NaN values (prefix values reach {float(source.detach().abs().max()):.3g} in "
            f"{str(source.dtype).replace('torch.', '')}). Export in float32 (--dtype float32), or use a prefix "
            "whose values fit the model's dtype.")
    log.info("prefix KV: shape %s, dtype %s", tuple(tensor.shape), tensor.dtype)
    return PrefixKV(tensor)


def is_prefix_tuning(peft_model) -> bool:
    """PEFT prefix tuning (keys/values prepended to the cache), not virtual token embeddings."""
    return str(getattr(peft_model.active_peft_config.peft_type, "value", "")) == "PREFIX_TUNING"


def virtual_tokens_kv(peft_model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) (1, H_kv, P, D) of PEFT's virtual tokens: one base-model forward over the
    embeddings PEFT prepends (get_prompt, cast to the model's dtype as PEFT's forward casts them), at
    positions 0..P-1 with a mask of ones, into a cache that keeps every position (a sliding-window layer's
    cache would keep only its window; the graph masks by position instead)."""
    model = peft_model.get_base_model()
    P = peft_model.active_peft_config.num_virtual_tokens
    task_id = getattr(peft_model, "prefix_export_task_id", None)
    task_ids = None if task_id is None else torch.tensor([task_id])
    dtype = model.get_input_embeddings().weight.dtype
    with torch.no_grad():
        embeddings = peft_model.get_prompt(batch_size=1, task_ids=task_ids).to(dtype)  # (1, P, token_dim)
        out = model(inputs_embeds=embeddings, attention_mask=torch.ones(1, P, dtype=torch.long),
                    position_ids=torch.arange(P).unsqueeze(0), use_cache=True, return_dict=True,
                    **architectures.cache_kwargs(model, architectures.make_cache([])))
    layers = architectures.cache_to_tensors(architectures.output_cache(out))
    if any(key.shape[2] != P for key, _ in layers):
        raise MismatchError(f"the base model's cache over the {P} virtual tokens holds "
                            f"{sorted({int(k.shape[2]) for k, _ in layers})} positions per layer, expected {P}.")
    return [(key.detach(), value.detach()) for key, value in layers]


def describe_conversion(checkpoint: PrefixCheckpoint) -> dict:
    """The method and how its checkpoint became the prefix KV, for the report and `inspect`."""
    config = checkpoint.config
    if checkpoint.is_prefix:
        return {"method": checkpoint.method, "prefix_projection": bool(config.prefix_projection),
                "conversion": "PEFT's prefix cache (get_prompt) read back per layer"
                              + (" (the projection MLP run once at load)" if checkpoint.kind != "peft_adapter"
                                 and config.prefix_projection else "")}
    details = {"method": checkpoint.method, "prefix_projection": False,
               "conversion": "the P virtual token embeddings run once through the base model (positions 0..P-1, "
                             "causal, mask of ones); its per-layer keys/values are the prefix, and the user's "
                             "tokens sit at positions P.. as with a prefix"}
    init = getattr(config, "prompt_tuning_init", None)
    if init is not None:
        details["prompt_tuning_init"] = str(getattr(init, "value", init))
    if checkpoint.method == "p_tuning":
        reparameterization = config.encoder_reparameterization_type
        details["encoder_reparameterization_type"] = str(getattr(reparameterization, "value", reparameterization))
        details["encoder_run_at_load"] = checkpoint.kind != "peft_adapter"
    if checkpoint.task_id is not None:
        details["task_id"] = checkpoint.task_id
        details["num_tasks"] = int(config.num_tasks)
    return details


def seq2seq_self_attention_prefix(cache, spec: architectures.ArchSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The decoder self-attention part of PEFT's seq2seq prefix cache, per layer (key, value) (1, H, P, D).

    The exported decoder places the prefix in self-attention only; this is where PEFT places it
    (get_prompt empties the cross-attention cache). Should a PEFT version put a prefix into the
    cross-attention cache, exporting it would need a different graph, so it is refused here.
    """
    if not hasattr(cache, "self_attention_cache"):
        raise UnsupportedError(f"PEFT {_peft_version()} returned a {type(cache).__name__} for a {spec.model_type} "
                               "prefix; prefix-export expects an EncoderDecoderCache for encoder-decoder models.")
    self_layers, cross_layers = architectures.encoder_decoder_cache_tensors(cache)
    if any(key.shape[2] for key, _ in cross_layers):
        raise UnsupportedError(
            f"PEFT {_peft_version()} puts prefix positions into the cross-attention cache of {spec.model_type}; "
            "prefix-export folds seq2seq prefixes into decoder self-attention only (what PEFT 0.21 does), so this "
            "combination of versions is not supported.")
    return self_layers
