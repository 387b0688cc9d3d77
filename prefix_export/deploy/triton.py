"""Triton Inference Server: a model repository entry (config.pbtxt for the onnxruntime backend) for an export.

Layout, inside the export folder (the graph is hard-linked, so it costs no disk space):

    OUT/triton/NAME/config.pbtxt
    OUT/triton/NAME/1/model.onnx        (+ model.onnx.data when the export has external data)

Serve with `tritonserver --model-repository OUT/triton`. The model is one decoder step with the
contract of `contract.py` (stateless: the client keeps the cache and feeds `present.*` back as
`past_key_values.*`), so `max_batch_size: 0` and every dimension, batch included, is given. On a
GPU the TensorRT execution accelerator is asked for (the graph's own precision, engine cache); the
CUDA provider runs what TensorRT cannot; on a CPU-only server the accelerator section is ignored.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import onnx

from .. import contract
from ..errors import ExportFailedError, InputError

log = logging.getLogger(__name__)

TRITON_DIR = "triton"
CONFIG_FILE = "config.pbtxt"
# ONNX element type -> Triton data type (model_config.proto's DataType).
_TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                 onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
                 onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
                 onnx.TensorProto.BOOL: "TYPE_BOOL"}
# TensorRT execution accelerator options of Triton's onnxruntime backend; precision_mode follows the
# graph's own dtype (FP32 keeps the validated numerics; set "FP16" by hand for speed, then re-check).
TENSORRT_PARAMETERS = {"max_workspace_size_bytes": str(1 << 30), "trt_engine_cache_enable": "1",
                       "trt_engine_cache_path": "/tmp/triton_trt_cache"}


def model_name(folder: Path) -> str:
    """A Triton model name from the export folder's name: letters, digits, '_' and '-'."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(folder).name).strip("_")
    return name or "prefix_model"


def check_name(name: str) -> str:
    """A user-given model name must be one plain folder name (it becomes OUT/triton/NAME)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or "") or ".." in name:
        raise InputError(f"--triton {name!r}: expected a model name of letters, digits, '_', '-' and '.', "
                         "such as prefix_gpt2.")
    return name


def _tensor_entries(values) -> list[str]:
    entries = []
    for value in values:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise ExportFailedError(f"graph {value.name!r} has ONNX element type {tensor.elem_type}, which has no "
                                    f"Triton data type here (known: {sorted(_TRITON_TYPES.values())}).")
        dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in tensor.shape.dim]
        entries.append(f'  {{\n    name: "{value.name}"\n    data_type: {_TRITON_TYPES[tensor.elem_type]}\n'
                       f'    dims: [ {", ".join(dims)} ]\n  }}')
    return entries


def build_config(graph_file: Path, name: str) -> str:
    """config.pbtxt text for the graph's inputs and outputs (read from the graph, not assumed)."""
    model = onnx.load(str(graph_file), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    logits = next(o for o in model.graph.output if o.name == contract.LOGITS)
    half = logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    parameters = {"precision_mode": "FP16" if half else "FP32", **TENSORRT_PARAMETERS}
    accelerator = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in parameters.items())
    return (
        f"# Triton model configuration written by prefix-export: one decoder step, the client keeps the cache.\n"
        f'name: "{name}"\n'
        f'backend: "onnxruntime"\n'
        "max_batch_size: 0\n"
        "input [\n" + ",\n".join(_tensor_entries(inputs)) + "\n]\n"
        "output [\n" + ",\n".join(_tensor_entries(model.graph.output)) + "\n]\n"
        f"optimization {{\n  execution_accelerators {{\n    gpu_execution_accelerator: [\n      {{\n"
        f'        name: "tensorrt"\n{accelerator}\n      }}\n    ]\n  }}\n}}\n'
    )


def load_model_config_proto():
    """Triton's `model_config_pb2` from the `tritonclient` package, or None when it is not installed.

    Loaded from its file: importing `tritonclient.grpc` itself needs grpcio, which parsing does not.
    """
    try:
        spec = importlib.util.find_spec("tritonclient")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_config(text: str, proto=None):
    """Parse config.pbtxt text with Triton's ModelConfig message; raises ExportFailedError when invalid."""
    from google.protobuf import text_format

    proto = proto or load_model_config_proto()
    if proto is None:
        raise ExportFailedError("Triton's model_config proto is not available; install it with "
                                "`pip install --no-deps tritonclient` to check config.pbtxt.")
    try:
        return text_format.Parse(text, proto.ModelConfig())
    except text_format.ParseError as exc:
        raise ExportFailedError(f"config.pbtxt does not parse as Triton's ModelConfig: {exc}") from exc


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_triton_entry(folder: Path, graph_name: str, name: str | None = None) -> Path:
    """Write OUT/triton/NAME/{config.pbtxt,1/<graph>}; checks the syntax when tritonclient is installed."""
    folder = Path(folder)
    name = name or model_name(folder)
    entry = folder / TRITON_DIR / name
    version_dir = entry / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    graph_file = folder / graph_name
    # Triton's onnxruntime backend looks for model.onnx in the version folder unless told otherwise.
    _link_or_copy(graph_file, version_dir / "model.onnx")
    data = folder / (graph_name + ".data")
    if data.is_file():
        _link_or_copy(data, version_dir / data.name)
    text = build_config(graph_file, name)
    proto = load_model_config_proto()
    if proto is not None:
        parse_config(text, proto)
    else:
        log.info("tritonclient is not installed; config.pbtxt was written without a syntax check")
    (entry / CONFIG_FILE).write_text(text)
    log.info("wrote Triton model repository entry %s", entry)
    return entry
