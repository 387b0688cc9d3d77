"""SIGKILL an export at random moments; the destination must stay absent or a complete export.

    python tools/check_atomic_kill.py --kills 24 [--seed 0] [--json out.json] [--no-validate]

Each round starts `prefix-export --force` into the same destination (which holds the previous
complete export) in a fresh interpreter and kills it with SIGKILL at a random moment spread over
the run (interpreter start, model loading, torch.onnx.export, validation, publishing). After every
kill the destination is checked: it must be absent or a complete export, meaning every file listed
in its export_report.json has the SHA-256 recorded there and no file is missing or extra. At the
end one more export must succeed and leave no `.NAME.tmp-*` / `.NAME.old-*` behind. Prints one
line per round and a JSON summary. tests/test_atomic_output.py runs a short version of this.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_complete(folder: Path) -> str | None:
    """None when `folder` is a complete export (report present, every hash matches, nothing extra)."""
    report_path = folder / "export_report.json"
    if not report_path.is_file():
        return f"{folder} has no export_report.json (files: {sorted(p.name for p in folder.iterdir())})"
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as exc:
        return f"export_report.json is not valid JSON ({exc})"
    expected = report.get("outputs", {}).get("sha256", {})
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"export_report.json"}
    if not expected:
        return "export_report.json lists no output files"
    if set(expected) != present:
        return f"files differ from the report: missing {sorted(set(expected) - present)}, extra " \
               f"{sorted(present - set(expected))}"
    bad = [name for name, digest in expected.items() if _sha256(folder / name) != digest]
    return f"hashes differ: {bad}" if bad else None


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(f".{dest.name}.*") if not p.name.endswith(".lock"))


def _temporaries(dest: Path) -> set[str]:
    return {p.name for p in dest.parent.glob(f".{dest.name}.tmp-*")}


def export_command(model: Path, prefix: Path, dest: Path, validate: bool) -> list[str]:
    command = [sys.executable, "-m", "prefix_export.cli", "--model", str(model), "--prefix", str(prefix),
               "--out", str(dest), "--force", "-q"]
    return command + ([] if validate else ["--no-validate"])


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def timed_export(command: list[str], dest: Path) -> tuple[float, float | None]:
    """Run to completion; returns (total seconds, seconds until the temporary folder appeared)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_tmp = None
    while process.poll() is None:
        if first_tmp is None and list(dest.parent.glob(f".{dest.name}.tmp-*")):
            first_tmp = time.perf_counter() - started
        time.sleep(0.02)
    stderr = process.stderr.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"the calibration export failed ({process.returncode}):\n{stderr}")
    return time.perf_counter() - started, first_tmp


def kill_loop(model: Path, prefix: Path, dest: Path, kills: int, seed: int = 0, validate: bool = True,
              log=print) -> dict:
    """The loop itself; returns the summary (raises AssertionError on a partial destination)."""
    rng = random.Random(seed)
    command = export_command(model, prefix, dest, validate)
    total, first_tmp = timed_export(command, dest)  # the "previous complete export"
    problem = check_complete(dest)
    assert problem is None, f"the calibration export is not complete: {problem}"
    previous = _sha256(dest / "export_report.json")
    log(f"calibration: full export {total:.2f}s, temporary folder after {first_tmp or float('nan'):.2f}s")
    rounds = []
    window = total - (first_tmp or 0.0)
    for index in range(kills):
        # One round in five is killed early (start-up, loading); the others inside the window where
        # the temporary folder exists, at a random fraction of it. The window is located in each run
        # itself (the machine's load changes how long each phase takes) and scaled by its slowdown.
        early = index % 5 == 0 or first_tmp is None
        stale = _temporaries(dest)  # left by the previous round's kill; this run removes them
        process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        began = time.perf_counter()
        tmp_seen = False
        if early:
            deadline = began + rng.uniform(0.2, 1.0) * (first_tmp or total)
        else:
            while process.poll() is None and not _temporaries(dest) - stale:
                time.sleep(0.005)
            tmp_seen = True
            seen_at = time.perf_counter() - began
            deadline = time.perf_counter() + rng.uniform(0.0, 1.1) * window * max(1.0, seen_at / first_tmp)
        kill_at = deadline - began
        while time.perf_counter() < deadline and process.poll() is None:
            tmp_seen = tmp_seen or bool(_temporaries(dest) - stale)
            time.sleep(0.005)
        finished_first = process.poll() is not None
        tmp_at_kill = bool(_temporaries(dest) - stale)
        if not finished_first:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        phase = ("finished before the kill" if finished_first else
                 "during export (temporary folder present)" if tmp_at_kill else
                 "after publishing" if tmp_seen else "before the temporary folder")
        if dest.exists():
            problem = check_complete(dest)
            report = _sha256(dest / "export_report.json") if problem is None else None
            state = "previous export" if report == previous else "new export" if problem is None else "PARTIAL"
            previous = report or previous
        else:
            problem, state = None, "absent"
        rounds.append({"round": index, "kill_at_s": round(kill_at, 3), "phase": phase, "destination": state,
                       "stale_temporaries": leftovers(dest)})
        log(f"round {index:2d}: kill at {kill_at:6.2f}s  {phase:<42} -> destination: {state}"
            f"{'  stale: ' + ', '.join(leftovers(dest)) if leftovers(dest) else ''}")
        assert problem is None, f"round {index}: the destination is partial: {problem}"
    final_started = time.perf_counter()
    result = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"the export after the kills failed:\n{result.stderr}"
    assert check_complete(dest) is None, check_complete(dest)
    assert leftovers(dest) == [], f"stale temporaries survived the next export: {leftovers(dest)}"
    phases: dict[str, int] = {}
    for item in rounds:
        phases[item["phase"]] = phases.get(item["phase"], 0) + 1
    states: dict[str, int] = {}
    for item in rounds:
        states[item["destination"]] = states.get(item["destination"], 0) + 1
    return {"kills": kills, "seed": seed, "validate": validate, "calibration_export_s": round(total, 2),
            "temporary_folder_after_s": first_tmp and round(first_tmp, 2), "phases": phases,
            "destination_after_kill": states, "partial_destinations": 0,
            "final_export_s": round(time.perf_counter() - final_started, 2),
            "stale_temporaries_after_final_export": leftovers(dest), "rounds": rounds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-validate", action="store_true", help="shorter runs: export without validation")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tiny_models import make_prefix, save_tiny_model, tiny_config

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        save_tiny_model(tiny_config("gpt2"), work / "model")
        prefix = make_prefix(work / "model", work / "prefix", 4, projection=True, trained=False)
        started = time.perf_counter()
        summary = kill_loop(work / "model", prefix, work / "out" / "export", args.kills, args.seed,
                            validate=not args.no_validate)
        summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary_text = json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2)
    print(summary_text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
