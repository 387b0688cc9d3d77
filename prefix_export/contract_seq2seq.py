"""The encoder-decoder I/O contract: graph files, input/output names and dynamic axes, in one place.

Names follow optimum's seq2seq exports (`encoder_model.onnx`, `decoder_model.onnx`,
`past_key_values.{i}.decoder.key`, `present.{i}.encoder.value`, ...). The prefix lives inside the
decoder graph (folded layout), so past/present hold the user's decoder tokens only.

One decoder graph serves every step, without an If node (optimum needs two graphs, or a merged one
with an If on `use_cache_branch`). Cross-attention keys/values are computed once, on the first step:

  first step:  encoder_hidden_states (B, S_enc, d_model)   past_key_values.{i}.encoder.*  (B, H, 0, D)
               past_key_values.{i}.decoder.*  (B, H, 0, D)
  later steps: encoder_hidden_states (B, 0, d_model)       past_key_values.{i}.encoder.*  (B, H, S_enc, D)
               past_key_values.{i}.decoder.*  (B, H, past, D)

Inside, each layer's cross-attention keys/values are concat(past encoder K/V, projection of
encoder_hidden_states): exactly one of the two is empty. `present.{i}.encoder.*` is always the full
(B, H, S_enc, D) cross-attention K/V, to be fed back unchanged. Feeding both non-empty is an error
(ONNX Runtime rejects the run: the cross-attention mask gathers out of range).
"""
from __future__ import annotations

ENCODER_GRAPH = "encoder_model.onnx"
DECODER_GRAPH = "decoder_model.onnx"

# encoder_model.onnx
INPUT_IDS = "input_ids"  # int64 (batch_size, encoder_sequence_length)
ATTENTION_MASK = "attention_mask"  # int64 (batch_size, encoder_sequence_length)
LAST_HIDDEN_STATE = "last_hidden_state"  # (batch_size, encoder_sequence_length, d_model)

# decoder_model.onnx
DECODER_INPUT_IDS = "input_ids"  # int64 (batch_size, decoder_sequence_length)
ENCODER_ATTENTION_MASK = "encoder_attention_mask"  # int64 (batch_size, encoder_sequence_length)
ENCODER_HIDDEN_STATES = "encoder_hidden_states"  # (batch_size, encoder_hidden_sequence_length, d_model)
LOGITS = "logits"  # (batch_size, decoder_sequence_length, vocab)

BATCH = "batch_size"
ENCODER_SEQUENCE = "encoder_sequence_length"
ENCODER_HIDDEN_SEQUENCE = "encoder_hidden_sequence_length"  # S_enc on the first step, 0 after
DECODER_SEQUENCE = "decoder_sequence_length"
PAST_DECODER = "past_decoder_sequence_length"
PAST_ENCODER = "past_encoder_sequence_length"  # 0 on the first step, S_enc after
TOTAL_DECODER = "total_decoder_sequence_length"  # past_decoder_sequence_length + decoder_sequence_length
ENCODER_OUT = "encoder_sequence_length_out"  # optimum's name for the cross-attention length

KINDS = ("key", "value")
PARTS = ("decoder", "encoder")  # self-attention, cross-attention


def past_name(layer: int, part: str, kind: str) -> str:
    """`past_key_values.{i}.decoder|encoder.key|value`: (batch_size, H, past length, D)."""
    return f"past_key_values.{layer}.{part}.{kind}"


def present_name(layer: int, part: str, kind: str) -> str:
    """`present.{i}.decoder|encoder.key|value`: (batch_size, H, total length, D)."""
    return f"present.{layer}.{part}.{kind}"


def prefix_initializer_name(layer: int, kind: str) -> str:
    """The folded prefix of decoder self-attention layer i: `prefix_decoder_{key|value}_{i}`, (1, H, P, D)."""
    return f"prefix_decoder_{kind}_{layer}"


def prefix_owners(layers) -> list[int]:
    """For each layer, the first layer with an identical (key, value) prefix: its initializers hold it.

    PEFT 0.21 builds the seq2seq cache from its (P, 2L, H, D) prefix concatenated with itself and cut
    into groups of four (self key, self value, cross key, cross value), so decoder layer i gets the
    prefix PEFT trained as layer 2i mod L; with an even L, layers i and i + L/2 get the same one
    (measured for L = 2, 3, 4, 6; the cross groups are then discarded by get_prompt).
    """
    import torch

    owners = []
    for i, (key, value) in enumerate(layers):
        owners.append(next(j for j in range(i + 1)
                           if torch.equal(layers[j][0], key) and torch.equal(layers[j][1], value)))
    return owners


def past_names(num_layers: int, part: str) -> list[str]:
    return [past_name(i, part, kind) for i in range(num_layers) for kind in KINDS]


def present_names(num_layers: int, part: str) -> list[str]:
    return [present_name(i, part, kind) for i in range(num_layers) for kind in KINDS]


def encoder_input_names() -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK]


def encoder_output_names() -> list[str]:
    return [LAST_HIDDEN_STATE]


def decoder_input_names(num_layers: int) -> list[str]:
    return [DECODER_INPUT_IDS, ENCODER_ATTENTION_MASK, ENCODER_HIDDEN_STATES,
            *past_names(num_layers, "decoder"), *past_names(num_layers, "encoder")]


def decoder_output_names(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers, "decoder"), *present_names(num_layers, "encoder")]
