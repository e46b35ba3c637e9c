"""The code's shape: no function over 60 lines, no cycle among the modules' import-time imports or their folders', and

Both are read from the source with :mod:`ast`, nothing is imported. A function's length runs from its ``def`` line to
its last line (a nested function counts in its own length and in its parent's). A module's imports are those its body
runs when it is imported (at any depth outside functions, except under ``if TYPE_CHECKING:``); ``from pkg import
name`` imports the module ``pkg.name`` where there is one, else ``pkg``. Module names follow the package folders of
``pyproject.toml`` (``passes/`` is ``nq_onnx.passes``); the benchmark scripts import each other by file name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60
CHECKED_FOLDERS = ("nq_onnx", "passes", "calibration", "benchmarks", "models")
# functions allowed over the limit while they are being split, at their current length (none may grow meanwhile)
ALLOWED_LONG: dict[str, int] = {}


def function_lengths(path: Path) -> dict[str, int]:
    """Every function and method of a source file by qualified name (``Class.method``, ``outer.inner``): its lines."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
                if not isinstance(child, ast.ClassDef):
                    out[name[:-1]] = child.end_lineno - child.lineno + 1
            visit(child, name)

    visit(ast.parse(path.read_text(), str(path)), "")
    return out


def long_functions() -> dict[str, int]:
    """``folder/file.py:function`` -> lines, for every function over :data:`MAX_LINES` in the checked folders."""
    out = {}
    for folder in CHECKED_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name, lines in function_lengths(path).items():
                if lines > MAX_LINES:
                    out[f"{path.relative_to(ROOT).as_posix()}:{name}"] = lines
    return out


def module_files() -> dict[str, Path]:
    """Every module of the project's packages (pyproject's folders) and of the benchmark scripts, by import name."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {package: ROOT / folder for package, folder in setuptools["package-dir"].items()}
    out = {}
    for package, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    for path in (ROOT / "benchmarks").glob("*.py"):
        out[path.stem] = path
    return out


def _import_time_nodes(node: ast.AST):
    """The import statements a module body runs when imported: outside functions, not under ``if TYPE_CHECKING``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from _import_time_nodes(ast.Module(body=child.orelse, type_ignores=[]))
        else:
            yield from _import_time_nodes(child)


def module_imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules that module ``name`` imports at import time (module docstring's rule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _import_time_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {m for m in out if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: module_imports(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected group of modules that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, set(group)) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A cycle through the first module of a strongly connected group, by breadth-first search inside it."""
    start = min(group)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in the strongly connected group {sorted(group)}")


def test_no_function_over_the_limit():
    over = {name: lines for name, lines in long_functions().items() if lines > ALLOWED_LONG.get(name, MAX_LINES)}
    assert not over, f"functions over {MAX_LINES} lines (or over their allowance): " + ", ".join(
        f"{name} ({lines} lines)" for name, lines in sorted(over.items()))


def test_allowed_long_functions_are_still_long():
    """An allowance ends with its function's split: an entry whose function is now short (or gone) must go."""
    found = long_functions()
    stale = sorted(name for name in ALLOWED_LONG if name not in found)
    assert not stale, f"remove from ALLOWED_LONG, now at most {MAX_LINES} lines or gone: {', '.join(stale)}"


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "module import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


# what each lower folder may import beside itself: the bottom layer nothing, the graph passes the bottom layer, the
# onnxruntime side both (the graph model, ``Layers``, is the passes'), model files and the machine the bottom layer,
# the search machinery the passes and the onnxruntime side, the summary and report all of these
LAYERS = {"nq_onnx/core": set(), "passes": {"nq_onnx/core"}, "calibration": {"nq_onnx/core", "passes"},
          "nq_onnx/io": {"nq_onnx/core"}, "nq_onnx/search": {"nq_onnx/core", "passes", "calibration"},
          "nq_onnx/report": {"nq_onnx/core", "nq_onnx/io", "nq_onnx/search", "passes", "calibration"}}


def folder_graph() -> dict[str, set[str]]:
    """Folder -> the folders its modules import at import time (module docstring's rule)."""
    files = module_files()
    out: dict[str, set[str]] = {}
    for name, imported in import_graph().items():
        folder = str(files[name].parent.relative_to(ROOT))
        out.setdefault(folder, set()).update(str(files[m].parent.relative_to(ROOT)) for m in imported)
    return {folder: targets - {folder} for folder, targets in out.items()}


def test_no_folder_cycle():
    graph = folder_graph()
    assert {"nq_onnx", "nq_onnx/core", "nq_onnx/search", "nq_onnx/techniques", "nq_onnx/io", "nq_onnx/report",
            "nq_onnx/cli", "passes", "calibration"} <= set(graph)
    found = cycles(graph)
    assert not found, "folder import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_lower_folders_import_only_the_layers_below():
    graph = folder_graph()
    wrong = {folder: sorted(graph[folder] - allowed) for folder, allowed in LAYERS.items() if graph[folder] - allowed}
    assert not wrong, f"imports above their layer: {wrong}"


def test_the_checks_find_what_they_look_for(tmp_path):
    """The helpers on known input: a 61-line function, a method, a nested function, and a three-module cycle."""
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    source = tmp_path / "m.py"
    source.write_text(f"def long():\n{body}\n    return x0\n\n\nclass C:\n    def m(self):\n        def inner():\n"
                      "            pass\n        return inner\n")
    assert function_lengths(source) == {"long": 61, "C.m": 4, "C.m.inner": 2}
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_resolve_submodules_and_packages(tmp_path):
    """``from pkg import sub`` reaches ``pkg.sub``, ``from pkg import name`` reaches ``pkg``; relative imports resolve
    against the package; imports inside functions and under ``if TYPE_CHECKING`` do not count."""
    path = tmp_path / "mod.py"
    path.write_text("from typing import TYPE_CHECKING\nfrom p import sub, Name\nfrom . import other\n"
                    "from .sub import thing\nimport p.deep\nif TYPE_CHECKING:\n    import p.typing_only\n"
                    "try:\n    import p.guarded\nexcept ImportError:\n    pass\n\ndef f():\n    import p.late\n")
    modules = {"p", "p.sub", "p.other", "p.deep", "p.typing_only", "p.guarded", "p.late", "p.mod"}
    assert module_imports("p.mod", path, modules) == {"p", "p.sub", "p.other", "p.deep", "p.guarded"}


def test_public_names_load_on_first_use():
    """The package exports lazily: a submodule's import does not import the pipeline, every name of ``__all__``
    resolves to its module's object, and an unknown name is an AttributeError."""
    code = ("import sys, nq_onnx.core.quant\n"
            "assert 'nq_onnx.pipeline' not in sys.modules, 'nq_onnx.core.quant imported the pipeline'\n"
            "import nq_onnx, nq_onnx.pipeline, nq_onnx.core.config\n"
            "assert nq_onnx.convert is nq_onnx.pipeline.convert\n"
            "assert nq_onnx.QuantConfig is nq_onnx.core.config.QuantConfig\n"
            "assert all(hasattr(nq_onnx, name) for name in nq_onnx.__all__)\n"
            "assert set(nq_onnx.__all__) <= set(dir(nq_onnx))\n"
            "assert not hasattr(nq_onnx, 'no_such_name')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
