"""The patch classifier (mmcontrast/patches.py, classifier.PatchClassifier): region banks per class, filled from
unlabelled images, stacked with the frozen probe, chosen by finetune's cross-validation when its log-loss is lower, and
read back by every command that loads a classifier run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcontrast import classifier as clf
from mmcontrast import patches
from mmcontrast.cli import main


def _checkers(root: Path, per_class: int, seed: int, flat: bool = False) -> Path:
    """Grey noise cells, 128 px; a "defect" cell has one small high-contrast checkerboard (12 px) somewhere: a local
    defect that pooled features dilute. ``flat``: no class folders, both kinds mixed (unlabelled images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    checker = 100 * (np.indices((12, 12)).sum(0) % 2 * 2 - 1)
    for name in ("defect", "good"):
        folder = root if flat else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(120, 25, (128, 128))
            if name == "defect":
                y, x = rng.integers(4, 112, 2)
                pixels[y:y + 12, x:x + 12] += checker
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB").save(folder / f"{name}{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def checkers(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkers")
    torch.manual_seed(0)
    weights = root / "random.pt"
    torch.save(clf.models.ImageEncoder(clf.models.timm_encoder_spec("timm:resnet10t", 128)).backbone.state_dict(), weights)
    model = ["--checkpoint", "timm:resnet10t", "--pretrained", str(weights), "--image-size", "128", "--workers", "0"]
    return {"train": _checkers(root / "train", 16, 0), "test": _checkers(root / "test", 20, 1),
            "unlabelled": _checkers(root / "unlabelled", 30, 2, flat=True), "model": model, "root": root}


def test_a_local_defect_is_found_by_the_region_banks_and_the_run_reads_back(checkers, capsys):
    run = checkers["root"] / "run"
    assert main(["finetune", "--train", str(checkers["train"]), "--output-dir", str(run), "--epochs", "0", "--folds", "3",
                 "--unlabelled", str(checkers["unlabelled"]), *checkers["model"]]) == 0
    out = capsys.readouterr().out
    best = json.loads((run / "best.json").read_text())
    # random-init features: the pooled probe finds most checkers, the region banks more (CV: 87.6% against 93.9%)
    assert best["patches"]["top1"] > best["probe"]["top1"] and best["patches"]["loss"] < best["probe"]["loss"]
    assert best["finetuned"] is None
    assert best["choice"] == "patches" and "kept the patch classifier" in out, out
    assert "60 images of --unlabelled" in best["patches_note"]
    config = json.loads((run / "model_config.json").read_text())[clf.CLASSIFIER_KEY]
    assert config["patches"]["region_dim"] > 0 and len(config["patches"]["bank_sizes"]) == len(config["patches"]["bank_classes"])
    # noise cells are all alike: a checker is far from every region of the good cells' bank, which must be read
    assert "good" in config["patches"]["bank_classes"] and "the stacking probe reads" in best["patches_note"]
    # The run is a classifier every command loads: held-out cells scored through eval classifier.
    assert main(["eval", "classifier", "--images", str(checkers["test"]), "--checkpoint", str(run), "--workers", "0",
                 "--precision", "fp32"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["top1"] >= 0.85, scored


def test_the_exported_classifier_predicts_what_the_fit_does(checkers):
    """The files hold the fit: the loaded PatchClassifier's logits on held-out cells equal the stacking probe's on the
    fit's own features (the probe's logits and the distances to its banks), refitted here as finetune fits it."""
    from mmcontrast import finetune
    from mmcontrast.labelled import labelled_images, starting_encoder

    run = checkers["root"] / "run"
    model, preprocess, _ = clf.load_classifier(json.loads((run / "model_config.json").read_text()), run / "model.safetensors", "cpu")
    assert isinstance(model, clf.PatchClassifier)
    settings = finetune.Settings(str(checkers["train"]), "timm:resnet10t", str(run), pretrained=checkers["model"][3],
                                 image_size=128, unlabelled_dir=str(checkers["unlabelled"]))
    classes, labelled = labelled_images(settings.train_dir, None)
    enc = finetune.Encoder(*starting_encoder(settings.checkpoint, settings.pretrained, 128, None))
    data, _ = finetune.patch_set(settings, enc, classes, labelled)
    fitted = patches.fit(data, np.arange(len(labelled.paths)))
    paths = sorted((checkers["test"] / "defect").iterdir()) + sorted((checkers["test"] / "good").iterdir())
    pooled, regions, _, _ = patches.encode(model.encoder, preprocess, paths)
    indexes = [patches.flat_index(bank) for bank in fitted.banks(data)]
    distances = np.array([[float(patches.nearest(r.float(), index).amax()) for index in indexes] for r in regions])
    expected = fitted.stack.decision(patches.stack_inputs(fitted.logits(pooled), distances))
    np.testing.assert_allclose(patches.score_images(fitted, data, pooled, regions),  # --val's path
                               fitted.stack.scores(patches.stack_inputs(fitted.logits(pooled), distances), data.n_classes), rtol=1e-3, atol=1e-5)
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        logits = model.logits(images).numpy()
    # the reference's query regions went through float16 (how the fit keeps them); the model's are float32
    np.testing.assert_allclose(logits, expected, rtol=1e-2, atol=2e-2)
    assert (logits.argmax(1) == expected.argmax(1)).all()
    model.to(torch.bfloat16)  # what --precision auto does to an encoder on a bf16 CPU: the banks stay exact
    assert {bank.dtype for bank in model.memory.banks} == {torch.float32}


def test_pseudo_members_leave_out_the_least_confident_quarter_of_each_class():
    assert patches.PSEUDO_SHARE == 0.75
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.1, 0.9], [0.3, 0.7]])
    defect, good = patches.pseudo_members(probabilities, 2)
    assert defect.tolist() == [0, 1] and good.tolist() == [2, 4, 5]  # row 3 (0.55) is the least sure "good"


def test_separation_is_the_roc_auc_of_each_class_from_its_own_bank_and_only_separating_banks_are_read():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    distances = rng.gamma(2.0, 1.0, (60, 3))
    distances[labels == 1, 1] *= 0.3  # class 1's images lie near their own bank; 0 and 2 do not
    distances[:4, 0] = distances[4, 0]  # ties count half
    got = patches.separation(distances, labels)
    np.testing.assert_allclose(got, [roc_auc_score(labels == k, -distances[:, k]) for k in range(3)])
    assert got[1] > 0.9 and patches.read_banks(got).tolist() == [1]
    assert patches.read_banks(np.array([0.3, 0.55, 0.5])).tolist() == [1]  # none separates: the best one is still read
    assert patches.read_banks(np.array([0.7, 0.2, 0.65])).tolist() == [0, 2]
    assert np.isnan(patches.separation(distances[labels != 2], labels[labels != 2])[2])  # no image of class 2
    assert patches.read_banks(np.array([0.4, np.nan])).tolist() == [0]


def test_a_run_exported_with_a_bank_per_class_still_loads(tmp_path):
    """Runs written before banks were chosen have no ``bank_classes``: a bank per class, in class order, read back
    from their files; a config whose banks are not distinct classes of its own is one clear error."""
    from safetensors.torch import save_file

    spec = clf.models.timm_encoder_spec("timm:resnet10t", 64)
    torch.manual_seed(0)
    old = clf.PatchClassifier(spec, ["a", "b"], [5, 7], 12)
    old.memory.fill([torch.randn(5, 12), torch.randn(7, 12)])
    config = clf.classifier_config(spec, ["a", "b"], {"bank_sizes": [5, 7], "region_dim": 12})
    save_file(clf.models.state_dict_for_file(old), tmp_path / "model.safetensors")
    loaded, _, _ = clf.load_classifier(config, tmp_path / "model.safetensors", "cpu")
    assert loaded.bank_classes == ["a", "b"] and loaded.stack.in_features == 4
    assert torch.equal(loaded.memory.banks[1], old.memory.banks[1])
    chosen = clf.PatchClassifier(spec, ["a", "b", "c"], [5], 12, ["b"])
    assert chosen.stack.in_features == 4 and len(chosen.memory.banks) == 1
    for banks, sizes in ((["z"], [5]), (["a", "a"], [5, 5]), ([], [])):
        with pytest.raises(clf.UsageError, match="must name"):
            clf.PatchClassifier(spec, ["a", "b"], sizes, 12, banks)


def test_regions_leave_each_image_out_of_its_own_bank():
    torch.manual_seed(0)
    regions = torch.randn(5, 9, 4).half()
    pairwise = patches.Regions(regions).compute_pairwise()
    assert torch.isinf(pairwise[2, 2]).all()
    np.testing.assert_allclose(pairwise[1, 3].float().numpy(), patches.nearest(regions[1].float(), regions[3].float()).numpy(),
                               rtol=2e-3, atol=2e-3)


def test_bad_unlabelled_folders_are_one_line_and_exit_2(checkers, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["finetune", "--train", str(checkers["train"]), "--epochs", "0", "--folds", "3", *checkers["model"]]
    assert main([*base, "--output-dir", str(tmp_path / "a"), "--unlabelled", str(empty)]) == 2
    assert main([*base, "--output-dir", str(tmp_path / "b"), "--unlabelled", str(checkers["train"] / "good")]) == 2
    assert main([*base, "--output-dir", str(tmp_path / "c"), "--unlabelled", str(tmp_path / "missing")]) == 2
    assert main([*base, "--output-dir", str(tmp_path / "d"), "--folds", "17"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 4 and "no images" in lines[0] and "one of --train's" in lines[1] and "--folds 17" in lines[3], err
