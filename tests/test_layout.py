"""The package's shape: no import cycles (between modules or between stages), no module over ~500 lines,
and every module opening with one line on its role."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles_and_no_oversized_module(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "package_map.py"), "--json", str(tmp_path / "m.json")],
                            capture_output=True, text=True)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["cycles"] == [] and data["stage_cycles"] == []
    sizes = {f"{folder}/{name}": lines for folder, entries in data["tree"].items() for name, lines in entries.items()}
    assert max(sizes.values()) <= 500, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_every_module_says_its_role_in_its_first_line():
    missing = []
    for path in sorted((ROOT / "prefix_export").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if not doc or len(doc.splitlines()[0]) < 20:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules without an opening line on their role: {missing}"
