"""The house rules, checked on the source (README "Layout"): no import circle (function-level imports
included, TYPE_CHECKING blocks not), no import of another module's `_private` name, edge/ imports no
other wing, no module much over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("edge", "convert", "train")


def _modules() -> dict[str, Path]:
    found = {}
    for wing in WINGS:
        for path in (ROOT / wing).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = "factedge." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(name: str, path: Path):
    """(imported module, imported names) of every import that runs (TYPE_CHECKING blocks skipped)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
            yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for module, names in _imports(m, path):
            for target in [module] + [f"{module}.{n}" for n in names]:
                if target in mods and target != m:
                    graph[m].add(target)
    return graph


def test_no_import_circle():
    graph, seen, done = _graph(), set(), set()
    circles = []

    def visit(node, trail):
        seen.add(node)
        for nxt in graph[node]:
            if nxt in trail:
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in done and nxt not in seen:
                visit(nxt, trail + [nxt])
        done.add(node)

    for start in graph:
        if start not in seen:
            visit(start, [start])
    assert circles == []


def test_no_module_imports_another_modules_private_names():
    found = []
    for m, path in _modules().items():
        for module, names in _imports(m, path):
            if module.startswith("factedge.") and module != m:
                found += [f"{m} imports {module}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert found == []


def test_edge_is_the_ground_floor():
    uses = [f"{m} -> {module}" for m, path in _modules().items() if m.startswith("factedge.edge")
            for module, _ in _imports(m, path) if module.startswith(("factedge.convert", "factedge.train", "torch"))]
    assert uses == []


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > 420}
    assert big == {}
