"""Graph passes for CPU inference: transformer fusions (`fuse`) and int8 dynamic quantization (`quantize_int8`).

Both read an exported graph and write a new one; neither is trusted on its own. `fuse` reports how
many nodes of each fused kind it produced against how many it should have (one attention per layer,
one gelu per gelu decomposition, one normalization per LayerNormalization), so a fusion that silently
failed to match shows up as "0 of 12". The caller validates the result like any export (fusions) or
by agreement with fp32 (`agreement`, for int8), and keeps it only when it passes and is faster.

The folded prefix initializers (`prefix_{key,value}_{i}`) must survive every pass: validation's
check 0 reads them by name. Both passes check that they did.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np

from .. import contract
from ..errors import ExportFailedError
from ..export.graph import tensor_bytes as initializer_bytes
from ..export.graph import too_large_for_one_file

log = logging.getLogger(__name__)

# What each fusion replaces, as op types in the exported graph (source) and in the fused graph.
_ATTENTION_OPS = ("MultiHeadAttention", "Attention", "GroupQueryAttention")
_NORM_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SimplifiedLayerNormalization")
_GELU_OPS = ("FastGelu", "Gelu", "BiasGelu")
FUSED_OP_TYPES = (*_ATTENTION_OPS, *_NORM_OPS, *_GELU_OPS, "FusedMatMul", "RotaryEmbedding")


@dataclasses.dataclass
class FusionReport:
    """Node counts before/after, and per fusion kind how many matched out of how many expected."""

    nodes_before: int
    nodes_after: int
    fused: dict[str, int]  # op type -> count in the fused graph (FUSED_OP_TYPES only)
    expected: dict[str, tuple[int, int]]  # kind -> (matched, expected)
    weight_bytes_before: int
    weight_bytes_after: int

    @property
    def missing(self) -> list[str]:
        return [f"{kind}: {got} of {want}" for kind, (got, want) in self.expected.items() if got < want]

    def lines(self) -> list[str]:
        lines = [f"nodes {self.nodes_before} -> {self.nodes_after}; weights {self.weight_bytes_before / 1e6:.1f} -> "
                 f"{self.weight_bytes_after / 1e6:.1f} MB"]
        for kind, (got, want) in self.expected.items():
            lines.append(f"{kind:<10} fused {got} of {want}{'' if got >= want else '  (fusion did NOT match)'}")
        lines.append("fused ops: " + ", ".join(f"{op} {n}" for op, n in sorted(self.fused.items())))
        return lines

    def to_dict(self) -> dict:
        return {"nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "fused_ops": self.fused,
                "expected": {k: {"matched": g, "expected": w} for k, (g, w) in self.expected.items()},
                "missing": self.missing, "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after}


def op_counts(model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _save(model, path: Path) -> None:
    """Single file below 2 GB, else one external data file beside it."""
    import onnx

    if too_large_for_one_file(initializer_bytes(model)):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(path).name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _check_prefix_kept(before, after, what: str) -> None:
    names = {t.name for t in before.graph.initializer if t.name.startswith("prefix_")}
    kept = {t.name for t in after.graph.initializer}
    lost = sorted(names - kept)
    if lost:
        raise ExportFailedError(f"{what} removed or renamed the folded prefix initializers {lost[:4]}; validation "
                                f"needs them by name ({contract.prefix_initializer_name(0, 'key')}, ...).")


def _copy_metadata(source, target) -> None:
    del target.metadata_props[:]
    for prop in source.metadata_props:
        target.metadata_props.add(key=prop.key, value=prop.value)


def _gemm_to_matmul(model) -> int:
    """Gemm(A, B, C) -> MatMul(A, B) + Add(C), in place; returns how many were rewritten.

    The exporter writes each Conv1D/Linear as Reshape(3D -> 2D) + Gemm + Reshape(-> 3D). onnxscript's
    attention fusion replaces the reshapes around attention and leaves a Gemm fed a 3D tensor, which
    ONNX Runtime rejects ("Input 0 expected to have rank 2"); MatMul takes any rank, and the Add is
    absorbed again by the SkipLayerNormalization / gelu fusions (both take a bias).
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
            nodes.append(helper.make_node("MatMul", node.input[:2], [product], name=node.name + "_matmul"))
            nodes.append(helper.make_node("Add", [product, node.input[2]], list(node.output), name=node.name + "_bias"))
        else:
            nodes.append(helper.make_node("MatMul", node.input[:2], list(node.output), name=node.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def fuse(source: Path, target: Path, num_heads: int, hidden_size: int) -> FusionReport:
    """Transformer fusions for ONNX Runtime (CPU): attention, skip + layer norm, gelu.

    Two tools, each for what it matches on a dynamo export: onnxscript's `optimize_for_ort` (SDPA ->
    MultiHeadAttention, SkipLayerNormalization, Transpose + MatMul -> FusedMatMul, which also lets the
    tied lm_head read the embedding table in place instead of a transposed copy), then ONNX Runtime's
    transformer optimizer for the tanh-gelu (FastGelu), with its own attention fusion off (it does not
    match dynamo graphs). `num_heads`/`hidden_size` are the model's.
    """
    import onnx_ir as ir
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    original = _load(source)
    before = op_counts(original)
    model = _load(source)
    rewritten = _gemm_to_matmul(model)
    log.info("fuse: %d Gemm -> MatMul + Add", rewritten)
    fused_ir, counts = optimize_for_ort(ir.from_proto(model))
    log.info("onnxscript fusions: %s", {k: v for k, v in counts.items() if v})
    model = ir.to_proto(fused_ir)
    options = FusionOptions("bert")
    options.enable_attention = False  # done above; ORT's pattern is for TorchScript exports
    optimizer_logger = logging.getLogger("onnxruntime.transformers")
    optimized = optimize_model(model, model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
                               optimization_options=options, use_gpu=False)
    model = optimized.model
    _copy_metadata(original, model)
    _check_prefix_kept(original, model, "the fusion passes")
    after = op_counts(model)
    fused = {op: after[op] for op in FUSED_OP_TYPES if after[op]}
    gelu_sources = before["Tanh"] + before["Erf"]
    norm_sources = before["LayerNormalization"] + before["SimplifiedLayerNormalization"]
    expected = {"attention": (sum(after[op] for op in _ATTENTION_OPS), before["Softmax"]),
                "layernorm": (sum(after[op] for op in _NORM_OPS if op.startswith("Skip")), norm_sources),
                "gelu": (sum(after[op] for op in _GELU_OPS), gelu_sources)}
    expected = {k: v for k, v in expected.items() if v[1]}
    # A final LayerNormalization without a residual add before it stays unfused; that is fine.
    if "layernorm" in expected:
        got, want = expected["layernorm"]
        expected["layernorm"] = (got + min(after["LayerNormalization"], 1 if got == want - 1 else 0), want)
    del optimizer_logger
    _save(model, target)
    report = FusionReport(sum(before.values()), sum(after.values()), fused, expected,
                          initializer_bytes(original), initializer_bytes(model))
    for line in report.lines():
        log.info("fuse: %s", line)
    return report


def _untie_transposed_weights(model) -> int:
    """Make every MatMul weight an initializer that quantize_dynamic can see; returns how many changed.

    A tied lm_head reaches its MatMul either as Transpose(embedding) (plain export) or as
    FusedMatMul(x, embedding, transB=1) (after `fuse`). The quantizer only quantizes a MatMul whose B
    is an initializer, so both become MatMul(x, embedding^T) with a transposed initializer (V, d) ->
    (d, V) that the quantizer then turns into int8; the fp32 table stays for the embedding Gather.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    transposed = {}  # transpose output name -> initializer name
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = [a.ints for a in node.attribute if a.name == "perm"]
            if not perm or list(perm[0]) == [1, 0]:
                transposed[node.output[0]] = node.input[0]
        nodes.append(node)
    new_nodes = []
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        source = None
        if node.op_type == "MatMul" and node.input[1] in transposed:
            source = transposed[node.input[1]]
        elif (node.op_type == "FusedMatMul" and node.input[1] in inits and attrs.get("transB", 0) == 1
              and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0):
            source = node.input[1]
        if source is None:
            new_nodes.append(node)
            continue
        name = source + "_transposed"
        if name not in inits:
            array = numpy_helper.to_array(inits[source])
            tensor = numpy_helper.from_array(np.ascontiguousarray(array.T), name)
            model.graph.initializer.append(tensor)
            inits[name] = tensor
        new_nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return count


def quantize_int8(source: Path, target: Path) -> dict:
    """Dynamic int8 quantization of the MatMul weights (per channel, signed int8; activations at run time).

    Returns what changed: MatMuls quantized, weight bytes before and after.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    original = _load(source)
    model = _load(source)
    untied = _untie_transposed_weights(model)
    matmuls = op_counts(model)["MatMul"]
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "staged.onnx"
        _save(model, staged)
        large = too_large_for_one_file(initializer_bytes(model))
        quantize_dynamic(staged, target, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                         weight_type=QuantType.QInt8, use_external_data_format=large,
                         extra_options={"MatMulConstBOnly": True})
    quantized = _load(target)
    _check_prefix_kept(original, quantized, "int8 quantization")
    _copy_metadata(original, quantized)
    _save(quantized, target)
    after = op_counts(quantized)
    info = {"matmuls": matmuls, "quantized": after["MatMulInteger"] + after["DynamicQuantizeMatMul"],
            "untied_transposed_weights": untied, "weight_bytes_before": initializer_bytes(original),
            "weight_bytes_after": initializer_bytes(quantized)}
    log.info("int8: %s", info)
    return info


def agreement(reference, candidate, prompts: list[np.ndarray], greedy_tokens: int = 0,
              eos_token_id: int | None = None) -> dict:
    """How often `candidate` picks the same next token as `reference` (two OnnxDecoders).

    Teacher-forced over every position of every prompt (top-1 agreement), then, with
    `greedy_tokens`, greedy continuations of each prompt compared token for token.
    """
    from ..runtime.loop import greedy_generate

    same = total = 0
    greedy = []
    for prompt in prompts:
        ids = prompt.astype(np.int64)[None, :]
        mask = np.ones_like(ids)
        positions = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        ref_logits, _ = reference.run(ids, mask, positions, reference.empty_past(1))
        got_logits, _ = candidate.run(ids, mask, positions, candidate.empty_past(1))
        same += int((ref_logits[0].argmax(-1) == got_logits[0].argmax(-1)).sum())
        total += ids.shape[1]
        if greedy_tokens:
            ref = greedy_generate(reference, ids, mask, greedy_tokens, eos_token_id)[0]
            got = greedy_generate(candidate, ids, mask, greedy_tokens, eos_token_id)[0]
            n = min(len(ref), len(got))
            greedy.append({"prompt_length": int(ids.shape[1]), "equal": bool(len(ref) == len(got) and (ref == got).all()),
                           "matching": int((ref[:n] == got[:n]).sum()), "new_tokens": int(len(ref)),
                           "reference": ref.tolist(), "candidate": got.tolist()})
    result = {"top1_agreement": same / max(total, 1), "positions": total, "prompts": len(prompts)}
    if greedy:
        result["greedy"] = greedy
        result["greedy_equal"] = sum(g["equal"] for g in greedy)
    return result
