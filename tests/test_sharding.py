"""FSDP2 (train.fsdp) on 2 gloo processes: DDP's losses step by step, sharded resume, a strict open_clip export."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "clip_tiny_cpu.yaml")
SIMCLR_TINY = str(ROOT / "configs" / "simclr_tiny_cpu.yaml")
NESTED_TIMM = "mobilenetv3_small_050"  # stages of blocks, BatchNormAct2d (BatchNorm + fused activation) throughout
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def two_processes(shards, out: Path, *extra: str, launch: tuple = ("--cpu",), config: str = TINY) -> subprocess.CompletedProcess:
    precision = () if "--mixed_precision" in launch else ("--mixed_precision", "no")
    cmd = [ACCELERATE, "launch", *launch, "--num_processes", "2", "--num_machines", "1", *precision,
           "--dynamo_backend", "no", "-m", "mmcontrast.train", "--config", config, "--train-shards", str(shards),
           "--output-dir", str(out), "--batch-size", "8", "--log-every", "1", "--workers", "0",
           "--set", "data.shuffle_buffer=0", "--set", "log.diagnostics_every=0", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=420)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("accum", ["1", pytest.param("2", marks=pytest.mark.slow)])  # accum 2: -m slow (gradcache is tested on DDP in CI)
def test_fsdp_gives_ddps_losses_step_by_step(tiny_shards, tmp_path, accum):
    ddp = two_processes(tiny_shards, tmp_path / "ddp", "--steps", "3", "--accum-steps", accum)
    fsdp = two_processes(tiny_shards, tmp_path / "fsdp", "--steps", "3", "--accum-steps", accum, "--set", "train.fsdp=true")
    assert ddp.returncode == 0 and fsdp.returncode == 0, (ddp.stderr + fsdp.stderr)[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "last" / "sharded" / ".metadata").is_file()  # each process wrote its shard


@pytest.mark.slow  # sharded resume and export: over a minute on 2 cores
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


@pytest.mark.slow  # a second FSDP launch; the FSDP path itself stays in CI
def test_accelerate_launch_use_fsdp_takes_the_same_path(tiny_shards, tmp_path):
    """Without GPUs, Accelerate's own FSDP plugin would start two processes that are both rank 0."""
    r = two_processes(tiny_shards, tmp_path / "run", "--steps", "1", launch=("--use_fsdp",))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fsdp: true" in (tmp_path / "run" / "config.yaml").read_text()
    assert (tmp_path / "run" / "checkpoints" / "last" / "sharded" / ".metadata").is_file()


@pytest.mark.slow  # a full launch to reach a refusal config validation also covers
def test_fsdp_refuses_the_launchers_fp16(tiny_shards, tmp_path):
    r = two_processes(tiny_shards, tmp_path / "run", "--steps", "1", "--set", "train.fsdp=true",
                      launch=("--cpu", "--mixed_precision", "fp16"))  # fmt: skip
    assert r.returncode != 0 and "train.fsdp runs in bf16 or float32" in r.stderr, r.stderr[-2000:]


def test_a_sharded_run_measures_every_step_and_a_tracked_run_ends_with_its_export(tiny_shards, tiny_val_shards,
                                                                                 tiny_image_folder, tmp_path):
    """Health, validation and zero-shot call ``encode_image``/``encode_text`` outside the model's forward: FSDP
    must gather the root's parameters for them too (they were sharded DTensors: "mixed torch.Tensor and
    DTensor"). And a run with a tracker ends with every process at the barrier before ``end_training`` tears
    the process group down (it raised on every process, and the launcher could kill the export half-written).
    With a moving average of the weights (measured, exported; each process checkpoints its shards of it)."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    r = two_processes(tiny_shards, run, "--steps", "2", "--val-shards", str(tiny_val_shards), "--set", "train.fsdp=true",
                      "--set", "log.diagnostics_every=1", "--set", "log.val_every=1", "--set", "log.eval_every=1",
                      "--set", f"log.eval_images={tiny_image_folder}", "--set", "log.trackers=[tensorboard]",
                      "--set", "train.ema_decay=0.8")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "model.safetensors").is_file() and list((run / "logs").rglob("events.out.tfevents.*"))
    averaged, raw = (load_file(str(run / name)) for name in ("model.safetensors", "model_raw.safetensors"))
    assert averaged.keys() == raw.keys() and not torch.equal(averaged["logit_scale"], raw["logit_scale"])
    assert {p.name for p in (run / "checkpoints" / "last").glob("ema_*")} == {"ema_00000.safetensors", "ema_00001.safetensors"}
    for record in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        assert record["health/effective_rank"] > 1 and 0 <= record["eval/zeroshot_top1"] <= 1, record
        assert any(k.startswith("val/") for k in record), record


@pytest.mark.slow
def test_a_sharded_run_averages_its_shards_measures_the_average_and_resumes_it(tiny_shards, tiny_image_folder, tmp_path):
    """train.ema_decay under FSDP: each process averages its own shards (and the whole logit scale), health and
    zero-shot measure the average every step (swapped in, then the trained weights back: the losses stay DDP's),
    a resume reads each process's average back, and the export is the average DDP's run makes."""
    from safetensors.torch import load_file

    ema = ("--set", "train.ema_decay=0.8", "--set", "log.diagnostics_every=1", "--set", "log.eval_every=1",
           "--set", f"log.eval_images={tiny_image_folder}", "--checkpoint-every", "2")  # fmt: skip
    ddp = two_processes(tiny_shards, tmp_path / "ddp", "--steps", "4", *ema)
    first = two_processes(tiny_shards, tmp_path / "fsdp", "--steps", "2", "--set", "train.fsdp=true", *ema)
    assert ddp.returncode == first.returncode == 0, (ddp.stderr + first.stderr)[-3000:]
    assert {p.name for p in (tmp_path / "fsdp" / "checkpoints" / "last").glob("ema_*")} == {"ema_00000.safetensors", "ema_00001.safetensors"}
    resumed = two_processes(tiny_shards, tmp_path / "fsdp", "--steps", "4", "--resume", "--set", "train.fsdp=true", *ema)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("ddp", "fsdp")]
    assert [r["health/uniformity"] for r in records[1]] == pytest.approx([r["health/uniformity"] for r in records[0]], rel=1e-4)
    for name in ("model.safetensors", "model_raw.safetensors"):
        want, got = (load_file(str(tmp_path / run / name)) for run in ("ddp", "fsdp"))
        assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k], rtol=1e-5, atol=1e-6) for k in want), name
    averaged, raw = (load_file(str(tmp_path / "fsdp" / name)) for name in ("model.safetensors", "model_raw.safetensors"))
    assert not torch.equal(averaged["visual.proj"], raw["visual.proj"])


@pytest.mark.parametrize("model, global_batchnorm", [pytest.param("mmc-tiny", "false", marks=pytest.mark.slow),  # the timm case covers more
                                                    (f"timm:{NESTED_TIMM}", "true")])
def test_fsdp_in_bf16_trains_batchnorm_models_and_measures_their_health(tiny_shards, tmp_path, model, global_batchnorm):
    """SimCLR in bf16 under FSDP: BatchNorm keeps float32 weights beside its float32 running statistics (one dtype
    for ``batch_norm``), per-process and global; a timm MobileNet, whose stages hold blocks, is sharded
    innermost first ("Invariant encountered" otherwise); health every step goes through the encoder."""
    run = tmp_path / "run"
    r = two_processes(tiny_shards, run, "--steps", "2", "--model", model, "--set", "data.augment.image_size=32",
                      "--set", "train.fsdp=true", "--set", f"model.sync_batchnorm={global_batchnorm}",
                      "--set", "log.diagnostics_every=1", launch=("--cpu", "--mixed_precision", "bf16"), config=SIMCLR_TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["health/effective_rank"] > 1 for r in records), records
    assert "mixed_precision: bf16" in (run / "config.yaml").read_text()


def test_blocks_come_after_the_blocks_inside_them():
    """``fully_shard`` must wrap a module's sharded children before the module: a timm stage after its blocks."""
    import timm

    from mmcontrast.sharding import blocks

    found = blocks(timm.create_model(NESTED_TIMM, num_classes=0))
    inside = [{m for m in block.modules() if m is not block} for block in found]
    assert any(inside[i] & set(found) for i in range(len(found)))  # the model does nest blocks
    for i, block in enumerate(found):
        assert not any(block in inside[j] for j in range(i + 1)), f"block {i} comes after a block that holds it"


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(2)])


def _channels_last_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from mmcontrast.sharding import shard

        torch.set_num_threads(1)
        model = _conv_net().to(memory_format=torch.channels_last)  # what the trainer does on CUDA, before sharding
        shard(model, torch.device("cpu"), "no")
        x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1)).to(memory_format=torch.channels_last)
        torch.save(model(x).detach(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_channels_last_model_shards_and_computes_what_it_did(tmp_path):
    """``fully_shard`` refuses parameters that are not contiguous; on CUDA the trainer makes convolutional towers
    channels-last before sharding them."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_channels_last_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 120 s")
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    want = _conv_net()(x).detach()
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), want)
