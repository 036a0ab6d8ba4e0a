"""The package's modules form no import cycle, and each imports on its own, in any order."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import convnext_cli

PACKAGE = Path(convnext_cli.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in it (functions included: a lazy
    import is still a dependency), except under ``if TYPE_CHECKING``."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in MODULES and target != name:
                found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def graph() -> dict[str, set[str]]:
    # a package's __init__ runs before its modules: importing it is no edge back to the package
    edges = {name: imported(name, path) for name, path in MODULES.items()}
    return {
        name: {t for t in targets if not name.startswith(t + ".")}
        for name, targets in edges.items()
    }


def test_the_checker_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_the_package_modules() -> None:
    assert len(MODULES) > 30
    assert find_cycle(graph()) is None


def test_every_module_imports_first_in_a_fresh_interpreter_in_a_random_order() -> None:
    names = sorted(set(MODULES) - {"convnext_cli.__main__"})  # that one runs the CLI
    random.Random().shuffle(names)
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('convnext_cli')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"order {names}:\n{done.stderr}"


MAX_FUNCTION_LINES = 60  # issue 19: a function a reader takes in at once


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions and methods whose definition (signature and body) spans more than `limit`
    lines, as ``name (N lines)``."""
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_the_length_check_finds_a_long_function() -> None:
    body = "".join(f"    x{n} = {n}\n" for n in range(60))
    assert long_functions(f"def f():\n{body}") == ["f (61 lines)"]
    assert long_functions(f"def f():\n{body[: -len('    x59 = 59') - 1]}") == []


def test_no_function_in_the_package_is_over_60_lines() -> None:
    found = {
        name: long
        for name, path in MODULES.items()
        if (long := long_functions(path.read_text(encoding="utf-8")))
    }
    assert found == {}
