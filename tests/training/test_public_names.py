"""The export pipeline reaches fpn_serve through its public names only (DESIGN.md: the manifest and
the public API are what the two halves share)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

TRAINING = Path(__file__).resolve().parents[2] / "training"
PIPELINE = [
    "calibrate",
    "certify",
    "export",
    "export_graphs",
    "export_manifest",
    "graph_builder",
    "loop_graph",
    "parity",
    "precision",
]
PUBLIC_MODULES = ("fpn_serve", "fpn_serve.contract")


def _private_uses(tree: ast.AST) -> list[str]:
    """``x._name`` on anything but self or cls, and imports of fpn_serve names not in a public __all__."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fpn_serve":
            if node.module not in PUBLIC_MODULES:
                found.append(f"line {node.lineno}: from {node.module}")
                continue
            public = set(importlib.import_module(node.module).__all__)
            found += [f"line {node.lineno}: {a.name} from {node.module}" for a in node.names if a.name not in public]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("fpn_serve.")]
    return found


@pytest.mark.parametrize("module", PIPELINE)
def test_the_export_pipeline_uses_only_fpn_serves_public_names(module: str) -> None:
    tree = ast.parse((TRAINING / f"{module}.py").read_text())
    assert _private_uses(tree) == []


def test_the_check_sees_a_private_call() -> None:
    tree = ast.parse(
        "from fpn_serve.runtime.engine import Engine\nfrom fpn_serve import Engine\nengine._apply_t(u, z)\n"
    )
    assert _private_uses(tree) == ["line 1: from fpn_serve.runtime.engine", "line 3: ._apply_t"]
