"""Representation health: each metric on constructed embeddings with hand-computed values, a collapsed
run that warns, and the `mmcontrast plot` / `mmcontrast diagnose` commands on real tiny runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmcontrast import diagnostics as dg
from mmcontrast.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def random_sphere(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---------------------------------------------------------------- metrics on constructed embeddings


def test_identical_vectors_align_perfectly_and_span_rank_one():
    x = unit([0.6, 0.8, 0.0]).repeat(10, 1)
    assert dg.alignment(x, x) == 0.0
    assert dg.effective_rank(x) == pytest.approx(1.0)
    assert dg.embedding_std(x) == pytest.approx(0.0, abs=1e-7)
    assert dg.top_k_variance_share(x, 1) == 1.0  # no variance at all counts as all of it in the top directions


def test_orthonormal_basis_has_full_effective_rank():
    for d in (2, 7, 64):
        assert dg.effective_rank(torch.eye(d)) == pytest.approx(d)
    # two directions with singular values 3:1 -> p = (3/4, 1/4), erank = exp(H(p))
    x = torch.diag(torch.tensor([3.0, 1.0]))
    assert dg.effective_rank(x) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_alignment_and_uniformity_by_hand():
    # pairs: orthogonal (|x-y|^2 = 2) and coinciding (0): alignment = (2 + 0) / 2
    x, y = unit([1, 0], [-1, 0]), unit([0, 1], [-1, 0])
    assert dg.alignment(x, y) == pytest.approx(1.0)
    # one pair of points: uniformity = log exp(-2 |a-b|^2)
    assert dg.uniformity(unit([1, 0], [0, 1])) == pytest.approx(-4.0)  # orthogonal: |a-b|^2 = 2
    assert dg.uniformity(unit([1, 0], [-1, 0])) == pytest.approx(-8.0)  # antipodal: |a-b|^2 = 4
    # three points: pairs at |.|^2 = 2, 2, 4 -> log((2 e^-4 + e^-8) / 3)
    expected = math.log((2 * math.exp(-4) + math.exp(-8)) / 3)
    assert dg.uniformity(unit([1, 0], [0, 1], [-1, 0])) == pytest.approx(expected)


def test_uniformity_is_lower_for_points_spread_over_the_sphere():
    spread = random_sphere(256, 16)
    clustered = F.normalize(torch.tensor([1.0] + [0.0] * 15) + 0.1 * random_sphere(256, 16, seed=1), dim=1)
    assert dg.uniformity(spread) < dg.uniformity(clustered) - 1.0
    assert dg.uniformity(clustered) <= 0.0  # log of a mean of values <= 1


def test_top_k_variance_share():
    line = torch.linspace(-1, 1, 50)[:, None] * torch.tensor([[1.0, 2.0, 0.5]])  # variance along one direction
    assert dg.top_k_variance_share(line, 1) == pytest.approx(1.0)
    isotropic = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))
    assert dg.top_k_variance_share(isotropic, 2) == pytest.approx(2 / 8, abs=0.02)


def test_embedding_std_is_one_over_sqrt_d_for_random_unit_vectors():
    d = 256
    assert dg.embedding_std(random_sphere(4096, d)) == pytest.approx(1 / math.sqrt(d), rel=0.03)
    assert dg.embedding_std(3.0 * random_sphere(4096, d)) == pytest.approx(1 / math.sqrt(d), rel=0.03)  # normalised first


def test_modality_gap_of_two_shifted_clouds():
    assert dg.modality_gap(unit([1, 0, 0]).repeat(5, 1), unit([0, 1, 0]).repeat(5, 1)) == pytest.approx(math.sqrt(2))
    noise = 0.3 * torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    x = F.normalize(noise + torch.tensor([1.0, 0, 0]), dim=1)
    y = F.normalize(noise + torch.tensor([0, 1.0, 0]), dim=1)
    assert dg.modality_gap(x, y) == pytest.approx(float((x.mean(0) - y.mean(0)).norm()))
    assert 1.0 < dg.modality_gap(x, y) < math.sqrt(2)  # spread clouds: centroids inside the sphere
    assert dg.modality_gap(x, x.flip(0)) == pytest.approx(0.0, abs=1e-6)  # same cloud, other order


def test_positive_accuracy_and_rank_on_a_constructed_batch():
    x = torch.eye(3)
    y = unit([1, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6])
    # similarities x_i . y_j: row 0 [1, 0, 0] (positive first), rows 1 and 2: positive 0.6, one candidate 0.8
    assert dg.positive_accuracy(x, y, views=False) == pytest.approx(1 / 3)
    assert dg.positive_rank(x, y, views=False) == pytest.approx((1 + 2 + 2) / 3)
    # two views: view i's twin is its only non-orthogonal candidate
    assert dg.positive_accuracy(torch.eye(4)[:2], torch.eye(4)[:2], views=True) == 1.0
    assert dg.positive_rank(torch.eye(4)[:2], torch.eye(4)[:2], views=True) == 1.0


def test_collapsed_embeddings_score_chance_not_perfect_accuracy():
    n = 8
    x = unit([1, 0, 0]).repeat(n, 1)  # every candidate ties with the positive
    assert dg.positive_accuracy(x, x, views=False) == pytest.approx(1 / n)
    assert dg.positive_rank(x, x, views=False) == pytest.approx((n + 1) / 2)
    assert dg.positive_accuracy(x, x, views=True) == pytest.approx(1 / (2 * n - 1))


def test_health_and_warnings_for_healthy_and_collapsed_towers():
    x, y = random_sphere(128, 32, seed=0), random_sphere(128, 32, seed=1)
    healthy = dg.health(x, x + 0.05 * y, views=False)
    assert healthy["alignment"] < 0.01 and healthy["positive_accuracy"] == 1.0
    assert healthy["image_embedding_std_ratio"] == pytest.approx(1.0, abs=0.1)
    assert healthy["image_effective_rank_fraction"] > 0.8
    assert dg.collapse_warnings(healthy, 0.05, 0.2) == []

    # the image tower outputs one point: the modality gap keeps the pooled std up, the per-tower check catches it
    collapsed = dg.health(unit([1.0] + [0.0] * 31).repeat(128, 1), y, views=False)
    assert collapsed["embedding_std_ratio"] > 0.2
    assert collapsed["image_effective_rank"] == pytest.approx(1.0) and collapsed["image_embedding_std"] == 0.0
    lines = dg.collapse_warnings(collapsed, 0.05, 0.2)
    assert len(lines) == 2 and all("image embeddings" in line for line in lines)

    views = dg.health(x, x, views=True)
    assert "modality_gap" not in views and "image_effective_rank" not in views
    assert dg.collapse_warnings(dg.health(x[:1].repeat(64, 1), x[:1].repeat(64, 1), views=True), 0.05, 0.2)


# ---------------------------------------------------------------- chance


@pytest.mark.parametrize("n", [2, 8, 100])
def test_chance_levels_are_the_losses_of_guessing(n):
    """Every embedding the same (every logit equal): each loss equals its chance level, positives are found at
    chance's rate; for SigLIP at the bias that fits guessing best."""
    from mmcontrast.losses import clip_loss, nt_xent_loss, siglip_loss, supcon_loss

    same = unit([1.0, 0.0, 0.0]).repeat(n, 1)
    clip, nt_xent, siglip = dg.chance_level("clip", n), dg.chance_level("nt_xent", n), dg.chance_level("siglip", n)
    assert float(clip_loss(same, same, torch.tensor(10.0))) == pytest.approx(clip[0], rel=1e-6)
    assert float(nt_xent_loss(same, same, temperature=0.3)) == pytest.approx(nt_xent[0], rel=1e-6)
    labels = torch.arange(n)
    assert float(supcon_loss(torch.stack([same, same], dim=1), labels)) == pytest.approx(dg.chance_level("supcon", n)[0], rel=1e-6)
    best_bias = math.log(1 / (n - 1))  # sigmoid(b) = 1/n
    assert float(siglip_loss(same, same, torch.tensor(0.0), torch.tensor(best_bias))) == pytest.approx(siglip[0], rel=1e-6)
    for bias in (best_bias - 0.5, best_bias + 0.5):  # no constant does better
        assert float(siglip_loss(same, same, torch.tensor(0.0), torch.tensor(bias))) > siglip[0]
    assert dg.positive_accuracy(same, same, views=False) == pytest.approx(clip[1])
    assert dg.positive_accuracy(same, same, views=True) == pytest.approx(nt_xent[1])


def test_at_chance_needs_both_the_loss_and_the_accuracy_of_guessing():
    chance = dg.chance_level("nt_xent", 128)  # ln 255 = 5.541, 1/255
    assert dg.at_chance(5.53, 0.004, chance)  # the run: loss 5.53, positives at 1/255
    assert dg.at_chance(5.30, 0.007, chance)  # 4.4% below: still within the 5% tolerance
    assert not dg.at_chance(5.20, 0.004, chance)  # 6% below chance: learning
    assert not dg.at_chance(5.53, 0.01, chance)  # positives found 2.5x chance's rate: learning
    assert not dg.at_chance(5.30, 0.004, chance, tolerance=0.03)


def test_an_alarm_speaks_first_and_once_more_past_a_quarter_of_the_run():
    alarm = dg.Alarm(total_steps=400)  # a quarter: step 100
    said = [step for step in range(10, 401, 10) if alarm.due(step, holds=step >= 30)]
    assert said == [30, 100]
    late = dg.Alarm(total_steps=400)  # first true past the quarter: said once
    assert [step for step in range(10, 401, 10) if late.due(step, holds=step >= 200)] == [200]
    never = dg.Alarm(total_steps=400)
    assert not any(never.due(step, holds=False) for step in range(10, 401, 10))


# ---------------------------------------------------------------- real runs and the commands


def train(shards: Path, out: Path, config: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmcontrast.train", "--config", str(ROOT / "configs" / config), "--train-shards", str(shards),
           "--output-dir", str(out), "--set", "data.workers=0", "--set", "log.every=2", "--set", "log.diagnostics_every=2",
           "--set", "log.diagnostics_samples=32", *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def clip_run(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diag") / "clip"
    train(tiny_shards, out, "clip_tiny_cpu.yaml", "--steps", "4", "--batch-size", "32")
    return out


@pytest.fixture(scope="module")
def collapsed_run(tiny_shards, tmp_path_factory) -> tuple[Path, str]:
    """SimCLR on a ViT with no transformer layers: its output is the class token whatever the image,
    and a 1e-9 learning rate keeps it that way. Returns (run dir, the trainer's stderr)."""
    folder = tmp_path_factory.mktemp("collapse")
    model = json.loads((ROOT / "configs" / "models" / "mmc-tiny.json").read_text())
    model["vision_cfg"]["layers"] = 0
    (folder / "constant.json").write_text(json.dumps(model))
    out = folder / "run"
    r = train(tiny_shards, out, "simclr_tiny_cpu.yaml", "--model", str(folder / "constant.json"), "--steps", "4",
              "--batch-size", "16", "--lr", "1e-9", "--set", "optim.warmup_steps=0")  # warnings wait for warmup
    return out, r.stderr


def test_a_collapsed_run_warns(collapsed_run):
    """A collapsed encoder is also at chance: the loss is exactly guessing's; each alarm is said once in 4 steps."""
    run_dir, stderr = collapsed_run
    assert stderr.count("warning: dimensional collapse") == 1 and stderr.count("warning: collapse of the embeddings") == 1
    assert stderr.count("warning: training is at chance") == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    health = [r for r in rows if "health/effective_rank" in r]
    assert len(health) == 2
    assert all(r["health/effective_rank"] < 1.01 and r["health/embedding_std"] < 1e-4 for r in health)
    for row in rows:
        assert row["health/at_chance"] is True and row["health/dimensional_collapse"] is True
        assert row["health/chance_loss"] == pytest.approx(math.log(2 * 16 - 1))
        assert row["loss"] == pytest.approx(row["health/chance_loss"], rel=1e-4)


def test_plot_writes_a_png_of_the_run(clip_run, tmp_path, capsys):
    assert main(["plot", str(clip_run)]) == 0
    png = clip_run / "run.png"
    assert capsys.readouterr().out.strip() == str(png)
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000

    assert main(["plot", str(clip_run), "--output", str(tmp_path / "sub" / "curves.png")]) == 0
    assert (tmp_path / "sub" / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_without_metrics_is_a_usage_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and "metrics" in line for line in err)


def test_diagnose_prints_health_of_a_clip_checkpoint(clip_run, tiny_shards, tmp_path, capsys):
    out = tmp_path / "health.json"
    args = ["diagnose", "--checkpoint", str(clip_run), "--shards", str(tiny_shards), "--samples", "40",
            "--batch-size", "16", "--workers", "0", "--quiet", "--output", str(out)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    for key in ("alignment", "uniformity", "effective_rank", "effective_rank_fraction", "top10_variance_share",
                "embedding_std", "positive_accuracy", "positive_rank", "modality_gap", "image_effective_rank"):
        assert math.isfinite(result[key]), key
    assert result["pairs"] == "image-text" and result["n_samples"] == 40 and result["dim"] == 64
    assert result["precision"] in ("fp32", "bf16")  # what the encoders ran in, "auto" resolved
    assert result["chance_positive_accuracy"] == pytest.approx(1 / 40) and result["at_chance"] in (True, False)
    assert 0 <= result["alignment"] <= 4 and -4 <= result["uniformity"] <= 0


def test_diagnose_an_image_only_encoder_uses_two_views_and_warns(collapsed_run, tiny_shards, capsys):
    run_dir, _ = collapsed_run
    assert main(["diagnose", "--checkpoint", str(run_dir), "--shards", str(tiny_shards), "--samples", "24",
                 "--workers", "0", "--quiet", "--preset", "texture"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["pairs"] == "two views" and result["preset"] == "texture" and "modality_gap" not in result
    assert result["effective_rank"] == pytest.approx(1.0, abs=0.01)
    assert result["at_chance"] is True and result["dimensional_collapse"] is True
    assert result["chance_positive_accuracy"] == pytest.approx(1 / 47)  # 24 images, two views: 47 candidates
    assert "warning: dimensional collapse" in captured.err and "under twice chance" in captured.err
    assert main(["diagnose", "--checkpoint", str(run_dir), "--shards", str(tiny_shards), "--samples", "1"]) == 2


@pytest.mark.parametrize("views", [False, True])
def test_positive_ranks_in_row_blocks_equal_the_whole_matrix(views):
    from mmcontrast.diagnostics import _positive_ranks

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(11, 4, generator=g), dim=1)
    y = F.normalize(torch.randn(11, 4, generator=g), dim=1)
    y[3] = x[3]  # a perfect pair, and a duplicate candidate (ties)
    x[5] = x[6]
    whole = _positive_ranks(x, y, views)
    for rows in (1, 3, 7):
        blocks = _positive_ranks(x, y, views, rows=rows)
        assert torch.equal(blocks[0], whole[0]) and torch.equal(blocks[1], whole[1])
    # the naive definition, for the whole matrix
    anchors, candidates = (torch.cat([x, y]), torch.cat([x, y])) if views else (x, y)
    for i in range(anchors.shape[0]):
        twin = (i + 11) % 22 if views else i
        others = [j for j in range(candidates.shape[0]) if j != twin and not (views and j == i)]
        pos = float(anchors[i] @ candidates[twin])
        sims = [float(anchors[i] @ candidates[j]) for j in others]
        assert int(whole[0][i]) == sum(s > pos + 1e-6 for s in sims)
        assert int(whole[1][i]) == sum(abs(s - pos) <= 1e-6 for s in sims)
