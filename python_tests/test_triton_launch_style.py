"""One launch style for the Triton kernels (docs/design.md §11.3), read from the source with
``ast``: every ``kernel[grid](...)`` passes its arguments by keyword, so a launch names
what it passes and an absent input is ``None`` next to its ``HAS_*`` flag rather than a
stand-in tensor in position."""

import ast
import pathlib

import pytest

OPS = pathlib.Path(__file__).resolve().parents[1] / "vreason_kernels" / "ops"
SOURCES = sorted(OPS.rglob("triton_*.py"))


def _launches(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            yield node


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(OPS)))
def test_launches_pass_arguments_by_keyword(path):
    positional = [f"{path.name}:{call.lineno}" for call in _launches(path) if call.args]
    assert not positional, f"positional launch arguments at {positional}"


def test_every_kernel_module_is_read():
    assert sum(1 for path in SOURCES for _ in _launches(path)) >= 12
