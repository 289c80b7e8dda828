"""The core's house rules, read from the code: rooms import downwards only, no import circle (imports
inside functions count), no private name taken from another module, no file over 500 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib" / "hybrid_ct"
MAX_LINES = 500

# room -> the rooms it may import (docs/CONTRACTS.md, "The rooms of hybrid_ct")
ALLOWED = {
    "top": set(),
    "imaging": {"top"},
    "net": {"top"},
    "processing": {"top", "imaging"},
    "data": {"top", "imaging", "processing"},
    "train": {"top", "imaging", "net", "processing", "data", "predict"},  # a build measures energy as served
    "predict": {"top", "imaging", "net", "processing"},
    "evaluate": {"top", "imaging", "net", "processing", "data", "train", "predict"},
}


def _module(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """-> [(imported module, [names])] for every import statement of ``path``, wherever it stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("hybrid_ct")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.startswith("hybrid_ct"):
                out.append((mod, [a.name for a in node.names]))
    return out


def _modules() -> dict:
    return {_module(p): p for p in LIB.rglob("*.py")}


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (LIB / parts[1]).is_dir()) else "top"


def _graph(mods: dict) -> dict:
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for target, names in _imports(p):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != m:
                    graph[m].add(cand)
                    break
    return graph


def test_no_import_circle():
    graph = _graph(_modules())
    state, circles = {}, []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_private_name_imported_across_modules():
    mods = _modules()
    bad = [f"{m} takes {target}.{n}" for m, p in mods.items() for target, names in _imports(p)
           for n in names if n.startswith("_") and not n.startswith("__") and target != m]
    assert not bad, bad


def test_rooms_import_downwards_only():
    mods = _modules()
    bad = []
    for m, p in mods.items():
        room = _room(m)
        if m == "hybrid_ct.cli":  # the command line drives every room
            continue
        for target, _ in _imports(p):
            other = _room(target) if target != "hybrid_ct" else "top"
            if other != room and other not in ALLOWED[room]:
                bad.append(f"{m} ({room}) imports {target} ({other})")
    assert not bad, bad


def test_every_public_name_of_a_room_resolves():
    import importlib

    for room in (r for r in ALLOWED if r != "top"):
        pkg = importlib.import_module(f"hybrid_ct.{room}")
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, f"hybrid_ct.{room}.{name}"
        with pytest.raises(AttributeError):
            getattr(pkg, "no_such_name")


@pytest.mark.parametrize("folder", ["lib", "apps", "slicer_extension"])
def test_no_file_over_500_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_readme_layout_names_every_room_and_module():
    """The README's layout table is the house: a row per room naming each of its modules."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {line.split("`")[1]: line for line in readme.splitlines() if line.startswith("| `lib/hybrid_ct/")}
    missing = []
    for room in [p for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]:
        row = rows.get(f"lib/hybrid_ct/{room.name}/")
        if row is None:
            missing.append(f"no row for {room.name}/")
            continue
        missing += [f"{room.name}/{m.stem}" for m in room.glob("*.py")
                    if not m.stem.startswith("__") and f"`{m.stem}`" not in row]
    top = rows.get("lib/hybrid_ct/", "")
    missing += [m.stem for m in LIB.glob("*.py") if not m.stem.startswith("__") and f"`{m.stem}`" not in top]
    assert not missing, f"README layout table does not name: {missing}"
