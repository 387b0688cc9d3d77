"""onnxruntime-genai support: write `genai_config.json` so `onnxruntime_genai.Model(folder)` loads an export.

genai's generic decoder (`"type": "decoder"`) drives any graph with the I/O contract of
`contract.py`: it feeds `input_ids`, `attention_mask` (B, past + seq), `position_ids` counted from 0
over the user's tokens, and the per-layer `past_key_values.{i}.key/value` (B, H_kv, past, D) it got
back as `present.{i}.key/value`. The prefix is folded inside the graph, so genai needs to know
nothing about it, except that it takes P of a learned position table: the context length genai may
use is `max_positions - P` for such models.

`past_present_share_buffer` is false: with a shared buffer genai would hand the graph a cache of
the full context length and expect the graph to write in place (as its own builder's
GroupQueryAttention graphs do); our graphs concatenate, so present is a new, longer tensor.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import contract
from ..source.architectures import ArchSpec

log = logging.getLogger(__name__)

GENAI_CONFIG_FILE = "genai_config.json"
# genai's generic decoder-only model; its architecture-named types (llama, qwen2, ...) select the
# same code path, with a few architecture-specific options we do not need.
GENAI_MODEL_TYPE = "decoder"
# For models that state no maximum length (ALiBi), the context length genai allocates for; users can
# raise `search.max_length` / `model.context_length` in genai_config.json by hand.
DEFAULT_CONTEXT_LENGTH = 2048


def context_length(spec: ArchSpec, num_virtual_tokens: int, config=None) -> int:
    """User tokens (prompt + new) the export can take: the model's positions minus the prefix's P.

    Learned positions: the table's rows (ArchSpec.max_positions), a hard limit. Rotary: no table, but
    the length the model was trained for (transformers' generic `max_position_embeddings`) still
    counts the prefix's P positions, since PEFT shifts the user's positions by P.
    """
    limit = spec.max_positions or getattr(config, "max_position_embeddings", None)
    if not limit:
        return DEFAULT_CONTEXT_LENGTH
    return int(limit) - num_virtual_tokens


def _token_id(value) -> int | list[int] | None:
    if isinstance(value, (list, tuple)):
        values = [int(v) for v in value if v is not None]
        return values[0] if len(values) == 1 else (values or None)
    return None if value is None else int(value)


def special_token_ids(config, generation_config=None) -> dict[str, int | list[int]]:
    """bos/eos/pad ids, generation_config first (it is what transformers' generate uses)."""
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for source in (generation_config, config):
            value = _token_id(getattr(source, key, None)) if source is not None else None
            if value is not None:
                ids[key] = value
                break
    if "eos_token_id" not in ids:
        # genai needs an end token; one outside the vocabulary is never generated.
        ids["eos_token_id"] = -1
    eos = ids["eos_token_id"]
    first_eos = eos[0] if isinstance(eos, list) else eos
    ids.setdefault("pad_token_id", first_eos if first_eos >= 0 else 0)
    ids.setdefault("bos_token_id", ids["pad_token_id"])
    return ids


def build_genai_config(spec: ArchSpec, num_virtual_tokens: int, graph_name: str, token_ids: dict,
                       config=None) -> dict:
    """The genai_config.json contents for a folded export of `spec` with a P-token prefix."""
    length = context_length(spec, num_virtual_tokens, config)
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "context_length": length,
            "vocab_size": spec.vocab_size,
            **token_ids,
            "decoder": {
                "filename": graph_name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": spec.hidden_size,
                "head_size": spec.head_dim,
                "num_attention_heads": spec.num_attention_heads,
                "num_key_value_heads": spec.num_kv_heads,
                "num_hidden_layers": spec.num_layers,
                "inputs": {
                    "input_ids": contract.INPUT_IDS,
                    "attention_mask": contract.ATTENTION_MASK,
                    "position_ids": contract.POSITION_IDS,
                    "past_key_names": contract.past_name(0, "key").replace(".0.", ".%d."),
                    "past_value_names": contract.past_name(0, "value").replace(".0.", ".%d."),
                },
                "outputs": {
                    "logits": contract.LOGITS,
                    "present_key_names": contract.present_name(0, "key").replace(".0.", ".%d."),
                    "present_value_names": contract.present_name(0, "value").replace(".0.", ".%d."),
                },
            },
        },
        "search": {
            "max_length": length,
            "min_length": 0,
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0,
            "early_stopping": True,
            "past_present_share_buffer": False,
        },
    }


def write_genai_config(folder: Path, spec: ArchSpec, num_virtual_tokens: int, graph_name: str, config,
                       generation_config=None) -> Path:
    """Write `folder/genai_config.json`; the tokenizer files beside it are the model's own."""
    content = build_genai_config(spec, num_virtual_tokens, graph_name, special_token_ids(config, generation_config),
                                 config)
    path = Path(folder) / GENAI_CONFIG_FILE
    path.write_text(json.dumps(content, indent=2) + "\n")
    log.info("wrote %s (context length %d)", path.name, content["model"]["context_length"])
    return path
