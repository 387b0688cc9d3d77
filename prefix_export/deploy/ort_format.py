"""The ORT format for mobile and edge builds: `model.ort` beside `model.onnx`, and the operator list a
reduced-size ONNX Runtime build needs (`required_operators_and_types.config`).

`--format ort` (export and compile) writes both with ONNX Runtime's own converter, then checks that
ONNX Runtime runs `model.ort` to the same greedy tokens as `model.onnx` before the folder is
published. `model.onnx` stays: it is what validation, genai, optimum and the other runtimes read.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import numpy as np

from ..errors import ExportFailedError, UnsupportedError

log = logging.getLogger(__name__)

ORT_SUFFIX = ".ort"
OPERATORS_CONFIG = "required_operators_and_types.config"


def ort_graph_name(graph_name: str) -> str:
    return Path(graph_name).with_suffix(ORT_SUFFIX).name


def write_ort_format(folder, check_tokens: int = 8) -> dict:
    """Convert `folder`'s decoder graph to ORT format (fixed optimizations, type reduction); returns
    sizes, operator count and the token check, which raises ExportFailedError on a difference."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if folder.is_seq2seq:
        raise UnsupportedError("--format ort writes one decoder graph; encoder-decoder exports are not converted.")
    if (folder.path / (folder.graph_name + ".data")).is_file():
        raise UnsupportedError("--format ort: the ORT format holds its weights inline (flatbuffers, 2 GB at most); "
                               "this graph's weights are external data. Use ONNX for models this large.")
    source = folder.graph
    printed = io.StringIO()  # the converter prints its progress; it goes to the log instead
    with contextlib.redirect_stdout(printed):
        convert_onnx_models_to_ort(source, output_dir=folder.path, optimization_styles=[OptimizationStyle.Fixed],
                                   enable_type_reduction=True)
    log.info("ORT format: %s", printed.getvalue().strip().replace("\n", "; "))
    target = folder.path / ort_graph_name(folder.graph_name)
    written = source.with_suffix(".required_operators_and_types.config")
    if not target.is_file() or not written.is_file():
        raise ExportFailedError(f"ONNX Runtime's ORT-format converter did not write {target.name} and its operator "
                                f"config: {printed.getvalue()[-500:]}")
    config = folder.path / OPERATORS_CONFIG
    # The converter names the (temporary) path it read; the folder's own file name is what holds.
    lines = [f"# - {target.name}" if line.startswith("# - ") else line for line in written.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")
    written.unlink()
    operators = sum(len(re.findall(r"(?:^|,)([A-Za-z][A-Za-z0-9_]*)(?=\{|,|$)", re.sub(r"\{[^}]*\}+", "", line.split(";", 2)[2])))
                    for line in lines if line and not line.startswith("#") and line.count(";") >= 2)
    info = {"graph": target.name, "config": config.name, "onnx_bytes": source.stat().st_size,
            "ort_bytes": target.stat().st_size, "config_operators": operators}
    info["tokens"] = check_same_tokens(folder, target, check_tokens)
    return info


def check_same_tokens(folder, ort_graph: Path, steps: int) -> dict:
    """Greedy tokens of `ort_graph` and of the folder's ONNX graph on one prompt; equal, or an error."""
    from ..runtime.decoder import make_decoder
    from ..runtime.loop import greedy_generate
    from ..runtime.sessions import create_session

    prefix = folder.read_prefix() if folder.layout == "cache" else None
    onnx_decoder = make_decoder(create_session(folder.graph, "cpu"), prefix)
    ort_decoder = make_decoder(create_session(ort_graph, "cpu"), prefix)
    vocab = onnx_decoder.vocab_size or 100
    prompt = (np.arange(7, dtype=np.int64) * 37 + 5) % vocab
    mask = np.ones((1, prompt.size), np.int64)
    expected = greedy_generate(onnx_decoder, prompt[None], mask, steps)[0]
    got = greedy_generate(ort_decoder, prompt[None], mask, steps)[0]
    if not np.array_equal(expected, got):
        raise ExportFailedError(f"{ort_graph.name} gives other greedy tokens than {folder.graph_name}: "
                                f"{got.tolist()} vs {expected.tolist()}")
    return {"prompt": prompt.tolist(), "new_tokens": expected.tolist(), "equal": True}
