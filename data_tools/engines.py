"""Who runs ``output.write_shard`` for each shard: a local process pool (the default) or a Ray cluster.

Owns: scheduling shard jobs ``(shard index, manifest rows)`` on workers with a bounded number in flight (the
listing may have millions of rows), and yielding each finished shard's stats. Does not own what a shard
contains (``output.write_shard``, the same function on every engine, hence the same bytes).

Ray is optional and imported only here, only for ``--engine ray``: ``pip install 'mmcontrast[ray]'``.
"""

from __future__ import annotations

import os
import re
import socket
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from data_tools.inputs import ArgumentError
from data_tools.output import ShardContext, write_shard

RAY_TASK_RETRIES = 3  # a task whose worker dies (killed, node lost) runs again, from the start of its shard
IN_FLIGHT_PER_WORKER = 2  # jobs queued per worker: enough to keep it busy, bounded memory

Job = tuple[int, list[str]]

_worker_context: ShardContext | None = None  # set once in each pool process


def _init_worker(ctx: ShardContext) -> None:
    global _worker_context
    _worker_context = ctx


def _write_in_worker(shard: int, lines: list[str]) -> dict:
    return write_shard(_worker_context, shard, lines)


class WorkerDied(Exception):
    """A worker process ended without finishing its shard (killed, out of memory); ``--resume`` finishes."""


def run_local(jobs: Iterable[Job], ctx: ShardContext, workers: int) -> Iterator[dict]:
    """Write every job's shard with ``workers`` processes (in this process when 1); yields their stats.

    A worker that dies ends the run with ``WorkerDied`` (multiprocessing.Pool would wait for it forever).
    """
    if workers == 1:
        for shard, lines in jobs:
            yield write_shard(ctx, shard, lines)
        return
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(ctx,))
    try:
        pending: deque = deque()
        for shard, lines in jobs:  # submitted as the listing is read: a bounded number in flight
            pending.append(pool.submit(_write_in_worker, shard, lines))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        pool.shutdown(wait=True)
    except BrokenProcessPool as e:
        raise WorkerDied("a worker process died while writing a shard (killed? out of memory?)") from e
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ArgumentError("--engine ray needs Ray, which is not installed: pip install 'mmcontrast[ray]'") from None
    return ray


def check_ray_address(address: str) -> None:
    """Fail at once when nothing answers at ``HOST:PORT`` (or ``ray://HOST:PORT``): Ray itself would keep
    retrying for many minutes. Other forms (``auto``) are left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address)
    if not match:
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=10).close()
    except OSError as e:
        raise ArgumentError(
            f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the cluster "
            "(ray start --head) or correct the address"
        ) from None


def _start_ray(ray, address: str | None, workers: int | None) -> bool:
    """Connect to ``address``, or start a local cluster (``workers`` CPUs, default all); True if we started it."""
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, include_dashboard=False, logging_level="ERROR")
        else:
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at --ray-address {address}" if address else "a local Ray cluster"
        raise ArgumentError(f"cannot start or reach {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return True


@contextmanager
def ray_session(address: str | None, workers: int | None) -> Iterator[None]:
    """Ray ready for ``run_ray`` within the block: connected to ``address``, or a local cluster (``workers``
    CPUs, default all) started here and stopped at the end. Entered before listing INPUT, so that a cluster
    that cannot be reached stops the run before the long part."""
    ray = _import_ray()
    started = _start_ray(ray, address, workers)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_ray(jobs: Iterable[Job], ctx: ShardContext) -> Iterator[dict]:
    """Write every job's shard as one Ray task (retried if its worker dies); yields their stats as they finish.

    Runs inside ``ray_session``. Workers import ``data_tools``: on a multi-machine cluster, install
    mmcontrast where Ray runs.
    """
    ray = _import_ray()
    task = ray.remote(max_retries=RAY_TASK_RETRIES)(write_shard)
    ctx_ref = ray.put(ctx)
    limit = IN_FLIGHT_PER_WORKER * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: list = []
    for shard, lines in jobs:
        pending.append(task.remote(ctx_ref, shard, lines))
        while len(pending) >= limit:
            finished, pending = ray.wait(pending, num_returns=1)
            yield ray.get(finished[0])
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        yield ray.get(finished[0])
