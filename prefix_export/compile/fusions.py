"""Transformer fusions for ONNX Runtime, checked against what the architecture registry says to expect.

`fuse` rewrites an exported graph with onnxscript's ORT fusions (attention -> MultiHeadAttention,
RMSNorm/LayerNorm + residual -> (Skip)(Simplified)LayerNormalization, rotary -> RotaryEmbedding) and
ONNX Runtime's transformer optimizer (gelu -> FastGelu/Gelu/BiasGelu), plus one pattern neither
library has (below). `expected_fusions` turns the registry's facts (layers, norm kind and count,
activation, rotary or not) into counts, so a pattern that silently did not match shows as
`attention 0/12` and fails the compile; a fusion that cannot apply to a family is listed with the
registry's reason instead of an expectation.

The folded prefix initializers (`prefix_{key,value}_{i}`) survive (checked): validation reads them.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..errors import ExportFailedError
from ..source.architectures import ArchSpec
from .graphio import check_prefix_kept, copy_metadata, initializer_bytes, keep_io, load, op_counts, save

log = logging.getLogger(__name__)

# Each fusion kind, as the op types that count for it in the fused graph.
FUSION_OPS = {
    "attention": ("MultiHeadAttention", "Attention", "GroupQueryAttention"),
    "normalization": ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
                      "SimplifiedLayerNormalization"),
    "gelu": ("FastGelu", "Gelu", "BiasGelu"),
    "rotary": ("RotaryEmbedding",),
}
FUSED_OP_TYPES = tuple(op for ops in FUSION_OPS.values() for op in ops) + ("FusedMatMul",)


class FusionMismatchError(ExportFailedError):
    """A fusion the registry expects did not match (e.g. `attention 0/12`): the compiled graph failed a
    check, like a failed validation (exit 1)."""

    exit_code = 1


def expected_fusions(spec: ArchSpec) -> tuple[dict[str, int], dict[str, str]]:
    """(kind -> expected count, kind -> why it cannot fuse) for one decoder of `spec`.

    attention: one per layer. normalization: every LayerNorm/RMSNorm as one op (norms per layer x
    layers + the rest). gelu: one per MLP when the activation is a gelu (relu and silu need none).
    rotary: one RotaryEmbedding for the queries and one for the keys per layer.
    """
    layers = spec.num_layers
    expected = {"attention": layers, "normalization": layers * spec.norms_per_layer + spec.extra_norms}
    if spec.activation in ("gelu_tanh", "gelu_erf"):
        expected["gelu"] = layers
    if spec.positions == "rotary":
        expected["rotary"] = 2 * layers
    reasons = dict(spec.unfusable)
    return {kind: n for kind, n in expected.items() if kind not in reasons}, reasons


@dataclasses.dataclass
class FusionReport:
    """Node counts before/after, per fusion kind (matched, expected), and what cannot fuse and why."""

    nodes_before: int
    nodes_after: int
    fused: dict[str, int]  # op type -> count in the fused graph (FUSED_OP_TYPES only)
    expected: dict[str, tuple[int, int]]  # kind -> (matched, expected)
    not_fusable: dict[str, str]  # kind -> the registry's reason
    weight_bytes_before: int
    weight_bytes_after: int
    prefix_copies_merged: int = 0  # folded layout: keys/values whose prefix+past+new concat is one copy

    @property
    def missing(self) -> list[str]:
        return [f"{kind} {got}/{want}" for kind, (got, want) in self.expected.items() if got != want]

    @property
    def passed(self) -> bool:
        return not self.missing

    def lines(self) -> list[str]:
        lines = [f"nodes {self.nodes_before} -> {self.nodes_after}"]
        for kind, (got, want) in self.expected.items():
            lines.append(f"{kind:<14} {got}/{want}{'' if got == want else '  (fusion did NOT match)'}")
        lines += [f"{kind:<14} not fused: {why}" for kind, why in self.not_fusable.items()]
        return lines

    def to_dict(self) -> dict:
        return {"nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "fused_ops": self.fused,
                "expected": {k: {"matched": g, "expected": w} for k, (g, w) in self.expected.items()},
                "not_fusable": self.not_fusable, "missing": self.missing,
                "weight_bytes_before": self.weight_bytes_before, "weight_bytes_after": self.weight_bytes_after,
                "prefix_copies_merged": self.prefix_copies_merged}

    @classmethod
    def from_dict(cls, data: dict) -> "FusionReport":
        expected = {k: (v["matched"], v["expected"]) for k, v in data.get("expected", {}).items()}
        return cls(data.get("nodes_before", 0), data.get("nodes_after", 0), data.get("fused_ops", {}), expected,
                   data.get("not_fusable", {}), data.get("weight_bytes_before", 0), data.get("weight_bytes_after", 0))


def count_fusions(model, spec: ArchSpec) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """(kind -> (matched in `model`, expected), kind -> reason) : what `validate` rechecks."""
    counts = op_counts(model)
    expected, reasons = expected_fusions(spec)
    return {kind: (sum(counts[op] for op in FUSION_OPS[kind]), want) for kind, want in expected.items()}, reasons


def gemm_to_matmul(model) -> int:
    """Gemm(A, B, C) -> MatMul(A, B) + Add(C), in place; returns how many were rewritten.

    The exporter writes each Conv1D/Linear as Reshape(3D -> 2D) + Gemm + Reshape(-> 3D). The attention
    fusion replaces the reshapes around attention and leaves a Gemm fed a 3D tensor, which ONNX
    Runtime rejects ("Input 0 expected to have rank 2"); MatMul takes any rank, and the Add is absorbed
    again by the SkipLayerNormalization / gelu fusions (both take a bias).
    """
    from onnx import helper

    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 \
                or attrs.get("transA", 0) or attrs.get("transB", 0):
            nodes.append(node)
            continue
        count += 1
        if len(node.input) > 2 and node.input[2]:
            product = node.output[0] + "_matmul"
            replacement = [helper.make_node("MatMul", node.input[:2], [product], name=node.name + "_matmul"),
                           helper.make_node("Add", [product, node.input[2]], list(node.output), name=node.name + "_bias")]
        else:
            replacement = [helper.make_node("MatMul", node.input[:2], list(node.output), name=node.name)]
        for new in replacement:  # the module path the exporter recorded (quantize.module_path reads it)
            new.metadata_props.extend(node.metadata_props)
        nodes += replacement
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def _rotary_cache_rules(max_positions: int):
    """The cos/sin-cache rewrite for transformers' rotary tables as torch.export writes them.

    onnxscript's own rule expects `inv_freq (1, E, 1) @ positions (B, 1, S)` then a transpose. With a
    contraction of length 1, torch.export writes the product as a broadcast Mul instead:
    `Cast(Unsqueeze(position_ids, -1)) (B, S, 1) * inv_freq (E,)` -> freqs (B, S, E). This rule matches
    that form and replaces the per-step Cos/Sin with constant (max_positions, E) tables, which is what
    ONNX Runtime's RotaryEmbedding reads (`position_ids` here already include the prefix's P offset).
    """
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import CosSinCacheFusion

    class BroadcastFreqsCosSinCache(CosSinCacheFusion):
        def __init__(self, name: str, max_pos_id: int, **kwargs):
            super().__init__(name, **kwargs)
            self.max_pos_id = max_pos_id  # constant (max_positions, E) tables, not per-step Cos/Sin

        def pattern(self, op, x, inv_freq, position_ids, interleaved, num_heads, freqs, dtype, extra_dims):
            positions = op.Cast(op.Unsqueeze(position_ids, extra_dims), to=ir.DataType.FLOAT)  # (B, S, 1)
            freqs = op.Mul(positions, inv_freq)  # (B, S, E)
            emb = op.Concat(freqs, freqs, axis=-1)  # (B, S, 2E) = (B, S, D)
            cos, sin = op.Cos(emb), op.Sin(emb)
            if self._cast:
                cos, sin = op.Cast(cos, to=dtype), op.Cast(sin, to=dtype)
            return op.RotaryEmbedding(x, op.Unsqueeze(cos, [1]), op.Unsqueeze(sin, [1]), interleaved=interleaved,
                                      num_heads=num_heads, _domain="ai.onnxruntime._fusion")

        def check(self, context, inv_freq, position_ids, **_):
            result = pattern.MatchResult()
            if not _ir_utils.has_rank(position_ids, 2):
                return result.fail("position_ids is not (B, S).", position_ids)
            if inv_freq.const_value is None or inv_freq.shape is None or len(inv_freq.shape) != 1:
                return result.fail("inv_freq is not a 1D constant.", inv_freq)
            return result

    return pattern.RewriteRuleSet([
        BroadcastFreqsCosSinCache.rule("CosSinCache_broadcast_cast", max_positions - 1, cast=True),
        BroadcastFreqsCosSinCache.rule("CosSinCache_broadcast", max_positions - 1, cast=False)])


def _onnxscript_fusions(model, max_positions: int) -> tuple[object, dict[str, int]]:
    """onnxscript's `fuse_xformers` sequence (0.7) with the rotary-cache rule above added, and without
    its GroupQueryAttention fusion: GQA needs head sizes that are multiples of 16 and right-padded
    batches (seqlens_k), where our contract takes any head size and left padding; attention becomes
    MultiHeadAttention, which takes both."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.rewriter import _fusion_utils, rewrite
    from onnxscript.rewriter.ort_fusions import _core
    from onnxscript.rewriter.ort_fusions import (attention, bias_gelu, cos_sin_cache, gelu, mha, mha_bias, mha_scale,
                                                 rotary_embedding, sdpa, sdpa_via_mha)
    from onnxscript.rewriter.ort_fusions import skip_normalization as skip
    from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.rules.common import _gemm_to_matmul_add

    rewrite(model, [_gemm_to_matmul_add.gemm_to_matmul_add_rule])
    model = _core._pre_optimize(model)
    broadcast_cos_sin = _fusion_utils.apply_fusion_rules(_rotary_cache_rules(max_positions))
    steps = [("erf_gelu", fuse_erfgelu, {}), ("rms_normalization", fuse_rms_normalization, {}),
             ("skip_layer_normalization", skip.fuse_skip_layer_normalization, {}),
             ("skip_rms_normalization", skip.fuse_skip_rms_normalization, {}),
             ("rotary_embedding", rotary_embedding.fuse_rotary_embedding, {}),
             ("cos_sin_cache", cos_sin_cache.fuse_cos_sin_cache, {}),
             ("cos_sin_cache_broadcast", broadcast_cos_sin, {})]
    counts = {name: fn(model, **kwargs) for name, fn, kwargs in steps}
    common_passes.CommonSubexpressionEliminationPass()(model)
    counts["partial_rotary_embedding"] = rotary_embedding.fuse_partial_rotary_embedding(model)
    counts["sdpa"] = sdpa.fuse_sdpa(model, apply_shape_inference=True)
    counts["mha1"] = mha.fuse_mha1(model)
    counts["mha2"] = mha.fuse_mha2(model)
    counts["mha_scale"] = mha_scale.fuse_mha_scale(model)
    if counts["mha1"] or counts["mha2"]:
        counts["mha_bias"] = mha_bias.fuse_mha_bias(model)
        counts["attention"] = attention.fuse_attention(model)
    counts["gelu"] = gelu.fuse_gelu(model)
    counts["bias_gelu"] = bias_gelu.fuse_bias_gelu(model)
    counts["sdpa_via_mha"] = sdpa_via_mha.replace_sdpa_by_mha(model)
    from onnxscript.optimizer import optimize

    optimize(model)  # inlines intermediate fusion functions nothing consumed; drops dead nodes
    rewrite(model, _core.ORT_PATTERN_REWRITE_RULES)
    passes = [common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
              common_passes.RemoveInitializersFromInputsPass(), common_passes.ShapeInferencePass()]
    for graph_pass in passes:
        graph_pass(model)
    return model, counts


def _topological_sort(model) -> None:
    """Nodes in an order where every input is produced before it is read (ONNX Runtime's optimizer
    refuses graphs that are not, and onnx_ir may emit rewritten nodes out of order)."""
    produced = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            missing = sorted({i for n in pending for i in n.input} - produced - {o for n in pending for o in n.output})
            raise ExportFailedError(f"the fused graph has a cycle or a dangling input at {pending[0].name} "
                                    f"(never produced: {missing[:3]})")
        for node in ready:
            produced.update(node.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def merge_prefix_copies(model) -> int:
    """The folded layout's cache copies, cut from three per layer and step to two; returns the layers done.

    The folded graph builds each layer's keys (and values) as Concat(Concat(prefix, past), new): the
    prefix (B, H_kv, P, D) and the past (B, H_kv, T, D) are copied once, then all of it again with the
    new (B, H_kv, S, D); the present is a Slice of that [P:], a third copy. Rewritten: one Concat(prefix,
    past, new) for attention, and the present as Concat(past, new), which is all it ever was. The graph's
    inputs and outputs do not change; the compiled graph is validated after.
    """
    from onnx import helper

    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pasts = {i.name for i in model.graph.input if i.name.startswith("past_key_values.")}
    presents = {o.name for o in model.graph.output}
    # Concat axes of the rank-4 cache tensors, -2 and 2 alike
    axis_of = {n.name: next((a.i % 4 for a in n.attribute if a.name == "axis"), None) for n in model.graph.node
               if n.op_type == "Concat"}
    merged, dead = 0, set()
    for outer in list(model.graph.node):
        if outer.op_type != "Concat" or len(outer.input) != 2:
            continue
        inner = producers.get(outer.input[0])
        if inner is None or inner.op_type != "Concat" or len(inner.input) != 2 or inner.input[1] not in pasts \
                or axis_of[inner.name] != axis_of[outer.name] or len(consumers.get(inner.output[0], [])) != 1:
            continue
        prefix, past, new = inner.input[0], inner.input[1], outer.input[1]
        slices = [n for n in consumers.get(outer.output[0], []) if n.op_type == "Slice" and n.output[0] in presents]
        if len(slices) != 1:
            continue
        axis = axis_of[outer.name]
        del outer.input[:]
        outer.input.extend([prefix, past, new])
        present = slices[0]
        present.CopyFrom(helper.make_node("Concat", [past, new], list(present.output), name=present.name + "_user",
                                          axis=axis))
        dead.add(id(inner))
        merged += 1
    kept = [n for n in model.graph.node if id(n) not in dead]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return merged


def fuse(source: Path, target: Path, spec: ArchSpec, max_positions: int, strict: bool = True,
         metadata: dict[str, str] | None = None) -> FusionReport:
    """Fuse `source` into `target` for ONNX Runtime (CPU and CUDA kernels alike).

    `max_positions` sizes the rotary cos/sin tables: the largest position the graph will see plus one
    (P + the model's context). With `strict`, a fusion the registry expects that did not match raises
    FusionMismatchError naming the counts (e.g. `attention 0/12`). `metadata` is added to the graph's own.
    """
    import onnx_ir as ir
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    original = load(source)
    model = load(source)
    log.info("fuse: %d Gemm -> MatMul + Add", gemm_to_matmul(model))
    fused_ir, counts = _onnxscript_fusions(ir.from_proto(model), max_positions)
    log.info("onnxscript fusions: %s", {k: v for k, v in counts.items() if v})
    model = ir.to_proto(fused_ir)
    _topological_sort(model)
    expected, _ = expected_fusions(spec)
    if "gelu" in expected:
        # ONNX Runtime's optimizer for the gelu onnxscript does not fuse (tanh -> FastGelu, erf -> Gelu,
        # + bias). Only then: on GPT-J's parallel block it writes a graph that is not a DAG.
        options = FusionOptions("bert")
        options.enable_attention = False  # its pattern is for TorchScript exports
        options.enable_rotary_embeddings = False
        # Its modules warn "symbolic shape inference disabled or failed" for every dynamo graph, from
        # loggers named after each module; the fusions work regardless. Shown with -v only.
        quiet = log.getEffectiveLevel() > logging.INFO
        if quiet:
            logging.disable(logging.WARNING)
        try:
            model = optimize_model(model, model_type="bert", num_heads=spec.num_attention_heads,
                                   hidden_size=spec.hidden_size, opt_level=0, optimization_options=options,
                                   use_gpu=False).model
        finally:
            if quiet:
                logging.disable(logging.NOTSET)
    merged = merge_prefix_copies(model)
    log.info("fuse: prefix + past + new concatenated once in %d of %d layers' keys and values", merged,
             2 * spec.num_layers)
    copy_metadata(original, model, metadata)
    keep_io(original, model, "the fusion passes")
    check_prefix_kept(original, model, "the fusion passes")
    after = op_counts(model)
    expected, reasons = count_fusions(model, spec)
    report = FusionReport(len(original.graph.node), len(model.graph.node),
                          {op: after[op] for op in FUSED_OP_TYPES if after[op]}, expected, reasons,
                          initializer_bytes(original), initializer_bytes(model), merged)
    for line in report.lines():
        log.info("fuse: %s", line)
    if strict and not report.passed:
        raise FusionMismatchError(f"{spec.model_type}: fusions did not match what the registry expects: "
                                  f"{', '.join(report.missing)} (matched/expected). The fused graph was not "
                                  "written; compile without --optimize, or report the model's config.")
    save(model, target)
    return report
