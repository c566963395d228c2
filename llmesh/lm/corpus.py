"""A training corpus built locally from the docstrings of Python's standard library."""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_DOC_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _source_files(root: Path) -> Iterator[Path]:
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _docstrings(path: Path) -> Iterator[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in [tree, *(n for n in ast.walk(tree) if isinstance(n, _DOC_NODES))]:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= 20:
            yield doc.strip()


def stdlib_docstrings(stdlib: Path | None = None) -> list[str]:
    """Every docstring of 20+ characters in the stdlib, in a stable (sorted-path) order."""
    root = stdlib or Path(sysconfig.get_paths()["stdlib"])
    return [doc for path in _source_files(root) for doc in _docstrings(path)]
