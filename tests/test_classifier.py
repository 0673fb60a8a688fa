"""The labelled slice into a classifier: `mmcontrast finetune` (the trainer's classify mode), `predict`,
`eval classifier`, the LP-FT head, per-kind learning rates, and every bad input as one line and exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcontrast import classifier as clf
from mmcontrast.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_probe_head_predicts_what_the_probe_does_on_raw_features():
    """LP-FT starts from the linear probe: the head's argmax on raw features is the prediction of scikit-learn's
    standardised, cross-validated logistic regression, with three classes and with two (where scikit-learn keeps a
    single row)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from mmcontrast.probe import PROBE_CS, PROBE_MAX_ITER, fit_probe

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    x = rng.normal(size=(90, 8)) * rng.uniform(0.1, 10, size=8) + np.eye(3, 8)[y] * 4  # features on different scales
    for keep in (y < 3, y < 2):
        xs, ys = x[keep], y[keep]
        weight, bias = clf.probe_head(xs, ys, n_classes=4)  # a class with no image gets a zero row, far below
        assert weight.shape == (4, 8) and not weight[3].any() and bias[3] < -1e3
        scaler = StandardScaler().fit(xs)
        reference = LogisticRegressionCV(Cs=list(PROBE_CS), cv=StratifiedKFold(5, shuffle=True, random_state=0),
                                         scoring="neg_log_loss", max_iter=PROBE_MAX_ITER)
        reference.fit(scaler.transform(xs), ys)
        head = (xs @ weight.T + bias).argmax(axis=1)
        assert np.array_equal(head, reference.predict(scaler.transform(xs)))
        assert np.array_equal(head, fit_probe(xs, ys).predict(xs))
    # a given C is used, not chosen: scikit-learn's logistic regression at that C on the standardised features
    from sklearn.linear_model import LogisticRegression

    given = fit_probe(x, y, c=0.01)
    reference = LogisticRegression(C=0.01, max_iter=PROBE_MAX_ITER).fit(StandardScaler().fit_transform(x), y)
    assert given.C == 0.01
    np.testing.assert_allclose(given.coef, reference.coef_, rtol=1e-6)


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
    """`mmcontrast finetune` from the tiny CLIP run's image tower: 2-fold cross-validation of 2-epoch runs, then the
    choice. A stale best.safetensors (an earlier version's, killed) lies in the fresh run dir and must not matter."""
    run = tmp_path_factory.mktemp("finetune") / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"stale")
    args = ["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", str(trained_tiny_clip.run_dir),
            "--output-dir", str(run), "--epochs", "2", "--batch-size", "16", "--workers", "0", "--folds", "2"]
    assert main(args) == 0
    return run, args


def test_finetune_chooses_by_cross_validation_and_writes_a_run_every_command_loads(finetuned, trained_tiny_clip):
    from mmcontrast import load
    from mmcontrast.finetune import CHOICES, SELECTION_FILE
    from mmcontrast.probe import fit_probe

    run, _ = finetuned
    config = json.loads((run / "model_config.json").read_text())[clf.CLASSIFIER_KEY]
    assert config["classes"] == sorted(trained_tiny_clip.classes) and config["encoder"]["source"] == "open_clip"
    best = json.loads((run / SELECTION_FILE).read_text())
    assert best["choice"] in CHOICES and best["selected_on"] == "2-fold cross-validation" and best["reason"]
    for estimate in (best["probe"], best["finetuned"]):
        assert len(estimate["folds"]) == 2 and estimate["top1"] == pytest.approx(np.mean([f["top1"] for f in estimate["folds"]]))
    # each fold is a run of the trainer, scored after every epoch on the images it did not see (40 of 80: 3 steps of 16)
    rows = [json.loads(line) for line in (run / "cv" / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all("eval/val_top1" in r and 0 < r["mean_confidence"] <= 1 for r in rows)
    assert best["finetuned"]["folds"][0]["top1"] == rows[-1]["eval/val_top1"]  # the last epoch: none is picked
    assert best["finetuned"]["folds"][0]["loss"] == rows[-1]["eval/val_loss"]  # what the choice compares
    model, _, tokenizer = load(run)  # the stale best.safetensors was neither exported nor read
    assert isinstance(model, clf.ImageClassifier) and tokenizer is None
    if best["choice"] == "probe":  # the exported head is the probe on every labelled image's frozen features
        from mmcontrast.evaluate import class_folders, encode_images

        paths, names = class_folders(trained_tiny_clip.train_dir)
        x = encode_images(model.encoder, load(run)[1], paths, workers=0, normalize=False).features.numpy()
        y = np.array([config["classes"].index(n) for n in names])
        with torch.no_grad():
            head = model.head(torch.from_numpy(x)).argmax(dim=1).numpy()
        assert np.array_equal(head, fit_probe(x, y).predict(x))


def test_with_a_moving_average_the_raw_and_averaged_weights_are_both_kept_and_differ(trained_tiny_clip, tmp_path):
    """train.ema_decay in classify mode: the averaged weights are the run's model, the trained ones lie beside them
    (model_raw), both the last epoch's — whichever classifier --val chose (the probe's export keeps them renamed)."""
    from safetensors.torch import load_file

    from mmcontrast.finetune import SELECTION_FILE

    run = tmp_path / "run"
    assert main(["finetune", "--train", str(trained_tiny_clip.train_dir), "--val", str(trained_tiny_clip.test_dir),
                 "--checkpoint", str(trained_tiny_clip.run_dir), "--output-dir", str(run), "--epochs", "2", "--batch-size", "16",
                 "--workers", "0", "--set", "train.ema_decay=0.5"]) == 0
    tuned = json.loads((run / SELECTION_FILE).read_text())["choice"] == "finetuned"
    averaged, raw = ("model.safetensors", "model_raw.safetensors") if tuned else \
        ("model_finetuned.safetensors", "model_finetuned_raw.safetensors")
    averaged, raw = load_file(str(run / averaged)), load_file(str(run / raw))
    assert averaged.keys() == raw.keys() and any(not torch.equal(averaged[k], raw[k]) for k in raw)
    assert not (run / "best.safetensors").exists()


def _bars(root: Path, per_class: int, seed: int) -> Path:
    """Two classes that only a horizontal flip tells apart: a bright bar in the left or in the right third."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, columns in (("left", slice(2, 10)), ("right", slice(22, 30))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(110, 12, (32, 32, 3))
            pixels[:, columns] += 90
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def test_the_choice_is_the_lowest_held_out_log_loss_not_the_highest_top1():
    """Each fold's log-loss is scikit-learn's; the candidate kept is the one whose held-out answers were surest of the
    truth, even where another's top-1 is higher (a fold of five images: top-1 moves in steps of 20 points), and a
    tie keeps the probe."""
    from sklearn.metrics import log_loss

    from mmcontrast.finetune import choose, fold_scores, summarise

    truth = np.array([0, 0, 1, 1, 2])
    sure = np.array([[0.9, 0.05, 0.05], [0.45, 0.5, 0.05], [0.05, 0.9, 0.05], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]])
    lucky = np.array([[0.4, 0.3, 0.3], [0.4, 0.3, 0.3], [0.3, 0.4, 0.3], [0.3, 0.4, 0.3], [0.3, 0.3, 0.4]])
    a, b = fold_scores(sure, truth), fold_scores(lucky, truth)
    assert a["loss"] == pytest.approx(log_loss(truth, sure)) and b["loss"] == pytest.approx(log_loss(truth, lucky))
    assert a["top1"] == pytest.approx(0.8) and b["top1"] == 1.0
    choice, reason = choose({"probe": summarise([b]), "patches": summarise([a]), "finetuned": None})
    assert choice == "patches" and "log-loss" in reason
    assert choose({"probe": summarise([a]), "patches": summarise([a]), "finetuned": summarise([a])})[0] == "probe"


def test_cross_validation_exports_the_probe_when_finetuning_hurts(trained_tiny_clip, tmp_path, capsys):
    """Bars on the left against bars on the right, fine-tuned with views that flip images left to right half the
    time: training is told both answers for every image, so fine-tuning must lose what the frozen features already
    separate; cross-validation sees it and the run exports the probe."""
    data, run = _bars(tmp_path / "bars", 12, 0), tmp_path / "run"
    assert main(["finetune", "--train", str(data), "--checkpoint", str(trained_tiny_clip.run_dir), "--output-dir", str(run),
                 "--epochs", "8", "--batch-size", "8", "--workers", "0", "--folds", "3", "--lr", "0.01",
                 "--set", "data.augment.hflip=0.5"]) == 0
    out = capsys.readouterr().out
    best = json.loads((run / "best.json").read_text())
    assert best["probe"]["top1"] >= 0.9 and best["finetuned"]["top1"] < best["probe"]["top1"]
    assert best["finetuned"]["loss"] > best["probe"]["loss"] and best["choice"] == "probe"
    assert "kept the frozen probe" in out
    assert not (run / "config.yaml").exists()  # nothing was refitted: the probe is the run's classifier


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
    fold = run / "cv" / "fold_0" / "metrics.jsonl"
    before = fold.read_text()
    assert main([*args, "--resume"]) == 0  # finished folds are read, not trained again
    assert fold.read_text() == before
    assert main([*args, "--epochs", "3", "--resume"]) == 0  # a longer recipe: each fold goes on from its checkpoint
    assert [json.loads(line)["step"] for line in fold.read_text().splitlines()] == [2, 4, 6]


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
          "--output-dir", str(tmp_path / "x"), "--image-size", "64"], "--image-size and --pool apply to timm:NAME"),
        (["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", "timm:resnet10t",
          "--output-dir", str(tmp_path / "y")], "needs its weights: --pretrained"),
        (["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", str(run), "--init", "zero-shot",
          "--output-dir", str(tmp_path / "z")], "--init zero-shot needs a CLIP checkpoint"),
        (["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", str(run), "--folds", "30",
          "--output-dir", str(tmp_path / "f")], "--folds 30 needs at least 30 labelled images per class"),
        (["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", str(run), "--classes", "red_square,blue_square",
          "--output-dir", str(tmp_path / "c")], "not in the list: its classes are"),
        (["finetune", "--train", str(trained_tiny_clip.train_dir), "--checkpoint", str(run), "--image-size", "huge",
          "--output-dir", str(tmp_path / "s")], "--image-size takes a number of pixels or native"),
    ]
    for argv, message in cases:
        assert main([*argv, "--quiet"] if argv[0] != "finetune" else argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def _grey_levels(root: Path, names: list[str], per_class: int = 8) -> Path:
    """One class per name: flat grey images, each class its own level (trivially separable), a little noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for level, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(20 + 20 * level, 2, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def test_numbered_class_folders_train_like_named_ones(tmp_path):
    """Folders 1, 2, 3 and 0 ... 10 are classes like any other: one class list (the names sorted as strings) decides every
    index — shards, training, scores, predictions — so they fine-tune as well as the same images in folders c00 ... c10
    (they crashed, or trained against shuffled labels, when the shards indexed digit folders by their value)."""
    torch.manual_seed(0)
    weights = tmp_path / "random.pt"
    torch.save(clf.models.ImageEncoder(clf.models.timm_encoder_spec("timm:resnet10t", 32)).backbone.state_dict(), weights)
    scores = {}
    for case, names in (("three", ["1", "2", "3"]), ("digits", [str(i) for i in range(11)]),
                        ("named", [f"c{i:02d}" for i in range(11)])):
        data = _grey_levels(tmp_path / case, names, per_class=24 if case == "three" else 8)  # as many steps as 11 classes
        run = tmp_path / f"run_{case}"
        assert main(["finetune", "--train", str(data), "--val", str(data), "--checkpoint", "timm:resnet10t", "--pretrained",
                     str(weights), "--image-size", "32", "--init", "random", "--epochs", "12", "--batch-size", "8",
                     "--lr", "0.01", "--workers", "0", "--output-dir", str(run)]) == 0
        scores[case] = json.loads((run / "best.json").read_text())["finetuned"]["top1"]
    assert scores["three"] >= 0.9 and scores["named"] >= 0.9
    assert abs(scores["digits"] - scores["named"]) <= 0.1, scores
