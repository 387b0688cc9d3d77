"""The export folder's on-disk format, owned in one place: file names, the report, the prefix file, metadata.

    OUT/model.onnx (+ .data)          the decoder graph (any NAME.onnx; a seq2seq folder holds
                                      encoder_model.onnx + decoder_model.onnx instead)
    OUT/prefix_kv.safetensors         the prefix, one tensor `prefix_kv` (L, 2, H_kv, P, D)
    OUT/export_report.json            versions, inputs, hashes, timings, validation
    OUT/config.json, generation_config.json, tokenizer files

Everything else asks an `ExportFolder` for these; nothing here imports torch (the runtime does not
need it).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from . import contract, contract_seq2seq
from .errors import InputError, RuntimeSetupError

GRAPH_FILE = "model.onnx"
PREFIX_KV_FILE = "prefix_kv.safetensors"
PREFIX_KV_TENSOR = "prefix_kv"
REPORT_FILE = "export_report.json"
LAYOUTS = ("folded", "cache")
log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(source: str | Path):
    """The tokenizer of a model folder, an export folder or a hub name, or None when there is none
    (token ids are used then). The one tokenizer loader, for the source model and the export alike."""
    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None  # transformers would otherwise fall back to a default tokenizer for the model type
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:  # noqa: BLE001 - a model without a usable tokenizer still runs on token ids
        (log.warning if folder.is_dir() else log.info)("no usable tokenizer in %s (%s: %s); token ids only",
                                                         source, type(exc).__name__, exc)
        return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hashes(paths: list[Path], root: Path | None = None) -> dict[str, str]:
    """{path (relative to `root` when given): SHA-256}."""
    return {str(p.relative_to(root) if root else p): sha256(p) for p in paths}


def resolve_output(out: str | Path) -> tuple[Path, str]:
    """`out/model.onnx` -> (out/, 'model.onnx'); `out/` -> (out/, 'model.onnx')."""
    out = Path(out).expanduser()
    if out.suffix == ".onnx":
        return out.parent if str(out.parent) else Path("."), out.name
    return out, GRAPH_FILE


def read_prefix_file(path: str | Path) -> np.ndarray:
    """A prefix_kv.safetensors (or an export folder holding one) -> (L, 2, H_kv, P, D) numpy."""
    from safetensors.numpy import load_file

    path = Path(path)
    if path.is_dir():
        path = path / PREFIX_KV_FILE
    if not path.is_file():
        raise InputError(f"prefix file {path} does not exist; expected a {PREFIX_KV_FILE} written by prefix-export "
                         "(or an export folder holding one).")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise InputError(f"{path} is not a {PREFIX_KV_FILE} written by prefix-export ({exc}).") from exc
    if PREFIX_KV_TENSOR not in tensors or tensors[PREFIX_KV_TENSOR].ndim != 5:
        raise InputError(f"{path} holds {sorted(tensors)}; expected one tensor {PREFIX_KV_TENSOR!r} of shape "
                         "(L, 2, H_kv, P, D).")
    return tensors[PREFIX_KV_TENSOR]


def prefix_file_metadata(shape: tuple[int, ...], dtype: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata written beside the `prefix_kv` tensor (L, 2, H_kv, P, D)."""
    L, _, H, P, D = shape
    metadata = {"layout": "(L, 2, H_kv, P, D); [:, 0] = keys, [:, 1] = values", "num_layers": str(L),
                "num_kv_heads": str(H), "num_virtual_tokens": str(P), "head_dim": str(D), "dtype": dtype}
    metadata.update(extra or {})
    return metadata


def read_initializers(path: Path, names: list[str]) -> dict:
    """The named initializers of a graph as numpy arrays, loading only their own external data."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    wanted = set(names)
    found = {}
    for init in model.graph.initializer:
        if init.name in wanted:
            if external_data_helper.uses_external_data(init):
                external_data_helper.load_external_data_for_tensor(init, str(Path(path).parent))
            found[init.name] = numpy_helper.to_array(init)
    return found


def read_metadata(path: Path) -> dict[str, str]:
    """The graph's metadata_props (layout, P, versions), without loading its weights."""
    if Path(path).suffix == ".ort":  # ORT format (flatbuffers): ONNX Runtime reads it
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return dict(session.get_modelmeta().custom_metadata_map)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _first(value):
    return value[0] if isinstance(value, list) and value else value


@dataclasses.dataclass
class ExportFolder:
    """An export folder, written or to be written. `graph_name` is the decoder graph's file name."""

    path: Path
    graph_name: str = GRAPH_FILE

    def __post_init__(self):
        self.path = Path(self.path)

    # ---- opening an existing folder --------------------------------------------------------------

    @classmethod
    def open(cls, folder_or_graph: str | Path) -> "ExportFolder":
        """An existing export folder (or one of its graphs); a clear error when it is not one."""
        path = Path(folder_or_graph)
        if path.is_file() and path.suffix in (".onnx", ".ort"):  # a graph of the folder (ORT format too)
            folder = cls(path.parent, path.name)
        elif not path.is_dir():
            raise RuntimeSetupError(f"{path} does not exist; expected an export folder written by prefix-export.")
        elif (path / contract_seq2seq.ENCODER_GRAPH).is_file() and (path / contract_seq2seq.DECODER_GRAPH).is_file():
            folder = cls(path, contract_seq2seq.DECODER_GRAPH)
        elif (path / GRAPH_FILE).is_file():
            folder = cls(path, GRAPH_FILE)
        else:
            graphs = sorted(path.glob("*.onnx"))
            if len(graphs) != 1:
                raise RuntimeSetupError(f"{path} is not an export folder: expected one .onnx graph in it, found "
                                        f"{[g.name for g in graphs] or 'none'}.")
            folder = cls(path, graphs[0].name)
        if contract.META_PREFIX_LENGTH not in folder.metadata:
            raise RuntimeSetupError(f"{folder.graph} has no {contract.META_PREFIX_LENGTH!r} metadata; it was not "
                                    "written by prefix-export. Expected an export folder (model.onnx, "
                                    f"{PREFIX_KV_FILE}, {REPORT_FILE}).")
        return folder

    @classmethod
    def from_report(cls, path: str | Path) -> "ExportFolder":
        """An export folder as its report describes it, whether or not its graphs are still there
        (what `validate` needs to say which file is missing)."""
        folder = cls(Path(path))
        info = folder.read_report().get("graph", {})
        if "parts" in info:
            return cls(folder.path, contract_seq2seq.DECODER_GRAPH)
        return cls(folder.path, info.get("graph") or GRAPH_FILE)

    # ---- files -----------------------------------------------------------------------------------

    @property
    def graph(self) -> Path:
        """The decoder graph (the one holding the prefix, or fed it)."""
        return self.path / self.graph_name

    @property
    def encoder_graph(self) -> Path | None:
        return self.path / contract_seq2seq.ENCODER_GRAPH if self.is_seq2seq else None

    @property
    def is_seq2seq(self) -> bool:
        return self.graph_name == contract_seq2seq.DECODER_GRAPH

    @property
    def prefix_file(self) -> Path:
        return self.path / PREFIX_KV_FILE

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_FILE

    def has_tokenizer(self) -> bool:
        return any((self.path / name).is_file() for name in TOKENIZER_FILES)

    def load_tokenizer(self):
        """The folder's own tokenizer, or None (see load_tokenizer)."""
        return load_tokenizer(self.path)

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file())

    # ---- the report ------------------------------------------------------------------------------

    def read_report(self) -> dict:
        if not self.report_file.is_file():
            raise InputError(f"{self.path} has no {REPORT_FILE}; it is not an export folder written by prefix-export.")
        try:
            return json.loads(self.report_file.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{self.report_file} is not valid JSON ({exc}).") from exc

    @functools.cached_property
    def report(self) -> dict:
        """The report, or {} when the folder has none (a graph copied without it still runs)."""
        return self.read_report() if self.report_file.is_file() else {}

    def write_report(self, report: dict) -> None:
        """Record every file's hash (the report's own excepted), then write the report."""
        report["outputs"] = {"sha256": hashes([p for p in self.files() if p != self.report_file], self.path)}
        self.report_file.write_text(json.dumps(report, indent=2))

    def check_hashes(self, report: dict | None = None) -> list[str]:
        """Files whose SHA-256 differs from the report, or that are missing."""
        report = self.read_report() if report is None else report
        problems = []
        for name, expected in report.get("outputs", {}).get("sha256", {}).items():
            path = self.path / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif sha256(path) != expected:
                problems.append(f"{name} changed since export (SHA-256 differs)")
        return problems

    def graph_names(self, report: dict) -> list[str]:
        """The graphs the report lists (a seq2seq export lists its two under `parts`)."""
        info = report.get("graph", {})
        return list(info.get("parts", {})) or [info.get("graph") or self.graph_name]

    # ---- what the graph and configs say ------------------------------------------------------------

    @functools.cached_property
    def metadata(self) -> dict[str, str]:
        return read_metadata(self.graph)

    @property
    def layout(self) -> str:
        return self.metadata.get(contract.META_LAYOUT, "folded")

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.metadata[contract.META_PREFIX_LENGTH])

    def read_prefix(self) -> np.ndarray:
        return read_prefix_file(self.prefix_file)

    def _json(self, name: str) -> dict:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else {}

    @functools.cached_property
    def config(self) -> dict:
        return self._json("config.json")

    @property
    def eos_token_id(self) -> int | None:
        return _first(self._json("generation_config.json").get("eos_token_id", self.config.get("eos_token_id")))

    @property
    def pad_token_id(self) -> int | None:
        return _first(self._json("generation_config.json").get("pad_token_id", self.config.get("pad_token_id")))

    @property
    def architecture(self) -> dict:
        return self.report.get("architecture") or {}

    @property
    def max_positions(self) -> int | None:
        """Rows of a learned position table (the registry's verdict, recorded in the report), else None.
        Without a report, the config's n_positions."""
        arch = self.architecture
        if arch:
            return arch.get("max_positions") if arch.get("positions") == "learned" else None
        return self.config.get("n_positions")

    @property
    def dtype(self) -> str:
        """The dtype the graph computes in (the report's prefix dtype; float32 without a report)."""
        return (self.report.get("prefix") or {}).get("dtype", "float32")

    def graph_bytes(self, graph: Path | None = None) -> int:
        """Bytes of a graph (the decoder's by default) on disk, its external data file included."""
        graph = graph or self.graph
        data = graph.with_name(graph.name + ".data")
        return sum(path.stat().st_size for path in (graph, data) if path.is_file())

    @property
    def sliding_window(self) -> int | None:
        return self.architecture.get("sliding_window")

    @property
    def vocab_size(self) -> int | None:
        """Rows of the output vocabulary: the report's architecture, else config.json."""
        value = self.architecture.get("vocab_size") or self.config.get("vocab_size")
        return int(value) if value else None

    @property
    def decoder_start_token_id(self) -> int | None:
        value = self.config.get("decoder_start_token_id")
        return None if value is None else int(value)
