"""The decode loop: one loop for generation, validation, bench and the quantization agreement.

`decode(stepper, config)` owns what every generation shares: the next-token choice (greedy or sampled),
stop tokens, rows that already finished, the output buffer, streaming one `Step` per token. A stepper
owns the model side: `first_tokens` (B, S) and `step(tokens) -> logits (B, s, V)`. Steppers here:

  DecoderStepper  a decoder-only graph (either layout): the mask is a preallocated (B, T_max) array
                  sliced to the current length, positions a counter; the cache is carried
                    * on the host (CPU default, `HostKV`): the presents go straight back in as pasts;
                    * bound (CUDA/TensorRT default, `BoundKV`): two device buffers per cache tensor,
                      allocated once for B * H_kv * T_max * D and swapped by IO binding, so the cache
                      never passes through host memory.
  Seq2SeqStepper  the encoder once, then the decoder with its self- and cross-attention cache.

validate/ adds PEFT's reference (the whole sequence recomputed each step), bench/ eager PyTorch.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterator

import numpy as np

from .. import contract
from ..errors import InputError
from .decoder import OnnxDecoder, OnnxSeq2Seq, positions_from_mask
from .sampling import Sampler, SamplingConfig

log = logging.getLogger(__name__)


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

    @classmethod
    def greedy(cls, max_new_tokens: int, eos_token_id: int | None = None) -> "GenerationConfig":
        """Greedy; with `eos_token_id`, rows stop there and keep emitting it."""
        if eos_token_id is None:
            return cls(max_new_tokens=max_new_tokens)
        return cls(max_new_tokens=max_new_tokens, stop_token_ids=(eos_token_id,), pad_token_id=eos_token_id)


@dataclasses.dataclass
class Step:
    index: int
    tokens: np.ndarray  # (B,) chosen at this step; pad_token_id for rows that had already stopped
    finished: np.ndarray  # (B,) bool, after this step


def decode(stepper, config: GenerationConfig, out: np.ndarray | None = None) -> Iterator[Step]:
    """Yield one Step per new token; `out` (B, max_new_tokens), if given, receives the tokens."""
    tokens = stepper.first_tokens
    batch = tokens.shape[0]
    sampler = Sampler(config.sampling)
    stops = np.array(sorted(set(config.stop_token_ids)), np.int64)
    finished = np.zeros(batch, bool)
    # greedy on a graph that has its own argmax (shared-buffer graphs): only token ids leave the device
    device_greedy = config.temperature == 0 and hasattr(stepper, "step_greedy")
    for index in range(config.max_new_tokens):
        if device_greedy:
            chosen = stepper.step_greedy(tokens)  # (B,)
        else:
            logits = stepper.step(tokens)  # (B, s, V)
            chosen = sampler(logits[:, -1, :]).astype(np.int64, copy=False)
        if stops.size:
            chosen[finished] = config.pad_token_id
            finished |= np.isin(chosen, stops)
        if out is not None:
            out[:, index] = chosen
        yield Step(index, chosen, finished)
        if stops.size and finished.all():
            return
        tokens = chosen[:, None]


def generate(stepper, config: GenerationConfig, on_step: Callable[[Step], None] | None = None) -> np.ndarray:
    """New tokens (B, n), n <= max_new_tokens (fewer when every row stopped early)."""
    out = np.empty((stepper.first_tokens.shape[0], config.max_new_tokens), np.int64)
    count = 0
    for step in decode(stepper, config, out=out):
        count = step.index + 1
        if on_step is not None:
            on_step(step)
    return out[:, :count]


def greedy_generate(decoder: OnnxDecoder, input_ids: np.ndarray, attention_mask: np.ndarray | None,
                    max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
    """Greedy tokens (B, <= max_new_tokens) of a decoder graph, host cache (what validation runs)."""
    stepper = make_stepper(decoder, input_ids, attention_mask, max_new_tokens)
    return generate(stepper, GenerationConfig.greedy(max_new_tokens, eos_token_id))


# ---- decoder-only ----------------------------------------------------------------------------------


def make_stepper(decoder, input_ids: np.ndarray, attention_mask: np.ndarray | None, max_new_tokens: int,
                 prefixes: list[np.ndarray] | None = None, io_binding: bool = False, device: str = "cpu",
                 device_id: int = 0, cuda_graph: bool = False):
    """The stepper for `decoder`: a shared-KV-buffer graph's own (always bound, fixed shapes), else
    DecoderStepper with the cache on the host or bound."""
    if getattr(decoder, "shared_buffer", False):
        from .shared_buffer import SharedBufferStepper

        return SharedBufferStepper(decoder, input_ids, attention_mask, max_new_tokens, prefixes, device, device_id,
                                   cuda_graph)
    return DecoderStepper(decoder, input_ids, attention_mask, max_new_tokens, prefixes, io_binding, device,
                          device_id)


class DecoderStepper:
    """A decoder graph's side of the loop: the mask, positions and cache between steps.

    The first past comes from `decoder.first_past` (empty, or the cache layout's prefix, per row if
    `prefixes`); the mask starts with the prefix's ones and positions are offset by each row's P.
    """

    def __init__(self, decoder: OnnxDecoder, input_ids: np.ndarray, attention_mask: np.ndarray | None,
                 max_new_tokens: int, prefixes: list[np.ndarray] | None = None, io_binding: bool = False,
                 device: str = "cpu", device_id: int = 0):
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        attention_mask = np.ones_like(input_ids) if attention_mask is None else attention_mask.astype(np.int64)
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {attention_mask.shape}, input_ids {input_ids.shape}.")
        if (attention_mask.sum(1) == 0).any():
            raise InputError("a row of the batch has no tokens (its mask is all zeros).")
        past, prefix_mask, prefix_lengths = decoder.first_past(batch, prefixes)
        P_max = prefix_mask.shape[1]
        self.total = P_max + seq
        max_total = self.total + max_new_tokens - 1
        # (B, T_max): prefix ones | the user's mask | ones for every token still to come
        self.mask = np.ones((batch, max_total), np.int64)
        self.mask[:, :P_max] = prefix_mask
        self.mask[:, P_max:self.total] = attention_mask
        self.positions = positions_from_mask(attention_mask) + prefix_lengths[:, None]  # (B, S)
        self.next_positions = self.positions[:, -1:] + 1  # (B, 1)
        self.cache = (BoundKV if io_binding else HostKV)(decoder, past, batch, max_total, device, device_id)
        self.first_tokens = input_ids

    def step(self, tokens: np.ndarray) -> np.ndarray:
        batch = tokens.shape[0]
        if self.cache.steps:  # a decode step: one new token per row (the first step is the prompt)
            self.positions = self.next_positions
            self.next_positions = self.next_positions + 1
            self.total += 1
        mask = self.mask[:, :self.total] if batch == 1 else np.ascontiguousarray(self.mask[:, :self.total])
        return self.cache.step(tokens, mask, self.positions)


class HostKV:
    """The cache as numpy arrays: each step's presents are the next step's pasts, by reference."""

    def __init__(self, decoder: OnnxDecoder, past: list[np.ndarray], batch: int, max_total: int,
                 device: str = "cpu", device_id: int = 0):
        self.decoder = decoder
        self.past = past
        self.steps = 0

    def step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        outputs = self.decoder.run_graph(input_ids, attention_mask, position_ids, self.past)
        self.past = outputs[1:]
        self.steps += 1
        return outputs[0]


class BoundKV:
    """The cache in two device buffers per tensor, allocated once for `max_total`; IO binding swaps them."""

    def __init__(self, decoder: OnnxDecoder, past: list[np.ndarray], batch: int, max_total: int,
                 device: str = "cpu", device_id: int = 0):
        import onnxruntime as ort

        self.decoder, self.session = decoder, decoder.session
        self.device, self.device_id = device, device_id
        self.batch, self.heads, self.head_dim = batch, decoder.num_kv_heads, decoder.head_dim
        self.kv_dtype = decoder.kv_dtype
        self.max_total = max_total
        capacity = batch * decoder.num_kv_heads * max_total * decoder.head_dim
        # two flat buffers per cache tensor, (B * H_kv * T_max * D,), on the device, for the whole generation
        self.buffers = [[ort.OrtValue.ortvalue_from_shape_and_type([capacity], decoder.kv_dtype, device, device_id)
                         for _ in decoder.past_names] for _ in range(2)]
        self.past_length = past[0].shape[2]
        # the first past (the prefix, or nothing) goes up once
        self.initial = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(p), device, device_id)
                        for p in past] if self.past_length else None
        self.current = 0  # which buffer holds the past
        self.steps = 0
        self.binding = self.session.io_binding()
        self.logits = {}  # sequence length -> preallocated host (B, s, V)
        self.vocab = int(self.session.get_outputs()[0].shape[2])

    def _logits_buffer(self, seq: int) -> np.ndarray:
        buffer = self.logits.get(seq)
        if buffer is None:
            buffer = self.logits[seq] = np.empty((self.batch, seq, self.vocab), self.decoder.logits_dtype)
        return buffer

    def step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        binding, decoder = self.binding, self.decoder
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
        for k, (past_name, present_name) in enumerate(zip(decoder.past_names, decoder.present_names)):
            if self.steps == 0 and self.initial is not None:
                binding.bind_ortvalue_input(past_name, self.initial[k])
            else:
                binding.bind_input(past_name, self.device, self.device_id, self.kv_dtype, past_shape,
                                   source[k].data_ptr())
            binding.bind_output(present_name, self.device, self.device_id, self.kv_dtype, present_shape,
                                target[k].data_ptr())
        logits = self._logits_buffer(seq)
        binding.bind_output(contract.LOGITS, "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding, decoder.run_options)
        self.current = 1 - self.current
        self.past_length = total
        self.steps += 1
        self.initial = None
        return logits


class Engine:
    """A decoder graph and how its cache is carried (host or IO binding on `device`): generation runs."""

    def __init__(self, decoder: OnnxDecoder, device: str = "cpu", device_id: int = 0, io_binding: bool | None = None,
                 cuda_graph: bool = False):
        self.decoder = decoder
        self.device, self.device_id = device, device_id
        self.io_binding = (device != "cpu") if io_binding is None else io_binding
        self.cuda_graph = cuda_graph  # the session was made with enable_cuda_graph (shared-buffer graphs)

    def stepper(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, max_new_tokens: int,
                prefixes: list[np.ndarray] | None = None):
        return make_stepper(self.decoder, input_ids, attention_mask, max_new_tokens, prefixes, self.io_binding,
                            self.device, self.device_id, self.cuda_graph)

    def stream(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               config: GenerationConfig = GenerationConfig(), prefixes: list[np.ndarray] | None = None,
               out: np.ndarray | None = None) -> Iterator[Step]:
        return decode(self.stepper(input_ids, attention_mask, config.max_new_tokens, prefixes), config, out)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 config: GenerationConfig = GenerationConfig(), prefixes: list[np.ndarray] | None = None,
                 on_step: Callable[[Step], None] | None = None) -> np.ndarray:
        return generate(self.stepper(input_ids, attention_mask, config.max_new_tokens, prefixes), config, on_step)


# ---- encoder-decoder -------------------------------------------------------------------------------


class Seq2SeqStepper:
    """The encoder once, then decoder steps from `decoder_start_token_id`; cross-attention K/V come out of
    the first decoder step and are fed back unchanged. `input_ids`/`attention_mask` (B, S_enc), right-padded."""

    def __init__(self, model: OnnxSeq2Seq, input_ids: np.ndarray, attention_mask: np.ndarray,
                 decoder_start_token_id: int):
        batch = input_ids.shape[0]
        self.model = model
        self.attention_mask = attention_mask
        self.hidden = model.encode(input_ids, attention_mask)
        self.past = model.empty_past(batch)
        self.first_tokens = np.full((batch, 1), decoder_start_token_id, np.int64)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        logits, self.past = self.model.decode(tokens, self.attention_mask, self.hidden, self.past)
        self.hidden = self.model.no_new_encoder_states(tokens.shape[0])  # cross K/V are in `past` from now on
        return logits
