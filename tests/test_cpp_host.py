"""The C++ host (cpp/prefix_generate on OpenVINO's C++ API) prints our Python runner's greedy tokens.

cpp/ is built once per session into a temporary folder, against the `openvino` wheel
(pip install 'prefix-export[cpp]'), with cmake and a C++17 compiler. It runs the export folders of
tests/test_deploy.py's cases (the embedded default and the registered decoder families, in both
layouts) and must print exactly our greedy tokens, ending after the same end token. Bad input exits
with 2 and says what was wrong. A missing tool skips here with the reason and fails under CI
(CI=true), where .ci/run installs it.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from test_deploy import CASE_NAMES, NEW_TOKENS, require
from tiny_models import make_prefix, save_tiny_model, tiny_config

CPP = Path(__file__).resolve().parent.parent / "cpp"
LAYOUTS = ("folded", "cache")
USAGE = "usage: prefix_generate OUT_DIR --token-ids"


@pytest.fixture(scope="session")
def prefix_generate(tmp_path_factory) -> Path:
    """cpp/ configured and built (Release) in a temporary folder: the prefix_generate binary."""
    require(shutil.which("cmake") is not None, "cmake is not installed (apt-get install cmake)")
    require(shutil.which("c++") is not None or shutil.which("g++") is not None,
            "no C++ compiler is installed (apt-get install g++)")
    try:
        import openvino.utils
    except ImportError:
        require(False, "openvino is not installed (pip install 'prefix-export[cpp]')")
    build = tmp_path_factory.mktemp("cpp-build")
    for command in (["cmake", "-S", CPP, "-B", build, f"-DOpenVINO_DIR={openvino.utils.get_cmake_path()}"],
                    ["cmake", "--build", build, "-j", "1"]):
        run = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{' '.join(map(str, command))} failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
    binary = build / "prefix_generate"
    assert binary.is_file(), f"the build did not produce {binary}"
    return binary


def host(binary: Path, *args) -> subprocess.CompletedProcess:
    """prefix_generate ARGS on one thread (CI has two cores and two pytest workers)."""
    return subprocess.run([str(binary), *map(str, args), "--threads", "1"], capture_output=True, text=True,
                          timeout=300)


def ids(values) -> str:
    return ",".join(map(str, values))


def assert_refused(run: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, nothing on stdout, and each fragment in the message on stderr."""
    assert run.returncode == 2, f"exit {run.returncode}; stdout {run.stdout!r}; stderr {run.stderr!r}"
    assert run.stdout == ""
    for fragment in fragments:
        assert fragment in run.stderr, f"{fragment!r} not in {run.stderr!r}"


# ---- the tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_cpp_host_reproduces_greedy(cases, prefix_generate, name, layout):
    case = cases.get(name, layout)
    run = host(prefix_generate, case.folder, "--token-ids", ids(case.prompt), "--max-new-tokens", NEW_TOKENS)
    assert run.returncode == 0, f"{name} ({layout}): exit {run.returncode}: {run.stderr[-3000:]}"
    assert run.stdout.count("\n") == 1 and run.stdout.endswith("\n"), f"expected one line, got {run.stdout!r}"
    got = [int(t) for t in run.stdout.split()]
    assert got == case.expected, f"{name} ({layout}): C++ host {got} != ours {case.expected}"


def test_cpp_host_stops_after_the_end_token(cases, prefix_generate, tmp_path):
    """An end token ends the line: the folder's eos made to be the second greedy token stops there."""
    case = cases.get("gpt2")
    folder = tmp_path / "eos"
    shutil.copytree(case.folder, folder)
    (folder / "generation_config.json").write_text(f'{{"eos_token_id": [999, {case.expected[1]}]}}')
    run = host(prefix_generate, folder, "--token-ids", ids(case.prompt), "--max-new-tokens", NEW_TOKENS)
    assert run.returncode == 0, run.stderr
    assert [int(t) for t in run.stdout.split()] == case.expected[:2]


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_prefix_files_are_read(cases, prefix_generate, tmp_path, dtype):
    """The safetensors reader widens F16 and BF16: a prefix rounded to that type gives the same tokens
    stored in it as stored in F32 (a misread value would change the varied greedy output)."""
    import torch
    from safetensors.torch import load_file, save_file

    case = cases.get("gpt2", "cache")
    rounded = load_file(str(case.folder / "prefix_kv.safetensors"))["prefix_kv"].to(
        {"F16": torch.float16, "BF16": torch.bfloat16}[dtype])
    lines = []
    for label, tensor in (("f32", rounded.float()), ("half", rounded)):
        folder = tmp_path / label
        shutil.copytree(case.folder, folder)
        save_file({"prefix_kv": tensor.contiguous()}, str(folder / "prefix_kv.safetensors"))
        run = host(prefix_generate, folder, "--token-ids", ids(case.prompt), "--max-new-tokens", NEW_TOKENS)
        assert run.returncode == 0, run.stderr
        lines.append(run.stdout)
    assert lines[0] == lines[1], f"{dtype} prefix: {lines[1]!r} != the same values in F32: {lines[0]!r}"


# ---- bad input: exit 2 and a message ------------------------------------------------------------------


def test_a_folder_that_is_not_an_export_is_refused(prefix_generate, tmp_path):
    assert_refused(host(prefix_generate, tmp_path / "missing", "--token-ids", "1,2"),
                   "is not a folder; expected an export folder written by prefix-export")
    (tmp_path / "notes.txt").write_text("not an export")
    assert_refused(host(prefix_generate, tmp_path, "--token-ids", "1,2"),
                   "is not an export folder: expected model.onnx (or one .onnx graph) in it, found none")


def test_a_graph_not_written_by_prefix_export_is_refused(prefix_generate, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "model.onnx"))
    assert_refused(host(prefix_generate, tmp_path, "--token-ids", "1,2"),
                   "has no 'prefix_export.num_virtual_tokens' metadata; it was not written by prefix-export")


@pytest.mark.parametrize("layout, missing, message", [
    ("folded", "model.onnx", "the graph model.onnx that export_report.json lists is missing"),
    ("cache", "prefix_kv.safetensors", "prefix_kv.safetensors is missing; a cache-layout export feeds it"),
])
def test_a_missing_file_is_named(cases, prefix_generate, tmp_path, layout, missing, message):
    folder = tmp_path / "copy"
    shutil.copytree(cases.get("gpt2", layout).folder, folder)
    (folder / missing).unlink()
    assert_refused(host(prefix_generate, folder, "--token-ids", "1,2"), message)


def test_a_truncated_prefix_file_is_refused(cases, prefix_generate, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(cases.get("gpt2", "cache").folder, folder)
    data = (folder / "prefix_kv.safetensors").read_bytes()
    (folder / "prefix_kv.safetensors").write_bytes(data[:-100])
    assert_refused(host(prefix_generate, folder, "--token-ids", "1,2"),
                   "tensor 'prefix_kv' has data_offsets", "the file is truncated")


@pytest.mark.parametrize("token_ids", ["1,x", "", "1,,2", "1,2,", "-1", " 1", "1.5"])
def test_bad_token_ids_are_refused(cases, prefix_generate, token_ids):
    assert_refused(host(prefix_generate, cases.get("gpt2").folder, "--token-ids", token_ids),
                   f'--token-ids "{token_ids}": expected comma-separated non-negative integers', USAGE)


def test_token_ids_beyond_the_vocabulary_and_the_position_table_are_refused(cases, prefix_generate):
    folder = cases.get("gpt2").folder  # vocabulary 300, a learned position table of 128 rows, P=3
    assert_refused(host(prefix_generate, folder, "--token-ids", "5,300"),
                   "--token-ids: 300 is not below the vocabulary size 300")
    assert_refused(host(prefix_generate, folder, "--token-ids", "5,6", "--max-new-tokens", 124),
                   "with the prefix's P=3 positions and 124 new tokens that needs 129 positions, but the model "
                   "has 128")


@pytest.mark.parametrize("args, message", [
    ((), "--token-ids is required"),
    (("--token-ids", "1", "--max-new-tokens", "0"), '--max-new-tokens "0": expected a positive integer'),
    (("--token-ids", "1", "--precision", "int8"), "--precision int8: expected f32, bf16 or f16"),
    (("--token-ids", "1", "--temperature", "1"), "unknown option --temperature"),
])
def test_bad_arguments_are_refused(cases, prefix_generate, args, message):
    assert_refused(host(prefix_generate, cases.get("gpt2").folder, *args), message, USAGE)


def test_a_seq2seq_export_is_refused(prefix_generate, tmp_path):
    """An encoder-decoder export (two graphs): not what this host runs, and it says so."""
    from prefix_export.api import export_prefix_model

    save_tiny_model(tiny_config("bart"), tmp_path / "bart")
    make_prefix(tmp_path / "bart", tmp_path / "prefix", 3, projection=False, trained=False)
    export_prefix_model(str(tmp_path / "bart"), tmp_path / "prefix", tmp_path / "out", progress=False,
                        run_validation=False)
    assert_refused(host(prefix_generate, tmp_path / "out", "--token-ids", "1,2"),
                   "is an encoder-decoder (seq2seq) export (encoder_model.onnx + decoder_model.onnx); "
                   "prefix_generate runs decoder-only exports")
