"""End-to-end training through the command line: run dir contents, learning, processes, resume, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "clip_tiny_cpu.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def train_cmd(shards, out, *extra) -> list[str]:
    return [sys.executable, "-m", "mmcontrast.train", "--config", TINY, "--train-shards", str(shards), "--output-dir", str(out), *extra]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def clip_run(tiny_shards, tiny_val_shards, tmp_path_factory) -> Path:
    """100 steps of the tiny CLIP on the tiny shapes (batch 32), validated on held-out pairs every 50: the run every
    test here can read."""
    out = tmp_path_factory.mktemp("run") / "clip"
    r = run(train_cmd(tiny_shards, out, "--steps", "100", "--batch-size", "32", "--log-every", "10", "--checkpoint-every", "50",
                      "--val-shards", str(tiny_val_shards)))  # validated at the checkpoint cadence when log.val_every is unset
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_run_dir_has_the_contract_files(clip_run):
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "model_config.json", "open_clip_config.json"):
        assert (clip_run / name).is_file(), name
    assert (clip_run / "checkpoints" / "last" / "train_state.json").is_file()
    assert (clip_run / "checkpoints" / "step_000100").is_dir() and (clip_run / "checkpoints" / "step_000050").is_dir()
    rows = metrics(clip_run)
    assert [r["step"] for r in rows] == list(range(10, 101, 10))
    for key in ("step", "loss", "lr", "samples_per_s", "global_batch", "temperature", "epoch", "data_time_share", "skipped_samples"):
        assert key in rows[0], key
    assert rows[0]["global_batch"] == 32
    assert all(0 < r["temperature"] < 1 for r in rows)


def test_loss_falls_on_learnable_data(clip_run):
    losses = [r["loss"] for r in metrics(clip_run)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_validation_on_held_out_pairs_rises_above_chance(clip_run):
    rows = {r["step"]: r for r in metrics(clip_run)}
    assert not any(k.startswith("val/") for k in rows[40])  # every 50 steps
    first, last = rows[50], rows[100]
    assert last["val/samples"] == 48 and first["val/samples"] == 48
    assert last["val/loss"] < 0.8 * math.log(32)  # ln 32: the loss of embeddings that know nothing, one block of 32
    chance = 5 / 48  # R@5 of random embeddings over 48 pairs
    for key in ("val/image_to_text_R@5", "val/text_to_image_R@5"):
        assert last[key] > 3 * chance, (key, last[key])


def test_weights_load_in_open_clip_and_reproduce_embeddings(clip_run):
    import open_clip
    from safetensors.torch import load_file

    from mmcontrast import load

    ours, preprocess, tokenizer = load(clip_run)
    images = torch.randn(3, 3, 32, 32)
    text = tokenizer(["a red circle", "a blue square", "a yellow triangle"])
    with torch.no_grad():
        want_img, want_txt = ours.encode_image(images), ours.encode_text(text)

    cfg = json.loads((clip_run / "model_config.json").read_text())
    open_clip.add_model_config(clip_run / "model_config.json")  # registers it as "model_config"
    plain = open_clip.create_model("model_config")
    plain.load_state_dict(load_file(str(clip_run / "model.safetensors")))
    plain.eval()
    assert cfg["embed_dim"] == 64
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), want_img, rtol=0, atol=0)
        torch.testing.assert_close(plain.encode_text(text), want_txt, rtol=0, atol=0)

    local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_run}")
    local_tok = open_clip.get_tokenizer(f"local-dir:{clip_run}")
    local.eval()
    with torch.no_grad():
        torch.testing.assert_close(local.encode_image(images), want_img, rtol=0, atol=0)
        torch.testing.assert_close(local.encode_text(local_tok(["a red circle", "a blue square", "a yellow triangle"])), want_txt, rtol=0, atol=0)


def test_two_processes_first_loss_equals_one_process_on_the_same_global_batch(first_step_on_one_and_two_processes, tmp_path):
    m1, m2, two = first_step_on_one_and_two_processes(TINY, tmp_path, port=29517)
    assert m2["global_batch"] == 32 == m1["global_batch"]
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert (two / "model.safetensors").is_file()


def test_accum_steps_log_the_same_losses_as_the_big_batch(tiny_shards, tmp_path):
    common = ["--steps", "4", "--log-every", "1", "--workers", "1"]
    big = run(train_cmd(tiny_shards, tmp_path / "big", "--batch-size", "32", *common))
    small = run(train_cmd(tiny_shards, tmp_path / "k4", "--batch-size", "8", "--accum-steps", "4", *common))
    assert big.returncode == 0 and small.returncode == 0, (big.stderr + small.stderr)[-3000:]
    a, b = metrics(tmp_path / "big"), metrics(tmp_path / "k4")
    assert [r["global_batch"] for r in b] == [32] * 4
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)


@pytest.mark.slow  # the random-kill test in test_checkpoint.py covers kill and resume in CI
def test_resume_after_kill_continues_exactly(tiny_shards, tmp_path):
    args = ["--steps", "30", "--batch-size", "16", "--log-every", "5", "--checkpoint-every", "10", "--workers", "1"]
    straight = run(train_cmd(tiny_shards, tmp_path / "straight", *args))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_shards, out, *args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_000010").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"

    resumed = run(train_cmd(tiny_shards, out, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in metrics(out)]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert [r["loss"] for r in metrics(out)] == pytest.approx([r["loss"] for r in metrics(tmp_path / "straight")], rel=1e-4)
    from mmcontrast import load

    model, _, _ = load(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--set", "optim.nope=1"], "unknown config key"),
        (["--set", "train.batch_size=abc"], "expects int"),
        (["--model", "no-such-model"], "unknown model"),
        (["--config", "configs/does_not_exist.yaml"], "does not exist"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tiny_shards, tmp_path, extra, needle):
    r = run(train_cmd(tiny_shards, tmp_path / "bad", "--steps", "1", *extra))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_missing_shards_and_missing_caption_field(tmp_path, tiny_image_folder):
    r = run(train_cmd(tmp_path / "nowhere", tmp_path / "bad", "--steps", "1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr

    from data_tools import make_shards

    image_only = tmp_path / "image_only"  # class folders → captions from the template; drop them again
    assert make_shards.main([str(tiny_image_folder), str(image_only), "--shard-size", "200", "--workers", "1"]) == 0
    import tarfile

    src = image_only / "00000.tar"
    dst = tmp_path / "nocaption" / "00000.tar"
    dst.parent.mkdir()
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            if not member.name.endswith(".txt"):
                tout.addfile(member, tin.extractfile(member))
    r = run(train_cmd(dst.parent, tmp_path / "bad2", "--steps", "1"))
    assert r.returncode == 2 and "txt" in r.stderr and "jpg" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- one step, in-process


@pytest.fixture
def simclr_step():
    """A 1-process Accelerator, the tiny SimCLR task (a BatchNorm in its head), its optimizer, and a batch maker."""
    from accelerate import Accelerator

    from mmcontrast import models
    from mmcontrast.optim import build_optimizer
    from mmcontrast.tasks import simclr_task

    torch.manual_seed(0)
    encoder = models.ImageEncoder(models.image_encoder_spec("mmc-tiny", {}, False))
    task = simclr_task(models.SimclrModel(encoder, 32, 16), loss_name="nt_xent", temperature=0.2)
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(task.model, "adamw", 1e-3, 0.1, [0.9, 0.98], 1e-6, 0.9)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    model.train()

    def batch(fill: float | None = None) -> list[dict]:
        views = [torch.randn(8, 3, 32, 32) if fill is None else torch.full((8, 3, 32, 32), fill) for _ in range(2)]
        return [{"view1": views[0] * 3 + 1, "view2": views[1] * 3 + 1, "__key__": [str(i) for i in range(8)]}]

    return accelerator, task, model, optimizer, batch


def test_a_step_with_a_non_finite_gradient_leaves_no_trace(simclr_step):
    from mmcontrast.ema import WeightEma
    from mmcontrast.train import train_step

    accelerator, task, model, optimizer, batch = simclr_step
    ema = WeightEma(accelerator.unwrap_model(model), decay=0.9)
    train_step(accelerator, task, model, optimizer, batch(), grad_clip=1.0, ema=ema)  # a real step: optimizer state exists
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    ema_before = [a.clone() for a in ema.average]
    loss, _, finite = train_step(accelerator, task, model, optimizer, batch(float("nan")), grad_clip=1.0, ema=ema, step=1)
    assert not bool(finite) and not torch.isfinite(loss)
    for key, value in model.state_dict().items():  # weights and the head's BatchNorm running statistics
        assert torch.equal(value, before[key]), key
    for key, value in optimizer.state_dict()["state"][0].items():  # Adam's moments and step count
        assert torch.equal(value, opt_before[key]), key
    assert all(torch.equal(a, b) for a, b in zip(ema.average, ema_before))  # the moving average
    _, _, finite = train_step(accelerator, task, model, optimizer, batch(), grad_clip=1.0)
    assert bool(finite) and not torch.equal(model.state_dict()["head.1.running_mean"], before["head.1.running_mean"])


def test_a_step_never_waits_for_the_device(simclr_step, monkeypatch):
    """On a GPU every host read of a device value stalls the pipeline; on the CPU, make each such read fail."""
    from mmcontrast.ema import WeightEma
    from mmcontrast.train import train_step

    accelerator, task, model, optimizer, batch = simclr_step
    micro = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightEma(accelerator.unwrap_model(model), decay=0.9)  # train.ema_decay: updated on the device too

    def host_read(self, *args, **kwargs):
        raise AssertionError("a step read a tensor's value on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    train_step(accelerator, task, model, optimizer, micro, grad_clip=1.0, ema=ema, step=3)
    monkeypatch.undo()
    assert not torch.equal(model.state_dict()["head.0.weight"], before["head.0.weight"])  # it did step
    assert not torch.equal(ema.average[ema.names.index("head.0.weight")], before["head.0.weight"])  # and so did the average


@pytest.mark.slow  # inductor compiles for over a minute on 2 cores; run with -m slow
def test_a_compiled_run_matches_eager_and_writes_plain_keys(tiny_shards, tmp_path):
    """train.compile (torch.compile, inductor) with gradient caching and a moving average of the weights: the first
    step's loss is eager's, and nothing written carries the compile wrapper's ``_orig_mod.`` prefix."""
    from safetensors.torch import load_file

    common = ["--steps", "2", "--batch-size", "8", "--accum-steps", "2", "--log-every", "1", "--workers", "0",
              "--set", "data.shuffle_buffer=0", "--set", "log.diagnostics_every=0"]  # fmt: skip
    eager = run(train_cmd(tiny_shards, tmp_path / "eager", *common))
    compiled = run(train_cmd(tiny_shards, tmp_path / "compiled", *common, "--set", "train.compile=true", "--set", "train.ema_decay=0.9"))
    assert eager.returncode == 0 and compiled.returncode == 0, (eager.stderr + compiled.stderr)[-3000:]
    first = [metrics(tmp_path / name)[0]["loss"] for name in ("eager", "compiled")]
    assert first[1] == pytest.approx(first[0], rel=1e-5)
    for weights in (tmp_path / "compiled" / "model.safetensors", tmp_path / "compiled" / "model_raw.safetensors",
                    tmp_path / "compiled" / "checkpoints" / "last" / "model.safetensors",
                    tmp_path / "compiled" / "checkpoints" / "last" / "ema.safetensors"):
        keys = list(load_file(str(weights)))
        assert keys and not any("_orig_mod" in k for k in keys), weights


def test_the_finetune_recipe_starts_from_a_run_and_watches_the_original_domain(trained_tiny_clip, tiny_shards, tmp_path):
    """configs/clip_finetune.yaml from a trained run: its weights are the start, zero-shot on log.eval_images runs at
    every checkpoint (eval_every unset), the lr of each depth is printed at start-up, the export is the average."""
    out = tmp_path / "ft"
    r = run([sys.executable, "-m", "mmcontrast.train", "--config", str(ROOT / "configs" / "clip_finetune.yaml"),
             "--train-shards", str(tiny_shards), "--output-dir", str(out), "--steps", "4", "--batch-size", "16",
             "--workers", "0", "--log-every", "2", "--checkpoint-every", "2", "--set", "log.diagnostics_every=0",
             "--set", f"model.pretrained={trained_tiny_clip.run_dir}", "--set", f"log.eval_images={trained_tiny_clip.test_dir}"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert [row["step"] for row in rows if "eval/zeroshot_top1" in row] == [2, 4]
    assert rows[0]["eval/zeroshot_top1"] > 0.5  # it started from the trained run (random weights guess 1 in 4)
    assert "eval_every: 2" in (out / "config.yaml").read_text() and (out / "model_raw.safetensors").is_file()
    table = [line.split() for line in r.stderr.splitlines() if line.startswith(("image ", "text "))]
    assert {(kind, depth) for kind, depth, *_ in table} == {(k, str(d)) for k in ("image", "text") for d in range(4)}
