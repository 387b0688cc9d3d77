"""Execution providers: partial names -> ONNX Runtime names, and the provider options we build.

The option builders are plain functions of the graph's inputs and the user's limits, so tests can
inspect them on a machine without a GPU. TensorRT needs an optimisation profile (min/opt/max shape)
for *every* dynamic input; we derive each one from the contract's named axes (contract.py):

    batch_size              1            .. opt_batch              .. max_batch
    sequence_length         1            .. 1 (decode)             .. max_total - min_past
    past_sequence_length    min_past     .. opt_total - 1          .. max_total - 1
    total_sequence_length   min_past + 1 .. opt_total              .. max_total

so that total = past + sequence holds at min, at opt and at the extremes. `min_past` is 0 for the
folded layout (the first step has no cache) and P for the cache layout (the prefix is the first
past), which is why the cache layout suits TensorRT: no zero-length tensors.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from .. import contract
from ..errors import InputError, RuntimeSetupError, UnsupportedError

log = logging.getLogger(__name__)

# ONNX Runtime's type strings (NodeArg.type) -> numpy dtypes
ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32}



def cache_geometry(inputs: dict) -> tuple[list[str], int, int, int, type]:
    """(past names, layers, H_kv, D, dtype) of a decoder session's inputs {name: NodeArg}, from
    past_key_values.0.key (B, H_kv, T, D)."""
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    first = inputs[contract.past_name(0, "key")]
    return past_names, len(past_names) // 2, int(first.shape[1]), int(first.shape[3]), ORT_TO_NUMPY[first.type]


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

# Partial names users type -> ONNX Runtime provider names.
ALIASES = {
    "cpu": CPU,
    "cuda": CUDA,
    "gpu": CUDA,
    "trt": TENSORRT,
    "tensorrt": TENSORRT,
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}

TRT_CACHE_DIR = "trt_cache"  # inside the export folder: engines/ and timing/


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def ort_package() -> str:
    """Which onnxruntime distribution is installed (the CPU and GPU wheels share the module name)."""
    from importlib import metadata

    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            metadata.version(dist)
            return dist
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def resolve_provider(name: str, available: list[str] | None = None) -> str:
    """`cpu`/`cuda`/`trt`/full name -> the installed ONNX Runtime provider, or a clear error."""
    import onnxruntime as ort

    available = available_providers() if available is None else available
    key = name.strip()
    full = ALIASES.get(key.lower(), key)
    if full in available:
        return full
    matches = [p for p in available if p.lower().startswith(key.lower())]
    if len(matches) == 1:
        return matches[0]
    raise RuntimeSetupError(
        f"execution provider {name!r} ({full}) is not available in this onnxruntime "
        f"({ort.__version__}, package {ort_package()}). Installed: {', '.join(available)}. "
        "For CUDA/TensorRT install the `gpu` extra: pip install 'prefix-export[gpu]' (and, for TensorRT, "
        "the TensorRT libraries), or pass --fallback cpu to run on the CPU instead.")


def device_of(provider: str) -> str:
    """Where a provider keeps tensors, as IO binding names it: 'cuda' or 'cpu'."""
    return "cuda" if provider in (CUDA, TENSORRT) else "cpu"


# ---- shapes ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapeLimits:
    """What the user will run: the largest batch and the longest attention mask (P + prompt + new)."""

    max_batch: int
    max_total_length: int  # attention_mask width: (cache layout: P +) prompt + new tokens
    min_past: int = 0  # 0 for the folded layout, P for the cache layout
    opt_batch: int | None = None  # default: max_batch
    opt_total_length: int | None = None  # default: half of max_total_length

    def __post_init__(self):
        if self.max_batch < 1:
            raise InputError(f"max batch must be >= 1, got {self.max_batch}.")
        if self.max_total_length < self.min_past + 1:
            raise InputError(f"max total length {self.max_total_length} leaves no room for a token after the "
                             f"{self.min_past} positions the first past holds; raise it above {self.min_past}.")

    def ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) per named dynamic axis of the contract."""
        Bm, Tm, p0 = self.max_batch, self.max_total_length, self.min_past
        Bo = min(max(self.opt_batch or Bm, 1), Bm)
        To = min(max(self.opt_total_length or (p0 + Tm + 1) // 2, p0 + 1), Tm)
        return {contract.BATCH: (1, Bo, Bm),
                contract.SEQUENCE: (1, 1, Tm - p0),
                contract.PAST: (p0, To - 1, Tm - 1),
                contract.TOTAL: (p0 + 1, To, Tm)}


def graph_inputs(graph: str | Path) -> dict[str, list[int | str | None]]:
    """Each graph input's dims: an int (static), the dim_param name, or None (unnamed dynamic)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in value.type.tensor_type.shape.dim]
    return shapes


def profile_shapes(inputs: dict[str, list[int | str | None]], limits: ShapeLimits) -> dict[str, dict[str, list[int]]]:
    """{"min"|"opt"|"max": {input: shape}} for every input with a dynamic axis."""
    ranges = limits.ranges()
    profiles: dict[str, dict[str, list[int]]] = {"min": {}, "opt": {}, "max": {}}
    for name, dims in inputs.items():
        if all(isinstance(d, int) for d in dims):
            continue  # static: TensorRT needs no profile for it
        for which, index in (("min", 0), ("opt", 1), ("max", 2)):
            shape = []
            for axis, dim in enumerate(dims):
                if isinstance(dim, int):
                    shape.append(dim)
                elif dim in ranges:
                    shape.append(ranges[dim][index])
                else:
                    raise UnsupportedError(
                        f"input {name!r} axis {axis} is dynamic ({dim!r}) but not one of the contract's named axes "
                        f"{sorted(ranges)}; TensorRT profiles cannot be derived for it. Was the graph exported by "
                        "prefix-export?")
            profiles[which][name] = shape
    return profiles


def _profile_string(shapes: dict[str, list[int]]) -> str:
    """ORT's format: `name:1x4x0x8,other:...`."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def tensorrt_options(inputs: dict[str, list[int | str | None]], limits: ShapeLimits, cache_dir: str | Path,
                     fp16: bool = False, device_id: int = 0, workspace_bytes: int | None = None) -> dict[str, str]:
    """TensorRT provider options: one profile covering `limits`, engine + timing caches in `cache_dir`."""
    profiles = profile_shapes(inputs, limits)
    cache_dir = Path(cache_dir)
    options = {
        "device_id": str(device_id),
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_profile_min_shapes": _profile_string(profiles["min"]),
        "trt_profile_opt_shapes": _profile_string(profiles["opt"]),
        "trt_profile_max_shapes": _profile_string(profiles["max"]),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir / "engines"),
        # engines are only valid for the profile and precision they were built with
        "trt_engine_cache_prefix": f"b{limits.max_batch}_t{limits.max_total_length}_{'fp16' if fp16 else 'fp32'}",
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir / "timing"),
    }
    if workspace_bytes:
        options["trt_max_workspace_size"] = str(int(workspace_bytes))
    return options


def cuda_options(device_id: int = 0, tf32: bool = False) -> dict[str, str]:
    """CUDA provider options. TF32 is off by default: fp32 graphs then match the CPU within 1e-4."""
    return {
        "device_id": str(device_id),
        "arena_extend_strategy": "kSameAsRequested",  # the KV buffers are allocated once, at full size
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
        "use_tf32": "1" if tf32 else "0",
    }


def provider_chain(provider: str, options: dict[str, str] | None = None) -> list[tuple[str, dict[str, str]]]:
    """The `providers=` list for a session: the requested one, then CPU for the nodes it cannot run.

    TensorRT gets CUDA after it, as ONNX Runtime recommends, so nodes TensorRT rejects still run on
    the GPU.
    """
    chain = [(provider, dict(options or {}))]
    if provider == TENSORRT:
        device = (options or {}).get("device_id", "0")
        chain.append((CUDA, cuda_options(int(device))))
    if provider != CPU:
        chain.append((CPU, {}))
    return chain
