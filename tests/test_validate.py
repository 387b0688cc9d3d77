"""The validator bites: a tampered graph or a changed file must fail, naming the output and the error."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from prefix_export.api import export_prefix_model, validate_export
from prefix_export.cli import main
from prefix_export.validate.report import Tolerances, compare


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gpt2_dir, gpt2_adapter):
    folder = tmp_path_factory.mktemp("exported") / "out"
    export_prefix_model(str(gpt2_dir), gpt2_adapter, folder, progress=False)
    return folder


def _prefix_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The folded prefix: prefix_key_{i} / prefix_value_{i}, each (1, H_kv, P, D) = (1, 4, 4, 8)."""
    by_name = {init.name: init for init in model.graph.initializer}
    names = [f"prefix_{kind}_{i}" for i in range(2) for kind in ("key", "value")]
    assert all(n in by_name for n in names), sorted(by_name)
    assert all(list(by_name[n].dims) == [1, 4, 4, 8] for n in names)
    return [by_name[n] for n in names]


def _tamper(src, dst, edit):
    """Apply `edit` to the prefix stacked as (L, 2, H_kv, P, D), write it back into a copy."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    inits = _prefix_initializers(model)
    values = np.stack([numpy_helper.to_array(i)[0] for i in inits]).reshape(2, 2, 4, 4, 8).copy()
    edit(values)
    for init, array in zip(inits, values.reshape(4, 4, 4, 8)):
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array[None]), init.name))
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def test_pristine_export_revalidates(exported, capsys):
    assert main(["validate", str(exported)]) == 0
    assert "validation PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("name, edit", [
    ("one value +1e-3", lambda v: v.__setitem__((1, 0, 2, 3, 5), v[1, 0, 2, 3, 5] + 1e-3)),
    ("layers swapped", lambda v: v.__setitem__(slice(None), v[::-1].copy())),
    ("keys and values swapped", lambda v: v.__setitem__(slice(None), v[:, ::-1].copy())),
])
def test_tampered_prefix_fails_validation(tmp_path, exported, capsys, name, edit):
    tampered = _tamper(exported, tmp_path / "tampered", edit)
    report = validate_export(tampered)
    print(report.table())
    assert not report.passed, f"validation passed on a graph with its prefix tampered ({name})"
    failures = "\n".join(report.failures())
    assert "model.onnx changed since export" in failures  # provenance check
    failed = [c for c in report.comparisons if not c]
    assert failed and all(c.output.startswith(("logits", "present.", "prefix_")) for c in failed), failures
    assert any(c.check == "prefix" for c in failed), "the folded prefix differs from PEFT's but was not flagged"
    assert main(["validate", str(tampered)]) == 1
    err = capsys.readouterr().out
    assert "FAILED" in err and "max abs err" in err


def test_hash_check_catches_changed_prefix_file(tmp_path, exported):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / "prefix_kv.safetensors", "ab") as handle:
        handle.write(b"\0")
    report = validate_export(copy)
    assert "hash: prefix_kv.safetensors changed since export (SHA-256 differs)" in report.problems


def test_compare_reports_errors_and_nan():
    reference = np.array([[1.0, 2.0, 3.0]])
    ok = compare("prefill", "logits", reference + 5e-5, reference, atol=1e-4)
    assert ok and ok.max_abs == pytest.approx(5e-5) and ok.max_rel == pytest.approx(5e-5, rel=1e-2)
    bad = compare("prefill", "logits", reference + np.array([[0, 0, 2e-4]]), reference, atol=1e-4)
    assert not bad and "FAILED" in bad.line() and "logits" in bad.line()
    nan = compare("prefill", "logits", np.array([[1.0, np.nan, 3.0]]), reference, atol=1e-4)
    assert not nan
    masked = compare("prefill", "logits", np.array([[1.0, 99.0, 3.0]]), reference, atol=1e-4,
                     where=np.array([[True, False, True]]))
    assert masked, "positions outside the mask must not count"


def test_per_output_tolerances():
    tolerances = Tolerances(atol=1e-4, per_output={"logits": 1e-3, "present.*": 2e-4})
    assert tolerances.for_output("logits") == 1e-3
    assert tolerances.for_output("present.3.value") == 2e-4
    assert Tolerances(atol=1e-5).for_output("present.0.key") == 1e-5


def test_failed_validation_publishes_nothing(tmp_path, gpt2_dir, gpt2_adapter, capsys):
    """An impossible tolerance makes validation fail: exit 1, and no output folder."""
    out = tmp_path / "out"
    code = main(["--model", str(gpt2_dir), "--prefix", str(gpt2_adapter), "--out", str(out), "-q",
                 "--atol", "1e-12"])
    assert code == 1
    assert "does not match PEFT" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
