"""The package's layout (issue 16): subpackages by role, imports one way, files that read.

Imports flow one way, ``functional <- core <- probes, consumers <- runner <- app,
integrations``: a module imports only from its own subpackage and from the layers below
it (every import counts, those inside functions and ``TYPE_CHECKING`` blocks too), and no
two modules import each other, directly or through others. No file is over 400 lines and
no function over 60, and the old public import paths still work.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lm_probe"

#: Each part of the package (a subpackage, or a module at the top) and the parts it may
#: import. ``lm_probe`` is the package itself (``__init__``: the lazy public names).
MAY_IMPORT: dict[str, set[str]] = {
    "functional": set(),
    "core": {"functional"},
    "probes": {"functional", "core"},
    "consumers": {"functional", "core"},
    "circuits": {"functional", "core", "probes"},  # mask probes: train through the model
    "runner": {"functional", "core", "probes"},
    "app": {"functional", "core", "probes", "consumers", "runner", "lm_probe"},
    "integrations": {"functional", "core", "probes", "consumers", "runner"},
    "__main__": {"app"},
    "architectures": {"core"},  # the re-export of an earlier import path
    "embedded": {"core"},  # likewise
    "testing": set(),  # tiny models for tests: nothing of lm_probe's
    "lm_probe": {"functional", "core", "probes", "consumers", "circuits", "runner", "app", "integrations"},
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60  # end_lineno - lineno + 1: signature and docstring included
MAX_RUNNER_CODE_LINES = 250
SCREEN_LINES = 40
#: Files (``lm_probe/x.py``) or functions (``lm_probe/x.py:Class.method``) allowed over the
#: limits, each with the reason it cannot be split. Empty: everything could be.
ALLOWED_LONG: dict[str, str] = {}


def modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The lm_probe modules that module ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # ``from . import pooling``: the module pooling
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m == "lm_probe" or m.startswith("lm_probe.")}


def part(module: str) -> str:
    """The part of the package a module belongs to (``lm_probe.core.sites`` -> ``core``)."""
    return module.split(".")[1] if "." in module else "lm_probe"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) - {name} for name, path in known.items()}


def test_every_part_of_the_package_has_a_place_in_the_order():
    assert {part(m) for m in modules()} == set(MAY_IMPORT)


def test_imports_run_one_way():
    against = [f"{module} imports {target}" for module, targets in graph().items() for target in sorted(targets)
               if part(target) != part(module) and part(target) not in MAY_IMPORT[part(module)]]
    assert not against, "imports against the order functional <- core <- probes, consumers <- runner <- app:\n" + \
        "\n".join(against)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_through_others():
    assert _cycle(graph()) is None, " -> ".join(_cycle(graph()))


def test_no_two_subpackages_import_each_other():
    between: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph().items():
        between[part(module)] |= {part(t) for t in targets if part(t) != part(module)}
    assert _cycle(between) is None, " -> ".join(_cycle(between))


def test_the_order_is_checked_on_lazy_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function, a relative one, ``from . import x``."""
    code = "def f():\n    from ..runner import ProbeRunner\n    from . import sites\n    import lm_probe.app.cli\n"
    (tmp_path / "m.py").write_text(code)
    known = {"lm_probe.runner", "lm_probe.core.sites", "lm_probe.app.cli"}
    assert imports("lm_probe.core.m", tmp_path / "m.py", known) == known


# ---------------------------------------------------------------- sizes
def _functions(tree: ast.AST, prefix: str = ""):
    """``(qualified name, lines)`` of every function and method, docstring included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, name + ".")


def _key(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_no_file_is_too_long():
    long = {_key(p): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES and _key(p) not in ALLOWED_LONG}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them along a seam): {long}"


def test_no_function_is_too_long():
    long = {f"{_key(p)}:{name}": n for p in modules().values() for name, n in _functions(ast.parse(p.read_text()))
            if n > MAX_FUNCTION_LINES and f"{_key(p)}:{name}" not in ALLOWED_LONG}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (docstring included): {long}"


def test_the_allowed_long_entries_still_exist():
    keys = {_key(p) for p in modules().values()}
    keys |= {f"{_key(p)}:{name}" for p in modules().values() for name, _ in _functions(ast.parse(p.read_text()))}
    assert set(ALLOWED_LONG) <= keys


def test_the_runner_is_the_loop_and_little_else():
    """ProbeRunner's code, its docstrings aside (the public API's documentation stays whole),
    is at most MAX_RUNNER_CODE_LINES, and its main loop fits on one screen."""
    tree = ast.parse((PACKAGE / "runner.py").read_text())
    runner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ProbeRunner")
    docstrings = {line for node in ast.walk(runner) if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                  and ast.get_docstring(node) is not None
                  for line in range(node.body[0].lineno, node.body[0].end_lineno + 1)}
    assert runner.end_lineno - runner.lineno + 1 - len(docstrings) <= MAX_RUNNER_CODE_LINES
    loop = next(n for n in runner.body if isinstance(n, ast.FunctionDef) and n.name == "_pass")
    assert loop.end_lineno - loop.lineno + 1 <= SCREEN_LINES


# ---------------------------------------------------------------- the import paths users have
@pytest.mark.parametrize("old, new", [("lm_probe.architectures", "lm_probe.core.architectures"),
                                      ("lm_probe.embedded", "lm_probe.core.embedded"),
                                      ("lm_probe.integrations", "lm_probe.integrations.trainer")])
def test_earlier_import_paths_give_the_same_objects(old, new):
    shim, module = importlib.import_module(old), importlib.import_module(new)
    assert shim.__all__ and all(getattr(shim, name) is getattr(module, name) for name in shim.__all__)
    assert set(shim.__all__) <= set(getattr(module, "__all__", shim.__all__))


def test_the_earlier_paths_of_the_readme_still_import():
    from lm_probe.architectures import sites
    from lm_probe.embedded import embedded_model_path, rotten_tomatoes
    from lm_probe.integrations import GaugeCallback

    assert sites.__module__ == "lm_probe.core.architectures"
    assert {rotten_tomatoes.__module__, embedded_model_path.__module__} == {"lm_probe.core.embedded"}
    assert GaugeCallback.__name__ == "GaugeCallback"


def test_the_console_script_and_python_m_reach_the_cli():
    from lm_probe.app import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["lm-probe"].partition(":")
    assert getattr(importlib.import_module(module), attr) is cli.main
    main = ast.parse((PACKAGE / "__main__.py").read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "app.cli" for n in main.body)


def test_every_subpackage_is_in_the_wheel():
    """``packages.find`` finds every folder of the package, each a regular package (with
    ``__init__.py``), so a built wheel holds every module."""
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("*.py")}
    assert set(find_packages(str(ROOT), include=include)) == folders
    assert all((ROOT / f.replace(".", "/") / "__init__.py").exists() for f in folders)
