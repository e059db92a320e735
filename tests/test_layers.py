"""The import graph of synpref is acyclic: no module imports one that imports it back."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "synpref"
# "pkg.module:function": a lazy reference (the command table, class paths) imported on use.
LAZY = re.compile(r"^(synpref(?:\.\w+)+):\w+$")


def module_names() -> dict[str, Path]:
    """Every module of the package (synpref/callbacks is the top-level callbacks/ folder)."""
    names = {}
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "callbacks").rglob("*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = ("synpref", *parts) if parts[0] == "callbacks" else parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (functions included), directly,
    `from x import submodule`, through importlib or as a "module:function" string."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            lazy = LAZY.match(node.value) or re.match(r"^(synpref(?:\.\w+)+)$", node.value)
            if lazy and lazy.group(1) in known:
                found.add(lazy.group(1))
    # Importing a.b.c runs the package a.b's __init__ first: a dependency too (not the importer's own).
    found |= {m.rsplit(".", k)[0] for m in found for k in range(1, m.count(".") + 1)}
    own = {name.rsplit(".", k)[0] for k in range(0, name.count(".") + 1)}
    return {m for m in found if m in known and m not in own}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports(path, name, set(names)) for name, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_is_acyclic():
    graph = import_graph()
    assert {"synpref.cli", "synpref.pipeline.reproduce", "synpref.callbacks.win_rate"} <= set(graph)
    assert "synpref.pipeline.reproduce" in graph["synpref.cli"]  # the command table's lazy references count
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_every_module_imports_in_a_fresh_interpreter():
    """Each module imports (a moved name, or a cycle resolved by import order, fails here);
    `synpref.__main__` runs the command, so it is left out."""
    names = [n for n in sorted(module_names()) if not n.endswith("__main__")]
    code = "import importlib, sys\nfor name in sys.stdin.read().split():\n    importlib.import_module(name)"
    done = subprocess.run(
        [sys.executable, "-c", code], input="\n".join(names), cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def readme_layers() -> list[list[str]]:
    """The README Layout's synpref/ lines, top down: the modules (`x.py`, `x/`) each line names."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("```")[1]
    body = text.split("\ncallbacks/", 1)[0].splitlines()[2:]  # the lines under `synpref/`
    return [[n.rstrip("/").removesuffix(".py") for n in re.findall(r"\b(\w+(?:\.py|/))", line)] for line in body]


def test_readme_layout_names_every_module_and_reads_bottom_up():
    layers = readme_layers()
    level = {name: i for i, names in enumerate(layers) for name in names}
    top = {n.split(".")[1] for n in module_names() if n.count(".") >= 1}
    assert top - {"__init__"} <= set(level), f"modules the README's Layout leaves out: {sorted(top - set(level))}"
    files = {p.name for p in (ROOT / "callbacks").glob("*.py")} - {"__init__.py"}
    listed = (ROOT / "README.md").read_text(encoding="utf-8").split("\ncallbacks/", 1)[1].split("\nconfigs/")[0]
    assert all(f in listed for f in files), f"callbacks/ files the Layout leaves out: {sorted(files)}"
    upward = sorted(
        (a, b)
        for a, deps in import_graph().items()
        for b in deps
        if "." in a
        and "." in b
        and a.split(".")[1] in level
        and b.split(".")[1] in level
        and level[b.split(".")[1]] > level[a.split(".")[1]]
    )
    assert not upward, f"imports pointing up the README's Layout: {upward}"


def test_old_module_paths_import_the_new_modules():
    """Code and checkpoints from before the core/, reporting/, pipeline/ regroup: `synpref.specs` is
    `synpref.core.specs` (one module under two names, its own spec kept), in a fresh interpreter."""
    from synpref.moved import MOVED

    code = (
        "import importlib, json, sys\n"
        "for old, new in json.loads(sys.stdin.read()).items():\n"
        "    a, b = importlib.import_module(old), importlib.import_module(new)\n"
        "    assert a is b and a.__spec__.name == new and a.__name__ == new, (old, new)\n"
        "from synpref.specs import ModelSpec\n"
        "assert ModelSpec.__module__ == 'synpref.core.specs'\n"
    )
    import json

    done = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(MOVED), cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(MOVED) == 32 and all(
        new.startswith(("synpref.core.", "synpref.reporting.", "synpref.pipeline.")) for new in MOVED.values()
    )
