"""Label efficiency (`mmcontrast eval few-shot`): the draws, the rules, the curves of a CLIP run against its
baselines read back from JSON and PNG, and every bad input as one line and exit 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mmcontrast import fewshot
from mmcontrast.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_draws_are_k_per_class_seeded_and_differ_between_seeds():
    y = np.repeat(np.arange(3), [5, 8, 4])
    idx = fewshot.draw(y, 3, seed=1)
    assert np.bincount(y[idx]).tolist() == [3, 3, 3] and len(set(idx.tolist())) == 9
    assert np.array_equal(idx, fewshot.draw(y, 3, seed=1))
    assert not np.array_equal(idx, fewshot.draw(y, 3, seed=2))


def test_a_class_short_of_images_is_named_with_its_count():
    y = np.repeat(np.arange(3), [5, 8, 2])
    fewshot.check_shots(y, ["a", "b", "c"], [1, 2])
    with pytest.raises(fewshot.UsageError, match=r"class 'c' has 2 training image\(s\) but --shots asks for 5"):
        fewshot.check_shots(y, ["a", "b", "c"], [1, 5])


def test_rules_on_separable_features_and_the_text_prior_at_one_shot():
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:3] * 3
    y = np.repeat(np.arange(3), 20)
    x = centres[y] + rng.normal(0, 0.3, (60, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for rule in (fewshot.logistic_probe, fewshot.nearest_class_mean):
        assert (rule(x[::2], y[::2], x[1::2]) == y[1::2]).mean() == 1.0
    # one image per class, one of them mislabelled; text embeddings at the true centres keep the head right
    text = centres / 3
    wrong = np.array([0, 25, 40])  # images of classes 0, 1, 2
    labels = np.array([0, 2, 1])  # the last two swapped
    prior = fewshot.text_prior_probe(text, logit_scale=50.0)
    assert (prior(x[wrong], labels, x) == y).mean() > 0.9
    assert (fewshot.logistic_probe(x[wrong], labels, x) == y).mean() < 0.5


def test_curves_use_the_same_draws_for_every_feature_set():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 10)
    a = fewshot.Split(rng.normal(size=(20, 3)), y, rng.normal(size=(6, 3)), np.array([0, 1] * 3))
    seen = []

    def recording(train_x, train_y, test_x, seed=0):
        seen.append(train_x.copy())
        return np.zeros(len(test_x), dtype=int)

    points = fewshot.curve(a, recording, [1, 3], repeats=2)
    assert [p["shots"] for p in points] == [1, 3] and all(p["mean"] == 0.5 for p in points)
    first = [s.copy() for s in seen]
    seen.clear()
    fewshot.curve(a, recording, [1, 3], repeats=2)
    assert all(np.array_equal(p, q) for p, q in zip(first, seen))


@pytest.fixture(scope="module")
def clip_curves(trained_tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("fewshot")
    args = ["eval", "few-shot", "--train", str(trained_tiny_clip.train_dir), "--test", str(trained_tiny_clip.test_dir),
            "--checkpoint", str(trained_tiny_clip.run_dir), "--shots", "1,2,5", "--repeats", "2", "--workers", "0",
            "--quiet", "--plot", str(out / "curve.png"), "--output", str(out / "result.json")]
    return args, out


def test_few_shot_curves_of_a_clip_run_against_its_baselines(clip_curves, trained_tiny_clip, capsys):
    args, out = clip_curves
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((out / "result.json").read_text())
    assert result["classes"] == sorted(trained_tiny_clip.classes) and result["n_test"] == 10 * len(result["classes"])
    curves = result["curves"]
    assert set(curves) == {"checkpoint", "checkpoint_ncm", "zero_shot", "text_init", "random_init", "pixels"}
    for name in ("checkpoint", "checkpoint_ncm", "text_init", "random_init", "pixels"):
        assert [p["shots"] for p in curves[name]] == [1, 2, 5]
        assert all(len(p["runs"]) == 2 and 0 <= p["mean"] <= 1 and p["std"] >= 0 for p in curves[name])
    assert curves["zero_shot"][0]["shots"] == 0
    # the colour model sorts colour squares from one image per class, and from their names alone
    assert curves["checkpoint"][0]["mean"] >= 0.9 and curves["checkpoint_ncm"][0]["mean"] >= 0.9
    assert curves["zero_shot"][0]["mean"] >= 0.8 and curves["text_init"][0]["mean"] >= 0.8
    assert result["dim"] == 64 and result["chance"] == pytest.approx(1 / len(result["classes"]))
    assert (out / "curve.png").read_bytes()[:8] == PNG_MAGIC and result["plot"] == str(out / "curve.png")


def test_few_shot_bad_inputs_are_one_line_and_exit_2(trained_tiny_clip, tmp_path, capsys):
    base = ["eval", "few-shot", "--train", str(trained_tiny_clip.train_dir), "--test", str(trained_tiny_clip.test_dir),
            "--checkpoint", str(trained_tiny_clip.run_dir), "--workers", "0", "--quiet", "--baselines", "none"]
    cases = [
        (["--shots", "1,50"], "has 20 training image(s) but --shots asks for 50"),
        (["--shots", "two"], "--shots takes whole numbers"),
        (["--shots", "0"], "each 1 or more"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--baselines", "imagenet"], "--baselines: unknown imagenet"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    stray = tmp_path / "test"  # a test class the training folder does not have
    (stray / "purple_circle").mkdir(parents=True)
    shutil.copy(next((trained_tiny_clip.test_dir / trained_tiny_clip.classes[0]).iterdir()), stray / "purple_circle" / "000.png")
    assert main(["eval", "few-shot", "--train", str(trained_tiny_clip.train_dir), "--test", str(stray),
                 "--checkpoint", str(trained_tiny_clip.run_dir), "--workers", "0", "--quiet", "--shots", "1"]) == 2
    assert "test classes purple_circle have no folder" in capsys.readouterr().err
    assert main(["eval", "few-shot", "--train", str(trained_tiny_clip.train_dir), "--test", str(trained_tiny_clip.test_dir),
                 "--checkpoint", "timm:resnet18", "--quiet"]) == 2
    assert "needs its weights: --pretrained" in capsys.readouterr().err


def _noisy_levels(root, per_class: int, seed: int):
    """Two classes of grey images whose levels overlap (each image's level drawn around its class's): a probe is right
    on some, wrong on others."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for level, name in ((100, "darker"), (110, "lighter")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(rng.normal(level, 8), 20, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def test_linear_probe_few_shot_and_finetunes_probe_score_the_same_draw_alike(tmp_path):
    """One probe everywhere (mmcontrast.probe): on the same labelled images and features, `eval linear-probe`,
    `eval few-shot` with every image of the draw and the probe `finetune` weighs against fine-tuning give one number."""
    import torch

    from mmcontrast import classifier as clf

    torch.manual_seed(0)
    weights = tmp_path / "random.pt"
    torch.save(clf.models.ImageEncoder(clf.models.timm_encoder_spec("timm:resnet10t", 32)).backbone.state_dict(), weights)
    train, test = _noisy_levels(tmp_path / "train", 20, 0), _noisy_levels(tmp_path / "test", 30, 1)
    model = ["--checkpoint", "timm:resnet10t", "--pretrained", str(weights), "--image-size", "32", "--workers", "0"]
    exact = ["--precision", "fp32"]  # finetune encodes in float32; bf16 features (auto, on CPUs that have it) differ
    assert main(["eval", "linear-probe", *model, *exact, "--train", str(train), "--test", str(test), "--output", str(tmp_path / "lp.json")]) == 0
    assert main(["eval", "few-shot", *model, *exact, "--train", str(train), "--test", str(test), "--shots", "20", "--repeats", "1",
                 "--baselines", "none", "--output", str(tmp_path / "fs.json")]) == 0
    assert main(["finetune", *model, "--train", str(train), "--val", str(test), "--epochs", "1", "--batch-size", "8",
                 "--output-dir", str(tmp_path / "run")]) == 0
    linear = json.loads((tmp_path / "lp.json").read_text())
    few = json.loads((tmp_path / "fs.json").read_text())["curves"]["checkpoint"][0]
    weighed = json.loads((tmp_path / "run" / "best.json").read_text())["probe"]
    assert 0.55 < linear["top1"] < 0.95, linear["top1"]  # neither chance nor perfect: agreement means something
    assert few["mean"] == pytest.approx(linear["top1"]) and weighed["top1"] == pytest.approx(linear["top1"])
    assert few["recall_mean"] == pytest.approx(linear["mean_per_class_recall"])


def test_test_images_that_are_training_images_are_counted_and_warned(tmp_path, capsys):
    """The same file in --train and --test inflates every score: counted in the JSON, said once on stderr."""
    import torch

    from mmcontrast import classifier as clf

    torch.manual_seed(0)
    weights = tmp_path / "random.pt"
    torch.save(clf.models.ImageEncoder(clf.models.timm_encoder_spec("timm:resnet10t", 32)).backbone.state_dict(), weights)
    train, test = _noisy_levels(tmp_path / "train", 6, 0), _noisy_levels(tmp_path / "test", 6, 1)
    shutil.copy(train / "darker" / "000.png", test / "darker" / "copy.png")
    shutil.copy(train / "lighter" / "001.png", test / "darker" / "renamed.png")  # its bytes, not its name or folder
    model = ["--checkpoint", "timm:resnet10t", "--pretrained", str(weights), "--image-size", "32", "--workers", "0"]
    assert main(["eval", "linear-probe", *model, "--train", str(train), "--test", str(test), "--output", str(tmp_path / "lp.json")]) == 0
    assert json.loads((tmp_path / "lp.json").read_text())["train_test_identical"] == 2
    err = capsys.readouterr().err
    assert "warning: 2 image(s) of --test are byte-identical to images of --train" in err
