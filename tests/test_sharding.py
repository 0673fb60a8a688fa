"""FSDP2 (train.fsdp) on 2 gloo processes: DDP's losses step by step, sharded resume, a strict open_clip export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "clip_tiny_cpu.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def two_processes(shards, out: Path, *extra: str, launch: tuple = ("--cpu",)) -> subprocess.CompletedProcess:
    precision = () if "--mixed_precision" in launch else ("--mixed_precision", "no")
    cmd = [ACCELERATE, "launch", *launch, "--num_processes", "2", "--num_machines", "1", *precision,
           "--dynamo_backend", "no", "-m", "mmcontrast.train", "--config", TINY, "--train-shards", str(shards),
           "--output-dir", str(out), "--batch-size", "8", "--log-every", "1", "--workers", "0",
           "--set", "data.shuffle_buffer=0", "--set", "log.diagnostics_every=0", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=420)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("accum", ["1", "2"])
def test_fsdp_gives_ddps_losses_step_by_step(tiny_shards, tmp_path, accum):
    ddp = two_processes(tiny_shards, tmp_path / "ddp", "--steps", "3", "--accum-steps", accum)
    fsdp = two_processes(tiny_shards, tmp_path / "fsdp", "--steps", "3", "--accum-steps", accum, "--set", "train.fsdp=true")
    assert ddp.returncode == 0 and fsdp.returncode == 0, (ddp.stderr + fsdp.stderr)[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "last" / "sharded" / ".metadata").is_file()  # each process wrote its shard


def test_a_sharded_run_resumes_and_exports_whole_weights_open_clip_loads_strictly(tiny_shards, tmp_path):
    import open_clip
    from safetensors.torch import load_file

    fsdp = ("--set", "train.fsdp=true", "--checkpoint-every", "2")
    straight = two_processes(tiny_shards, tmp_path / "straight", "--steps", "4", *fsdp)
    first = two_processes(tiny_shards, tmp_path / "resumed", "--steps", "2", *fsdp)
    resumed = two_processes(tiny_shards, tmp_path / "resumed", "--steps", "4", "--resume", *fsdp)
    assert straight.returncode == first.returncode == resumed.returncode == 0, (straight.stderr + resumed.stderr)[-3000:]
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)

    run = tmp_path / "resumed"
    weights = load_file(str(run / "model.safetensors"))
    open_clip.add_model_config(run / "model_config.json")  # registered as "model_config"
    model = open_clip.create_model("model_config")
    model.load_state_dict(weights, strict=True)  # every key, whole tensors, open_clip's names
    assert weights["logit_scale"].dim() == 0 and all(torch.isfinite(v).all() for v in weights.values())
    straight_weights = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert all(torch.allclose(weights[k], straight_weights[k], rtol=1e-5, atol=1e-7) for k in weights)


def test_accelerate_launch_use_fsdp_takes_the_same_path(tiny_shards, tmp_path):
    """Without GPUs, Accelerate's own FSDP plugin would start two processes that are both rank 0."""
    r = two_processes(tiny_shards, tmp_path / "run", "--steps", "1", launch=("--use_fsdp",))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fsdp: true" in (tmp_path / "run" / "config.yaml").read_text()
    assert (tmp_path / "run" / "checkpoints" / "last" / "sharded" / ".metadata").is_file()


def test_fsdp_refuses_the_launchers_fp16(tiny_shards, tmp_path):
    r = two_processes(tiny_shards, tmp_path / "run", "--steps", "1", "--set", "train.fsdp=true",
                      launch=("--cpu", "--mixed_precision", "fp16"))  # fmt: skip
    assert r.returncode != 0 and "train.fsdp runs in bf16 or float32" in r.stderr, r.stderr[-2000:]
