"""The package's shape: short functions and files, rooms that import downwards only, one training loop, the mode decided
in one module, data_tools free of the training stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmcontrast", "data_tools")
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 600
# The rooms, lowest first: a module imports modules of its own room or lower ones, never higher (function-level
# imports included: a lazy import is still a dependency). Within a room there must be no cycle either.
ROOMS = (
    ("errors", "threads", "probe", "plots", "sharding", "distributed"),  # foundations: no mmcontrast imports but these
    ("losses", "config", "shards", "data", "feed", "augment", "models", "zeroshot", "ann", "collection", "checkpoint",
     "ema", "holding", "optim", "launch"),  # data, models and the pieces of a run
    ("evaluate", "heldout", "diagnostics", "patches", "classifier", "loading", "fewshot", "search", "dedup", "web", "monitor",
     "wiseft"),  # measuring, loading any checkpoint, searching
    ("labelled", "views", "tasks", "gradcache"),  # what a mode trains
    ("train",),  # the loop
    ("finetune",),  # commands built on the loop
    ("cli", "cli.*", "__init__"),  # the command line and the package's front door
)
# Where a gradient is taken or an optimizer steps: the trainer's rooms, and the exceptions with their reason.
TRAINING_ROOMS = {"mmcontrast/train.py", "mmcontrast/gradcache.py", "mmcontrast/tasks.py"}
NOT_A_TRAINING_LOOP = {
    "mmcontrast/fewshot.py": "the text-prior probe's convex L-BFGS fit on frozen features (a solver, like sklearn's)",
    "bench/loss_memory.py": "one backward pass of a loss, to measure its memory",
    "bench/train_gpu.py": "one backward pass under FlopCounterMode, to count the FLOPs",
}
MODES = ("clip", "simclr", "classify")


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_a_screen_and_a_bit():
    long = [
        f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for fn in _functions(path)
        if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def _room(module: str) -> int:
    for level, names in enumerate(ROOMS):
        if module in names or any(n.endswith(".*") and module.startswith(n[:-1]) for n in names):
            return level
    raise AssertionError(f"mmcontrast.{module} is in no room of tests/test_structure.py: place it")


def _imports() -> dict[str, set[str]]:
    """``module -> mmcontrast modules it imports`` (names relative to the package; ``__init__`` is the package)."""
    graph = {}
    for path in sorted((ROOT / "mmcontrast").rglob("*.py")):
        parts = path.relative_to(ROOT / "mmcontrast").with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "mmcontrast":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmcontrast."):
                found.add(node.module.removeprefix("mmcontrast."))
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("mmcontrast.") for a in node.names if a.name.startswith("mmcontrast.")}
        graph[module] = found - {module}
    return graph


def test_rooms_import_downwards_only_and_nothing_imports_in_a_circle():
    graph = _imports()
    upwards = [f"{m} (room {_room(m)}) imports {d} (room {_room(d)})" for m, deps in graph.items() for d in deps
               if d in graph and _room(d) > _room(m)]
    assert not upwards, upwards
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep in graph and len(path) < len(graph):
                visit(dep, path + [dep])

    for module in graph:
        visit(module, [module])
    assert not cycles, cycles[0]


def test_files_stay_under_a_few_screens():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES]
    assert not long, long


def test_gradients_and_optimizer_steps_happen_in_the_trainer_only():
    """One loop: a backward pass or an optimizer step anywhere else (the package, bench, examples) is a second loop."""
    found = []
    for folder in ("mmcontrast", "bench", "examples", "data_tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            if name in TRAINING_ROOMS or name in NOT_A_TRAINING_LOOP:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("backward", "step"):
                    found.append(f"{name}:{node.lineno} .{node.func.attr}()")
    assert not found, found


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
