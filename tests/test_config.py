"""Config schema: YAML, flags and --set overrides, type coercion, and user-facing errors."""

from __future__ import annotations

import math

import pytest

from mmcontrast.config import Config, apply_overrides, load_config, validate
from mmcontrast.errors import UsageError
from mmcontrast.optim import lr_factor, param_groups
from mmcontrast.train import config_from_args


def test_shipped_configs_load_and_validate(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_config(path)
        cfg.train.output_dir, cfg.data.train_shards = str(tmp_path), "shards/"
        if cfg.train.steps is None and cfg.train.epochs is None:
            cfg.train.steps = 10
        if cfg.model.lock_image and not cfg.model.pretrained:  # a config that continues from weights the user gives
            cfg.model.pretrained = "weights.safetensors"
        validate(cfg)


def test_flags_and_overrides_are_typed(tmp_path):
    cfg = config_from_args([
        "--config", "configs/clip_tiny_cpu.yaml", "--train-shards", "s/", "--output-dir", str(tmp_path),
        "--epochs", "3", "--lr", "2e-4", "--set", "optim.betas=[0.9, 0.95]", "--set", "optim.eps=1e-8",
        "--set", "model.lock_text=true", "--set", "train.seed=7",
    ])  # fmt: skip
    assert cfg.train.epochs == 3 and cfg.train.steps is None  # --epochs replaces the config's steps
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == [0.9, 0.95] and cfg.optim.eps == 1e-8
    assert cfg.model.lock_text is True and cfg.train.seed == 7


def test_yaml_no_is_the_string_no_where_a_string_is_expected(tmp_path):
    """YAML 1.1 reads a bare `no` as false; `mixed_precision: no` must still mean Accelerate's "no"."""
    cfg = Config()
    apply_overrides(cfg, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["optim.nope=1"], "unknown config key"),
        (["nope=1"], "unknown config key"),
        (["train.batch_size=1.5"], "expects int"),
        (["train.resume=maybe"], "expects bool"),
        (["optim"], "key.sub=value"),
    ],
)
def test_bad_overrides_are_usage_errors(overrides, needle):
    with pytest.raises(UsageError, match=needle):
        apply_overrides(Config(), overrides)


def test_unknown_yaml_key_names_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(UsageError, match=r"optim\.learning_rate.*lr"):
        load_config(path)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"mode": "byol"}, "mode must be"),
        ({"loss.name": "nt_xent"}, "does not fit mode clip"),
        ({"train.steps": None}, "how long to train"),
        ({"train.epochs": 2}, "either --steps or --epochs"),
        ({"train.output_dir": ""}, "--output-dir"),
        ({"log.eval_every": -5}, "must be 0 \\(off\\) or a number of steps"),
        ({"log.eval_every": 10}, "needs log.eval_images"),
        ({"mode": "simclr", "model.lock_image": True}, "would freeze randomly initialised layers"),
        ({"mode": "simclr", "model.lock_image": True, "model.pretrained": "w.safetensors"}, "needs model.lock_image_unlocked_groups >= 1"),
        ({"mode": "simclr", "model.lock_image": True, "model.pretrained": "w.safetensors", "model.lock_image_unlocked_groups": 2,
          "train.fsdp": True}, "model.lock_image and train.fsdp together"),
    ],
)
def test_validate_rejects_inconsistent_configs(change, needle):
    cfg = Config()
    cfg.train.steps, cfg.train.output_dir, cfg.data.train_shards = 10, "runs/x", "shards/"
    apply_overrides(cfg, [f"{k}={'null' if v is None else v}" for k, v in change.items()])
    with pytest.raises(UsageError, match=needle):
        validate(cfg)


def test_schedule_warms_up_then_follows_a_cosine():
    assert lr_factor(0, 10, 111) == pytest.approx(0.1)
    assert lr_factor(9, 10, 111) == pytest.approx(1.0)
    assert lr_factor(60, 10, 111) == pytest.approx(0.5)
    assert lr_factor(110, 10, 111) == pytest.approx(0.0)  # the last of 111 steps ends the schedule
    assert lr_factor(35, 10, 111, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(110, 10, 111, min_ratio=0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_embeddings_and_logit_scale():
    from mmcontrast.models import create_clip

    model = create_clip("mmc-tiny").model
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "positional_embedding", "visual.class_embedding", "visual.positional_embedding"} <= no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "token_embedding.weight" in {names[id(p)] for p in decay["params"]}


def test_eval_every_unset_means_every_checkpoint_when_there_are_eval_images():
    for images, expected in ((None, 0), ("some/folder", 50)):
        cfg = Config()
        cfg.train.output_dir, cfg.data.train_shards, cfg.train.steps = "x", "y", 1
        cfg.log.eval_every, cfg.log.eval_images, cfg.log.checkpoint_every = None, images, 50
        validate(cfg)
        assert cfg.log.eval_every == expected


def test_the_imagenet_simclr_config_builds_with_its_top_training(tmp_path):
    """configs/simclr_imagenet_cpu.yaml with an EfficientNet-Lite0 weights file (random here; ImageNet's in use):
    the stem and first blocks frozen, the top and the projection head training."""
    from pathlib import Path

    from safetensors.torch import save_file

    from mmcontrast import models
    from mmcontrast.tasks import build_task

    encoder = models.ImageEncoder(models.image_encoder_spec("timm:efficientnet_lite0", {}, cifar_stem=False, image_size=160))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, tmp_path / "w.safetensors")
    cfg = load_config(Path(__file__).parents[1] / "configs" / "simclr_imagenet_cpu.yaml")
    cfg.train.output_dir, cfg.data.train_shards, cfg.model.pretrained = str(tmp_path), "shards/", str(tmp_path / "w.safetensors")
    validate(cfg)
    training = {name for name, p in build_task(cfg).model.named_parameters() if p.requires_grad}
    assert "encoder.backbone.conv_head.weight" in training and "encoder.backbone.blocks.6.0.conv_pw.weight" in training
    assert "encoder.backbone.conv_stem.weight" not in training and "encoder.backbone.blocks.3.0.conv_pw.weight" not in training
    assert any(name.startswith("head.") for name in training)
