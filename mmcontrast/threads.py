"""CPU threads: how a machine's cores are split between the model's compute threads and the data workers.

Owns ``torch.set_num_threads`` on the CPU, for the trainer and for the commands that encode images. A split is
decided by measurement, never by reservation: a data worker that decodes small images uses a few percent of a
core, and a core reserved for it is a core the model does not compute on (1.62x slower on 2 cores); a worker that
decodes large JPEGs needs its core, and compute threads spinning on it slow both down.

* **A user's count wins.** ``OMP_NUM_THREADS`` set by the user, or ``accelerate launch
  --num_cpu_threads_per_process``, is kept as it is (``user_threads``). What a launcher sets by itself
  (Accelerate's default, torchrun's 1 per process) is not a user's choice and is replaced.
* **The trainer** (``TrainingThreads``) starts with every core of its process's share computing
  (``cores // processes``), then, when the run has data workers and steps enough, steps a few times with the
  split that leaves the workers their cores, and keeps whichever stepped faster (mean seconds per step, data
  wait included; the processes agree on the mean). The mean, not the median: a worker decodes in bursts (it
  refills the loader's queue), and the steps that share a core with a burst are the slow ones — a median picks
  the steps between bursts and kept two compute threads where one was 1.4x faster (the tiny CLIP). The splits
  alternate in two rounds, so a worker still filling a shuffle buffer early on weighs on each alike. The choice is printed, recorded in every ``metrics.jsonl``
  record (``cpu_threads``) and in the checkpoint, so a resumed run goes on with it. The thread count changes
  float sums (a convolution's weight gradient), so reruns meant to be bit-identical set ``OMP_NUM_THREADS``.
* **The encoding commands** (``DecodeBalance``): the same two splits, chosen batch by batch from the decode and
  encode times the loader reports.

Does not own starting processes (``launch.py``) or the loop (``train.py``).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

THREADS_ENV = "MMCONTRAST_CPU_THREADS"  # set by launch.exec_torchrun for its ranks: "auto", or the user's count
WARMUP_STEPS = 2  # the first steps start the workers and fill the allocator's caches: not measured
TRIAL_STEPS = 6  # measured steps per split at least (their mean), half in each of two rounds
ROUNDS = 2  # the splits alternate: A B A B
PREFETCH = 2  # batches each DataLoader worker keeps ready (torch's default): a trial outlasts what was queued
RUN_PER_TRIAL = 3  # a trial takes at most a third of the run's steps (shorter runs keep every core computing)


def available_cpus() -> int:
    """The cores this process may run on (its affinity, where the platform says it; else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _count(text: str | None) -> int | None:
    try:
        return max(1, int(text)) if text else None
    except ValueError:  # "4,2" (nested OpenMP levels) and the like: not a count we can keep to
        return None


def _launcher() -> tuple[list[str], dict] | None:
    """(command line, starting environment) of this process's parent when it is ``accelerate launch`` or torchrun,
    which set ``OMP_NUM_THREADS`` of their own accord; None otherwise (or without psutil)."""
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        cmdline = parent.cmdline()
        joined = " ".join(cmdline)
        if not ("accelerate" in joined and "launch" in cmdline) and "torch.distributed.run" not in joined and "torchrun" not in joined:
            return None
        return cmdline, parent.environ()
    except Exception:  # no psutil, no /proc, a parent gone: as if started by hand
        return None


def user_threads() -> int | None:
    """The compute threads per process a user asked for, or None when mmcontrast chooses.

    ``OMP_NUM_THREADS`` counts as the user's when it was set before the launcher ran: in the environment
    ``accelerate launch`` or torchrun started with, or given as ``--num_cpu_threads_per_process`` (Accelerate always
    sets it, torchrun sets 1 for several processes); without a launcher, whenever it is set.
    """
    ours = os.environ.get(THREADS_ENV)
    if ours is not None:  # our own launcher said it (launch.exec_torchrun)
        return None if ours == "auto" else _count(ours)
    count = _count(os.environ.get("OMP_NUM_THREADS"))
    if count is None:
        return None
    launcher = _launcher()
    if launcher is None:
        return count
    cmdline, environ = launcher
    given = any(arg.startswith("--num_cpu_threads_per_process") for arg in cmdline)
    return count if given or "OMP_NUM_THREADS" in environ else None


def process_share(processes: int) -> int:
    """Every core of this process's share of the machine: where a run starts."""
    return max(1, available_cpus() // max(1, processes))


def splits(processes: int, workers: int) -> list[int]:
    """The compute-thread counts worth trying, the first where a run starts: every core of the process's share,
    then (with data workers) fewer by the workers' cores, and halfway for several workers."""
    share = process_share(processes)
    counts = [share, share - workers // 2, share - workers] if workers else [share]
    return list(dict.fromkeys(max(1, c) for c in counts))


class TrainingThreads:
    """The trainer's compute threads per process: a user's count, or a short trial of ``splits`` and the fastest.

    ``before_step(step)`` sets the threads that step runs with, ``after_step(step, seconds)`` records its time (data
    wait and step, not logging); the trial's steps are a function of the step number (the same on every process),
    and the decision at its last step is the one place processes talk (``agree``: the mean of their means).
    """

    def __init__(self, candidates: list[int], first_step: int, measured_steps: int, chosen: int | None = None,
                 source: str = "auto", agree: Callable[[list[float]], list[float]] | None = None, active: bool = True):
        self.candidates, self.first_step, self.measured_steps = candidates, first_step, measured_steps
        self.chosen, self.source, self.agree, self.active = chosen, source, agree, active
        self.times: dict[int, list[float]] = {c: [] for c in candidates}
        self.result: dict[str, float] | None = None  # seconds per step of each split, once decided
        self.schedule = self._schedule() if chosen is None else []

    @classmethod
    def plan(cls, on_cpu: bool, processes: int, workers: int, start_step: int, total_steps: int,
             saved: int | None = None, agree: Callable[[list[float]], list[float]] | None = None) -> TrainingThreads:
        """The threads of a run from ``start_step`` to ``total_steps``; ``saved``: the count a resumed run chose."""
        import torch

        if not on_cpu:
            return cls([torch.get_num_threads()], start_step, 0, torch.get_num_threads(), "device", active=False)
        user = user_threads()
        if user is not None:
            return cls([user], start_step, 0, user, "OMP_NUM_THREADS")
        candidates = splits(processes, workers)
        if saved is not None:
            return cls(candidates, start_step, 0, saved, "chosen when the run started")
        measured = ROUNDS * -(-max(TRIAL_STEPS, 2 * PREFETCH * workers + 1) // ROUNDS)
        trial = cls(candidates, start_step, measured, agree=agree)
        if len(candidates) == 1 or RUN_PER_TRIAL * len(trial.schedule) > total_steps - start_step:
            return cls(candidates, start_step, 0, candidates[0], "every core" if len(candidates) == 1 else "short run")
        return trial

    def _schedule(self) -> list[tuple[int, bool]]:
        """(threads, measured?) of each trial step: warm-up on the first split, then each split's steps in
        ``ROUNDS`` alternating blocks, the first step after a switch not measured (the pool of threads is remade)."""
        steps = [(self.candidates[0], False)] * WARMUP_STEPS
        block = self.measured_steps // ROUNDS
        for _ in range(ROUNDS):
            for count in self.candidates:
                switched = bool(steps) and steps[-1][0] != count
                steps += [(count, False)] * switched + [(count, True)] * block
        return steps

    @property
    def current(self) -> int:
        import torch

        return torch.get_num_threads()

    def start(self) -> None:
        """Set the threads the run starts with."""
        self._set(self.chosen if self.chosen is not None else self.candidates[0])

    def _set(self, count: int) -> None:
        import torch

        if self.active and count != torch.get_num_threads():
            torch.set_num_threads(count)

    def describe(self, processes: int, workers: int) -> str:
        """One line for the start of a run: the split and how it was (or will be) chosen."""
        where = f"{available_cpus()} cores, {processes} process{'es' if processes > 1 else ''}, {workers} data worker{'s' if workers != 1 else ''} each"
        if not self.active:
            return f"cpu threads: {self.current} per process (computing on the {self.source})"
        if self.chosen is not None:
            return f"cpu threads: {self.chosen} compute threads per process ({self.source}; {where})"
        others = ", ".join(str(c) for c in self.candidates[1:])
        last = self.first_step + len(self.schedule)
        return (f"cpu threads: {self.candidates[0]} compute threads per process ({where}); {others} tried in turn with "
                f"it at steps {self.first_step + WARMUP_STEPS + 1}-{last} and the faster kept "
                "(OMP_NUM_THREADS=N fixes it)")

    def before_step(self, step: int) -> None:
        offset = step - self.first_step
        if self.chosen is None and 0 <= offset < len(self.schedule):
            self._set(self.schedule[offset][0])

    def after_step(self, step: int, seconds: float) -> str | None:
        """Record a step's seconds; at the trial's last step choose and return the line that says so."""
        offset = step - self.first_step
        if self.chosen is not None or not 0 <= offset < len(self.schedule):
            return None
        count, measured = self.schedule[offset]
        if measured:
            self.times[count].append(seconds)
        if offset < len(self.schedule) - 1:
            return None
        means = [statistics.fmean(self.times[c]) for c in self.candidates]
        means = self.agree(means) if self.agree else means
        best = min(range(len(means)), key=lambda i: (means[i], i))  # a tie keeps the earlier: more threads
        self.chosen, self.source = self.candidates[best], "measured"
        self.result = {str(c): round(m, 4) for c, m in zip(self.candidates, means)}
        self._set(self.chosen)
        timings = ", ".join(f"{c}: {m:.3g} s" for c, m in zip(self.candidates, means))
        return f"cpu threads: kept {self.chosen} compute threads per process (mean seconds per step with {timings})"

    def record(self) -> dict:
        """What a metrics record says of the threads: the count the steps ran with, and the trial's timings."""
        if not self.active:
            return {}
        out: dict = {"cpu_threads": self.current}
        if self.result is not None:
            out["cpu_threads_trial_s_per_step"], self.result = self.result, None  # once, in the record after the choice
        return out


class DecodeBalance:
    """The encoding commands' compute threads, batch by batch: every core while the model is the bottleneck, one
    fewer per decode worker while the decoders are (their time per batch, divided among them, exceeds the
    model's; idle intra-op threads would spin on the cores they need). A no-op on GPUs, without workers and when
    the user set the count. Changes the process's thread count: the CLI's ``main`` restores it.
    """

    def __init__(self, device, workers: int):
        import torch

        self.active = device.type == "cpu" and workers > 0 and user_threads() is None
        self.workers = workers
        self.many = torch.get_num_threads()
        self.few = max(1, min(self.many, available_cpus() - workers))
        self.decode = self.compute = 0.0

    def update(self, decode_seconds: float, compute_seconds: float) -> None:
        import torch

        if not self.active:
            return
        self.decode += decode_seconds
        self.compute += compute_seconds
        wanted = self.few if self.decode / self.workers > self.compute else self.many
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
