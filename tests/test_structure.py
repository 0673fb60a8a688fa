"""The package's shape: short functions, the mode decided in one module, data_tools free of the training stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmcontrast", "data_tools")
MAX_FUNCTION_LINES = 80
MODES = ("clip", "simclr")


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_a_screen_and_a_bit():
    long = [
        f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for package in PACKAGES
        for path in sorted((ROOT / package).glob("*.py"))
        for fn in _functions(path)
        if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def _mode_comparisons(path: Path) -> list[int]:
    """Lines comparing something with a mode name (``x == "clip"``, ``mode in ("simclr", ...)``)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            constants = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            constants += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set)) for e in c.elts
                          if isinstance(e, ast.Constant)]
            if any(c.value in MODES for c in constants):
                lines.append(node.lineno)
    return lines


def test_the_mode_is_decided_where_the_task_is_built_and_nowhere_in_the_loop():
    assert _mode_comparisons(ROOT / "mmcontrast" / "train.py") == []
    assert _mode_comparisons(ROOT / "mmcontrast" / "gradcache.py") == []
    assert len(_mode_comparisons(ROOT / "mmcontrast" / "tasks.py")) <= 2


def test_data_tools_import_neither_torch_nor_the_training_stack():
    code = (
        "import sys, data_tools.make_shards, data_tools.inspect, data_tools.formats\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mmcontrast', 'webdataset', 'open_clip'))\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
