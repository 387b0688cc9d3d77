"""Running a shared-KV-buffer graph (compile/kv_buffer.py): one (B, H_kv, T_max, D) buffer per cache
tensor, allocated once, bound as both past and present so ONNX Runtime writes each step's K/V in place.

  SharedBufferDecoder   what validation and agreement drive: `run` in the folded contract (the user's
                        cache in and out, left-padded rows), emulated row by row on fresh buffers. For
                        checking; it copies.
  SharedBufferStepper   the decode loop's side (runtime/loop.py): the prompt row by row (ONNX Runtime's
                        GroupQueryAttention takes S > 1 with a past for one row at a time), each row's
                        tokens at the start of its slice of the buffer, no padding; then every decode
                        step with the same shapes and addresses: (B, 1) ids and positions, seqlens_k
                        (B,), total_sequence_length = T_max, the buffers, logits (B, 1, V) and
                        greedy_token_ids (B, 1) in fixed device buffers. That is what CUDA graphs
                        need: with `cuda_graph`, decode steps run as ONNX Runtime's captured graph
                        (one gpu_graph_id per batch size and buffer length) and prompts uncaptured
                        (gpu_graph_id -1). The buffers are the decoder's (DecodeState), kept between
                        generations, so a replay sees the addresses it was captured with; one
                        generation at a time per decoder. Greedy decoding takes the graph's own
                        argmax, so only B token ids cross to the host per step.

Row layout in a buffer: [prefix (P) | prompt (L_b) | new tokens ...], seqlens_k[b] = tokens - 1.
"""
from __future__ import annotations

import json
import logging

import numpy as np

from .. import contract
from ..contract import GREEDY_TOKEN_IDS, META_KV_BUFFER, SEQLENS_K, TOTAL_SEQUENCE_LENGTH
from ..errors import InputError, MismatchError, RuntimeSetupError
from .providers import ORT_TO_NUMPY, cache_geometry

log = logging.getLogger(__name__)

_NO_CAPTURE = "-1"  # ONNX Runtime's gpu_graph_id for a run that is not captured


class SharedBufferDecoder:
    """A shared-buffer graph's session, its prefix (cache layout) and its shapes."""

    shared_buffer = True
    # `run` computes each row of a padded batch unpadded, as GroupQueryAttention does; with a sliding window
    # that is not what transformers gives the padded batch (its window counts the pad slots)
    runs_rows_alone = True

    def __init__(self, session, prefix: np.ndarray | None = None, adapter=None):
        if adapter is not None:
            raise InputError("a swappable-prefix adapter cannot run on a shared-KV-buffer graph; compile the "
                             "swappable export without --kv-buffer shared.")
        self.session = session
        self.adapter = None
        inputs = {i.name: i for i in session.get_inputs()}
        missing = [n for n in (contract.INPUT_IDS, contract.POSITION_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH)
                   if n not in inputs]
        if missing:
            raise RuntimeSetupError(f"the graph lacks inputs {missing}; it is not a shared-KV-buffer graph of "
                                    f"prefix-export (inputs: {sorted(inputs)}).")
        meta = session.get_modelmeta().custom_metadata_map
        info = json.loads(meta.get(META_KV_BUFFER, "{}"))
        self.graph_layout = info.get("layout", "cache")
        self.prefix_length = int(info.get("num_virtual_tokens", 0))
        self.past_names, self.num_layers, self.num_kv_heads, self.head_dim, self.kv_dtype = cache_geometry(inputs)
        self.graph_output_names = [o.name for o in session.get_outputs()]
        self.present_names = [n for n in self.graph_output_names if n.startswith("present.")]
        # what `run` returns (the folded contract), which validation checks by name
        self.output_names = [contract.LOGITS, *self.present_names]
        if GREEDY_TOKEN_IDS not in self.graph_output_names:
            raise RuntimeSetupError(f"the graph has no {GREEDY_TOKEN_IDS} output; it is not a shared-KV-buffer graph "
                                    "of prefix-export.")
        logits = next(o for o in session.get_outputs() if o.name == contract.LOGITS)
        self.logits_dtype = ORT_TO_NUMPY.get(logits.type, np.float32)
        self.vocab_size = logits.shape[2] if isinstance(logits.shape[2], int) else None
        if self.graph_layout == "cache" and prefix is None:
            self.prefix, self.prefix_length = None, 0  # the base model alone (bench's "base" rows)
        elif self.graph_layout == "cache":
            want = (self.num_layers, 2, self.num_kv_heads, self.head_dim)
            if (prefix.shape[0], prefix.shape[1], prefix.shape[2], prefix.shape[4]) != want:
                raise MismatchError(f"the prefix has shape {tuple(prefix.shape)} (L, 2, H_kv, P, D); this graph "
                                    f"needs L={want[0]}, H_kv={want[2]}, D={want[3]}. It was made for another base "
                                    "model.")
            self.prefix = prefix.astype(self.kv_dtype, copy=False)
            self.prefix_length = prefix.shape[3]
        else:
            self.prefix = None
        self._folded_prefix = None  # (L, 2, H_kv, P, D), read back from a first step (folded)
        self._states: dict[tuple, DecodeState] = {}

    def decode_state(self, batch: int, capacity: int, device: str, device_id: int) -> "DecodeState":
        """The decode state for this shape, made once and reused (its addresses are what a captured CUDA
        graph replays); one generation at a time uses it."""
        key = (batch, capacity, device, device_id)
        if key not in self._states:
            graph_id = 1 + len(self._states)  # gpu_graph_id: one captured graph per state
            self._states[key] = DecodeState(self, batch, capacity, device, device_id, graph_id)
        return self._states[key]

    @property
    def layout(self) -> str:
        return self.graph_layout

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def position_offset(self) -> int:
        """The graph's position_ids: the folded graph adds P itself, the cache layout's takes P + t."""
        return self.prefix_length if self.graph_layout == "cache" else 0

    def bind_prompt(self, binding, input_ids: np.ndarray, position_ids: np.ndarray, total: int) -> None:
        """One row's multi-token step, all but the KV buffers: ids and positions (1, S), seqlens_k = total - 1,
        total_sequence_length = total, logits and greedy ids left for ONNX Runtime to allocate."""
        binding.bind_cpu_input(contract.INPUT_IDS, np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input(contract.POSITION_IDS, np.ascontiguousarray(position_ids, np.int64))
        binding.bind_cpu_input(SEQLENS_K, np.array([total - 1], np.int32))
        binding.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(total, np.int32))
        binding.bind_output(contract.LOGITS)
        binding.bind_output(GREEDY_TOKEN_IDS)

    def run_row(self, input_ids: np.ndarray, position_ids: np.ndarray, buffers: list[np.ndarray],
                filled: int) -> np.ndarray:
        """One row (1, S) on host buffers (1, H_kv, T_max, D) holding `filled` tokens; written in place.
        Returns the logits (1, S, V)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        total = filled + input_ids.shape[1] + (self.prefix_length if filled == 0 and self.graph_layout == "folded"
                                               else 0)
        self.bind_prompt(binding, input_ids, position_ids, total)
        for name, present, buffer in zip(self.past_names, self.present_names, buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the numpy memory
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()  # logits, the first output bound

    def prefix_kv(self) -> np.ndarray:
        """(L, 2, H_kv, P, D): the cache layout's prefix, or what the folded graph writes on a first step."""
        if self.prefix is not None:
            return self.prefix
        if self._folded_prefix is None:
            P = self.prefix_length
            buffers = [np.zeros((1, self.num_kv_heads, P + 1, self.head_dim), self.kv_dtype) for _ in self.past_names]
            self.run_row(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64), buffers, 0)
            self._folded_prefix = np.stack([np.stack([buffers[2 * i][0, :, :P], buffers[2 * i + 1][0, :, :P]])
                                            for i in range(self.num_layers)])
        return self._folded_prefix

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step in the folded contract (user cache (B, H_kv, T, D) in and out, masked columns anywhere),
        row by row through fresh buffers; for validation. `position_ids` are the user's (from 0)."""
        batch, seq = input_ids.shape
        past_length = past[0].shape[2]
        P = self.prefix_length
        logits = None
        presents = [np.zeros((batch, self.num_kv_heads, past_length + seq, self.head_dim), self.kv_dtype)
                    for _ in self.past_names]
        mask = attention_mask.astype(bool)
        for row in range(batch):
            old, new = np.flatnonzero(mask[row, :past_length]), np.flatnonzero(mask[row, past_length:])
            # the folded graph writes its prefix itself when a row has nothing yet (its first step)
            filled = len(old) + P if len(old) or self.graph_layout == "cache" else 0
            capacity = P + len(old) + len(new)
            buffers = [np.zeros((1, self.num_kv_heads, capacity, self.head_dim), self.kv_dtype)
                       for _ in self.past_names]
            if filled and P:
                prefix = self.prefix_kv()
                for k, buffer in enumerate(buffers):
                    buffer[0, :, :P] = prefix[k // 2, k % 2]
            for k, buffer in enumerate(buffers):  # the row's own past after the prefix
                buffer[0, :, P:P + len(old)] = past[k][row][:, old]
            if len(new) == 0:
                continue
            row_logits = self.run_row(input_ids[row:row + 1, new], position_ids[row:row + 1, new] +
                                      self.position_offset(), buffers, filled)
            if logits is None:
                logits = np.zeros((batch, seq, row_logits.shape[2]), row_logits.dtype)
            logits[row, new] = row_logits[0]
            columns = np.concatenate([old, past_length + new])
            for k, buffer in enumerate(buffers):
                presents[k][row][:, columns] = buffer[0, :, P:P + len(columns)]
        return logits, presents


CAPACITY_STEP = 256  # with CUDA graphs, buffers come in lengths of multiples of this: one graph per size


class DecodeState:
    """Everything a decode step binds, allocated once per (batch, T_max, device) and kept by the decoder:
    a CUDA graph captured on these addresses replays correctly in every later generation that uses them.

    buffers      per cache tensor (B, H_kv, T_max, D), the prefix in each row's first P slots (cache layout)
    step_*       the decode step's inputs (B, 1) ids and positions, (B,) seqlens_k, T_max as the total,
                 and outputs (B, 1, V) logits, (B, 1) greedy ids, updated in place
    """

    def __init__(self, decoder: "SharedBufferDecoder", batch: int, capacity: int, device: str, device_id: int,
                 graph_id: int):
        import onnxruntime as ort

        self.batch, self.capacity, self.graph_id = batch, capacity, graph_id
        P = decoder.prefix_length
        shape = (batch, decoder.num_kv_heads, capacity, decoder.head_dim)
        # On the CPU an OrtValue made from numpy shares its memory: one array per buffer, kept alive here.
        self.host_buffers, self.buffers = [], []
        for k in range(len(decoder.past_names)):
            initial = np.zeros(shape, decoder.kv_dtype)
            if decoder.graph_layout == "cache" and P:
                initial[:, :, :P] = decoder.prefix[k // 2, k % 2]  # written once; tokens only go after it
            self.host_buffers.append(initial)
            self.buffers.append(ort.OrtValue.ortvalue_from_numpy(initial, device, device_id))
        self.row_bytes = self.host_buffers[0][0].nbytes
        if device != "cpu":
            self.host_buffers = []  # the device holds its own copy
        self.step_ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), device, device_id)
        self.step_positions = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), device, device_id)
        self.step_seqlens = ort.OrtValue.ortvalue_from_numpy(np.zeros(batch, np.int32), device, device_id)
        self.step_total = np.array(capacity, np.int32)  # T_max, constant: a captured graph replays it
        vocab = decoder.vocab_size or int(next(o for o in decoder.session.get_outputs()
                                               if o.name == contract.LOGITS).shape[2])
        self.step_logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, vocab], decoder.logits_dtype, device,
                                                                     device_id)
        self.step_greedy_ids = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1], np.int64, device, device_id)
        self.binding = None  # the decode step's IO binding, made on first use


class SharedBufferStepper:
    """The decode loop's side for a shared-buffer graph; see the module docstring."""

    def __init__(self, decoder: SharedBufferDecoder, input_ids: np.ndarray, attention_mask: np.ndarray | None,
                 max_new_tokens: int, prefixes: list[np.ndarray] | None = None, device: str = "cpu",
                 device_id: int = 0, cuda_graph: bool = False):
        if prefixes:
            raise InputError("per-row prefixes are not supported on a shared-KV-buffer graph; give one prefix.")
        input_ids = np.asarray(input_ids, np.int64)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {mask.shape}, input_ids {input_ids.shape}.")
        self.rows = [input_ids[b][mask[b].astype(bool)] for b in range(input_ids.shape[0])]
        if any(len(r) == 0 for r in self.rows):
            raise InputError("a row of the batch has no tokens (its mask is all zeros).")
        self.decoder, self.session = decoder, decoder.session
        self.device, self.device_id = device, device_id
        self.batch = len(self.rows)
        needed = decoder.prefix_length + max(len(r) for r in self.rows) + max_new_tokens  # T_max
        # CUDA graphs replay fixed shapes: buffer lengths in steps of CAPACITY_STEP, one captured graph each
        capacity = -(-needed // CAPACITY_STEP) * CAPACITY_STEP if cuda_graph else needed
        self.state = decoder.decode_state(self.batch, capacity, device, device_id)
        self.capacity = capacity
        self.filled = np.zeros(self.batch, np.int64)  # tokens in each row's buffer
        self.first_tokens = input_ids
        self.steps = 0
        self.cuda_graph = cuda_graph  # the session was made with enable_cuda_graph
        self.capture = cuda_graph  # decode steps as the captured graph (off after a failed capture)
        self.run_options = {flag: self._run_options(flag) for flag in (_NO_CAPTURE, str(self.state.graph_id))}

    # the state's buffers under the names the loop and tests read
    buffers = property(lambda self: self.state.buffers)
    step_ids = property(lambda self: self.state.step_ids)
    step_positions = property(lambda self: self.state.step_positions)
    step_seqlens = property(lambda self: self.state.step_seqlens)
    step_total = property(lambda self: self.state.step_total)
    step_logits = property(lambda self: self.state.step_logits)
    step_greedy_ids = property(lambda self: self.state.step_greedy_ids)
    decode_binding = property(lambda self: self.state.binding)

    @staticmethod
    def _run_options(graph_id: str):
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", graph_id)
        return options

    def _prefill(self) -> tuple[np.ndarray, np.ndarray]:
        """Each row's prompt into its slice of the buffers; (last logits (B, 1, V), greedy ids (B,))."""
        decoder = self.decoder
        P = decoder.prefix_length
        last_logits, greedy = [], []
        kv_shape = [1, decoder.num_kv_heads, self.capacity, decoder.head_dim]
        for row, tokens in enumerate(self.rows):
            binding = self.session.io_binding()
            length = len(tokens)
            total = P + length
            positions = np.arange(length, dtype=np.int64)[None, :] + decoder.position_offset()
            decoder.bind_prompt(binding, tokens[None, :], positions, total)
            for name, present, buffer in zip(decoder.past_names, decoder.present_names, self.buffers):
                pointer = buffer.data_ptr() + row * self.state.row_bytes  # row `row` of (B, H_kv, T_max, D)
                binding.bind_input(name, self.device, self.device_id, decoder.kv_dtype, kv_shape, pointer)
                binding.bind_output(present, self.device, self.device_id, decoder.kv_dtype, kv_shape, pointer)
            # a prompt's shapes differ from the decode steps': never captured
            self.session.run_with_iobinding(binding, self.run_options[_NO_CAPTURE] if self.cuda_graph else None)
            logits, ids = binding.get_outputs()[:2]  # bound first, before the buffers
            last_logits.append(logits.numpy()[:, -1:])
            greedy.append(int(ids.numpy()[0, -1]))
            self.filled[row] = total
        return np.concatenate(last_logits), np.array(greedy, np.int64)

    def _decode_binding(self):
        """The decode step's binding, made once: every address stays the same from step to step."""
        decoder = self.decoder
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(contract.INPUT_IDS, self.step_ids)
        binding.bind_ortvalue_input(contract.POSITION_IDS, self.step_positions)
        binding.bind_ortvalue_input(SEQLENS_K, self.step_seqlens)
        binding.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, self.step_total)
        for name, present, buffer in zip(decoder.past_names, decoder.present_names, self.buffers):
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(present, buffer)
        binding.bind_ortvalue_output(contract.LOGITS, self.step_logits)
        binding.bind_ortvalue_output(GREEDY_TOKEN_IDS, self.step_greedy_ids)
        return binding

    def _decode(self, tokens: np.ndarray) -> None:
        if (self.filled + 1 > self.capacity).any():
            raise InputError(f"the KV buffer holds {self.capacity} positions per row; this step needs more.")
        # positions: the folded graph counts user tokens (it adds P), the cache layout's take P + t
        positions = self.filled - self.decoder.prefix_length + self.decoder.position_offset()
        self.step_ids.update_inplace(np.ascontiguousarray(tokens.reshape(self.batch, 1), np.int64))
        self.step_positions.update_inplace(positions.reshape(self.batch, 1).astype(np.int64))
        self.step_seqlens.update_inplace(self.filled.astype(np.int32))  # tokens after this one, - 1
        if self.state.binding is None:
            self.state.binding = self._decode_binding()
        if not self.cuda_graph:
            self.session.run_with_iobinding(self.decode_binding)
        elif not self.capture:
            self.session.run_with_iobinding(self.decode_binding, self.run_options[_NO_CAPTURE])
        else:
            try:
                self.session.run_with_iobinding(self.decode_binding, self.run_options[str(self.state.graph_id)])
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error types
                log.warning("CUDA graph capture failed, decode steps run uncaptured from here: %s", exc)
                self.capture = False
                self.session.run_with_iobinding(self.decode_binding, self.run_options[_NO_CAPTURE])
        self.filled += 1

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Logits (B, 1, V) of the last position (the loop samples from them)."""
        self.steps += 1
        if self.steps == 1:
            return self._prefill()[0]
        self._decode(tokens)
        return self.step_logits.numpy()

    def step_greedy(self, tokens: np.ndarray) -> np.ndarray:
        """The graph's argmax (B,): only the ids cross to the host."""
        self.steps += 1
        if self.steps == 1:
            return self._prefill()[1]
        self._decode(tokens)
        return self.step_greedy_ids.numpy()[:, 0].copy()
