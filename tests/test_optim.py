"""Learning rates per kind of parameter and per layer (optim.lr_scale, optim.layer_decay), read from the optimizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmcontrast import models
from mmcontrast.optim import build_optimizer, lr_table, set_lr
from mmcontrast.tasks import _clip_kind, _head_or_image

ROOT = Path(__file__).resolve().parents[1]


def _lrs(model, optimizer) -> dict[str, float]:
    """Each trainable parameter's learning rate, as the optimizer holds it."""
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {name: lr_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def test_layer_decay_gives_the_formulas_learning_rates_in_an_open_clip_vit_and_text_transformer():
    """mmc-tiny: 2 blocks per tower, so the top (final norm, projection) is depth 0, block 1 depth 1, block 0 depth
    2, the embeddings depth 3; lr = lr x lr_scale[kind] x layer_decay ** depth."""
    model = models.create_clip("mmc-tiny").model
    depths = models.layer_depths(model, _clip_kind)
    expected = {"visual.proj": 0, "visual.ln_post.weight": 0, "visual.transformer.resblocks.1.attn.in_proj_weight": 1,
                "visual.transformer.resblocks.0.mlp.c_fc.weight": 2, "visual.conv1.weight": 3, "visual.class_embedding": 3,
                "visual.positional_embedding": 3, "visual.ln_pre.bias": 3, "text_projection": 0, "ln_final.weight": 0,
                "transformer.resblocks.1.ln_2.weight": 1, "transformer.resblocks.0.ln_1.bias": 2, "token_embedding.weight": 3,
                "positional_embedding": 3, "logit_scale": 0}  # fmt: skip
    assert {name: depths[name] for name in expected} == expected
    scale = {"image": 1.0, "text": 0.5, "logit_scale": 2.0}
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.1, [0.9, 0.98], 1e-6, 0.9, scale, _clip_kind, 0.6, depths.__getitem__)
    set_lr(optimizer, 1e-3, 0.5)
    for name, lr in _lrs(model, optimizer).items():
        assert lr == pytest.approx(5e-4 * scale[_clip_kind(name)] * 0.6 ** depths[name]), name
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(model.visual.conv1.weight)] == 0.1 and decay_of[id(model.visual.ln_pre.bias)] == 0.0  # as before


def test_timm_towers_decay_by_timms_own_grouping_and_huggingface_text_towers_by_their_layers():
    """A timm ResNet (open_clip's visual.trunk) grouped by timm's group_matcher: stem, then each block; a
    HuggingFace MiniLM (6 layers): embeddings 7, layer i at 6 - i, the projection 0."""
    model = models.create_clip("mmc-tiny-timm-hf").model
    depths = models.layer_depths(model, _clip_kind)
    assert depths["visual.trunk.conv1.weight"] == 8 and depths["visual.trunk.layer1.0.conv1.weight"] == 7
    assert depths["visual.trunk.layer4.1.conv2.weight"] == 0 and depths["visual.head.proj.weight"] == 0
    assert depths["text.transformer.embeddings.word_embeddings.weight"] == 7
    assert depths["text.transformer.encoder.layer.0.attention.self.query.weight"] == 6
    assert depths["text.transformer.encoder.layer.5.output.dense.weight"] == 1 and depths["text.proj.weight"] == 0
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.1, [0.9, 0.98], 1e-6, 0.9, None, _clip_kind, 0.75, depths.__getitem__)
    set_lr(optimizer, 2e-3, 1.0)
    for name, lr in _lrs(model, optimizer).items():
        assert lr == pytest.approx(2e-3 * 0.75 ** depths[name]), name


def test_a_timm_encoder_with_a_head_and_the_table_of_what_each_depth_gets():
    from mmcontrast.classifier import ImageClassifier

    model = ImageClassifier({"source": "timm", "name": "resnet10t", "timm_kwargs": {}, "cifar_stem": False, "image_size": 32,
                             "mean": [0.5] * 3, "std": [0.5] * 3}, ["a", "b"])  # fmt: skip
    depths = models.layer_depths(model, _head_or_image)
    assert depths["head.weight"] == 0 and depths["encoder.backbone.layer4.0.conv1.weight"] == 0
    assert depths["encoder.backbone.conv1.0.weight"] == 4  # stem, then 4 stages of one block
    optimizer = build_optimizer(model, "lars", 1.0, 0.0, [0.9, 0.98], 1e-6, 0.9, {"head": 10.0}, _head_or_image, 0.5, depths.__getitem__)
    set_lr(optimizer, 0.1, 1.0)
    rows = lr_table(model, optimizer, _head_or_image, depths.__getitem__)
    assert [(r["kind"], r["depth"]) for r in rows] == [("head", 0)] + [("image", d) for d in range(5)]
    assert rows[0]["lr"] == pytest.approx(1.0) and [r["lr"] for r in rows[1:]] == pytest.approx([0.1 * 0.5**d for d in range(5)])
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())


def test_layer_decay_one_keeps_the_groups_it_had():
    """optim.layer_decay=1 (the default) groups as before it existed: runs made earlier resume their optimizer."""
    model = models.create_clip("mmc-tiny").model
    depths = models.layer_depths(model, _clip_kind)
    plain = build_optimizer(model, "adamw", 1e-3, 0.1, [0.9, 0.98], 1e-6, 0.9)
    off = build_optimizer(model, "adamw", 1e-3, 0.1, [0.9, 0.98], 1e-6, 0.9, None, _clip_kind, 1.0, depths.__getitem__)
    assert len(plain.param_groups) == 2  # weight decay or not
    assert [len(g["params"]) for g in plain.param_groups] == [len(g["params"]) for g in off.param_groups]


def test_print_lr_groups_prints_each_kind_and_depth_and_exits():
    """No shards or output dir needed: it reads and writes nothing."""
    r = subprocess.run([sys.executable, "-m", "mmcontrast.train", "--config", str(ROOT / "configs" / "clip_tiny_cpu.yaml"),
                        "--print-lr-groups", "--lr", "1e-3", "--set", "optim.layer_decay=0.5", "--set", "optim.lr_scale={text: 0.1}"],
                       cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {tuple(line.split()[:2]): line.split() for line in r.stdout.splitlines()[1:]}
    assert set(rows) == {("image", d) for d in "0123"} | {("text", d) for d in "0123"} | {("logit_scale", "0")}
    assert float(rows[("image", "2")][4]) == pytest.approx(2.5e-4) and float(rows[("text", "3")][4]) == pytest.approx(1.25e-5)


def test_layer_decay_out_of_range_is_a_usage_error():
    from mmcontrast.config import Config, validate
    from mmcontrast.errors import UsageError

    cfg = Config()
    cfg.train.output_dir, cfg.data.train_shards, cfg.train.steps, cfg.optim.layer_decay = "x", "y", 1, 1.5
    with pytest.raises(UsageError, match="optim.layer_decay"):
        validate(cfg)
