"""The generation loop: prompt feeds for either layout, the KV cache between steps, streaming tokens.

Two ways to carry the cache from one step to the next:
  * host (CPU default): `session.run` returns the presents as numpy arrays and they go straight back
    in as the next step's pasts; nothing is concatenated or copied by us.
  * bound (CUDA/TensorRT default, also runs on the CPU): IO binding onto two buffers per cache
    tensor, each allocated once on the device for the maximum length B * H_kv * T_max * D. Step t
    reads its past (B, H_kv, t, D) from one buffer and writes its present (B, H_kv, t + s, D) into the
    other, then they swap; the cache never passes through host memory. Only the ids, the mask and
    the positions go up and the logits come down each step.

Per step the loop does O(B) numpy work besides the run: the mask is a preallocated (B, T_max) array
sliced to the current length, positions are a counter, new tokens go into a preallocated (B, N).

Layouts: folded graphs start from an empty past; cache-layout graphs start from the prefix, one per
row if asked (rows with a shorter prefix are padded on the left and masked out), with the mask
starting with the prefix's ones and the positions offset by each row's P.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import contract
from .errors import InputError, MismatchError
from .runtime import OnnxDecoder, positions_from_mask
from .sampling import Sampler, SamplingConfig

log = logging.getLogger(__name__)

PREFIX_KV_FILE = "prefix_kv.safetensors"  # = prefix_kv.PREFIX_KV_FILE, without importing torch
PREFIX_KV_TENSOR = "prefix_kv"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # a row stops after emitting one of these
    pad_token_id: int = 0  # what finished rows emit, and what left padding holds

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}.")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.seed)


@dataclasses.dataclass
class Step:
    index: int
    tokens: np.ndarray  # (B,) chosen at this step; pad_token_id for rows that had already stopped
    finished: np.ndarray  # (B,) bool, after this step


def load_prefix_file(path: str | Path) -> np.ndarray:
    """A prefix_kv.safetensors (or an export folder holding one) -> (L, 2, H_kv, P, D) numpy."""
    from safetensors.numpy import load_file

    path = Path(path)
    if path.is_dir():
        path = path / PREFIX_KV_FILE
    if not path.is_file():
        raise InputError(f"prefix file {path} does not exist; expected a {PREFIX_KV_FILE} written by prefix-export "
                         "(or an export folder holding one).")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise InputError(f"{path} is not a {PREFIX_KV_FILE} written by prefix-export ({exc}).") from exc
    if PREFIX_KV_TENSOR not in tensors or tensors[PREFIX_KV_TENSOR].ndim != 5:
        raise InputError(f"{path} holds {sorted(tensors)}; expected one tensor {PREFIX_KV_TENSOR!r} of shape "
                         "(L, 2, H_kv, P, D).")
    return tensors[PREFIX_KV_TENSOR]


class Engine:
    """A decoder session plus its layout; builds the first step's feeds and runs the loop."""

    def __init__(self, session, *, layout: str | None = None, prefix: np.ndarray | None = None,
                 device: str = "cpu", device_id: int = 0, io_binding: bool | None = None):
        self.decoder = OnnxDecoder(session)
        self.session = session
        metadata = session.get_modelmeta().custom_metadata_map
        self.layout = layout or metadata.get(contract.META_LAYOUT, "folded")
        self.prefix = prefix  # default prefix (L, 2, H_kv, P, D) for the cache layout
        self.device, self.device_id = device, device_id
        self.io_binding = (device != "cpu") if io_binding is None else io_binding
        self.present_names = [contract.present_name(i, kind) for i in range(self.decoder.num_layers)
                              for kind in ("key", "value")]
        self.past_names = [contract.past_name(i, kind) for i in range(self.decoder.num_layers)
                           for kind in ("key", "value")]
        self.output_names = [contract.LOGITS, *self.present_names]
        outputs = {o.name: o for o in session.get_outputs()}
        self.logits_dtype = {"tensor(float16)": np.float16}.get(outputs[contract.LOGITS].type, np.float32)

    # ---- the first step ------------------------------------------------------------------------

    def check_prefix(self, prefix: np.ndarray, label: str) -> np.ndarray:
        d = self.decoder
        want = (d.num_layers, 2, d.num_kv_heads, d.head_dim)
        got = (prefix.shape[0], prefix.shape[1], prefix.shape[2], prefix.shape[4])
        if got != want:
            raise MismatchError(f"{label} has shape {tuple(prefix.shape)} (L, 2, H_kv, P, D); this graph needs "
                                f"L={want[0]}, H_kv={want[2]}, D={want[3]}. It was made for another base model.")
        return prefix.astype(d.kv_dtype, copy=False)

    def initial_state(self, batch: int, prefixes: list[np.ndarray] | None):
        """(past list of (B, H_kv, P_max, D), prefix mask (B, P_max), per-row P (B,))."""
        d = self.decoder
        if self.layout != "cache":
            if prefixes:
                raise InputError("per-row prefixes need an export with --layout cache; this one is folded (its "
                                 "prefix is inside the graph).")
            return d.empty_past(batch), np.zeros((batch, 0), np.int64), np.zeros(batch, np.int64)
        if not prefixes:
            if self.prefix is None:
                raise InputError(f"this cache-layout graph needs its prefix ({PREFIX_KV_FILE}); none was given.")
            prefixes = [self.prefix]
        if len(prefixes) not in (1, batch):
            raise InputError(f"{len(prefixes)} prefixes for a batch of {batch} rows; give one prefix for all rows "
                             "or one per row.")
        prefixes = [self.check_prefix(p, f"prefix {i}") for i, p in enumerate(prefixes)]
        lengths = np.array([p.shape[3] for p in prefixes] * (batch if len(prefixes) == 1 else 1), np.int64)
        P_max = int(lengths.max())
        if len(prefixes) == 1:
            # one prefix for every row: (1, H_kv, P, D) broadcast, made contiguous once
            past = [np.ascontiguousarray(np.broadcast_to(prefixes[0][i, j][None], (batch, *prefixes[0].shape[2:])))
                    for i in range(d.num_layers) for j in (0, 1)]
        else:
            past = [np.zeros((batch, d.num_kv_heads, P_max, d.head_dim), d.kv_dtype)
                    for _ in range(2 * d.num_layers)]
            for row, prefix in enumerate(prefixes):
                P = prefix.shape[3]
                for i in range(d.num_layers):
                    for j in (0, 1):
                        past[2 * i + j][row, :, P_max - P:] = prefix[i, j]  # shorter prefixes: padded left
        prefix_mask = (np.arange(P_max)[None, :] >= (P_max - lengths)[:, None]).astype(np.int64)
        return past, prefix_mask, lengths

    # ---- the loop ------------------------------------------------------------------------------

    def stream(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               config: GenerationConfig = GenerationConfig(), prefixes: list[np.ndarray] | None = None,
               out: np.ndarray | None = None) -> Iterator[Step]:
        """Yield one Step per new token; `out` (B, max_new_tokens), if given, receives the tokens."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = attention_mask.astype(np.int64, copy=False)
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {attention_mask.shape}, input_ids {input_ids.shape}.")
        if (attention_mask.sum(1) == 0).any():
            raise InputError("a row of the batch has no tokens (its mask is all zeros).")
        past, prefix_mask, prefix_lengths = self.initial_state(batch, prefixes)
        P_max = prefix_mask.shape[1]
        steps = config.max_new_tokens
        start = P_max + seq
        # (B, T_max): prefix ones | the user's mask | ones for every token still to come
        mask = np.ones((batch, start + steps - 1), np.int64)
        mask[:, :P_max] = prefix_mask
        mask[:, P_max:start] = attention_mask
        positions = positions_from_mask(attention_mask) + prefix_lengths[:, None]  # (B, S)
        next_positions = positions[:, -1:] + 1  # (B, 1)
        cache = (BoundKV if self.io_binding else HostKV)(self, past, batch, start + steps - 1)
        sampler = Sampler(config.sampling)
        stops = np.array(sorted(set(config.stop_token_ids)), np.int64)
        finished = np.zeros(batch, bool)
        if out is None:
            out = np.empty((batch, steps), np.int64)
        tokens, total = input_ids, start
        for index in range(steps):
            step_mask = mask[:, :total] if batch == 1 else np.ascontiguousarray(mask[:, :total])
            logits = cache.step(tokens, step_mask, positions)
            chosen = sampler(logits[:, -1, :]).astype(np.int64, copy=False)
            if stops.size:
                chosen[finished] = config.pad_token_id
                finished |= np.isin(chosen, stops)
            out[:, index] = chosen
            yield Step(index, chosen, finished)
            if stops.size and finished.all():
                return
            tokens = chosen[:, None]
            positions = next_positions
            next_positions = next_positions + 1
            total += 1

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 config: GenerationConfig = GenerationConfig(), prefixes: list[np.ndarray] | None = None,
                 on_step: Callable[[Step], None] | None = None) -> np.ndarray:
        """New tokens (B, n), n <= max_new_tokens (fewer when every row stopped early)."""
        out = np.empty((input_ids.shape[0], config.max_new_tokens), np.int64)
        count = 0
        for step in self.stream(input_ids, attention_mask, config, prefixes, out=out):
            count = step.index + 1
            if on_step is not None:
                on_step(step)
        return out[:, :count]


class HostKV:
    """The cache as numpy arrays: each step's presents are the next step's pasts, by reference."""

    def __init__(self, engine: Engine, past: list[np.ndarray], batch: int, max_total: int):
        self.run = engine.session.run
        self.output_names = engine.output_names
        self.past_names = engine.past_names
        self.feeds = dict(zip(self.past_names, past))

    def step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        feeds = self.feeds
        feeds[contract.INPUT_IDS] = input_ids
        feeds[contract.ATTENTION_MASK] = attention_mask
        feeds[contract.POSITION_IDS] = position_ids
        outputs = self.run(self.output_names, feeds)
        feeds.update(zip(self.past_names, outputs[1:]))
        return outputs[0]


class BoundKV:
    """The cache in two device buffers per tensor, allocated once for `max_total`; IO binding swaps them."""

    def __init__(self, engine: Engine, past: list[np.ndarray], batch: int, max_total: int):
        import onnxruntime as ort

        d = engine.decoder
        self.engine = engine
        self.session = engine.session
        self.device, self.device_id = engine.device, engine.device_id
        self.batch, self.heads, self.head_dim = batch, d.num_kv_heads, d.head_dim
        self.kv_dtype = d.kv_dtype
        self.max_total = max_total
        capacity = batch * d.num_kv_heads * max_total * d.head_dim
        # two flat buffers per cache tensor, (B * H_kv * T_max * D,), on the device, for the whole generation
        self.buffers = [[ort.OrtValue.ortvalue_from_shape_and_type([capacity], d.kv_dtype, self.device,
                                                                   self.device_id) for _ in engine.past_names]
                        for _ in range(2)]
        self.past_length = past[0].shape[2]
        # the first past (the prefix, or nothing) goes up once
        self.initial = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(p), self.device, self.device_id)
                        for p in past] if self.past_length else None
        self.current = 0  # which buffer holds the past
        self.first = True
        self.binding = self.session.io_binding()
        self.logits = {}  # sequence length -> preallocated host (B, s, V)
        self.vocab = int(self.session.get_outputs()[0].shape[2])

    def _logits_buffer(self, seq: int) -> np.ndarray:
        buffer = self.logits.get(seq)
        if buffer is None:
            buffer = self.logits[seq] = np.empty((self.batch, seq, self.vocab), self.engine.logits_dtype)
        return buffer

    def step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        binding, engine = self.binding, self.engine
        seq = input_ids.shape[1]
        total = self.past_length + seq
        if total > self.max_total:
            raise InputError(f"the cache holds {self.max_total} positions; step needs {total}.")
        binding.bind_cpu_input(contract.INPUT_IDS, input_ids)
        binding.bind_cpu_input(contract.ATTENTION_MASK, attention_mask)
        binding.bind_cpu_input(contract.POSITION_IDS, position_ids)
        source, target = self.buffers[self.current], self.buffers[1 - self.current]
        past_shape = [self.batch, self.heads, self.past_length, self.head_dim]
        present_shape = [self.batch, self.heads, total, self.head_dim]
        for k, (past_name, present_name) in enumerate(zip(engine.past_names, engine.present_names)):
            if self.first and self.initial is not None:
                binding.bind_ortvalue_input(past_name, self.initial[k])
            else:
                binding.bind_input(past_name, self.device, self.device_id, self.kv_dtype, past_shape,
                                   source[k].data_ptr())
            binding.bind_output(present_name, self.device, self.device_id, self.kv_dtype, present_shape,
                                target[k].data_ptr())
        logits = self._logits_buffer(seq)
        binding.bind_output(contract.LOGITS, "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        self.current = 1 - self.current
        self.past_length = total
        self.first = False
        self.initial = None
        return logits
