"""Processes: starting N of them on the CPU under ``accelerate launch``, and ending every one when one ends.

Accelerate's launcher starts a single process for ``--cpu`` unless an MPI hostfile is configured
(huggingface/accelerate#2741): it only sets ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR/PORT``. This module
notices that case, reads N from the launcher's own command line (with Accelerate's own argument parser),
and replaces the process with PyTorch's elastic launcher — ``python -m torch.distributed.run --standalone
--nproc-per-node N`` (a free port, the ranks' environment, and every rank stopped when one fails) — so the
command does what it says. The ranks start with ``OMP_NUM_THREADS`` = their share of the cores and choose their
split themselves (``mmcontrast.threads``), unless the user gave a count (``--num_cpu_threads_per_process`` or
``OMP_NUM_THREADS``), which they keep.

In every rank of a multi-process job, ``watch_parent`` ends the process when its launcher dies (SIGKILL
included), so no rank is left waiting in a collective. ``check_world`` refuses a job whose processes did
not form one group. ``take_over_fsdp_request`` routes ``accelerate launch --use_fsdp`` to ``train.fsdp``. Owns processes: starting
them, ending them, checking they formed one group; gathers live in ``mmcontrast.distributed``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mmcontrast.errors import UsageError

WATCH_INTERVAL_S = 1.0


def _accelerate_launch_args():
    """Accelerate's parsed arguments of the ``accelerate launch`` that started this process, or None."""
    try:
        import psutil

        parent = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil or no /proc: run as one process, as Accelerate would
        return None
    if "launch" not in parent:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(parent[parent.index("launch") + 1 :])
    except SystemExit:
        return None
    return args


def requested_cpu_processes() -> int:
    """N of ``accelerate launch --cpu --num_processes N`` when Accelerate started only this one process; else 1."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return 1
    if "WORLD_SIZE" in os.environ or "MASTER_ADDR" not in os.environ:
        return 1
    args = _accelerate_launch_args()
    if args is None or int(getattr(args, "num_machines", 1) or 1) > 1:
        return 1  # multi-node CPU runs go through mpirun or torchrun, which set the ranks themselves
    return max(1, int(args.num_processes or 1))


def exec_torchrun(n: int, module: str, argv: Sequence[str]) -> None:
    """Replace this process with ``torch.distributed.run --standalone --nproc-per-node n -m module *argv``; the ranks
    start with their share of the cores, or the user's thread count (``threads.user_threads``), and know which."""
    from mmcontrast.threads import THREADS_ENV, process_share, user_threads

    user = user_threads()
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}  # torchrun picks a free port
    env["OMP_NUM_THREADS"] = str(user or process_share(n))
    env[THREADS_ENV] = str(user) if user else "auto"
    env["ACCELERATE_USE_CPU"] = "true"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", module, *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)


def watch_parent(interval: float = WATCH_INTERVAL_S) -> None:
    """End this process (exit 1) as soon as its parent — the launcher — is gone, from a daemon thread."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:  # re-parented: the launcher died without stopping us
                os._exit(1)

    threading.Thread(target=watch, name="mmcontrast-watch-parent", daemon=True).start()


def use_gloo_without_cuda() -> None:
    """Let Accelerate form a gloo group when a launcher (torchrun, srun) started several ranks on a machine
    without CUDA: without ``ACCELERATE_USE_CPU`` it would run them as independent single processes."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def take_over_fsdp_request() -> bool:
    """Whether ``accelerate launch --use_fsdp`` started this process. Its plugin needs CUDA (on the CPU it falls
    back to DDP), so the request is taken over by ``train.fsdp`` (torch's ``fully_shard``, on any device) and
    Accelerate is told to keep out of it."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("true", "1"):
        return False
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    return True


def check_world(accelerator) -> None:
    """UsageError when the processes did not form one group of the size the launcher started."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise UsageError(
            f"the launcher started {launched} processes but they formed a group of {accelerator.num_processes}; "
            "launch with `accelerate launch` (add --cpu without GPUs) or `torchrun --nproc-per-node N`"
        )


# ---------------------------------------------------------------- the processes' Accelerator


def usable_trackers(names: list) -> list:
    """The configured trackers minus TensorBoard when it is not installed (it is the default)."""
    from accelerate.utils import is_tensorboard_available

    return [n for n in names if n != "tensorboard" or is_tensorboard_available()]


def flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def make_accelerator(mixed_precision: str, trackers: list, output_dir: Path, compile_model: bool, dist_timeout_s: float = 1800.0):
    """Accelerate with the run's precision and trackers; ``compile_model`` compiles the model with torch.compile
    (inductor), as ``accelerate launch --dynamo_backend inductor`` does for runs started without it. The process
    group it forms (under any launcher: accelerate launch, torchrun, srun) lets a process wait ``dist_timeout_s`` in a
    collective before the job fails."""
    import datetime

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    return Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=dist_timeout_s))],
        mixed_precision=None if mixed_precision == "no" else mixed_precision,  # None: `accelerate launch --mixed_precision`
        dynamo_backend="inductor" if compile_model else None,  # None: Accelerate's own (launch --dynamo_backend)
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
