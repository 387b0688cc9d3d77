"""The shared KV buffer: a fused graph's attention rewritten onto ONNX Runtime's GroupQueryAttention,
whose past and present are one preallocated (B, H_kv, T_max, D) buffer, written in place.

Why: the plain graphs concatenate past and new K/V every step (a copy of the whole cache per layer)
and change shape every step, which rules out CUDA graphs. With the shared buffer every decode step has
the same shapes and addresses, and no copy but the new token's K/V.

The rewrite, per layer (the fused graph holds one com.microsoft.MultiHeadAttention per layer):

    query (B, S, H*D), new key/value (B, S, H_kv*D), rotary already applied by RotaryEmbedding nodes
      -> GroupQueryAttention(query, key, value, past_key_values.i.key, .value, seqlens_k,
                             total_sequence_length) -> output (B, S, H*D), present.i.key, .value

    inputs   input_ids (B, S), position_ids (B, S), past_key_values.i.{key,value} (B, H_kv, T_max, D)
             [the buffers], seqlens_k int32 (B,) = tokens in the buffer after this step - 1 per row,
             total_sequence_length int32 () = the longest row's count, or T_max (what CUDA graphs need).
             attention_mask is gone: GroupQueryAttention masks by seqlens_k (rows right-aligned to
             nothing: each row's tokens sit at the start of its buffer, no padding inside).
    outputs  logits (B, S, V), greedy_token_ids int64 (B, S) (argmax on the device: only ids need
             to cross to the host), present.i.{key,value}: the buffers, when bound to the same memory
             as the pasts (IO binding); ONNX Runtime writes in place then.

Where the prefix is:
    cache layout   the runtime writes prefix_kv.safetensors into each row's first P slots once; the
                   prompt then runs as a continuation of that past (ONNX Runtime allows S > 1 with a
                   past for one row at a time, so the runtime runs a batch's prompts row by row).
    folded layout  the prefix stays in the graph as constants. On the first step (the buffer is
                   empty: total_sequence_length == S + P) the graph puts its P prefix K/V in front of
                   the prompt's, so GroupQueryAttention writes them into the buffer as the first P
                   tokens; the query is padded with P rows whose output is dropped. Later steps take
                   none of it (a Slice of length 0). The decision is made on shapes on the host, which
                   is why the cache layout is the one for CUDA graphs.

This module rewrites graphs; runtime/shared_buffer.py runs them.
"""
from __future__ import annotations

import json
import logging

import numpy as np

from .. import contract
from ..contract import BUFFER_LENGTH, GREEDY_TOKEN_IDS, META_KV_BUFFER, SEQLENS_K, TOTAL_SEQUENCE_LENGTH
from ..errors import ExportFailedError

log = logging.getLogger(__name__)

_MS = "com.microsoft"
# Ops between a cache Concat and the attention's key input (repeat_kv, head reshapes): traced through.
_SHAPE_OPS = {"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Identity", "Cast", "Tile"}


class SharedBufferError(ExportFailedError):
    """The fused graph's attention is not in a form the shared-buffer rewrite knows."""


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Graph:
    """Producers/consumers of a graph, and fresh names for what the rewrite adds."""

    def __init__(self, model):
        self.model = model
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.added: list = []
        self.initializers: list = []
        self._constants: dict[tuple, str] = {}  # (dtype, shape, bytes) -> name: each value added once
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"kvbuf_{stem}_{self._count}"

    def node(self, op: str, inputs: list[str], stem: str, outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        names = [self.name(stem) for _ in range(outputs)]
        self.added.append(helper.make_node(op, inputs, names, name=names[0], domain=domain or None, **attrs))
        return names

    def const(self, stem: str, value: np.ndarray) -> str:
        """An initializer holding `value`; the same value asked for again (every layer's reshape target and
        tile counts) is the same initializer."""
        from onnx import numpy_helper

        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self._constants:
            self._constants[key] = self.name(stem)
            self.initializers.append(numpy_helper.from_array(value, self._constants[key]))
        return self._constants[key]


def _find_cache_concat(graph: _Graph, tensor: str, past_names: set[str]):
    """The Concat that joins a layer's past with its new K or V, found by walking up from the attention's
    key/value input through reshapes (repeat_kv). Returns (concat node, index of the past among its inputs)."""
    frontier, seen = [tensor], set()
    for _ in range(12):
        next_frontier = []
        for name in frontier:
            node = graph.producer.get(name)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Concat":
                pasts = [k for k, i in enumerate(node.input) if i in past_names]
                if pasts:
                    return node, pasts[0]
            if node.op_type in _SHAPE_OPS or node.op_type == "Concat":
                next_frontier.extend(node.input[:1])
        frontier = next_frontier
    return None, None


def _to_bsd(graph: _Graph, bhsd: str, stem: str) -> str:
    """(B, H, S, D) -> (B, S, H*D): the layout GroupQueryAttention takes."""
    transposed = graph.node("Transpose", [bhsd], stem + "_t", perm=[0, 2, 1, 3])[0]
    return graph.node("Reshape", [transposed, graph.const("shape_bs_flat", np.array([0, 0, -1], np.int64))],
                      stem + "_bsd")[0]


def _layer_of(past_name: str) -> int:
    return int(past_name.split(".")[1])


def share_kv_buffer(model, num_virtual_tokens: int, layout: str, sliding_window: int | None = None) -> dict:
    """Rewrite `model` (a fused graph, in place) onto GroupQueryAttention with shared past/present buffers.

    Returns what was done ({"layers": L, "form": ..., "layout": ...}). Raises SharedBufferError when an
    attention layer is not in a form this knows, or something besides attention still reads the mask.
    """
    from onnx import TensorProto, helper

    g = model.graph
    graph = _Graph(model)
    past_names = {i.name for i in g.input if i.name.startswith("past_key_values.")}
    present_names = {o.name for o in g.output if o.name.startswith("present.")}
    attentions = [n for n in g.node if n.op_type == "MultiHeadAttention" and n.domain == _MS]
    num_layers = len(past_names) // 2
    if len(attentions) != num_layers:
        raise SharedBufferError(f"the shared KV buffer needs one fused MultiHeadAttention per layer; the graph has "
                                f"{len(attentions)} for {num_layers} layers. Compile with --optimize a family whose "
                                "attention fuses (README, Compile: which families fuse).")
    P = num_virtual_tokens if layout == "folded" else 0
    dead: set[int] = set()
    forms = set()

    # Folded: how many prefix positions this step writes: P on the first step, else 0 (host-side scalars).
    first_step_prefix = None
    if P:
        seq = graph.node("Shape", [contract.INPUT_IDS], "seq", start=1, end=2)[0]
        seq32 = graph.node("Cast", [seq], "seq32", to=TensorProto.INT32)[0]
        expected_total = graph.node("Add", [seq32, graph.const("P32", np.array([P], np.int32))], "first_total")[0]
        is_first = graph.node("Equal", [TOTAL_SEQUENCE_LENGTH, expected_total], "is_first")[0]
        first_step_prefix = graph.node("Mul", [graph.node("Cast", [is_first], "is_first64", to=TensorProto.INT64)[0],
                                              graph.const("P64", np.array([P], np.int64))], "n_prefix")[0]  # (1,)
    zero = graph.const("zero", np.array([0], np.int64))
    seq_axis = graph.const("axis1", np.array([1], np.int64))
    end_of_axis = graph.const("int_max", np.array([np.iinfo(np.int64).max], np.int64))

    for mha in attentions:
        num_heads = int(_attr(mha, "num_heads"))
        inputs = list(mha.input) + [""] * (8 - len(mha.input))
        if inputs[6] and inputs[7]:
            # GPT-2's form: MHA(q, k_new, v_new, '', '', bias, past_k, past_v) -> (out, present_k, present_v);
            # the past is the graph input (cache) or Concat(prefix, past input) (folded).
            forms.add("past inside attention")
            q, k_bsd, v_bsd = inputs[0], inputs[1], inputs[2]
            pasts, prefixes = [], []
            for past in (inputs[6], inputs[7]):
                if past in past_names:
                    pasts.append(past)
                    prefixes.append(None)
                    continue
                concat = graph.producer.get(past)
                if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 \
                        or concat.input[1] not in past_names:
                    raise SharedBufferError(f"attention {mha.name}: its past {past!r} is neither a graph input nor "
                                            "Concat(prefix, past input)")
                pasts.append(concat.input[1])
                prefixes.append(concat.input[0])
                dead.add(id(concat))
            presents = []
            for present in mha.output[1:3]:
                # folded: the attention's present holds the prefix too, and a Slice [P:] makes the output
                slices = [n for n in graph.consumers.get(present, []) if n.op_type == "Slice"
                          and n.output[0] in present_names]
                if slices:
                    dead.add(id(slices[0]))
                    present = slices[0].output[0]
                presents.append(present)
        else:
            # The rotary families' form: MHA(q, K_all, V_all, '', '', bias) over the whole cache, which
            # Concat(prefix?, past, new) built; the present is Concat(past, new) (or that very Concat).
            forms.add("past concatenated before attention")
            q = inputs[0]
            pasts, prefixes, news, presents = [], [], [], []
            for kv_input in (inputs[1], inputs[2]):
                concat, at = _find_cache_concat(graph, kv_input, past_names)
                if concat is None:
                    raise SharedBufferError(f"attention {mha.name}: no Concat of a past input with the new "
                                            f"K/V above its input {kv_input!r}")
                past, new = concat.input[at], concat.input[-1]
                pasts.append(past)
                prefixes.append(concat.input[0] if at == 1 else None)
                news.append(new)
                present = contract.present_name(_layer_of(past), past.rsplit(".", 1)[1])
                presents.append(present)
                dead.add(id(concat))
                producer = graph.producer.get(present)
                if producer is not None:
                    dead.add(id(producer))
            k_bsd, v_bsd = _to_bsd(graph, news[0], "k"), _to_bsd(graph, news[1], "v")
        layer = _layer_of(pasts[0])
        if pasts != [contract.past_name(layer, "key"), contract.past_name(layer, "value")]:
            raise SharedBufferError(f"attention {mha.name} reads pasts {pasts}; expected layer {layer}'s key and value")
        kv_heads = next(int(i.type.tensor_type.shape.dim[1].dim_value) for i in g.input if i.name == pasts[0])
        output = mha.output[0]
        if P:
            if None in prefixes:
                raise SharedBufferError(f"attention {mha.name}: a folded graph whose layer {layer} has no prefix "
                                        "constants in front of its past")
            # (B, H_kv, P, D) prefix -> (B, n, H_kv*D), n = P on the first step else 0, in front of the new K/V
            taken = [graph.node("Slice", [_to_bsd(graph, prefix, "prefix"), zero, first_step_prefix, seq_axis],
                                "prefix_taken")[0] for prefix in prefixes]
            k_bsd = graph.node("Concat", [taken[0], k_bsd], "k_with_prefix", axis=1)[0]
            v_bsd = graph.node("Concat", [taken[1], v_bsd], "v_with_prefix", axis=1)[0]
            # the query gets n rows too (GroupQueryAttention wants as many as keys); any values do,
            # their outputs are dropped: the prefix keys, tiled to H heads
            q_rows = graph.node("Tile", [taken[0], graph.const("tile", np.array([1, 1, num_heads // kv_heads],
                                                                                 np.int64))], "q_pad")[0]
            q = graph.node("Concat", [q_rows, q], "q_with_prefix", axis=1)[0]
            output = graph.name("attention_with_prefix")
        attrs = dict(num_heads=num_heads, kv_num_heads=kv_heads)
        scale = _attr(mha, "scale")
        if scale:
            attrs["scale"] = float(scale)
        if sliding_window:
            # ONNX Runtime 1.32's CPU kernel with local_window_size = W gives transformers' window of W keys
            # (the query's own among them) exactly: measured on tiny mistral, W = 8, P = 5, 12 tokens (W - 1 and
            # W + 1 are off by 0.1-0.4 in the logits). The GPU check compares the CUDA kernel's tokens with PEFT's.
            attrs["local_window_size"] = int(sliding_window)
        gqa_inputs = [q, k_bsd, v_bsd, pasts[0], pasts[1], SEQLENS_K, TOTAL_SEQUENCE_LENGTH]
        graph.added.append(helper.make_node("GroupQueryAttention", gqa_inputs, [output, *presents],
                                            name=f"GroupQueryAttention_{layer}", domain=_MS, **attrs))
        if P:  # the query's prefix rows dropped: (B, n + S, H*D) -> (B, S, H*D)
            graph.added.append(helper.make_node("Slice", [output, first_step_prefix, end_of_axis, seq_axis],
                                                [mha.output[0]], name=f"drop_prefix_rows_{layer}"))
        dead.add(id(mha))
        missing = {contract.present_name(layer, "key"), contract.present_name(layer, "value")} - set(presents)
        if missing & present_names:
            raise SharedBufferError(f"attention {mha.name}: its presents {presents} are not layer {layer}'s outputs")

    kept = [n for n in g.node if id(n) not in dead]
    del g.node[:]
    g.node.extend(kept + graph.added)
    g.initializer.extend(graph.initializers)
    _add_greedy_output(model)
    _batch_from_input_ids(model)
    _prune(model)
    mask_readers = [n.name for n in g.node if contract.ATTENTION_MASK in n.input]
    if mask_readers:
        raise SharedBufferError(f"after the rewrite, nodes besides attention still read attention_mask "
                                f"({mask_readers[:3]}); GroupQueryAttention masks by lengths, so this graph cannot "
                                "drop its mask")
    _set_io(model)
    from .fusions import _topological_sort

    _topological_sort(model)  # the added nodes went in at the end
    del g.value_info[:]  # shapes of tensors that changed; ONNX Runtime infers them again
    info = {"layers": num_layers, "form": sorted(forms), "layout": layout, "prefix_in_graph": bool(P),
            "sliding_window": sliding_window}
    metadata = {META_KV_BUFFER: json.dumps({"layout": layout, "num_virtual_tokens": num_virtual_tokens},
                                           sort_keys=True)}
    from .graphio import copy_metadata

    copy_metadata(model, model, metadata)
    log.info("shared KV buffer: %d GroupQueryAttention layers (%s)", num_layers, ", ".join(sorted(forms)))
    return info


def _batch_from_input_ids(model) -> None:
    """Shape(attention_mask)[0:1] (where the exporter took the batch size from) -> Shape(input_ids)[0:1]."""
    for node in model.graph.node:
        if node.op_type == "Shape" and list(node.input) == [contract.ATTENTION_MASK] \
                and _attr(node, "start", 0) == 0 and _attr(node, "end", None) == 1:
            node.input[0] = contract.INPUT_IDS


def _add_greedy_output(model) -> None:
    from onnx import TensorProto, helper

    g = model.graph
    g.node.append(helper.make_node("ArgMax", [contract.LOGITS], [GREEDY_TOKEN_IDS], name="greedy_argmax", axis=-1,
                                   keepdims=0))
    g.output.append(helper.make_tensor_value_info(GREEDY_TOKEN_IDS, TensorProto.INT64,
                                                  [contract.BATCH, contract.SEQUENCE]))


def _prune(model) -> None:
    """Drop nodes nothing reads (the old masks, concats, repeat_kv), unread initializers and inputs."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    needed, pending, kept_ids = set(), [o.name for o in g.output], set()
    while pending:  # walk back from the outputs (the nodes are not in order here)
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in kept_ids:
            kept_ids.add(id(node))
            pending.extend(node.input)
    kept = [n for n in g.node if id(n) in kept_ids]
    del g.node[:]
    g.node.extend(kept)
    initializers = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(initializers)
    inputs = [i for i in g.input if i.name in needed or i.name in (SEQLENS_K, TOTAL_SEQUENCE_LENGTH)]
    del g.input[:]
    g.input.extend(inputs)


def _set_io(model) -> None:
    """The buffers' time dimension is T_max; the new length inputs go after the pasts."""
    from onnx import TensorProto, helper

    g = model.graph
    for value in list(g.input) + list(g.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[2].ClearField("dim_value")
            value.type.tensor_type.shape.dim[2].dim_param = BUFFER_LENGTH
    names = {i.name for i in g.input}
    if SEQLENS_K not in names:
        g.input.append(helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, [contract.BATCH]))
    if TOTAL_SEQUENCE_LENGTH not in names:
        g.input.append(helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []))
