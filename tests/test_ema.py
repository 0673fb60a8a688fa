"""The moving average of the weights (train.ema_decay): its update, its swap, and a run that measures and exports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmcontrast.ema import WeightEma, averaged_tensors, decay_at
from mmcontrast.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "clip_tiny_cpu.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_the_decay_warms_up_then_holds():
    assert decay_at(0, 0.999, warmup=True) == pytest.approx(0.1)
    assert decay_at(80, 0.999, warmup=True) == pytest.approx(0.9)
    assert decay_at(10**6, 0.999, warmup=True) == 0.999
    assert decay_at(0, 0.999, warmup=False) == 0.999


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    net[2].bias.requires_grad_(False)  # frozen: nothing to average
    return net


def test_the_average_moves_by_one_minus_the_decay_and_not_on_a_skipped_step():
    net = _net()
    assert sorted(averaged_tensors(net)) == ["0.bias", "0.weight", "1.bias", "1.running_mean", "1.running_var", "1.weight", "2.weight"]
    ema = WeightEma(net, decay=0.75, warmup=False)
    start = [a.clone() for a in ema.average]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(step=5, taken=torch.tensor(False))
    assert all(torch.equal(a, s) for a, s in zip(ema.average, start))
    ema.update(step=5, taken=torch.tensor(True))
    now = dict(zip(ema.names, ema.average))
    assert torch.allclose(now["0.weight"], 0.75 * start[0] + 0.25 * net[0].weight.detach())
    assert torch.equal(now["1.running_mean"], start[ema.names.index("1.running_mean")])  # statistics unchanged: average too


def test_swapped_in_holds_the_average_and_gives_the_weights_back_bit_for_bit():
    net = _net()
    ema = WeightEma(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.1)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.swapped_in():
        assert torch.equal(net[0].weight, ema.average[ema.names.index("0.weight")])
        assert not torch.equal(net[0].weight, own["0.weight"])
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items())


def test_a_checkpoint_without_an_average_is_refused_when_resuming_with_one(tmp_path):
    ema = WeightEma(_net(), decay=0.9)
    ema.save(tmp_path, 0)
    other = WeightEma(_net(), decay=0.9)
    with torch.no_grad():
        other.average[0].zero_()
    other.load(tmp_path, 0)
    assert all(torch.equal(a, b) for a, b in zip(ema.average, other.average))
    with pytest.raises(UsageError, match="train.ema_decay=0"):
        other.load(tmp_path / "nowhere", 0)


# ---------------------------------------------------------------- a run


def _run(shards, val_shards, out: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "mmcontrast.train", "--config", TINY, "--train-shards", str(shards), "--output-dir", str(out),
           "--steps", "6", "--batch-size", "16", "--log-every", "3", "--workers", "0", "--val-shards", str(val_shards),
           "--set", "log.val_every=3", "--set", "log.diagnostics_every=3", *extra]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_ema_run_trains_as_without_measures_and_exports_the_average(tiny_shards, tiny_val_shards, tmp_path):
    """The average changes nothing about training (the raw export is the plain run's, bit for bit), is what
    validation and health measure, and is the run's model: open_clip loads it; the raw weights lie beside it."""
    import open_clip
    from safetensors.torch import load_file

    plain = _run(tiny_shards, tiny_val_shards, tmp_path / "plain")
    ema = _run(tiny_shards, tiny_val_shards, tmp_path / "ema", "--set", "train.ema_decay=0.8")
    assert [r["loss"] for r in ema] == [r["loss"] for r in plain]
    assert ema[-1]["val/loss"] != plain[-1]["val/loss"] and ema[-1]["health/uniformity"] != plain[-1]["health/uniformity"]
    raw, plain_weights = load_file(str(tmp_path / "ema" / "model_raw.safetensors")), load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert raw.keys() == plain_weights.keys() and all(torch.equal(raw[k], plain_weights[k]) for k in raw)
    averaged = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert not torch.equal(averaged["visual.proj"], raw["visual.proj"])
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ema'}", weights_only=True)
    assert torch.equal(model.state_dict()["visual.proj"], averaged["visual.proj"])
    assert (tmp_path / "ema" / "checkpoints" / "last" / "ema.safetensors").is_file()
