"""The package's tree (folders, modules, line counts) and its import graph, checked for cycles.

    python tools/package_map.py            # tree + import edges + cycles (exit 1 if any)
    python tools/package_map.py --json F   # the same, machine-readable

Imports are read statically (ast), both module-level and inside functions; a cycle in either is
reported, since a function-level import only hides a cycle until the function runs.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "prefix_export"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Package modules `path` imports (relative imports resolved; `from X import name` counts X.name when
    that is a module, else X)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name and target.startswith(PACKAGE):
                found.add(target)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the tree, edges and cycles here")
    args = parser.parse_args()
    sys.setrecursionlimit(10000)
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports_of(f, modules) for f in files}
    cycles = find_cycles(graph)
    # The same at the level of the stages (subpackages and top-level modules): a stage importing a
    # stage that imports it back is a tangle even when no two modules import each other.
    stage = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    stages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        stages.setdefault(stage(module), set()).update(stage(t) for t in targets if stage(t) != stage(module))
    stage_cycles = find_cycles(stages)
    tree: dict[str, dict[str, int]] = {}
    for f in files:
        folder = str(f.parent.relative_to(ROOT))
        tree.setdefault(folder, {})[f.name] = len(f.read_text().splitlines())
    for folder, entries in tree.items():
        print(f"{folder}/  ({sum(entries.values())} lines)")
        for name, lines in entries.items():
            print(f"    {name:<24} {lines:>4}")
    print(f"\n{len(modules)} modules, {sum(len(v) for v in graph.values())} import edges; "
          f"largest module {max(n for e in tree.values() for n in e.values())} lines")
    print("import cycles between modules: " + ("none" if not cycles else "; ".join(" <-> ".join(c) for c in cycles)))
    print("import cycles between stages:  " + ("none" if not stage_cycles else
                                                "; ".join(" <-> ".join(c) for c in stage_cycles)))
    for name, targets in sorted(stages.items()):
        print(f"    {name.replace(PACKAGE + '.', ''):<18} -> {', '.join(sorted(t.replace(PACKAGE + '.', '') for t in targets))}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tree": tree, "imports": {k: sorted(v) for k, v in graph.items()},
                                               "cycles": cycles, "stage_cycles": stage_cycles,
                                               "stages": {k: sorted(v) for k, v in stages.items()}}, indent=2))
    return 1 if cycles or stage_cycles else 0


if __name__ == "__main__":
    sys.exit(main())
