"""A task's prefix as an ONNX Runtime adapter file (`.onnx_adapter`): written, read, checked, activated.

A swappable folded export (`--swappable-prefix`) lists its prefix initializers `prefix_{key,value}_{i}`,
(1, H_kv, P, D) each, as graph inputs too. An adapter file holds tensors of exactly those names;
ONNX Runtime substitutes them for the initializers when the adapter is active
(`RunOptions.add_active_adapter`; onnxruntime-genai: `og.Adapters` + `set_active_adapter`), so one
loaded graph serves every task made for its base model. The file format is ONNX Runtime's own
(`onnxruntime.AdapterFormat`, flatbuffers); nothing here imports torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import contract
from ..errors import InputError, MismatchError, UnsupportedError

ADAPTER_SUFFIX = ".onnx_adapter"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": "bfloat16",
              "tensor(double)": np.float64}


def report_path(adapter: str | Path) -> Path:
    """Where an adapter's report lives: beside it, `task.onnx_adapter.json`."""
    adapter = Path(adapter)
    return adapter.with_name(adapter.name + ".json")


def write_adapter(path: str | Path, prefix: np.ndarray) -> dict:
    """Write `prefix` (L, 2, H_kv, P, D) as an adapter file of `prefix_{key,value}_{i}` (1, H_kv, P, D)
    tensors; returns {parameters, bytes}."""
    import onnxruntime as ort

    names = contract.prefix_initializer_names(prefix.shape[0])
    tensors = [np.ascontiguousarray(prefix[i, j][None]) for i in range(prefix.shape[0]) for j in (0, 1)]
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(t) for name, t in zip(names, tensors)})
    adapter.export_adapter(str(path))
    return {"parameters": len(names), "bytes": Path(path).stat().st_size}


def read_adapter(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} of an adapter file; a missing, truncated or foreign file is an InputError."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InputError(f"adapter {path}: no such file (make one with `prefix-export adapter OUT --prefix TASK "
                         f"--out {path.name}`).")
    try:
        parameters = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as exc:  # noqa: BLE001 - ORT raises RuntimeError with its verifier's text
        raise InputError(f"adapter {path} is not a readable ONNX Runtime adapter file ({path.stat().st_size} bytes; "
                         f"truncated or another format): {str(exc).splitlines()[0][-200:]}") from None
    # Copies: the arrays would otherwise view memory owned by the reader, freed with it (seen: garbage).
    return {name: np.array(value.numpy(), copy=True) for name, value in parameters.items()}


def stack_prefix(tensors: dict[str, np.ndarray], num_layers: int) -> np.ndarray:
    """Adapter tensors -> the prefix (L, 2, H_kv, P, D), in layer order."""
    return np.stack([np.stack([tensors[contract.prefix_initializer_name(i, kind)][0] for kind in ("key", "value")])
                     for i in range(num_layers)])


def swappable_inputs(session) -> dict[str, tuple[tuple, object]]:
    """{prefix input name: (shape, numpy dtype)} of a session's graph; empty when not swappable.
    (ONNX Runtime lists initializers that are also graph inputs apart from the required inputs.)"""
    return {i.name: (tuple(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in session.get_overridable_initializers()
            if i.name.startswith("prefix_")}


def check_adapter_fits(tensors: dict[str, np.ndarray], expected: dict[str, tuple[tuple, object]], adapter: str,
                       graph: str) -> None:
    """Every tensor the graph can take, of its shape and dtype, and nothing else; else MismatchError
    showing both sides."""
    if not expected:
        raise UnsupportedError(f"{graph} keeps its prefix constant, so an adapter cannot replace it; re-export with "
                               "--swappable-prefix.")
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise MismatchError(f"adapter {adapter} does not fit {graph}: "
                            + (f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}" if missing else "")
                            + ("; " if missing and extra else "")
                            + (f"unknown tensors {extra[:4]}{'...' if len(extra) > 4 else ''}" if extra else "")
                            + f" (the graph takes {len(expected)} prefix tensors, the adapter has {len(tensors)}); "
                            "it was made for a model with another number of layers.")
    for name, (shape, dtype) in expected.items():
        got = tensors[name]
        if tuple(got.shape) != shape or _dtype_name(got.dtype) != _dtype_name(dtype):
            raise MismatchError(
                f"adapter {adapter}: {name} is {tuple(got.shape)} {_dtype_name(got.dtype)}, {graph} takes {shape} "
                f"{_dtype_name(dtype)} (1, H_kv, P, D). The prefix length P, KV heads, head dim and dtype must be "
                "the export's; make the adapter from this export (`prefix-export adapter`).")


def _dtype_name(dtype) -> str:
    """numpy's name for a dtype; bfloat16, which numpy lacks, by its own name."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


class ActiveAdapter:
    """An adapter file loaded into ONNX Runtime, and the RunOptions that make it active. The options
    hold a raw pointer to the loaded adapter: this object keeps both alive together."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        self.path = Path(path)
        self.adapter = ort.LoraAdapter()
        try:
            self.adapter.Load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"ONNX Runtime could not load the adapter {path}: "
                             f"{str(exc).splitlines()[0][-200:]}") from None
        self.run_options = ort.RunOptions()
        self.run_options.add_active_adapter(self.adapter)


def activate(decoder, path: str | Path) -> np.ndarray:
    """Check the adapter at `path` against `decoder`'s graph (an OnnxDecoder) and run its later steps
    with the adapter active. Returns the adapter's prefix (L, 2, H_kv, P, D)."""
    if decoder.prefix is not None:
        raise InputError(f"adapter {path}: this is a cache-layout export, which takes a task's prefix as its first "
                         "past; pass that task's prefix_kv.safetensors with --prefix-kv instead.")
    tensors = read_adapter(path)
    check_adapter_fits(tensors, swappable_inputs(decoder.session), str(path), "the graph")
    decoder.adapter = ActiveAdapter(path)
    return stack_prefix(tensors, decoder.num_layers)
