"""Bad input, the output location (exists, a file, not writable, disk full): each case exits 2 with a message naming the problem and the fix, and writes
nothing (`out` is an empty parent folder that must stay empty).

Tests run as root in CI, where chmod cannot make a file unreadable or a folder unwritable; those
cases are simulated by making `open` (or `os.access`) fail for exactly one path (`deny_open`), or use
a path under /proc that even root cannot read or write.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch

from tests_helpers import assert_refused, export_args, listing, run_cli


def test_existing_output_needs_force(gpt2_dir, gpt2_adapter, out, capsys):
    (out / "export").mkdir()
    (out / "export" / "keep.txt").write_text("mine")
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert code == 2 and "--force" in text
    assert (out / "export" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["export"]


def test_output_is_a_file(gpt2_dir, gpt2_adapter, out, capsys):
    (out / "export").write_text("a file")
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert code == 2 and "is a file" in text
    assert (out / "export").read_text() == "a file"


def test_output_not_writable(gpt2_dir, gpt2_adapter, out, capsys, monkeypatch):
    """What a non-root user meets on a read-only folder: os.access says no."""
    from prefix_export.export import output

    real_access = os.access
    monkeypatch.setattr(output.os, "access",
                        lambda path, mode, **kw: False if Path(path) == out else real_access(path, mode, **kw))
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, r"outputs is not writable; choose another output folder")


def test_output_where_even_root_cannot_write(tmp_path, gpt2_dir, gpt2_adapter, capsys):
    """os.access says yes to root for /proc, but no file can be made there: the write probe catches it."""
    code, text = run_cli(["--model", gpt2_dir, "--prefix", gpt2_adapter, "--out", "/proc/prefix-export-out", "-q"],
                         capsys)
    assert code == 2 and re.search(r"(nothing can be written in|is not writable).*/proc", text), text
    assert not Path("/proc/prefix-export-out").exists()


def test_output_under_a_file(tmp_path, gpt2_dir, gpt2_adapter, out, capsys):
    (out / "afile").write_text("x")
    code, text = run_cli(["--model", gpt2_dir, "--prefix", gpt2_adapter, "--out", out / "afile" / "sub" / "exp",
                          "-q"], capsys)
    assert code == 2 and "afile is a file, so no folder can be made under it" in text, text
    assert listing(out) == ["afile"] and (out / "afile").read_text() == "x"


def test_disk_full_in_the_exporter(gpt2_dir, gpt2_adapter, out, capsys, monkeypatch):
    """The exporter's writer fails with ENOSPC (wrapped, as torch.onnx wraps it): named, nothing left."""
    def full_disk(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("exporter failed while saving") from exc

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, "OutputError", "the disk is full", "nothing was published", "Free space")


def test_disk_full_while_saving_the_graph(gpt2_dir, gpt2_adapter, out, capsys, monkeypatch):
    """onnx.save_model writes half the graph, then the disk is full: no temp folder or lock remains."""
    import onnx

    def half_then_full(model, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(model.SerializeToString()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx, "save_model", half_then_full)
    code, text = run_cli(export_args(gpt2_dir, gpt2_adapter, out), capsys)
    assert_refused(code, text, out, "the disk is full while writing", "nothing was published")
