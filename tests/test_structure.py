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


# What the code calls, with the first release that has it: the declared minimums must not be below these.
NEWEST_CALLS = {
    "torch": ("2.7", "fully_shard(ignored_params=...) in sharding.shard (torch.nn.utils.get_total_norm and "
                     "register_fsdp_forward_method need 2.6)"),
    "torchvision": ("0.22", "the release built for torch 2.7"),
    "accelerate": ("1.3", "Accelerator.unwrap_model(keep_torch_compile=...) in train.Holding and checkpoint"),
    "open_clip_torch": ("3.0", "create_model_and_transforms('local-dir:RUN') in models.load"),
}


def test_declared_minimum_versions_cover_what_the_code_calls():
    """An install that satisfies setup.cfg must run: pip keeps an older torch or accelerate that it allows."""
    import configparser
    import inspect

    from accelerate import Accelerator
    from packaging.requirements import Requirement
    from packaging.version import Version
    from torch.distributed.fsdp import fully_shard

    assert "ignored_params" in inspect.signature(fully_shard).parameters  # the table's claims, on what is installed
    assert "keep_torch_compile" in inspect.signature(Accelerator.unwrap_model).parameters
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirements = [Requirement(line) for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    minimums = {r.name: max((Version(s.version) for s in r.specifier if s.operator == ">="), default=None) for r in requirements}
    for name, (version, why) in NEWEST_CALLS.items():
        assert minimums[name] is not None and minimums[name] >= Version(version), f"{name}>={minimums[name]}, but the code calls {why}"
