"""mmcontrast.checkpoint: atomic saves that a kill cannot break, verified loads with fallback, pruning, metrics."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mmcontrast import checkpoint as ck
from mmcontrast.config import TRAIN_STATE_FILE
from mmcontrast.errors import TrainingError, UsageError


def new_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def accelerator():
    return new_accelerator()


def tiny(accelerator, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(6, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(accelerator, model, run: Path, step: int, keep: int = 2) -> None:
    ck.save_checkpoint(accelerator, model, run, {"step": step, "epoch": 0}, keep=keep)


def test_pruning_orders_by_step_number_and_never_deletes_last(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        (root / ck.step_dir_name(step)).mkdir(parents=True)
    assert sorted(p.name for p in root.iterdir())[0] == "step_1000000"  # as strings, the newest would sort first
    (root / "last").symlink_to("step_999998")  # e.g. resumed from an older one
    ck.prune(root, keep=2)
    assert sorted(p.name for p in ck.step_dirs(root)) == ["step_1000000", "step_1000001", "step_999998"]
    with pytest.raises(ValueError):
        ck.prune(root, keep=0)


def test_keep_checkpoints_zero_is_a_usage_error():
    from mmcontrast.config import apply_overrides, load_config, validate

    cfg = load_config(None)
    apply_overrides(cfg, ["train.output_dir=x", "data.train_shards=y", "train.steps=1", "log.keep_checkpoints=0"])
    with pytest.raises(UsageError, match="log.keep_checkpoints must be at least 1"):
        validate(cfg)


def test_torn_metrics_line_is_dropped_not_fatal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n{"step": 30, "lo')  # SIGKILL mid-write
    ck.truncate_metrics(path, 20)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    ck.truncate_metrics(path, 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10]


class _Recording:
    """Wraps an Accelerator and records save_state / barriers / the directory rename, in order."""

    def __init__(self, accelerator, events: list):
        self._acc, self.events = accelerator, events

    def __getattr__(self, name):
        return getattr(self._acc, name)

    def save_state(self, path):
        self.events.append("save_state")
        return self._acc.save_state(path)

    def wait_for_everyone(self):
        self.events.append("barrier")


def test_every_process_has_written_before_the_directory_is_sealed(accelerator, tmp_path, monkeypatch):
    model, _ = tiny(accelerator)
    events: list[str] = []
    rename = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, target: (events.append("rename"), rename(self, target))[1])
    save(_Recording(accelerator, events), model, tmp_path, 5)
    assert events.index("save_state") < events.index("barrier", events.index("save_state")) < events.index("rename")
    folder = tmp_path / "checkpoints" / "step_000005"
    assert ck.damage(folder) is None and os.readlink(tmp_path / "checkpoints" / "last") == "step_000005"
    manifest = json.loads((folder / ck.MANIFEST_FILE).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", TRAIN_STATE_FILE} <= set(manifest)


def test_saving_the_same_step_again_keeps_the_complete_copy(accelerator, tmp_path):
    model, _ = tiny(accelerator)
    save(accelerator, model, tmp_path, 5)
    folder = tmp_path / "checkpoints" / "step_000005"
    inode = folder.stat().st_ino
    save(accelerator, model, tmp_path, 5)  # deleting it first would leave `last` pointing at nothing
    assert folder.stat().st_ino == inode and ck.damage(folder) is None


def test_non_finite_buffers_are_never_checkpointed(accelerator, tmp_path):
    model, _ = tiny(accelerator)
    accelerator.unwrap_model(model)[1].running_var.fill_(float("nan"))  # a skipped step's forward, say
    with pytest.raises(TrainingError, match="running_var"):
        save(accelerator, model, tmp_path, 1)
    assert not (tmp_path / "checkpoints" / "last").exists()


def damaged_run(accelerator, tmp_path) -> tuple[Path, dict]:
    """Checkpoints at steps 1 and 2, with weights of step 1 remembered; then step 2's weights truncated."""
    model, _ = tiny(accelerator)
    save(accelerator, model, tmp_path, 1)
    remembered = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save(accelerator, model, tmp_path, 2)
    weights = tmp_path / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return weights, remembered


def test_a_damaged_last_falls_back_to_the_previous_complete_checkpoint(accelerator, tmp_path, caplog):
    weights, remembered = damaged_run(accelerator, tmp_path)
    fresh = new_accelerator()  # a new process would have one model, not two
    model, _ = tiny(fresh, seed=1)
    with caplog.at_level(logging.WARNING, logger="mmcontrast.checkpoint"):
        state = ck.load_checkpoint(fresh, tmp_path)
    assert state["step"] == 1
    assert str(weights) in caplog.text and "resuming from step_000001" in caplog.text
    for key, value in fresh.unwrap_model(model).state_dict().items():
        assert torch.equal(value, remembered[key]), key


def test_with_no_complete_checkpoint_the_error_names_the_damaged_file(accelerator, tmp_path):
    weights, _ = damaged_run(accelerator, tmp_path)
    (tmp_path / "checkpoints" / "step_000001" / "optimizer.bin").unlink()
    fresh = new_accelerator()
    tiny(fresh, seed=1)
    with pytest.raises(UsageError, match=f"{weights} has 100 bytes"):
        ck.load_checkpoint(fresh, tmp_path)


def test_random_states_that_accelerate_could_not_restore_are_an_error(accelerator, tmp_path):
    model, _ = tiny(accelerator)
    save(accelerator, model, tmp_path, 1)
    folder = tmp_path / "checkpoints" / "step_000001"
    (folder / "random_states_0.pkl").write_bytes(b"not a pickle")
    ck.write_manifest(folder)  # consistent manifest: only the RNG restore itself can notice
    fresh = new_accelerator()
    tiny(fresh, seed=1)
    with pytest.raises(UsageError, match="random_states_0.pkl cannot be read"):
        ck.load_checkpoint(fresh, tmp_path)


# ---------------------------------------------------------------- fault injection: SIGKILL at random moments


def _train_cmd(shards: Path, out: Path, steps: int, resume: bool, extra: tuple = ()) -> list[str]:
    import sys

    root = Path(__file__).resolve().parents[1]
    return [sys.executable, "-m", "mmcontrast.train", "--config", str(root / "configs" / "clip_tiny_cpu.yaml"),
            "--train-shards", str(shards), "--output-dir", str(out), "--steps", str(steps), "--batch-size", "16",
            "--log-every", "2", "--checkpoint-every", "2", "--workers", "1", "--set", "log.keep_checkpoints=2",
            *extra, *(["--resume"] if resume else [])]  # fmt: skip


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def killed_and_resumed(shards: Path, out: Path, steps: int, kills: int, seed: int, extra: tuple = ()) -> list[float]:
    """Run to ``steps``, SIGKILLing the run ``kills`` times at random moments (resuming after each) unless it
    finishes first; returns the seconds each kill that hit came after the run had logged a new step."""
    import random
    import signal
    import subprocess
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rng, delays = random.Random(seed), []
    for _ in range(kills):
        before = _logged_steps(out)
        proc = subprocess.Popen(_train_cmd(shards, out, steps, ck.has_checkpoint(out), extra), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        deadline = time.time() + 240
        while _logged_steps(out) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # wait for progress, so that each kill lands in a different place of the run
        delay = rng.uniform(0.0, 0.6)  # inside a step, a checkpoint write, a metrics line, the export...
        time.sleep(delay)
        if proc.poll() is not None:  # it finished before the kill
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        delays.append(delay)
    final = subprocess.run(_train_cmd(shards, out, steps, ck.has_checkpoint(out), extra), env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert final.returncode == 0, final.stderr[-3000:]
    return delays


def assert_same_run(straight: Path, killed: Path) -> None:
    from safetensors.torch import load_file

    for name in ("model.safetensors", "model_raw.safetensors"):  # the raw weights beside a moving average's
        assert (straight / name).is_file() == (killed / name).is_file(), name
        if not (straight / name).is_file():
            continue
        want, got = load_file(str(straight / name)), load_file(str(killed / name))
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), (name, key)  # bit for bit
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight, killed)]
    assert [(r["step"], r["loss"], r["samples_seen"]) for r in rows[0]] == [(r["step"], r["loss"], r["samples_seen"]) for r in rows[1]]


def straight(shards: Path, out: Path, steps: int, extra: tuple = ()) -> Path:
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(_train_cmd(shards, out, steps, False, extra), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_a_run_killed_at_random_moments_ends_with_the_weights_of_an_uninterrupted_one(tiny_shards, tmp_path):
    """With a moving average of the weights (train.ema_decay): it is checkpointed and resumed too, and both the
    export (the average) and the raw weights end bit for bit. The 12-kill test below runs without one."""
    ema = ("--set", "train.ema_decay=0.9")
    delays = killed_and_resumed(tiny_shards, tmp_path / "run", 24, kills=3, seed=0, extra=ema)
    assert len(delays) == 3
    assert_same_run(straight(tiny_shards, tmp_path / "straight", 24, ema), tmp_path / "run")
    assert (tmp_path / "run" / "model_raw.safetensors").is_file()


@pytest.mark.slow
def test_a_run_killed_twelve_times_ends_with_the_weights_of_an_uninterrupted_one(tiny_shards, tmp_path):
    import time

    start = time.time()
    delays = killed_and_resumed(tiny_shards, tmp_path / "run", 60, kills=12, seed=1)
    took = time.time() - start
    assert len(delays) == 12
    assert_same_run(straight(tiny_shards, tmp_path / "straight", 60), tmp_path / "run")
    print(f"12 kills survived (delays after a logged step: {', '.join(f'{d:.2f}' for d in delays)} s), "
          f"killed-and-resumed run {took:.0f} s, in all {time.time() - start:.0f} s")
