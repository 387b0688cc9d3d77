"""Provenance: export_report.json records what went in, what came out, with what, and how it validated;
`prefix-export validate OUT_DIR` fails (exit 1) when any recorded file changed or went missing."""
from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from prefix_export.cli import main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory, gpt2_dir, gpt2_adapter):
    out = tmp_path_factory.mktemp("prov") / "export"
    argv = ["--model", str(gpt2_dir), "--prefix", str(gpt2_adapter), "--out", str(out), "-q", "--json"]
    assert main(argv) == 0
    return out, argv


def test_report_hashes_every_input_file(cli_export, gpt2_dir, gpt2_adapter):
    out, _ = cli_export
    recorded = json.loads((out / "export_report.json").read_text())["inputs"]["sha256"]
    expected = {str(p): sha256(p) for p in [gpt2_adapter / "adapter_config.json",
                                            gpt2_adapter / "adapter_model.safetensors",
                                            gpt2_dir / "config.json", gpt2_dir / "model.safetensors",
                                            gpt2_dir / "generation_config.json"]}
    assert recorded == expected


def test_report_hashes_every_output_file(cli_export):
    out, _ = cli_export
    recorded = json.loads((out / "export_report.json").read_text())["outputs"]["sha256"]
    on_disk = {str(p.relative_to(out)): sha256(p) for p in out.rglob("*") if p.is_file()}
    del on_disk["export_report.json"]  # it cannot hold its own hash
    assert recorded == on_disk
    assert {"model.onnx", "prefix_kv.safetensors", "config.json"} <= set(recorded)


def test_report_records_versions_command_line_and_validation(cli_export):
    out, argv = cli_export
    report = json.loads((out / "export_report.json").read_text())
    for dist in ("torch", "transformers", "peft", "onnx", "onnxruntime"):
        assert report["versions"][dist] == metadata.version(dist)
    assert report["command_line"] == ["prefix-export", *argv]
    validation = report["validation"]
    assert validation["passed"] is True
    checks = {row["check"] for row in validation["summary"]}
    assert {"prefix", "prefill", "decode"} <= checks
    for row in validation["summary"]:
        assert 0.0 <= row["max_abs"] <= row["atol"] and row["passed"]
    assert [g["matching"] for g in validation["greedy"]] == [g["new_tokens"] for g in validation["greedy"]]
    assert validation["settings"]["atol"] == 1e-4
    assert report["timing_s"]["export"] > 0 and report["peak_memory_mb"] > 0


@pytest.mark.parametrize("change", ["edit config.json", "delete generation_config.json", "delete model.onnx",
                                    "edit export_report.json hash"])
def test_validate_fails_on_a_changed_or_missing_file(tmp_path, cli_export, capsys, change):
    out, _ = cli_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    if change == "edit config.json":
        config = json.loads((copy / "config.json").read_text())
        config["n_positions"] = 64
        (copy / "config.json").write_text(json.dumps(config))
        expected = "hash: config.json changed since export (SHA-256 differs)"
    elif change == "edit export_report.json hash":
        report = json.loads((copy / "export_report.json").read_text())
        report["outputs"]["sha256"]["prefix_kv.safetensors"] = "0" * 64
        (copy / "export_report.json").write_text(json.dumps(report))
        expected = "hash: prefix_kv.safetensors changed since export (SHA-256 differs)"
    else:
        name = change.split()[1]
        (copy / name).unlink()
        expected = f"hash: {name} is missing"
    code = main(["validate", str(copy)])
    text = capsys.readouterr().out
    assert code == 1, text
    assert f"PROBLEM: {expected}" in text and "validation FAILED" in text
