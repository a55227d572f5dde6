"""`_core.pyi` describes the native module as it is: the same names, the same parameters."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import sharpness
from sharpness import _core

STUB = Path(sharpness.__file__).with_name("_core.pyi")


def stub_entries():
    tree = ast.parse(STUB.read_text())
    functions, values = {}, set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            functions[node.name] = (
                [x.arg for x in a.posonlyargs + a.args],
                [x.arg for x in a.kwonlyargs],
            )
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            values.add(node.target.id)
    return functions, values


def test_stub_names_match_the_module():
    functions, values = stub_entries()
    public = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert set(functions) | (values - {"Tensors"}) == public


def test_stub_signatures_match_the_module():
    functions, _ = stub_entries()
    for name, (positional, keyword_only) in functions.items():
        sig = inspect.signature(getattr(_core, name))
        kinds = inspect.Parameter
        native_positional = [
            p.name for p in sig.parameters.values() if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
        ]
        native_keyword = [p.name for p in sig.parameters.values() if p.kind == kinds.KEYWORD_ONLY]
        assert native_positional == positional, name
        assert native_keyword == keyword_only, name
