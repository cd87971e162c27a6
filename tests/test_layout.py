"""One concept per room: no module of src/tether over 400 lines, no class over 250 (issue 13).

A module or class past these sizes holds more than one concept; split it by
concept rather than raise the limit. Each test lists every offender with its
size, largest first.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

PACKAGE = ROOT / "src" / "tether"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def modules() -> list[Path]:
    found = sorted(PACKAGE.rglob("*.py"))
    assert len(found) > 10, f"no tether sources under {PACKAGE}"
    return found


def name_of(path: Path) -> str:
    return str(path.relative_to(ROOT))


def class_sizes(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from its first decorator to its last line) of every class."""
    sizes = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                assert child.end_lineno is not None
                sizes.append((f"{prefix}{child.name}", child.end_lineno - first + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text(), str(path)), "")
    return sizes


def test_no_module_is_longer_than_400_lines() -> None:
    sizes = {name_of(p): len(p.read_text().splitlines()) for p in modules()}
    over = sorted(((n, name) for name, n in sizes.items() if n > MAX_MODULE_LINES), reverse=True)
    assert not over, "modules over {} lines: {}".format(
        MAX_MODULE_LINES, ", ".join(f"{name} ({n})" for n, name in over))


def test_no_class_is_longer_than_250_lines() -> None:
    over = sorted(((n, f"{name_of(p)}:{cls}") for p in modules() for cls, n in class_sizes(p)
                   if n > MAX_CLASS_LINES), reverse=True)
    assert not over, "classes over {} lines: {}".format(
        MAX_CLASS_LINES, ", ".join(f"{name} ({n})" for n, name in over))


def test_the_size_guard_measures_what_it_says(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("@decorator\nclass Outer:\n    class Inner:\n        x = 1\n\n"
                      "    def f(self) -> None:\n        class Local:\n            pass\n")
    assert class_sizes(source) == [("Outer", 8), ("Outer.Inner", 2), ("Outer.f.Local", 2)]
