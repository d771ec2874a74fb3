"""The import graph of the installed packages, read from the source (no import runs).

Folders are mapped to package names as pyproject.toml maps them (``core/`` is ``shallot.core``), so the
graph is the one Python sees.  Every way the code base imports counts: ``import a.b``, ``from a import b``
(``b`` resolved to the module ``a.b`` where that is a module), relative imports, imports inside functions
(the CLI's lazy ones), and ``importlib.import_module``/``__import__`` with a literal name.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Import:
    target: str  # a module (or package) name
    line: int
    typing_only: bool  # under ``if TYPE_CHECKING:``: annotations only, never run


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Every package of the distribution and its folder, from pyproject.toml."""
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = tool.get("package-dir", {})
    out = {}
    for package in tool["packages"]:
        base = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        rest = package[len(base):].lstrip(".").replace(".", "/")
        out[package] = root / mapping[base] / rest
    return out


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file of every package (``__init__.py`` is the package itself)."""
    out = {}
    for package, folder in package_dirs(root).items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _typing_only_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                ids.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return ids


def imports_of(source: str, module: str, *, is_package: bool, known: set[str]) -> list[Import]:
    """What ``module`` (whose source is ``source``) imports.  ``known``: every module name of the
    distribution, used to tell ``from pkg import submodule`` from ``from pkg import name``."""
    tree = ast.parse(source)
    typing_only = _typing_only_nodes(tree)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        lazy = id(node) in typing_only
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno, lazy) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append(Import(sub if sub in known else target, node.lineno, lazy))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append(Import(node.args[0].value, node.lineno, lazy))
    return found


def graph(root: Path = ROOT) -> dict[str, list[Import]]:
    """Module -> what it imports, for the whole distribution."""
    mods = modules(root)
    known = set(mods)
    return {name: imports_of(path.read_text(), name, is_package=path.stem == "__init__", known=known)
            for name, path in mods.items()}
