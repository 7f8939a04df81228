"""The package's imports, read from its source: the table of docs/architecture.md, and the rules it keeps.

    python tools/import_graph.py            # the Markdown table of docs/architecture.md
    python tools/import_graph.py --write    # ... written into docs/architecture.md (its last section)
    python tools/import_graph.py --check    # the rules below; exit 1 with what breaks them

Every import counts: at import time, inside a function, and under ``if TYPE_CHECKING:`` (a
circle of type-only imports is still a circle for a reader). ``tests/test_architecture.py``
runs the check and compares docs/architecture.md with the table.

The rules: no import circle between modules; every module imports only from its own part and
from the parts below it (:data:`MAY_IMPORT`); no function longer than :data:`MAX_FUNCTION_LINES`.
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hf_llama_strategies"
MAX_FUNCTION_LINES = 80

#: Each part of the package, and the parts it may import (beside itself). Read bottom up: the
#: contract and core services know no strategy; the strategies know the core; the options of
#: every strategy are composed into ``StrategyArguments``; a run (context, planner) is built from
#: them; the integrations (training, memory, data) use a run; the command line uses everything.
MAY_IMPORT: dict[str, set[str]] = {
    "_version": set(),
    "errors": set(),
    "core": {"errors"},
    "strategies": {"core", "errors", "_version"},
    "arguments": {"strategies", "core", "errors"},
    "context": {"arguments", "core", "errors"},
    "planner": {"context", "arguments", "core", "errors"},
    "data": {"core", "errors"},
    "training": {"data", "planner", "context", "arguments", "core", "errors"},
    "memory": {"training", "planner", "context", "arguments", "core", "errors"},
    "cli": {"memory", "training", "data", "planner", "context", "arguments", "core", "errors", "_version"},
    "__init__": {"memory", "training", "planner", "context", "arguments", "core", "errors", "_version"},
    "__main__": {"cli"},
}


def module_name(path: pathlib.Path) -> str:
    """``core/plan.py`` -> ``core.plan``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def part_of(module: str) -> str:
    """The part a module belongs to: its first component (``core.plan`` -> ``core``)."""
    return module.split(".", 1)[0]


def _modules() -> dict[str, pathlib.Path]:
    return {
        module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "assets" not in p.relative_to(PACKAGE).parts
    }


def imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, wherever the import stands."""
    here = list(path.relative_to(PACKAGE).parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - node.level + 1]
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            # "from . import x" names the module x; "from .plan import StrategyPlan" the module plan.
            submodules = {f"{module}.{alias.name}" if module else alias.name for alias in node.names} & known
            found.update(submodules or {module})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_llama_strategies":
            module = node.module.removeprefix("hf_llama_strategies").lstrip(".")
            submodules = {f"{module}.{alias.name}" if module else alias.name for alias in node.names} & known
            found.update(submodules or {module or "__init__"})
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("hf_llama_strategies.") for alias in node.names
                         if alias.name.startswith("hf_llama_strategies."))
    return {m for m in found if m in known and m != module_name(path)}


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = _modules()
    known = set(modules)
    return {name: imports(path, known) for name, path in modules.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layer_breaches(edges: dict[str, set[str]]) -> list[str]:
    """``module -> import`` for every import of a part the module's part may not import."""
    out = []
    for module, targets in sorted(edges.items()):
        allowed = MAY_IMPORT[part_of(module)] | {part_of(module)}
        out += [f"{module} -> {t}" for t in sorted(targets) if part_of(t) not in allowed]
    return out


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``module.function (N lines)`` for every function longer than ``limit`` lines."""
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > limit:
                    out.append(f"{name}.{node.name} ({length} lines)")
    return out


def table() -> str:
    """The Markdown table of docs/architecture.md: one row per module, what it imports."""
    edges = graph()
    rows = ["| part | module | imports |", "|---|---|---|"]
    for module in sorted(edges, key=lambda m: (list(MAY_IMPORT).index(part_of(m)), m)):
        rows.append(f"| {part_of(module)} | `{module}` | {', '.join(sorted(edges[module])) or '-'} |")
    return "\n".join(rows)


def check() -> list[str]:
    """Every rule broken, one line each; empty when the package keeps them all."""
    edges = graph()
    problems = [f"import circle: {' <-> '.join(group)}" for group in circles(edges)]
    problems += [f"imports a part above its own: {breach}" for breach in layer_breaches(edges)]
    problems += [f"longer than {MAX_FUNCTION_LINES} lines: {f}" for f in long_functions()]
    return problems


def write_doc() -> None:
    """Replace the table at the end of docs/architecture.md with the code's."""
    doc = PACKAGE.parent / "docs" / "architecture.md"
    text = doc.read_text(encoding="utf-8")
    start = text.index("| part | module | imports |")
    doc.write_text(text[:start] + table() + "\n", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        broken = check()
        print("\n".join(broken) or "the package keeps its rules")
        sys.exit(1 if broken else 0)
    if sys.argv[1:] == ["--write"]:
        write_doc()
    else:
        print(table())
