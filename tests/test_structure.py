"""The house rules a newcomer relies on, read off the source (issue 24): no import circle, every module in the
README's code map and importing only modules listed below it (or beside it, inside one package), no module over
400 lines, and imports of our own modules at the top of the file unless the module pulls in a heavy third-party
package (torch, mlx, llama.cpp, ...): the graph a reader sees is the real one.

Each rule is checked against a deliberately broken graph too, so a check that cannot fail would show here."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rmx_local"
HEAVY = {"torch", "mlx", "mlx_lm", "llama_cpp", "transformers", "peft", "matplotlib", "trl", "datasets"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(mods: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import of a module of ours; `from pkg import name` counts
    as an import of pkg.name where that is a module, else of pkg."""
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in dict.fromkeys(targets):
                if t in mods and t != name:
                    out.append((name, t, id(node) in nested))
    return out


def heavy_modules(mods: dict[str, Path], edges: list[tuple[str, str, bool]]) -> set[str]:
    """Modules that import a heavy third-party package at their top, directly or through our modules."""
    direct = set()
    for name, path in mods.items():
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] in HEAVY for n in names):
                direct.add(name)
    heavy, grew = set(direct), True
    while grew:
        grew = False
        for a, b, inner in edges:
            if not inner and b in heavy and a not in heavy:
                heavy.add(a)
                grew = True
    return heavy


def cycles(edges: list[tuple[str, str, bool]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def code_map() -> list[list[str]]:
    """The README's code map under rmx_local/, top to bottom: each line's entries (`io.py ui.py` -> two, `stages/`
    -> the package)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Code map", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    lines = block.split("\nrmx_local/", 1)[1].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("  ") or line.startswith("   "):
            break
        rows.append(map_entries(line))
    return rows


def map_entries(line: str) -> list[str]:
    """`  io.py ui.py    text` -> ["io", "ui"]; `  stages/   text` -> ["stages"]."""
    words = re.findall(r"^\s+((?:\w+(?:\.py|/)\s+)+)", line + " ")
    return [w[:-3] if w.endswith(".py") else w[:-1] for w in words[0].split()] if words else []


def map_position(mods: dict[str, Path]) -> dict[str, int]:
    """Module -> its line in the code map (a package's modules share the package's line)."""
    where = {}
    for i, row in enumerate(code_map()):
        for entry in row:
            where[entry] = i
    out = {}
    for name in mods:
        rel = name.split(".")[1:] or ["__init__"]
        if rel == ["__init__"] or rel == ["__main__"]:
            continue
        key = rel[0]
        if key in where:
            out[name] = where[key]
    return out


def layering_violations(edges, position) -> list[str]:
    return [f"{a} (line {position[a]}) imports {b} (line {position[b]}), listed above it"
            for a, b, _ in edges if a in position and b in position and position[b] < position[a]]


def lazy_violations(edges, heavy) -> list[str]:
    return [f"{a} imports {b} inside a function, but {b} pulls in no heavy package" for a, b, inner in edges
            if inner and b not in heavy]


# ---------------------------------------------------------------- the rules, on the real source

MODS = modules()
EDGES = imports(MODS)


def test_no_import_circle():
    assert cycles(EDGES) == []


def test_every_module_is_on_the_code_map():
    position = map_position(MODS)
    missing = [m for m in MODS if m not in position and m not in ("rmx_local", "rmx_local.__main__")]
    assert missing == []


def test_no_module_imports_one_above_it_on_the_code_map():
    assert layering_violations(EDGES, map_position(MODS)) == []


def test_no_module_over_400_lines():
    assert {m: n for m, p in MODS.items() if (n := len(p.read_text().splitlines())) > MAX_LINES} == {}


def test_own_modules_imported_at_the_top_unless_heavy():
    assert lazy_violations(EDGES, heavy_modules(MODS, EDGES)) == []


def test_heavy_modules_are_the_framework_wrappers():
    heavy = heavy_modules(MODS, EDGES)
    assert "rmx_local.backends.torch_backend" in heavy and "rmx_local.backends.mlx_backend" in heavy
    assert "rmx_local.cli" not in heavy and "rmx_local.recipe" not in heavy  # `rmx-local --help` stays instant


# ---------------------------------------------------------------- each check can fail

def test_checks_catch_a_broken_graph():
    edges = [("a", "b", False), ("b", "c", False), ("c", "a", True), ("d", "c", True)]
    assert cycles(edges) == [["a", "b", "c"]]
    assert layering_violations(edges, {"a": 0, "b": 1, "c": 2, "d": 3}) == [
        "c (line 2) imports a (line 0), listed above it", "d (line 3) imports c (line 2), listed above it"]
    assert lazy_violations(edges, heavy={"a"}) == ["d imports c inside a function, but c pulls in no heavy package"]


def test_import_reader_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "rmx_local"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import torch\n")
    (pkg / "sub" / "__init__.py").write_text("from rmx_local import low\n")
    (pkg / "sub" / "x.py").write_text("from . import y\ndef f():\n    from rmx_local.sub import y\n")
    (pkg / "sub" / "y.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    mods = modules()
    edges = imports(mods)
    assert ("rmx_local.sub", "rmx_local.low", False) in edges
    assert ("rmx_local.sub.x", "rmx_local.sub.y", False) in edges and ("rmx_local.sub.x", "rmx_local.sub.y", True) in edges
    assert heavy_modules(mods, edges) == {"rmx_local.low", "rmx_local.sub"}


@pytest.mark.parametrize("line,entries", [("  io.py ui.py       atomic writes", ["io", "ui"]),
                                          ("  stages/           RunContext; rollouts", ["stages"])])
def test_code_map_line_reader(line, entries):
    assert map_entries(line) == entries
