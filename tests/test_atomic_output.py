"""Atomic output: killed at any moment, an export leaves no output or the previous complete one.

The long SIGKILL loop (20+ kills) is tools/check_atomic_kill.py; here a short run of the same loop,
two exports racing for one destination, and the pieces of output.py in-process.
"""
from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

import pytest

from prefix_export.export import output
from prefix_export.errors import OutputError

import check_atomic_kill  # tools/, on pytest's pythonpath (pyproject.toml)


def test_sigkill_at_random_moments_never_leaves_a_partial_folder(tmp_path, gpt2_dir, gpt2_adapter):
    dest = tmp_path / "out" / "export"
    summary = check_atomic_kill.kill_loop(gpt2_dir, gpt2_adapter, dest, kills=3, seed=7, validate=False,
                                          log=lambda line: print(line))
    assert summary["partial_destinations"] == 0
    assert sum(summary["destination_after_kill"].values()) == 3
    assert "absent" not in summary["destination_after_kill"], "a previous export was lost"
    assert check_atomic_kill.check_complete(dest) is None
    assert summary["stale_temporaries_after_final_export"] == []


def test_two_exports_at_once_one_wins_the_other_says_why(tmp_path, gpt2_dir, gpt2_adapter):
    dest = tmp_path / "out" / "export"
    command = check_atomic_kill.export_command(gpt2_dir, gpt2_adapter, dest, validate=False)
    command.remove("--force")
    processes = [subprocess.Popen(command, env=check_atomic_kill._env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "OutputError" in loser and ("another prefix-export is writing" in loser or "pass --force" in loser), loser
    assert "Traceback" not in loser
    assert check_atomic_kill.check_complete(dest) is None
    assert sorted(p.name for p in dest.parent.iterdir()) == ["export"], "temporaries or the lock were left"


# ---- output.py in-process ------------------------------------------------------------------------


def _fill(folder: Path, text: str) -> None:
    (folder / "model.onnx").write_text(text)
    (folder / "export_report.json").write_text(text)


def test_replacing_keeps_the_old_export_until_the_new_one_is_complete(tmp_path):
    dest = tmp_path / "export"
    with output.atomic_folder(dest, force=False) as tmp:
        _fill(tmp, "old")
    with pytest.raises(RuntimeError):
        with output.atomic_folder(dest, force=True) as tmp:
            _fill(tmp, "new")
            assert (dest / "model.onnx").read_text() == "old"  # untouched while the new one is built
            raise RuntimeError("export failed half-way")
    assert (dest / "model.onnx").read_text() == "old"
    with output.atomic_folder(dest, force=True) as tmp:
        _fill(tmp, "new")
    assert (dest / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_stale_temporaries_are_removed_by_the_next_export(tmp_path):
    dest = tmp_path / "export"
    stale = tmp_path / ".export.tmp-killed"
    stale.mkdir()
    (stale / "model.onnx").write_text("half")
    (tmp_path / ".export.lock").write_text("")  # a killed export's lock file: flock died with it
    with output.atomic_folder(dest, force=False) as tmp:
        _fill(tmp, "complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_previous_export_moved_aside_is_restored(tmp_path):
    """Killed between the two renames of the fallback publish: the next run puts the old one back."""
    dest = tmp_path / "export"
    aside = tmp_path / ".export.old-killed" / "export"
    aside.mkdir(parents=True)
    _fill(aside, "previous")
    with pytest.raises(OutputError, match="already exists"):
        with output.atomic_folder(dest, force=False):
            pass
    assert (dest / "model.onnx").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_fallback_publish_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    dest = tmp_path / "export"
    for text in ("one", "two"):
        with output.atomic_folder(dest, force=True) as tmp:
            _fill(tmp, text)
    assert (dest / "model.onnx").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_busy_destination_is_refused(tmp_path):
    dest = tmp_path / "export"
    with open(tmp_path / ".export.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputError, match="another prefix-export is writing .*export right now"):
            with output.atomic_folder(dest, force=True):
                pass
    assert not dest.exists() and not list(tmp_path.glob(".export.tmp-*"))
