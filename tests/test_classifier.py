"""The labelled slice into a classifier: `mmcontrast finetune` (the trainer's classify mode), `predict`,
`eval classifier`, the LP-FT head, per-kind learning rates, and every bad input as one line and exit 2."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from mmcontrast import classifier as clf
from mmcontrast.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_probe_head_predicts_what_the_probe_does_on_raw_features():
    """LP-FT starts from the linear probe: the head's argmax on raw features is the fitted probe's prediction, with
    three classes and with two (where scikit-learn keeps a single row)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    from mmcontrast.fewshot import PROBE_CS

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    x = rng.normal(size=(90, 8)) * rng.uniform(0.1, 10, size=8) + np.eye(3, 8)[y] * 4  # features on different scales
    for keep in (y < 3, y < 2):
        xs, ys = x[keep], y[keep]
        weight, bias = clf.probe_head(xs, ys, n_classes=4)  # a class with no image gets a zero row
        assert weight.shape == (4, 8) and not weight[3].any() and bias[3] == 0
        scaler = StandardScaler().fit(xs)
        reference = LogisticRegressionCV(Cs=list(PROBE_CS), cv=5, scoring="accuracy", max_iter=3000, random_state=0)
        reference.fit(scaler.transform(xs), ys)
        n = len(np.unique(ys))
        head = (xs @ weight.T + bias)[:, :n].argmax(axis=1)
        assert np.array_equal(head, reference.predict(scaler.transform(xs)))


def test_lr_scale_gives_each_kind_of_parameter_its_learning_rate():
    from mmcontrast.optim import build_optimizer, set_lr

    model = clf.ImageClassifier({"source": "timm", "name": "resnet10t", "timm_kwargs": {}, "cifar_stem": False, "image_size": 32,
                                 "mean": [0.5] * 3, "std": [0.5] * 3}, ["a", "b"])
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.05, [0.9, 0.999], 1e-8, 0.9, {"image": 0.1, "head": 2.0},
                                lambda name: "head" if name.startswith("head.") else "image")
    assert set_lr(optimizer, 1e-3, 0.5) == 5e-4
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.head.weight)] == pytest.approx(1e-3) and lr_of[id(model.head.bias)] == pytest.approx(1e-3)
    assert lr_of[id(model.encoder.backbone.conv1[0].weight)] == pytest.approx(5e-5)
    assert decay_of[id(model.head.weight)] == 0.05 and decay_of[id(model.head.bias)] == 0.0
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


def test_frozen_batchnorm_keeps_its_statistics_in_training():
    spec = {"source": "timm", "name": "resnet10t", "timm_kwargs": {}, "cifar_stem": False, "image_size": 32,
            "mean": [0.5] * 3, "std": [0.5] * 3}
    model = clf.ImageClassifier(spec, ["a", "b"], frozen_batchnorm=True).train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert model.training and not bn.training and torch.equal(bn.running_mean, before)


@pytest.fixture(scope="module")
def finetuned(trained_tiny_clip, tmp_path_factory):
    """2 epochs of `mmcontrast finetune` from the tiny CLIP run's image tower, a tenth held out for validation."""
    run = tmp_path_factory.mktemp("finetune") / "run"
    args = ["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", str(trained_tiny_clip.run_dir),
            "--output-dir", str(run), "--epochs", "2", "--batch-size", "16", "--workers", "0"]
    assert main(args) == 0
    return run, args


def test_finetune_writes_a_classifier_run_that_every_command_loads(finetuned, trained_tiny_clip):
    from mmcontrast import load

    run, _ = finetuned
    config = json.loads((run / "model_config.json").read_text())[clf.CLASSIFIER_KEY]
    assert config["classes"] == sorted(trained_tiny_clip.classes) and config["encoder"]["source"] == "open_clip"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8]  # 72 training images (a tenth of 80 held out), batch 16: 4 steps an epoch
    assert all("eval/val_top1" in r and 0 < r["mean_confidence"] <= 1 for r in rows)
    best = json.loads((run / clf.BEST_RECORD_FILE).read_text())
    assert best["val_top1"] == max(r["eval/val_top1"] for r in rows)
    from safetensors import safe_open

    with safe_open(str(run / clf.BEST_WEIGHTS_FILE), framework="pt") as f:  # the weights carry their own scores
        assert json.loads(f.metadata()["best"]) == best
    model, preprocess, tokenizer = load(run)
    assert isinstance(model, clf.ImageClassifier) and tokenizer is None
    from safetensors.torch import load_file

    exported, kept = load_file(str(run / "model.safetensors")), load_file(str(run / clf.BEST_WEIGHTS_FILE))
    assert exported.keys() == kept.keys() and all(torch.equal(exported[k], kept[k]) for k in kept)


def test_predict_and_eval_classifier_read_back(finetuned, trained_tiny_clip, tmp_path, capsys):
    run, _ = finetuned
    out = tmp_path / "preds.csv"
    assert main(["predict", "--images", str(trained_tiny_clip.test_dir), "--checkpoint", str(run), "--output", str(out),
                 "--top-k", "2", "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 * len(trained_tiny_clip.classes)
    assert all(r["label"] in trained_tiny_clip.classes and 0 < float(r["score"]) <= 1 and r["label_2"] for r in rows)
    correct = np.mean([r["label"] == r["true_label"] for r in rows])
    assert f"top-1 {correct:.4f}" in printed and correct >= 0.9  # colour squares: the CLIP tower already sorts them

    plot = tmp_path / "confusion.png"
    assert main(["eval", "classifier", "--images", str(trained_tiny_clip.test_dir), "--checkpoint", str(run),
                 "--plot", str(plot), "--workers", "0", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(correct) and result["classes"] == sorted(trained_tiny_clip.classes)
    confusion = np.array(result["confusion"])
    assert confusion.sum() == len(rows) and np.trace(confusion) == round(correct * len(rows))
    assert set(result["per_class"]) == set(result["classes"]) and 0 <= result["mean_per_class_recall"] <= 1
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_finetune_resumes_and_refuses_to_clobber(finetuned, capsys):
    run, args = finetuned
    assert main(args) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main([*args, "--epochs", "3", "--resume"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]


def test_classifier_bad_inputs_are_one_line_and_exit_2(finetuned, trained_tiny_clip, tmp_path, capsys):
    run, _ = finetuned
    stray = tmp_path / "stray" / "purple_circle"  # a class the classifier was not trained on
    stray.mkdir(parents=True)
    some_image = next((trained_tiny_clip.test_dir / trained_tiny_clip.classes[0]).iterdir())
    (stray / "a.png").write_bytes(some_image.read_bytes())
    cases = [
        (["predict", "--images", str(trained_tiny_clip.test_dir), "--checkpoint", str(trained_tiny_clip.run_dir)],
         "is not a fine-tuned classifier"),
        (["eval", "classifier", "--images", str(stray.parent), "--checkpoint", str(run)], "are not among the classifier's"),
        (["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", str(trained_tiny_clip.run_dir),
          "--output-dir", str(tmp_path / "x"), "--image-size", "64"], "--image-size applies to timm:NAME"),
        (["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", "timm:resnet10t",
          "--output-dir", str(tmp_path / "y")], "needs its weights: --pretrained"),
        (["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", str(run), "--init", "zero-shot",
          "--output-dir", str(tmp_path / "z")], "--init zero-shot needs a CLIP checkpoint"),
    ]
    for argv, message in cases:
        assert main([*argv, "--quiet"] if argv[0] != "finetune" else argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
