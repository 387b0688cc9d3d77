"""Graph runners: one ONNX Runtime session (two for seq2seq) plus what the I/O contract says about it.

`OnnxDecoder` runs a decoder-only graph of either layout. Its `first_past` is the one place where a
cache-layout prefix becomes the first past (the folded layout's first past is empty); `run` shows
both layouts through the folded contract (a user-only cache), which is what validation compares.
`OnnxSeq2Seq` runs an encoder + decoder pair. Nothing here imports torch.
"""
from __future__ import annotations

import numpy as np

from .. import contract, contract_seq2seq
from ..errors import InputError, MismatchError, RuntimeSetupError
from .providers import ORT_TO_NUMPY, cache_geometry



def pad_batch(rows, pad_token_id: int, side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (B, S_max) int64 ids and mask. Left padding puts every row's last token at the
    end (decoders); right padding keeps every row's first token first (encoders)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, columns] = row
        mask[i, columns] = 1
    return ids, mask


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Left-padding-aware positions, 0 for the first real token: cumsum(mask) - 1, clipped at 0."""
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int64)


class OnnxDecoder:
    """A decoder-only session: layers, KV shape and dtype from its inputs; `prefix` for the cache layout.

    `prefix` (L, 2, H_kv, P, D) is the cache layout's default first past; None for a folded graph,
    whose prefix is inside it. `adapter` (adapters.ActiveAdapter) replaces a swappable folded graph's
    prefix in every run (adapters.activate sets it after checking it fits).
    """

    def __init__(self, session, prefix: np.ndarray | None = None, adapter=None):
        self.session = session
        self.adapter = adapter
        inputs = {i.name: i for i in session.get_inputs()}
        missing = [n for n in (contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS) if n not in inputs]
        if missing:
            raise RuntimeSetupError(f"the graph lacks inputs {missing}; it was not exported by prefix-export "
                                    f"(inputs: {sorted(inputs)}).")
        self.past_names, self.num_layers, self.num_kv_heads, self.head_dim, self.kv_dtype = cache_geometry(inputs)
        self.output_names = [o.name for o in session.get_outputs()]
        self.present_names = self.output_names[1:]
        logits = session.get_outputs()[0]
        self.logits_dtype = ORT_TO_NUMPY.get(logits.type, np.float32)
        self.vocab_size = logits.shape[2] if isinstance(logits.shape[2], int) else None
        self.prefix = None if prefix is None else self.check_prefix(prefix, "the export's prefix")

    @property
    def layout(self) -> str:
        return "folded" if self.prefix is None else "cache"

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past, (B, H_kv, 0, D) per tensor: the folded layout's first step."""
        return [np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def check_prefix(self, prefix: np.ndarray, label: str) -> np.ndarray:
        want = (self.num_layers, 2, self.num_kv_heads, self.head_dim)
        got = (prefix.shape[0], prefix.shape[1], prefix.shape[2], prefix.shape[4])
        if got != want:
            raise MismatchError(f"{label} has shape {tuple(prefix.shape)} (L, 2, H_kv, P, D); this graph needs "
                                f"L={want[0]}, H_kv={want[2]}, D={want[3]}. It was made for another base model.")
        return prefix.astype(self.kv_dtype, copy=False)

    def first_past(self, batch: int, prefixes: list[np.ndarray] | None = None):
        """The first step's cache: (past list of (B, H_kv, P_max, D), prefix mask (B, P_max), per-row P (B,)).

        Folded: empty (the prefix is inside the graph). Cache layout: the prefix, one for all rows or
        one per row; rows with a shorter prefix are padded on the left and masked out.
        """
        if self.prefix is None:
            if prefixes:
                raise InputError("per-row prefixes need an export with --layout cache; this one is folded (its "
                                 "prefix is inside the graph).")
            return self.empty_past(batch), np.zeros((batch, 0), np.int64), np.zeros(batch, np.int64)
        prefixes = [self.check_prefix(p, f"prefix {i}") for i, p in enumerate(prefixes or [self.prefix])]
        if len(prefixes) not in (1, batch):
            raise InputError(f"{len(prefixes)} prefixes for a batch of {batch} rows; give one prefix for all rows "
                             "or one per row.")
        lengths = np.array([p.shape[3] for p in prefixes] * (batch if len(prefixes) == 1 else 1), np.int64)
        P_max = int(lengths.max())
        if len(prefixes) == 1:
            # one prefix for every row: (1, H_kv, P, D) broadcast, made contiguous once
            past = [np.ascontiguousarray(np.broadcast_to(prefixes[0][i, j][None], (batch, *prefixes[0].shape[2:])))
                    for i in range(self.num_layers) for j in (0, 1)]
        else:
            past = [np.zeros((batch, self.num_kv_heads, P_max, self.head_dim), self.kv_dtype)
                    for _ in range(2 * self.num_layers)]
            for row, prefix in enumerate(prefixes):
                P = prefix.shape[3]
                for i in range(self.num_layers):
                    for j in (0, 1):
                        past[2 * i + j][row, :, P_max - P:] = prefix[i, j]
        prefix_mask = (np.arange(P_max)[None, :] >= (P_max - lengths)[:, None]).astype(np.int64)
        return past, prefix_mask, lengths

    def run_graph(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  past: list[np.ndarray]) -> list[np.ndarray]:
        """One session run with the graph's own feeds: [logits, *presents]."""
        feeds = {contract.INPUT_IDS: input_ids.astype(np.int64, copy=False),
                 contract.ATTENTION_MASK: attention_mask.astype(np.int64, copy=False),
                 contract.POSITION_IDS: position_ids.astype(np.int64, copy=False)}
        feeds.update(zip(self.past_names, past))
        return self.session.run(self.output_names, feeds, self.run_options)

    @property
    def run_options(self):
        """ONNX Runtime RunOptions for every run: the active adapter's, else None."""
        return None if self.adapter is None else self.adapter.run_options

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step in the folded contract, whatever the layout: the user's cache in and out.

        A cache-layout graph is given its prefix before the user's past (B, H_kv, P + past, D), P ones
        before the mask and positions + P; the prefix's P positions are dropped from its presents. It
        concatenates per step, so it is for checking; the decode loop feeds the prefix once.
        """
        if self.prefix is None:
            outputs = self.run_graph(input_ids, attention_mask, position_ids, past)
            return outputs[0], outputs[1:]
        batch = input_ids.shape[0]
        prefix_past, prefix_mask, lengths = self.first_past(batch)
        P = prefix_mask.shape[1]
        full_past = [np.concatenate([prefix, user], axis=2) for prefix, user in zip(prefix_past, past)]
        mask = np.concatenate([prefix_mask, attention_mask.astype(np.int64)], axis=1)
        outputs = self.run_graph(input_ids, mask, position_ids.astype(np.int64) + lengths[:, None], full_past)
        return outputs[0], [present[:, :, P:] for present in outputs[1:]]


class OnnxSeq2Seq:
    """The encoder and decoder sessions of a seq2seq export plus what the contract says about them."""

    def __init__(self, encoder_session, decoder_session):
        self.encoder = encoder_session
        self.decoder = decoder_session
        inputs = {i.name: i for i in decoder_session.get_inputs()}
        needed = [contract_seq2seq.DECODER_INPUT_IDS, contract_seq2seq.ENCODER_ATTENTION_MASK,
                  contract_seq2seq.ENCODER_HIDDEN_STATES]
        missing = [n for n in needed if n not in inputs]
        if missing:
            raise RuntimeSetupError(f"the decoder graph lacks inputs {missing}; it was not exported by prefix-export "
                                    f"as an encoder-decoder (inputs: {sorted(inputs)}).")
        self.decoder_input_names = [i.name for i in decoder_session.get_inputs()]
        self.self_past_names = [n for n in self.decoder_input_names if n.endswith((".decoder.key", ".decoder.value"))]
        self.cross_past_names = [n for n in self.decoder_input_names if n.endswith((".encoder.key", ".encoder.value"))]
        self.num_layers = len(self.self_past_names) // 2
        first = inputs[contract_seq2seq.past_name(0, "decoder", "key")]
        self.num_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.hidden_size = int(inputs[contract_seq2seq.ENCODER_HIDDEN_STATES].shape[2])
        self.kv_dtype = ORT_TO_NUMPY[first.type]
        self.hidden_dtype = ORT_TO_NUMPY[inputs[contract_seq2seq.ENCODER_HIDDEN_STATES].type]
        self.encoder_output_names = [o.name for o in encoder_session.get_outputs()]
        self.decoder_output_names = [o.name for o in decoder_session.get_outputs()]
        logits = decoder_session.get_outputs()[0]
        self.vocab_size = logits.shape[2] if isinstance(logits.shape[2], int) else None

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, S_enc) -> last_hidden_state (B, S_enc, d_model)."""
        return self.encoder.run([contract_seq2seq.LAST_HIDDEN_STATE],
                                {contract_seq2seq.INPUT_IDS: input_ids.astype(np.int64, copy=False),
                                 contract_seq2seq.ATTENTION_MASK: attention_mask.astype(np.int64, copy=False)})[0]

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
        feeds = {contract_seq2seq.DECODER_INPUT_IDS: input_ids.astype(np.int64, copy=False),
                 contract_seq2seq.ENCODER_ATTENTION_MASK: encoder_attention_mask.astype(np.int64, copy=False),
                 contract_seq2seq.ENCODER_HIDDEN_STATES: encoder_hidden_states}
        feeds.update(zip(self.self_past_names + self.cross_past_names, past))
        outputs = self.decoder.run(self.decoder_output_names, feeds)
        return outputs[0], outputs[1:]


def make_decoder(session, prefix: np.ndarray | None = None, adapter=None):
    """The runner for `session`'s graph: a shared-KV-buffer graph's (compile --kv-buffer shared), else OnnxDecoder."""
    if contract.is_shared_buffer_graph(i.name for i in session.get_inputs()):
        from .shared_buffer import SharedBufferDecoder

        return SharedBufferDecoder(session, prefix, adapter)
    return OnnxDecoder(session, prefix, adapter)
