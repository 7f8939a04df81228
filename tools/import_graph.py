"""Print the package's own imports, module by module, as the Markdown table of docs/architecture.md.

    python tools/import_graph.py

A module's imports at import time, and apart those it makes inside a function (where it uses them);
imports under ``if TYPE_CHECKING:`` are left out (types only). ``tests/test_architecture.py``
checks that docs/architecture.md holds this table as printed.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hf_llama_strategies"


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _target(path: pathlib.Path, node: ast.ImportFrom) -> list[str]:
    """The package modules ``node`` (a relative import in ``path``) names."""
    here = list(path.relative_to(PACKAGE).parts[:-1])
    base = here[: len(here) - node.level + 1] if node.level else None
    if base is None:
        return []
    if node.module:
        return [".".join([*base, *node.module.split(".")])]
    return [".".join([*base, alias.name]) for alias in node.names]


def imports(path: pathlib.Path) -> tuple[list[str], list[str]]:
    """(imported at import time, imported inside functions) by the module at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top: set[str] = set()
    deferred: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom):
            (deferred if in_function else top).update(_target(path, node))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    known = {_module_name(p) for p in PACKAGE.rglob("*.py")}

    def module(target: str) -> str:
        # "from .plan import StrategyPlan" names a module; "from .. import __version__" the package.
        return target if target in known else (target.rsplit(".", 1)[0] if "." in target else "(package)")

    top = {module(t) for t in top if t}
    deferred = {module(t) for t in deferred if t} - top
    return sorted(top), sorted(deferred)


def table() -> str:
    """The Markdown table: one row per module of the package."""
    rows = ["| module | imports | imports inside a function |", "|---|---|---|"]
    for path in sorted(PACKAGE.rglob("*.py"), key=lambda p: (len(p.relative_to(PACKAGE).parts), str(p))):
        if "assets" in path.relative_to(PACKAGE).parts or path.name in ("__init__.py", "__main__.py"):
            continue
        top, deferred = imports(path)
        rows.append(f"| `{_module_name(path)}` | {', '.join(top) or '-'} | {', '.join(deferred) or '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
