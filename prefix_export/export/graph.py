"""ONNX post-processing: metadata, dimension names, external data, checker."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .. import contract, contract_seq2seq
from ..errors import ExportFailedError

log = logging.getLogger(__name__)

TWO_GB = 2 * 1024**3


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in the graph itself (what a single protobuf file must hold below 2 GB)."""
    return sum(len(init.raw_data) if init.HasField("raw_data") else init.ByteSize() for init in model.graph.initializer
               if init.data_location != onnx.TensorProto.EXTERNAL)


# Above this, an export keeps its weights in `<graph>.data` beside the graph (as written by the
# exporter, never reloaded); below it, one self-contained file, whose writing holds the weights in
# memory twice more for a moment (a few hundred MB at most).
EXTERNAL_DATA_ABOVE = 256 * 1024**2


def too_large_for_one_file(weight_bytes: int) -> bool:
    """Protobuf caps a file at 2 GB; keep a margin for the graph itself."""
    return weight_bytes > TWO_GB - 64 * 1024**2


def _name_present_dims(model: onnx.ModelProto) -> None:
    """The exporter names present's length 'past_sequence_length + sequence_length'; call it total."""
    for output in model.graph.output:
        if not output.name.startswith("present."):
            continue
        dim = output.type.tensor_type.shape.dim[2]
        if not dim.HasField("dim_value"):
            if ".encoder." in output.name:  # seq2seq cross-attention K/V: the encoder's length
                dim.dim_param = contract_seq2seq.ENCODER_OUT
            elif ".decoder." in output.name:
                dim.dim_param = contract_seq2seq.TOTAL_DECODER
            else:
                dim.dim_param = contract.TOTAL


_ELEMENTWISE = {"Mul", "Add", "Sub", "Div"}


def upcast_bfloat16_arithmetic(model: onnx.ModelProto) -> int:
    """Rewrite bfloat16 Mul/Add/Sub/Div as float32 math + Cast back; returns how many were rewritten.

    Some modelling code computes in bfloat16 whatever the model's dtype (falcon's ALiBi slopes), and
    ONNX Runtime's CPU provider has no bfloat16 kernels for these ops. PyTorch's CPU bfloat16 ops
    compute in float32 and round once, so float32 + one Cast gives the same bits.
    """
    from onnx import TensorProto, helper

    # Type inference on a weightless copy (initializers as typed inputs): works for > 2 GB models too.
    weightless_inputs = [helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                         for init in model.graph.initializer]
    weightless = helper.make_model(
        helper.make_graph(list(model.graph.node), "types", list(model.graph.input) + weightless_inputs,
                          list(model.graph.output)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    weightless.functions.extend(model.functions)
    inferred = onnx.shape_inference.infer_shapes(weightless)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    new_nodes, rewritten = [], 0
    for node in model.graph.node:
        if node.op_type in _ELEMENTWISE and types.get(node.output[0]) == TensorProto.BFLOAT16:
            upcast_inputs = []
            for name in node.input:
                cast_name = f"{name}_as_float_{rewritten}"
                new_nodes.append(helper.make_node("Cast", [name], [cast_name], to=TensorProto.FLOAT,
                                                  name=f"{node.name}_upcast_{len(upcast_inputs)}"))
                upcast_inputs.append(cast_name)
            float_out = f"{node.output[0]}_float"
            new_nodes.append(helper.make_node(node.op_type, upcast_inputs, [float_out], name=node.name))
            new_nodes.append(helper.make_node("Cast", [float_out], [node.output[0]], to=TensorProto.BFLOAT16,
                                              name=f"{node.name}_downcast"))
            rewritten += 1
        else:
            new_nodes.append(node)
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        log.info("rewrote %d bfloat16 elementwise ops as float32 for ONNX Runtime's CPU provider", rewritten)
    return rewritten


def _external_location(tensor) -> str | None:
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), None)


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers stored outside the graph file (their `length` entries)."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((entry.value for entry in init.external_data if entry.key == "length"), 0))
    return total


def make_overridable(model: onnx.ModelProto, names: list[str]) -> None:
    """List the initializers `names` as graph inputs too (after the contract's inputs): their values are
    then defaults that an ONNX Runtime adapter (RunOptions.add_active_adapter) or a feed can replace.
    ONNX Runtime no longer constant-folds through them, so this is opt-in (--swappable-prefix)."""
    from onnx import helper

    initializers = {init.name: init for init in model.graph.initializer}
    missing = [name for name in names if name not in initializers]
    if missing:
        raise ExportFailedError(f"the graph has no initializers {missing[:4]} to make overridable; the exporter "
                                "renamed or folded them.")
    for name in names:
        init = initializers[name]
        model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))


def finalize(raw_path: Path, final_path: Path, metadata: dict[str, str], force_external_data: bool = False,
             overridable: list[str] | None = None) -> dict:
    """Read the exporter's graph without its weights, add metadata and dimension names, write `final_path`.

    `overridable`: initializers to list as graph inputs too (make_overridable).

    Weights above EXTERNAL_DATA_ABOVE (or with `force_external_data`) stay in the exporter's own data
    file, renamed to `<graph>.data` beside `final_path`: they are never loaded, copied or held twice.
    Smaller graphs are written as one self-contained file.
    """
    try:
        model = onnx.load(str(raw_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportFailedError(f"the exporter's ONNX file {raw_path} could not be read back ({exc}).") from exc
    _name_present_dims(model)
    if overridable:
        make_overridable(model, overridable)
    bf16_rewrites = upcast_bfloat16_arithmetic(model)
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        model.metadata_props.add(key=key, value=str(value))
    weight_bytes = tensor_bytes(model) + external_bytes(model)
    external = force_external_data or weight_bytes > EXTERNAL_DATA_ABOVE
    data_name = final_path.name + ".data"
    locations = {_external_location(init) for init in model.graph.initializer
                 if init.data_location == onnx.TensorProto.EXTERNAL}
    if external and len(locations) == 1:
        # The exporter's data file becomes ours by a rename; only the references to it change.
        (raw_path.parent / locations.pop()).rename(final_path.parent / data_name)
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                next(entry for entry in init.external_data if entry.key == "location").value = data_name
        onnx.save_model(model, str(final_path))
    else:
        if locations:  # small enough to hold: one file (or the exporter split its data: gather it)
            onnx.load_external_data_for_model(model, str(raw_path.parent))
        if external:
            onnx.save_model(model, str(final_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024, convert_attribute=False)
        else:
            onnx.save_model(model, str(final_path))
    try:
        onnx.checker.check_model(str(final_path))  # by path: reads the graph, not its external weights
    except onnx.checker.ValidationError as exc:
        raise ExportFailedError(f"onnx.checker rejected the exported graph: {exc}") from exc
    info = {"graph": final_path.name, "external_data": data_name if external else None,
            "weight_bytes": weight_bytes, "nodes": len(model.graph.node), "opset": model.opset_import[0].version,
            "bfloat16_ops_upcast": bf16_rewrites}
    log.info("graph: %d nodes, %.1f MB of weights%s", info["nodes"], weight_bytes / 1e6,
             f", external data {data_name}" if external else "")
    return info
