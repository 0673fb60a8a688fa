"""The trainer's thread trial (threads.TrainingThreads), with step times made up so the right split is known."""

import itertools

import pytest
import torch

from mmcontrast import threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_trial(trial: threads.TrainingThreads, seconds) -> str:
    """Step through the trial; ``seconds(threads, step)`` is the time a step takes with that many threads."""
    said = None
    for step in range(trial.first_step, trial.first_step + len(trial.schedule)):
        trial.before_step(step)
        said = trial.after_step(step, seconds(trial.current, step)) or said
    return said


def test_bursty_slow_steps_count_against_the_split_they_slow(two_cores):
    # Two compute threads share a core with a worker decoding in bursts: most steps are fast, every third one waits
    # on the burst (mean 0.05 s); one thread is steady at 0.04 s. A median (0.02 s) would keep two threads.
    trial = threads.TrainingThreads.plan(on_cpu=True, processes=1, workers=1, start_step=0, total_steps=200)
    assert trial.candidates == [2, 1] and trial.chosen is None
    bursts = itertools.cycle([0.02, 0.02, 0.11])
    said = run_trial(trial, lambda count, step: next(bursts) if count == 2 else 0.04)
    assert trial.chosen == 1 and torch.get_num_threads() == 1
    assert "kept 1 compute threads" in said and trial.record()["cpu_threads_trial_s_per_step"] == {"2": 0.05, "1": 0.04}


def test_the_splits_alternate_and_a_switch_is_not_measured(two_cores):
    trial = threads.TrainingThreads.plan(on_cpu=True, processes=1, workers=1, start_step=10, total_steps=200)
    counts = [count for count, _ in trial.schedule]
    assert counts[: threads.WARMUP_STEPS] == [2] * threads.WARMUP_STEPS
    blocks = [count for count, _ in itertools.groupby(counts)]
    assert blocks == [2, 1, 2, 1]  # A B A B: drift early in the run weighs on both
    switches = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]
    assert all(not trial.schedule[i][1] for i in switches)
    for count in (2, 1):
        assert sum(measured for c, measured in trial.schedule if c == count) == trial.measured_steps >= threads.TRIAL_STEPS
    # Steady times: the tie keeps every core computing.
    run_trial(trial, lambda count, step: 0.04)
    assert trial.chosen == 2


def test_a_users_thread_count_wins_and_short_runs_keep_every_core(two_cores, monkeypatch):
    short = threads.TrainingThreads.plan(on_cpu=True, processes=1, workers=1, start_step=0, total_steps=20)
    assert (short.chosen, short.source, short.schedule) == (2, "short run", [])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    user = threads.TrainingThreads.plan(on_cpu=True, processes=1, workers=1, start_step=0, total_steps=200)
    assert (user.chosen, user.source, user.schedule) == (1, "OMP_NUM_THREADS", [])
