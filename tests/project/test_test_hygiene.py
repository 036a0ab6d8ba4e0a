"""The tests reach the package only through its public names (issue 19): no test imports a
``_private`` name or module of ``convnext_cli``, reads or patches ``module._name`` on a name bound
to one of its modules, or ``monkeypatch.setattr(module, "_name", ...)``. The walk is over the
source (ast), so it also sees lazy imports inside test functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = next(p for p in Path(__file__).resolve().parents if p.name == "tests")  # moves safely
PACKAGE = "convnext_cli"


# Files still reaching private names, with the reason. Empty this list when the owner is done.
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_part(dotted: str) -> str | None:
    return next((part for part in dotted.split(".") if _private(part)), None)


def _test_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def violations(source: str) -> list[str]:
    """Each private reach into the package in ``source``, as ``line: what``."""
    tree = ast.parse(source)
    bound: set[str] = set()  # local names bound to the package or one of its modules/objects
    found: list[str] = []

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != PACKAGE:
                    continue
                if _private_part(alias.name):
                    found.append(f"{node.lineno}: import {alias.name}")
                bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            if module.split(".")[0] != PACKAGE:
                continue
            if _private_part(module):
                found.append(f"{node.lineno}: from {module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{node.lineno}: from {module} import {alias.name}")
                bound.add(alias.asname or alias.name)

    def root(node: ast.expr) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return node.id if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and root(node) in bound:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"setattr", "delattr"}
            and len(node.args) >= 2
            and root(node.args[0]) in bound
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            found.append(f"{node.lineno}: {ast.unparse(node.func)}(..., {node.args[1].value!r})")
        elif (  # monkeypatch.setattr("convnext_cli.x._y", ...)
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"setattr", "delattr"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith(PACKAGE + ".")
            and _private_part(node.args[0].value)
        ):
            found.append(f"{node.lineno}: {ast.unparse(node.func)}({node.args[0].value!r}, ...)")
    return sorted(set(found), key=lambda line: int(line.split(":")[0]))


@pytest.mark.parametrize("path", _test_files(), ids=lambda p: str(p.relative_to(TESTS)))
def test_no_test_reaches_a_private_name(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "source",
    [
        "from convnext_cli.engine._environment import cudnn_version",
        "from convnext_cli.inputs import _folder_chunks",
        "import convnext_cli.engine._environment as env",
        "from convnext_cli.inputs import expand as inputs\ninputs._folder_chunks('x')",
        "from convnext_cli import progress\nprogress._stats(1)",
        "from convnext_cli.inputs import expand\ndef t(monkeypatch):\n"
        "    monkeypatch.setattr(expand, '_SCAN_BLOCK', 3)",
        "from convnext_cli.engine import decode_pool\ndef t(monkeypatch):\n"
        "    monkeypatch.setattr(decode_pool.DecodePool, '_start_worker', None)",
        "def t(monkeypatch):\n    monkeypatch.setattr('convnext_cli.imaging.decoding._X', 1)",
        "from convnext_cli.cli.progress import Stats\nStats()._progress",
    ],
)
def test_the_check_sees_each_kind_of_reach(source: str) -> None:
    assert violations(source), source


@pytest.mark.parametrize(
    "source",
    [
        "import sys\nsys._getframe()",
        "import torch\ntorch._dynamo",
        "from convnext_cli.inputs import expand\nexpand.folder_chunks('x')",
        "from convnext_cli import errors\nerrors.UsageError.__name__",
        "def t(monkeypatch, thing):\n    monkeypatch.setattr(thing, '_x', 1)",
    ],
)
def test_the_check_leaves_other_names_alone(source: str) -> None:
    assert violations(source) == []
