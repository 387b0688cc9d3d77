"""The graph's I/O contract: input/output names, dtypes and dynamic axis names, fixed in one place.

Other runtimes (onnxruntime-genai, optimum, JavaScript) rely on exactly these names, which follow
optimum's convention for decoder-only models. The past/present tensors hold the user's tokens only;
the prefix lives inside the graph (folded layout).
"""
from __future__ import annotations

INPUT_IDS = "input_ids"  # int64 (batch_size, sequence_length)
ATTENTION_MASK = "attention_mask"  # int64 (batch_size, past_sequence_length + sequence_length)
POSITION_IDS = "position_ids"  # int64 (batch_size, sequence_length), counted from 0 over user tokens
LOGITS = "logits"  # (batch_size, sequence_length, vocab)

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"  # = past_sequence_length + sequence_length

# Metadata keys written into the ONNX model (metadata_props) and read back by the runtime.
META_PREFIX_LENGTH = "prefix_export.num_virtual_tokens"
META_LAYOUT = "prefix_export.layout"
META_VERSION = "prefix_export.version"
# "1" when the folded prefix initializers are also graph inputs, so that an ONNX Runtime adapter file
# (`prefix-export adapter`) can replace them at run time; absent otherwise.
META_SWAPPABLE = "prefix_export.swappable_prefix"

# The shared-KV-buffer graph (compile --kv-buffer shared): no attention mask; the pasts are buffers
# (batch_size, H_kv, max_sequence_length, D) that the presents alias, and these besides:
SEQLENS_K = "seqlens_k"  # int32 (batch_size,): tokens in each row's buffer after this step - 1
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar: the longest row's count, or the buffer length
GREEDY_TOKEN_IDS = "greedy_token_ids"  # int64 (batch_size, sequence_length): argmax of the logits
BUFFER_LENGTH = "max_sequence_length"  # the buffers' time axis
META_KV_BUFFER = "prefix_export.kv_buffer"  # JSON {"layout", "num_virtual_tokens"}


def is_shared_buffer_graph(input_names) -> bool:
    return SEQLENS_K in set(input_names)


def past_name(layer: int, kind: str) -> str:
    """`past_key_values.{i}.key|value`: (batch_size, H_kv, past_sequence_length, D)."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """`present.{i}.key|value`: (batch_size, H_kv, total_sequence_length, D)."""
    return f"present.{layer}.{kind}"


def prefix_initializer_name(layer: int, kind: str) -> str:
    """The folded prefix inside the graph: `prefix_{key|value}_{i}`, an initializer (1, H_kv, P, D)."""
    return f"prefix_{kind}_{layer}"


def prefix_initializer_names(num_layers: int) -> list[str]:
    """Every layer's folded prefix, key then value: what an adapter file for the graph holds."""
    return [prefix_initializer_name(i, kind) for i in range(num_layers) for kind in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    return [past_name(i, kind) for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [present_name(i, kind) for i in range(num_layers) for kind in ("key", "value")]


def input_names(num_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers)]
