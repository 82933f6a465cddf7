"""Every recipe's ``--help`` renders.

argparse expands ``%`` in help strings, so a help text with a bare percent sign ("0% ASR")
crashed ``python recipes/inject.py --help`` with a ValueError before any option was shown.
Each recipe is imported (not run), the dataclasses it hands ``TrlParser`` are read from its
source, and the parser's help is formatted.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from trl import TrlParser

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.py"))


def parser_dataclasses(path: Path) -> list[str]:
    """Names in the tuple passed to ``TrlParser(...)`` in a recipe's source."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "TrlParser":
            return [elt.id for elt in node.args[0].elts]
    return []


@pytest.mark.parametrize("path", [p for p in RECIPES if parser_dataclasses(p)], ids=lambda p: p.name)
def test_recipe_help_renders(path):
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = TrlParser(tuple(getattr(module, name) for name in parser_dataclasses(path)))
    text = parser.format_help()
    assert "--output_dir" in text or "--config" in text, text[:500]
