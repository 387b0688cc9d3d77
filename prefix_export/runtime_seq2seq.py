"""ONNX Runtime sessions for an encoder-decoder export, and its greedy loop (seq2seq_contract.py).

Like runtime.py, nothing here knows about the prefix: the loop is what a runtime does for the plain
base model. Cross-attention K/V come out of the first decoder step and are fed back unchanged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import seq2seq_contract as contract
from .errors import RuntimeSetupError
from .runtime import _ORT_TO_NUMPY, create_session


def is_seq2seq_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / contract.ENCODER_GRAPH).is_file() and (folder / contract.DECODER_GRAPH).is_file()


class OnnxSeq2Seq:
    """The encoder and decoder sessions plus what the contract says about them."""

    def __init__(self, encoder_session, decoder_session):
        self.encoder = encoder_session
        self.decoder = decoder_session
        inputs = {i.name: i for i in decoder_session.get_inputs()}
        needed = [contract.DECODER_INPUT_IDS, contract.ENCODER_ATTENTION_MASK, contract.ENCODER_HIDDEN_STATES]
        missing = [n for n in needed if n not in inputs]
        if missing:
            raise RuntimeSetupError(f"the decoder graph lacks inputs {missing}; it was not exported by prefix-export "
                                    f"as an encoder-decoder (inputs: {sorted(inputs)}).")
        self.decoder_input_names = [i.name for i in decoder_session.get_inputs()]
        self.self_past_names = [n for n in self.decoder_input_names if n.endswith((".decoder.key", ".decoder.value"))]
        self.cross_past_names = [n for n in self.decoder_input_names if n.endswith((".encoder.key", ".encoder.value"))]
        self.num_layers = len(self.self_past_names) // 2
        first = inputs[contract.past_name(0, "decoder", "key")]
        self.num_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.hidden_size = int(inputs[contract.ENCODER_HIDDEN_STATES].shape[2])
        self.kv_dtype = _ORT_TO_NUMPY[first.type]
        self.hidden_dtype = _ORT_TO_NUMPY[inputs[contract.ENCODER_HIDDEN_STATES].type]
        self.encoder_output_names = [o.name for o in encoder_session.get_outputs()]
        self.decoder_output_names = [o.name for o in decoder_session.get_outputs()]

    @classmethod
    def from_folder(cls, folder: str | Path, provider: str = "cpu", threads: int | None = None) -> "OnnxSeq2Seq":
        folder = Path(folder)
        if not is_seq2seq_folder(folder):
            raise RuntimeSetupError(f"{folder} is not an encoder-decoder export: expected {contract.ENCODER_GRAPH} "
                                    f"and {contract.DECODER_GRAPH} in it.")
        return cls(create_session(folder / contract.ENCODER_GRAPH, provider, threads),
                   create_session(folder / contract.DECODER_GRAPH, provider, threads))

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, S_enc) -> last_hidden_state (B, S_enc, d_model)."""
        return self.encoder.run([contract.LAST_HIDDEN_STATE],
                                {contract.INPUT_IDS: input_ids.astype(np.int64, copy=False),
                                 contract.ATTENTION_MASK: attention_mask.astype(np.int64, copy=False)})[0]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length self- and cross-attention past, (B, H, 0, D) each: the first step's."""
        return [np.zeros((batch, self.num_heads, 0, self.head_dim), self.kv_dtype)
                for _ in self.self_past_names + self.cross_past_names]

    def no_new_encoder_states(self, batch: int) -> np.ndarray:
        """(B, 0, d_model): what encoder_hidden_states is after the first step."""
        return np.zeros((batch, 0, self.hidden_size), self.hidden_dtype)

    def decode(self, input_ids: np.ndarray, encoder_attention_mask: np.ndarray, encoder_hidden_states: np.ndarray,
               past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder step; `past` and the returned presents are [self..., cross...] in contract order."""
        feeds = {contract.DECODER_INPUT_IDS: input_ids.astype(np.int64, copy=False),
                 contract.ENCODER_ATTENTION_MASK: encoder_attention_mask.astype(np.int64, copy=False),
                 contract.ENCODER_HIDDEN_STATES: encoder_hidden_states}
        feeds.update(zip(self.self_past_names + self.cross_past_names, past))
        outputs = self.decoder.run(self.decoder_output_names, feeds)
        return outputs[0], outputs[1:]


def generate_seq2seq(model: OnnxSeq2Seq, input_ids: np.ndarray, attention_mask: np.ndarray,
                     decoder_start_token_id: int, config, on_step=None) -> np.ndarray:
    """Encoder once, then decoder steps with the KV cache: greedy or sampled (`config`, a
    decoding.GenerationConfig); a row stops after a stop token and emits pad_token_id afterwards.
    `input_ids`/`attention_mask` (B, S_enc), right-padded. Returns the new tokens (B, <= max_new_tokens)."""
    from .decoding import Step
    from .sampling import Sampler

    batch = input_ids.shape[0]
    sampler = Sampler(config.sampling)
    stops = np.array(sorted(config.stop_token_ids), np.int64)
    hidden = model.encode(input_ids, attention_mask)
    past = model.empty_past(batch)
    tokens = np.full((batch, 1), decoder_start_token_id, np.int64)
    generated, finished = [], np.zeros(batch, dtype=bool)
    for index in range(config.max_new_tokens):
        logits, past = model.decode(tokens, attention_mask, hidden, past)
        hidden = model.no_new_encoder_states(batch)  # cross K/V are in `past` from now on
        next_tokens = np.where(finished, config.pad_token_id, sampler(logits[:, -1]).astype(np.int64))
        finished = finished | np.isin(next_tokens, stops)
        generated.append(next_tokens)
        if on_step is not None:
            on_step(Step(index, next_tokens, finished.copy()))
        if finished.all():
            break
        tokens = next_tokens[:, None]
    return np.stack(generated, axis=1)


def greedy_generate_seq2seq(model: OnnxSeq2Seq, input_ids: np.ndarray, attention_mask: np.ndarray,
                            decoder_start_token_id: int, max_new_tokens: int,
                            eos_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding with the KV cache; rows that emitted eos keep emitting it."""
    from .decoding import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens,
                              stop_token_ids=(eos_token_id,) if eos_token_id is not None else (),
                              pad_token_id=eos_token_id if eos_token_id is not None else 0)
    return generate_seq2seq(model, input_ids, attention_mask, decoder_start_token_id, config)
