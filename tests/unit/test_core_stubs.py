"""choreo/_core.pyi describes the compiled module exactly: every public name, and no more.

Also checks the twin exposes the same public names, so code written against one core runs on
the other.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from choreo import _core, _pycore

STUB = Path(_core.__file__).with_name("_core.pyi")
NOT_API = {"NamedTuple", "deque"}  # imported helpers that show up as module attributes


def stub_names() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(STUB.read_text())
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
        if isinstance(node, ast.ClassDef):
            names = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
            members[node.name] = {n for n in names if not n.startswith("_")}
    return top, members


def public(obj) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def test_stub_lists_every_public_name_of_the_compiled_module() -> None:
    top, _ = stub_names()
    assert top == public(_core) - NOT_API


def test_stub_lists_every_public_member_of_each_class() -> None:
    _, members = stub_names()
    for name, names in members.items():
        cls = getattr(_core, name)
        real = public(instances(_core).get(name, cls))
        if issubclass(cls, tuple):  # NamedTuple: count/index come from tuple
            real -= {"count", "index"}
        if issubclass(cls, BaseException):
            real -= public(ValueError)
        assert names == real, f"{name}: stub {sorted(names ^ real)} differ"


def instances(core) -> dict[str, object]:
    z = bytes(16)
    return {
        "OutboundWindow": core.OutboundWindow(),
        "InboundReorder": core.InboundReorder(),
        "DedupWindow": core.DedupWindow(1.0, 10),
        "KeyedDispatch": core.KeyedDispatch(),
        "Envelope": core.Envelope(core.pack_envelope(1, 1, 0, b"T", b"", 0, z, z, z, b"")),
        "MalformedFrame": core.MalformedFrame("truncated", "detail"),
        "IdSource": core.IdSource(bytes(8)),
        "FastLane": core.FastLane(),
        "SpanRing": core.SpanRing(4),
        "EmitLane": core.EmitLane(
            b"T", "k", 1, [core.OutboundWindow()], bytes, bytes, core.IdSource(bytes(8)), 256, 1 << 18, 1 << 20
        ),
        "EmitTable": core.EmitTable({}, None),
    }


@pytest.mark.parametrize("name", sorted(public(_core) - NOT_API))
def test_twin_has_the_same_public_names(name: str) -> None:
    assert hasattr(_pycore, name), f"choreo._pycore lacks {name}"
    compiled, pure = getattr(_core, name), getattr(_pycore, name)
    if inspect.isclass(compiled):
        c_obj, p_obj = instances(_core).get(name, compiled), instances(_pycore).get(name, pure)
        missing = public(c_obj) - public(p_obj)
        assert not missing, f"choreo._pycore.{name} lacks {sorted(missing)}"
