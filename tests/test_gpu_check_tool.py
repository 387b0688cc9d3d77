"""tools/gpu_check.py's wheel handling (the part a GPU session cannot afford to debug): parts -> wheel."""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
