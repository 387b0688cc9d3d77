"""tools/gpu_check.py's wheel handling (the part a GPU session cannot afford to debug): parts -> wheel."""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name: str):
    """tools/NAME.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_tool("gpu_check")


def make_wheel(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("onnxruntime/__init__.py", "x = 1\n" * 5000)
    return path.read_bytes()


def test_parts_carried_in_several_calls_make_the_wheel(tmp_path, gpu_check):
    name = "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    data = make_wheel(tmp_path / name)
    stash = tmp_path / "stash"
    for index, start in enumerate(range(0, len(data), 4000)):  # one part per "device call"
        carried = tmp_path / f"call{index}" / "parts"
        carried.mkdir(parents=True)
        (carried / f"{name}.part-a{chr(97 + index)}").write_bytes(data[start:start + 4000])
        assert len(gpu_check.stash_parts([carried.parent], stash)) == 1
    wheel = gpu_check.assemble_wheel(stash)
    assert wheel.name == name and wheel.read_bytes() == data


def test_missing_part_is_reported(tmp_path, gpu_check):
    name = "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    data = make_wheel(tmp_path / name)
    stash = tmp_path / "stash"
    stash.mkdir()
    (stash / f"{name}.part-aa").write_bytes(data[:100])  # the rest never arrived
    with pytest.raises(SystemExit, match="part is missing"):
        gpu_check.assemble_wheel(stash)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gpu_check.assemble_wheel(empty) is None


@pytest.fixture(scope="module")
def gpu_decode():
    return load_tool("gpu_decode")


def test_decode_path_targets_pick_the_captured_fp16_layout_and_its_base(gpu_decode):
    """The issue's targets from gpu_decode's rows: the faster shared fp16 layout with CUDA graphs (when any
    captured row ran), against eager and the base compiled the same way; generate against the lean loop."""
    rows = [{"model": "gpt2-small", "graph": "PyTorch eager", "layout": "-", "cuda_graph": False, "decode_ms": 4.0},
            {"model": "gpt2-small", "graph": "shared fp16", "layout": "folded", "cuda_graph": True, "decode_ms": 0.5},
            {"model": "gpt2-small", "graph": "shared fp16", "layout": "cache", "cuda_graph": True, "decode_ms": 0.4,
             "generate_over_lean": 1.05},
            {"model": "gpt2-small", "graph": "shared fp16", "layout": "cache", "cuda_graph": False, "decode_ms": 1.2},
            {"model": "gpt2-small", "graph": "shared fp16", "layout": "base", "cuda_graph": True, "decode_ms": 0.39},
            {"model": "default", "graph": "shared fp16", "layout": "cache", "cuda_graph": True, "decode_ms": 0.1}]
    targets = gpu_decode.targets(rows)
    assert (targets["best_layout"], targets["cuda_graph"], targets["decode_ms"]) == ("cache", True, 0.4)
    assert targets["vs_eager"] == 0.1 and targets["prefix_cost"] == round(0.4 / 0.39, 3)
    assert targets["generate_over_lean"] == 1.05
    assert gpu_decode.first_divergence([1, 2, 3], [1, 2, 4]) == 2 and gpu_decode.first_divergence([1], [1]) is None
