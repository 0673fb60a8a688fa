"""Which views keep the label (`mmcontrast views`, `data.augment.preset=auto`): a view that destroys the class is ranked
last and never chosen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcontrast.cli import main
from mmcontrast.config import AugmentConfig, resolve_augment
from mmcontrast.views import OFF, candidate_views


def _stripes(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    """Horizontal against vertical stripes: a quarter turn swaps the classes, crops, flips and colour keep them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("horizontal", "vertical"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            period, phase = rng.integers(4, 8), rng.integers(0, 8)
            wave = 128 + 90 * np.sign(np.sin(2 * np.pi * (np.arange(32) + phase) / period))
            pixels = np.repeat(wave[:, None], 32, axis=1) if name == "horizontal" else np.repeat(wave[None, :], 32, axis=0)
            pixels = np.stack([pixels] * 3, axis=-1) + rng.normal(0, 10, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def random_resnet(tmp_path_factory) -> Path:
    """Random-init ResNet-10t weights in timm's layout: random convolutions see orientation well enough."""
    from mmcontrast.models import ImageEncoder, timm_encoder_spec

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random.pt"
    torch.save(ImageEncoder(timm_encoder_spec("timm:resnet10t", 32)).backbone.state_dict(), path)
    return path


def test_candidates_are_every_preset_and_each_part_that_changes_an_image():
    views = candidate_views()
    overhead = AugmentConfig(preset="overhead")
    resolve_augment(overhead)
    assert views["overhead"]["rot90"] is True and views["overhead"]["crop_scale"] == overhead.crop_scale
    assert views["overhead:rot90"] == {**OFF, "rot90": True}  # a part: that field kept, everything else off
    assert not any(v == OFF for v in views.values())
    parts = [v for name, v in views.items() if ":" in name]
    assert len(parts) == len({json.dumps(v, sort_keys=True) for v in parts})  # a part shared by presets is measured once


def test_a_view_that_destroys_the_label_is_ranked_last_and_not_chosen(random_resnet, tmp_path, capsys):
    data = _stripes(tmp_path / "stripes")
    out = tmp_path / "views.json"
    assert main(["views", "--train", str(data), "--checkpoint", "timm:resnet10t", "--pretrained", str(random_resnet),
                 "--image-size", "32", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["clean"]["top1"] >= 0.9
    names = [v["name"] for v in result["views"]]  # least loss first
    rot90 = {"overhead", "inspection", "overhead:rot90"}  # every view that turns images a quarter
    assert set(names[-len(rot90):]) == rot90 and result["views"][-1]["loss"] > 0.2
    assert result["chosen"] is not None and result["chosen"] not in rot90
    assert f"strongest preset that keeps the label: {result['chosen']}" in capsys.readouterr().out


def test_views_bad_inputs_are_one_line_and_exit_2(random_resnet, tmp_path, capsys):
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    _stripes(tmp_path / "s", per_class=1)
    cases = [(["views", "--train", str(tmp_path / "nope"), "--checkpoint", "timm:resnet10t"], "no such folder"),
             (["views", "--train", str(tmp_path / "s"), "--checkpoint", "timm:resnet10t", "--pretrained", str(random_resnet),
               "--image-size", "32"], "at least 2 labelled images in every class")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
