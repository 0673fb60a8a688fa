"""mmcontrast.models: weights saved from wrapped models (DDP's ``module.``, torch.compile's ``_orig_mod.``) load."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from mmcontrast import loading, models


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_a_checkpoint_of_a_ddp_wrapped_model_loads_as_the_run_dir(one_process_group, tmp_path):
    torch.manual_seed(0)
    bundle = models.create_clip("mmc-tiny")
    run = tmp_path / "run"
    models.save_clip_run_files(bundle.model, bundle.model_cfg, run, bundle.tokenizer, weights=False)  # as at start-up
    wrapped = nn.parallel.DistributedDataParallel(bundle.model)
    state = {k: v.detach().contiguous() for k, v in wrapped.state_dict().items()}
    assert all(k.startswith("module.") for k in state)
    last = run / "checkpoints" / "last"
    last.mkdir(parents=True)
    save_file(state, str(last / models.WEIGHTS_FILE))  # what Accelerate's save_state writes for a DDP model on GPUs

    loaded, _, tokenizer = loading.load(run)  # a run still training: checkpoints/last
    images, text = torch.randn(2, 3, 32, 32), tokenizer(["a red circle", "a blue square"])
    bundle.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), bundle.model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(text), bundle.model.encode_text(text), rtol=0, atol=0)


def test_compiled_and_wrapped_prefixes_are_stripped():
    state = {"module._orig_mod.visual.proj": torch.ones(1), "_orig_mod.logit_scale": torch.zeros(()),
             "encoder._orig_mod.backbone.w": torch.ones(2), "text.proj": torch.ones(1)}  # fmt: skip
    assert sorted(models.strip_wrapper_prefixes(state)) == ["encoder.backbone.w", "logit_scale", "text.proj", "visual.proj"]


# ---------------------------------------------------------------- model.pretrained: where fine-tuning starts


def _clip_cfg(pretrained, name: str = "mmc-tiny"):
    from mmcontrast.config import Config

    cfg = Config()
    cfg.model.name, cfg.model.pretrained, cfg.log.diagnostics_every = name, str(pretrained), 0
    return cfg


def test_model_pretrained_takes_an_open_clip_checkpoint_a_run_and_its_weights_file(tmp_path):
    """open_clip's trainer writes ``{"epoch", "name", "state_dict": {"module." + key: ...}, "optimizer"}``; a run
    writes ``model.safetensors``: both start a clip run with those weights, and so does the run dir itself."""
    from mmcontrast.tasks import build_task

    torch.manual_seed(1)
    start = models.create_clip("mmc-tiny")
    state = start.model.state_dict()
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "epoch_3.pt")  # fmt: skip
    models.save_clip_run_files(start.model, start.model_cfg, tmp_path / "run", start.tokenizer)
    for pretrained in (tmp_path / "epoch_3.pt", tmp_path / "run" / models.WEIGHTS_FILE, tmp_path / "run"):
        loaded = build_task(_clip_cfg(pretrained)).model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), pretrained


def test_model_pretrained_of_another_architecture_names_the_first_tensor_that_differs(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mmcontrast.errors import UsageError
    from mmcontrast.tasks import build_task

    start = models.create_clip("mmc-tiny")
    models.save_clip_run_files(start.model, start.model_cfg, tmp_path / "run", start.tokenizer)
    wider = {**start.model_cfg, "embed_dim": 32}
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    with pytest.raises(UsageError, match=r"text_projection has shape \[64, 32\] in the model but \[64, 64\] in the file"):
        build_task(_clip_cfg(tmp_path / "run", str(tmp_path / "wider.json")))
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "mmcontrast.train", "--config", str(root / "configs" / "clip_tiny_cpu.yaml"),
                        "--train-shards", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--model", str(tmp_path / "wider.json"),
                        "--set", f"model.pretrained={tmp_path / 'run' / models.WEIGHTS_FILE}", "--print-lr-groups"],
                       cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "text_projection has shape" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_locked_timm_encoder_in_simclr_mode_trains_its_top_only_and_keeps_its_statistics(tmp_path):
    """``model.lock_image`` with ``lock_image_unlocked_groups`` (continued pretraining from ImageNet weights): after
    training steps the locked groups' weights and BatchNorm statistics are the file's, the unlocked top moved, and
    the export loads into a plain, unlocked encoder; more unlocked groups than the model has is a usage error."""
    from safetensors.torch import load_file

    from mmcontrast.config import Config
    from mmcontrast.errors import UsageError
    from mmcontrast.tasks import build_task

    torch.manual_seed(0)
    spec = models.image_encoder_spec("timm:mobilenetv3_small_050", {}, cifar_stem=False, image_size=32)
    start = models.ImageEncoder(spec)
    for module in start.modules():  # statistics that differ from a fresh model's, as ImageNet's do
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, tmp_path / "start.safetensors")
    cfg = Config(mode="simclr")
    cfg.model.name, cfg.model.pretrained, cfg.data.augment.image_size = "timm:mobilenetv3_small_050", str(tmp_path / "start.safetensors"), 32
    cfg.model.lock_image, cfg.model.lock_image_unlocked_groups = True, 2
    task = build_task(cfg)
    probe = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # locking changes nothing the encoder computes (timm's fused BatchNorm activations kept)
        torch.testing.assert_close(task.model.encoder.eval()(probe), start.eval()(probe))
    model = task.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        view1, view2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32) + 1.0
        task.loss(model(view1, view2), None).backward()
        optimizer.step(), optimizer.zero_grad()

    before, after = start.state_dict(), model.encoder.state_dict()
    assert all(k.endswith("num_batches_tracked") for k in before.keys() - after.keys())  # FrozenBatchNorm keeps no count
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("backbone.blocks.5.", "backbone.conv_head.")) for k in moved), sorted(moved)
    assert "backbone.blocks.0.0.bn1.running_mean" not in moved and "backbone.conv_stem.weight" not in moved
    exported = tmp_path / "run"
    task.export(model, exported, weights=True)
    plain = models.ImageEncoder(spec)
    plain.load_state_dict(load_file(exported / models.WEIGHTS_FILE), strict=True)
    assert torch.equal(plain.state_dict()["backbone.blocks.0.0.bn1.running_var"], before["backbone.blocks.0.0.bn1.running_var"])

    n_groups = 1 + max(__import__("timm").models.group_parameters(plain.backbone, plain.backbone.group_matcher()))
    for unlocked in (0, n_groups, -1):  # nothing to pretrain; nothing locked; nonsense
        with pytest.raises(UsageError, match=f"lock_image_unlocked_groups={unlocked}: mobilenetv3_small_050 has {n_groups} layer groups"):
            models.ImageEncoder(spec).lock(unlocked)
    models.ImageEncoder(spec).lock(n_groups - 1)  # all but the stem train


def test_a_locked_open_clip_vit_trains_its_last_groups_only():
    """An open_clip vision tower locks by open_clip's own groups (embeddings, each block, the last block with the
    final norm, the projection): 2 unlocked groups leave the last block, ln_post and proj training."""
    from mmcontrast.errors import UsageError

    encoder = models.ImageEncoder(models.image_encoder_spec("configs/models/mmc-tiny.json", {}, cifar_stem=False))
    encoder.lock(2)
    last = len(encoder.backbone.transformer.resblocks) - 1
    training = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert training and all(n.startswith((f"backbone.transformer.resblocks.{last}.", "backbone.ln_post.", "backbone.proj")) for n in training)
    assert "backbone.proj" in training and f"backbone.transformer.resblocks.{last - 1}.attn.in_proj_weight" not in training
    with pytest.raises(UsageError, match=f"has {last + 3} layer groups, so leave 1 to {last + 2}"):
        models.ImageEncoder(encoder.spec).lock(last + 3)


def test_a_timm_encoder_pools_as_asked_and_a_clip_refuses_the_flag(tmp_path, capsys):
    """--pool max: the encoder's feature is the maximum of its last feature map over positions (a small strong
    response is kept, not averaged away); the spec carries it, so an exported run keeps it. A SimCLR run's encoder
    takes --pool and --image-size too; an open_clip model: exit 2."""
    import torch
    from PIL import Image

    from mmcontrast.cli import main
    from mmcontrast.loading import load

    torch.manual_seed(0)
    import argparse

    from mmcontrast.cli.common import pool_argument

    parser = argparse.ArgumentParser()
    pool_argument(parser)
    assert tuple(parser._actions[-1].choices) == models.POOLS  # the CLI names them without importing torch
    encoder = models.ImageEncoder(models.timm_encoder_spec("timm:resnet10t", 32, pool="max")).eval()
    assert encoder.spec["timm_kwargs"]["global_pool"] == "max"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder.encode_image(x), encoder.backbone.forward_features(x).amax(dim=(2, 3)))
        average = models.ImageEncoder(models.timm_encoder_spec("timm:resnet10t", 32))
        average.load_state_dict(encoder.state_dict())
        assert torch.allclose(average.eval().encode_image(x), encoder.backbone.forward_features(x).mean(dim=(2, 3)), atol=1e-6)
    # a SimCLR run's timm encoder takes another size and pooling, its weights unchanged; an open_clip model takes neither
    models.save_image_encoder_files(average, tmp_path / "simclr_run")
    resized, preprocess, _ = load(str(tmp_path / "simclr_run"), image_size=48, pool="max")
    assert resized.spec["image_size"] == 48 and resized.spec["timm_kwargs"]["global_pool"] == "max"
    assert preprocess(Image.new("RGB", (100, 70))).shape == (3, 48, 48)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(resized.encode_image(x), average.backbone.forward_features(x).amax(dim=(2, 3)))
    (tmp_path / "a" / "x").mkdir(parents=True)
    assert main(["eval", "linear-probe", "--checkpoint", "mmc-tiny", "--pool", "max", "--train", str(tmp_path / "a"),
                 "--test", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --image-size and --pool apply to timm:NAME and image-only")
