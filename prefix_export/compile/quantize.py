"""Reduced precisions of an exported (or fused) graph: fp16, int8 and int4.

    fp16   every float weight and activation in float16, with ONNX Runtime's converter keeping the ops
           it must in float32; the cache and the logits become float16 like a float16 export's.
    int8   weight-only 8-bit `MatMulNBits` (block-wise scales, int8 compute at accuracy level 4): on
           real weights it kept 39/40 chat answers where dynamic per-tensor int8 kept 25/40 (issue 12);
           `method="dynamic"` is the older per-channel `MatMulInteger` (activations quantized at run time).
    int4   4-bit `MatMulNBits` (round-to-nearest or HQQ), optionally keeping chosen layers at 8 bits.

The lm_head is a MatMul like the others and is quantized unless told not to; a tied lm_head (which
reads the embedding table transposed) first gets a transposed copy of its own (`untie_lm_head`),
because the quantizers only take a MatMul whose weight is an initializer. Layers are chosen by their
module path, which the exporter records on every node (`pkg.torch.onnx.name_scopes`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from .graphio import check_prefix_kept, copy_metadata, initializer_bytes, keep_io, load, op_counts, save

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
_QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul")


@dataclasses.dataclass(frozen=True)
class QuantizationSettings:
    """How a reduced precision is made; recorded in the report and the graph metadata."""

    precision: str = "fp32"
    method: str = "nbits"  # int8: "nbits" (weight-only MatMulNBits) or "dynamic" (MatMulInteger)
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits compute: 0/1 float32, 4 int8 (fast; may flip near-tie argmaxes)
    symmetric: bool = True
    algorithm: str = "rtn"  # int4: "rtn" (round to nearest) or "hqq" (half-quadratic, no calibration data)
    quantize_lm_head: bool = True
    keep_8bit: tuple[str, ...] = ()  # int4: module-path patterns (fnmatch) kept at 8 bits, e.g. "*down_proj"
    keep_fp32: tuple[str, ...] = ()  # int8/int4: module-path patterns not quantized, e.g. "*layers.0.*"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.method not in ("nbits", "dynamic"):
            raise InputError(f"the int8 method must be 'nbits' or 'dynamic', got {self.method!r}.")
        if self.algorithm not in ("rtn", "hqq"):
            raise InputError(f"the int4 algorithm must be 'rtn' or 'hqq', got {self.algorithm!r}.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"--block-size must be a power of two >= 16, got {self.block_size}.")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"--accuracy-level must be 0-4, got {self.accuracy_level}.")

    def to_dict(self) -> dict:
        """Only what applies to this precision."""
        if self.precision in ("fp32", "fp16"):
            return {"precision": self.precision}
        if self.precision == "int8" and self.method == "dynamic":
            return {"precision": "int8", "method": "dynamic", "per_channel": True,
                    "quantize_lm_head": self.quantize_lm_head, "keep_fp32": list(self.keep_fp32)}
        data = {"precision": self.precision, "method": "nbits", "bits": 8 if self.precision == "int8" else 4,
                "block_size": self.block_size, "accuracy_level": self.accuracy_level, "symmetric": self.symmetric,
                "quantize_lm_head": self.quantize_lm_head, "keep_fp32": list(self.keep_fp32)}
        if self.precision == "int4":
            data.update(algorithm=self.algorithm, keep_8bit=list(self.keep_8bit))
        return data


def module_path(node) -> str:
    """The PyTorch module a node came from ('model.model.layers.3.mlp.down_proj'), or '' when unknown."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def _matching(matmuls: list, patterns: tuple[str, ...], flag: str) -> list[str]:
    """Names of the MatMuls whose module path matches a pattern; a pattern matching none is an error
    (a typo would otherwise quantize what the user meant to keep)."""
    names = []
    for pattern in patterns:
        found = [n.name for n in matmuls if fnmatch.fnmatch(module_path(n), pattern)]
        if not found:
            paths = sorted({module_path(n) for n in matmuls} - {""})[:6]
            raise InputError(f"{flag} {pattern!r} matches no MatMul; module paths look like {paths}.")
        names += [name for name in found if name not in names]
    return names


def _weight_matmuls(model) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def lm_head_nodes(model) -> list[str]:
    """The MatMul(s) that compute the logits: the last weight MatMul before the `logits` output."""
    matmuls = _weight_matmuls(model)
    named = [n.name for n in matmuls if module_path(n).endswith("lm_head")]
    return named or ([matmuls[-1].name] if matmuls else [])


def untie_lm_head(model) -> int:
    """Make every MatMul weight an initializer the quantizers can see; returns how many changed.

    A tied lm_head reaches its MatMul as Transpose(embedding) (plain export) or as
    FusedMatMul(x, embedding, transB=1) (after fusion). Both become MatMul(x, embedding^T) with a
    transposed initializer (V, d) -> (d, V); the table stays for the embedding Gather.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    transposed = {}  # transpose output name -> initializer name
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = [a.ints for a in node.attribute if a.name == "perm"]
            if not perm or list(perm[0]) == [1, 0]:
                transposed[node.output[0]] = node.input[0]
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        source = None
        if node.op_type == "MatMul" and node.input[1] in transposed:
            source = transposed[node.input[1]]
        elif (node.op_type == "FusedMatMul" and node.input[1] in inits and attrs.get("transB", 0) == 1
              and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0):
            source = node.input[1]
        if source is None:
            nodes.append(node)
            continue
        name = source + "_transposed"
        if name not in inits:
            tensor = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[source]).T), name)
            model.graph.initializer.append(tensor)
            inits[name] = tensor
        replacement = helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name)
        replacement.metadata_props.extend(node.metadata_props)
        nodes.append(replacement)
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def _dynamic_int8(model, target: Path, exclude: list[str]):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "staged.onnx"
        save(model, staged)
        quantize_dynamic(staged, target, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         use_external_data_format=initializer_bytes(model) > 1.8e9,
                         extra_options={"MatMulConstBOnly": True})
    return load(target)


def _nbits(model, bits: int, settings: QuantizationSettings, exclude: list[str] | None = None,
           include: list[str] | None = None):
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if settings.algorithm == "hqq" and bits == 4:
        config = HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=bits, op_types_to_quantize=("MatMul",))
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                              accuracy_level=settings.accuracy_level, bits=bits,
                                              op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=settings.block_size,
                                     is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                                     nodes_to_exclude=exclude or [], nodes_to_include=include, algo_config=config)
    quantizer.process()
    quantized = quantizer.model.model
    if settings.algorithm == "hqq" and bits == 4:  # HQQ's config takes no accuracy level; set it on its nodes
        for node in quantized.graph.node:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = settings.accuracy_level
    return quantized


def _fp16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types=False: the cache and logits in float16 too, like a float16 export (the runtime
    # reads the dtypes from the graph); the converter keeps its own block list of ops in float32.
    return convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)


def reduce_precision(source: Path, target: Path, settings: QuantizationSettings,
                     metadata: dict[str, str] | None = None) -> dict:
    """Write `source` at `settings.precision` to `target` (`metadata` added to the graph's own); returns
    what changed (counts, bytes)."""
    original = load(source)
    model = load(source)
    info: dict = {}
    if settings.precision == "fp16":
        model = _fp16(model)
    elif settings.precision in ("int8", "int4"):
        from .fusions import gemm_to_matmul

        # The quantizers take MatMul only; GPT-2's Conv1D and friends export as Gemm (the fused graph
        # has none left).
        info["gemm_rewritten"] = gemm_to_matmul(model)
        info["untied_lm_head"] = untie_lm_head(model)
        matmuls = _weight_matmuls(model)
        lm_head = lm_head_nodes(model)
        exclude = ([] if settings.quantize_lm_head else lm_head) + _matching(matmuls, settings.keep_fp32, "--keep-fp32")
        info.update(weight_matmuls=len(matmuls), lm_head=lm_head, kept_fp32=len(exclude))
        if settings.precision == "int8" and settings.method == "dynamic":
            model = _dynamic_int8(model, target, exclude)
        elif settings.precision == "int8":
            model = _nbits(model, 8, settings, exclude=exclude)
        else:
            keep = [name for name in _matching(matmuls, settings.keep_8bit, "--keep-8bit") if name not in exclude]
            model = _nbits(model, 4, settings, exclude=exclude + keep)
            if keep:
                model = _nbits(model, 8, settings, include=keep)
            info["kept_8bit"] = len(keep)
    copy_metadata(original, model, metadata)
    keep_io(original, model, f"{settings.precision} conversion")
    check_prefix_kept(original, model, f"{settings.precision} conversion")
    save(model, target)
    counts = op_counts(model)
    info.update(quantized_matmuls=sum(counts[op] for op in _QUANTIZED_OPS),
                weight_bytes_before=initializer_bytes(original), weight_bytes_after=initializer_bytes(model))
    log.info("%s: %s", settings.precision, info)
    return info
