"""OpenVINO (its Python API) as a drop-in for the ONNX Runtime session an OnnxDecoder drives.

`OpenVinoSession` answers the three calls the decoder and the loop make of a session (`get_inputs`,
`get_outputs`, `run`), so the same decode loop, with the same masks, positions and cache handling
(both layouts), runs an export folder's `model.onnx` on OpenVINO. bench uses it as a peer runtime.

OpenVINO's CPU plugin computes in bfloat16 by default on CPUs that support it; tokens then differ
from float32's, so the precision hint is float32 unless asked otherwise.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import RuntimeSetupError

_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)", "i64": "tensor(int64)",
          "i32": "tensor(int32)", "boolean": "tensor(bool)", "bf16": "tensor(bfloat16)"}


@dataclasses.dataclass(frozen=True)
class _Port:
    """What OnnxDecoder reads of an ONNX Runtime NodeArg: name, shape (ints or names), type string."""

    name: str
    shape: list
    type: str


def _port(port) -> _Port:
    shape = [int(d.get_length()) if d.is_static else str(d) for d in port.get_partial_shape()]
    return _Port(port.get_any_name(), shape, _TYPES.get(port.get_element_type().get_type_name(), "tensor(float)"))


class OpenVinoSession:
    """A compiled OpenVINO model and one infer request, behind ONNX Runtime's session calls."""

    def __init__(self, graph: str | Path, device: str = "CPU", threads: int | None = None, precision: str = "f32"):
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeSetupError("OpenVINO is not installed: pip install openvino (the `cpp` extra).") from exc
        core = ov.Core()
        model = core.read_model(str(graph))
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self._inputs = [_port(p) for p in model.inputs]
        self._outputs = [_port(p) for p in model.outputs]
        self.device = device

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return [f"OpenVINO:{self.device}"]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        # share_outputs=False: copies, since the presents are fed back while the request is reused
        results = self.request.infer(feeds, share_inputs=False, share_outputs=False)
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return [by_name[name] for name in (output_names or [o.name for o in self._outputs])]
