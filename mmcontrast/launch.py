"""Multi-process training on the CPU under ``accelerate launch --cpu --num_processes N``.

Accelerate's launcher starts a single process for ``--cpu`` unless an MPI hostfile is configured
(huggingface/accelerate#2741): it only sets ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR/PORT``. This
module notices that case, reads N from the launcher's own command line (with Accelerate's own
argument parser), and starts N worker processes with the torchrun environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ...), which Accelerate turns into a gloo process group
(``MULTI_CPU``). When one worker fails the others are stopped, so a failure never becomes a hang.

Owns process start-up only; gathers live in ``mmcontrast.distributed``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence

SPAWNED_ENV = "MMCONTRAST_SPAWNED"


def requested_cpu_processes() -> int:
    """N of ``accelerate launch --cpu --num_processes N`` when Accelerate itself started only one process; else 1."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return 1
    if "WORLD_SIZE" in os.environ or SPAWNED_ENV in os.environ or "MASTER_ADDR" not in os.environ:
        return 1
    try:
        import psutil

        parent = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil or no /proc: run as one process, as Accelerate would
        return 1
    if "launch" not in parent:
        return 1
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(parent[parent.index("launch") + 1 :])
    except SystemExit:
        return 1
    if getattr(args, "num_machines", 1) and int(args.num_machines or 1) > 1:
        return 1  # multi-node CPU runs go through mpirun, which sets the ranks itself
    return max(1, int(args.num_processes or 1))


def spawn_workers(n: int, module: str, argv: Sequence[str]) -> int:
    """Run ``python -m module *argv`` in ``n`` processes with torchrun's environment; return the worst exit code."""
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = []
    for rank in range(n):
        env = dict(os.environ)
        env.update(
            {
                SPAWNED_ENV: "1",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(n),
                "LOCAL_WORLD_SIZE": str(n),
                "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": os.environ.get("MASTER_PORT", "29500"),
            }
        )
        env.setdefault("OMP_NUM_THREADS", str(threads))
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env))
    codes: dict[int, int] = {}
    try:
        while len(codes) < n:
            for i, p in enumerate(procs):
                if i not in codes and p.poll() is not None:
                    codes[i] = p.returncode
                    if p.returncode != 0:  # a failed rank would leave the others waiting in a collective
                        for other in procs:
                            if other.poll() is None:
                                other.terminate()
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        return 130
    failed = [c for c in codes.values() if c != 0]
    # the first failure is the real one; terminated peers report -15
    return next((c for c in failed if c > 0), failed[0] if failed else 0)
