"""ONNX Runtime sessions and a generation loop that follows the graph's I/O contract.

The loop is what any runtime would do for the *plain base model*: positions counted from 0 over the
user's tokens (from the mask, so left padding works), the cache fed back as is. Nothing here knows
about the prefix, which is the point of the folded layout.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import contract
from .errors import RuntimeSetupError
from .providers import resolve_provider  # noqa: F401 - re-exported for callers of runtime.resolve_provider

log = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def graph_path(folder_or_graph: str | Path) -> Path:
    """The .onnx file of an export folder (or the path itself when it is a graph)."""
    path = Path(folder_or_graph)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if not path.is_dir():
        raise RuntimeSetupError(f"{path} does not exist; expected an export folder written by prefix-export.")
    graphs = sorted(path.glob("*.onnx"))
    if (path / GRAPH_NAME).is_file():
        return path / GRAPH_NAME
    if len(graphs) == 1:
        return graphs[0]
    raise RuntimeSetupError(f"{path} is not an export folder: expected one .onnx graph in it, found "
                            f"{[g.name for g in graphs] or 'none'}.")


def create_session(graph: str | Path, provider: str = "cpu", threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    full = resolve_provider(provider)
    providers = [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(graph), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise RuntimeSetupError(f"ONNX Runtime could not load {graph} on {full}: {exc}") from exc


class OnnxDecoder:
    """A session plus what the contract says about it: layers, KV shape and dtype."""

    def __init__(self, session):
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        missing = [n for n in (contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS) if n not in inputs]
        if missing:
            raise RuntimeSetupError(f"the graph lacks inputs {missing}; it was not exported by prefix-export "
                                    f"(inputs: {sorted(inputs)}).")
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.num_layers = len(self.past_names) // 2
        first = inputs[contract.past_name(0, "key")]
        self.num_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = _ORT_TO_NUMPY[first.type]
        self.output_names = [o.name for o in session.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past, (B, H_kv, 0, D) per tensor: the first step's cache."""
        return [np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {contract.INPUT_IDS: input_ids.astype(np.int64, copy=False),
                 contract.ATTENTION_MASK: attention_mask.astype(np.int64, copy=False),
                 contract.POSITION_IDS: position_ids.astype(np.int64, copy=False)}
        feeds.update(zip(self.past_names, past))
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]


class CacheLayoutDecoder:
    """A cache-layout graph seen through the folded contract (user-only cache), for validation.

    The cache-layout graph is the plain base decoder; this adapter prepends the prefix to every past,
    P ones to the mask and adds P to the positions, then drops the prefix's P positions from the
    presents, so validate.py's checks (written against the folded contract) apply unchanged. It
    concatenates per step, so it is for checking, not for speed (decoding.py feeds the prefix once).
    """

    def __init__(self, decoder: OnnxDecoder, prefix_kv: np.ndarray):
        # prefix_kv: (L, 2, H_kv, P, D), [:, 0] keys, [:, 1] values
        self.decoder = decoder
        self.prefix = [np.ascontiguousarray(prefix_kv[i, j]).astype(decoder.kv_dtype)[None]
                       for i in range(prefix_kv.shape[0]) for j in (0, 1)]  # each (1, H_kv, P, D)
        self.num_virtual_tokens = int(prefix_kv.shape[3])
        for name in ("session", "past_names", "num_layers", "num_kv_heads", "head_dim", "kv_dtype", "output_names"):
            setattr(self, name, getattr(decoder, name))

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return self.decoder.empty_past(batch)

    def run(self, input_ids, attention_mask, position_ids, past):
        batch, P = input_ids.shape[0], self.num_virtual_tokens
        full_past = [np.concatenate([np.broadcast_to(prefix, (batch, *prefix.shape[1:])), user], axis=2)
                     for prefix, user in zip(self.prefix, past)]
        mask = np.concatenate([np.ones((batch, P), np.int64), attention_mask.astype(np.int64)], axis=1)
        logits, presents = self.decoder.run(input_ids, mask, position_ids.astype(np.int64) + P, full_past)
        return logits, [present[:, :, P:] for present in presents]


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


def pick_greedy(logits: np.ndarray, finished: np.ndarray, eos_token_id: int | None) -> np.ndarray:
    """Argmax of the last position (B,); rows already finished keep emitting eos. Updates `finished`."""
    next_tokens = logits[:, -1, :].argmax(-1).astype(np.int64)
    if eos_token_id is not None:
        next_tokens = np.where(finished, eos_token_id, next_tokens)
        finished |= next_tokens == eos_token_id
    return next_tokens


def greedy_generate(decoder: OnnxDecoder, input_ids: np.ndarray, attention_mask: np.ndarray,
                    max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding with the KV cache; returns the new tokens (B, <= max_new_tokens)."""
    batch = input_ids.shape[0]
    mask = attention_mask.astype(np.int64)
    positions = positions_from_mask(mask)
    past = decoder.empty_past(batch)
    tokens = input_ids
    generated = []
    finished = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        logits, past = decoder.run(tokens, mask, positions, past)
        next_tokens = pick_greedy(logits, finished, eos_token_id)
        generated.append(next_tokens)
        if finished.all():
            break
        tokens = next_tokens[:, None]
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return np.stack(generated, axis=1)
