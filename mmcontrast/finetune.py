"""``mmcontrast finetune``: a labelled folder and any checkpoint into a run of the trainer's ``classify`` mode.

Owns preparing such a run — the validation split (``--val``, or a stratified, seeded tenth of ``--train`` held
out), the training shards (``data_tools.make_shards`` over class folders), the starting weights (the checkpoint's
encoder and a head from a linear probe on its frozen features — LP-FT — or from a CLIP checkpoint's class-name
embeddings, or random), class weights when classes are uneven, and the ``Config``. The training itself is the one
trainer (``mmcontrast.train``): resume, Accelerate, checkpoints, metrics and the nothing-lost guarantees are its.

Does not own the classifier model or its files (``classifier.py``, imported where used: ``mmcontrast --help``
stays free of torch) or the loop.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcontrast.config import Config
from mmcontrast.errors import UsageError

VAL_FRACTION = 0.1  # of --train held out for choosing the epoch when no --val is given
UNEVEN = 1.5  # largest class / smallest class above which the loss weighs classes by inverse frequency
START_DIR, DATA_DIR = "start", "data"  # RUN_DIR/start: starting weights; RUN_DIR/data: split folders and shards
HEAD_INITS = ("probe", "zero-shot", "random")  # --init: a linear probe (LP-FT), the class names (CLIP), random


@dataclass
class Settings:
    """What ``mmcontrast finetune`` asks for."""

    train_dir: str
    checkpoint: str
    output_dir: str
    val_dir: str | None = None
    pretrained: str | None = None
    epochs: int = 15
    lr: float = 1e-3  # the head's; the encoder's is lr × backbone_lr_scale
    backbone_lr_scale: float = 0.1
    batch_size: int = 32
    image_size: int | None = None
    init: str = "probe"
    templates: str = "default"
    seed: int = 0
    workers: int = 1


def _link_split(train_dir: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """Class folders of symlinks ``out/train`` and ``out/val``: a stratified ``VAL_FRACTION`` of every class
    (at least one image, never all) held out, seeded. Returns the two folders."""
    from mmcontrast.evaluate import class_folders

    paths, names = class_folders(train_dir)
    rng = random.Random(seed)
    for name in sorted(set(names)):
        members = sorted(p for p, n in zip(paths, names) if n == name)
        if len(members) < 2:
            raise UsageError(f"class {name!r} has {len(members)} image in {train_dir}: fine-tuning needs at least 2 per class "
                             "when a tenth is held out for validation (or give --val DIR)")
        rng.shuffle(members)
        n_val = min(len(members) - 1, max(1, round(VAL_FRACTION * len(members))))
        for split, chosen in (("val", members[:n_val]), ("train", members[n_val:])):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(chosen):
                link = folder / f"{i:06d}{path.suffix.lower()}"
                if not link.is_symlink():
                    link.symlink_to(Path(path).resolve())
    return out / "train", out / "val"


def _write_shards(train_dir: Path, shards: Path, seed: int) -> int:
    """Class folders to shards (labels from the folder names); returns the number of samples written."""
    from data_tools import make_shards

    if (shards / "stats.json").is_file():
        return json.loads((shards / "stats.json").read_text())["written"]
    code = make_shards.main([str(train_dir), str(shards), "--layout", "classes", "--follow-symlinks", "--seed", str(seed),
                             "--shard-size", "1000", "--workers", "1", *(["--resume"] if shards.exists() else [])])
    if code != 0:
        raise UsageError(f"could not write the training shards from {train_dir} (make_shards exit {code}); see above")
    return json.loads((shards / "stats.json").read_text())["written"]


def _class_weights(train_dir: Path, classes: list[str]) -> list[float] | None:
    """Inverse-frequency weights (mean 1) when the largest class is over ``UNEVEN`` times the smallest, else None."""
    from mmcontrast.evaluate import class_folders

    _, names = class_folders(train_dir)
    counts = np.array([names.count(c) for c in classes], dtype=np.float64)
    if counts.max() <= UNEVEN * counts.min():
        return None
    return (counts.sum() / (len(classes) * counts)).round(6).tolist()


def _start(s: Settings, train_dir: Path, classes: list[str], start: Path) -> Path:
    """The starting weights file: the checkpoint's encoder and the head ``s.init`` asks for."""
    from mmcontrast import classifier as clf

    spec, encoder_state = clf.starting_encoder(s.checkpoint, s.pretrained, s.image_size)
    head = None
    if s.init != "random":
        from mmcontrast.evaluate import class_folders, encode_images
        from mmcontrast.models import image_eval_transform

        encoder = clf.ImageClassifier(spec, classes).encoder
        encoder.load_state_dict(encoder_state)
        paths, names = class_folders(train_dir)
        encoded = encode_images(encoder.eval(), image_eval_transform(spec), paths, workers=0, normalize=False)
        features = encoded.features.numpy()
        if s.init == "probe":
            labels = np.array([classes.index(names[i]) for i in encoded.ok])
            head = clf.probe_head(features, labels, len(classes), s.seed)
        else:
            head = clf.zero_shot_head(s.checkpoint, s.pretrained, classes, s.templates,
                                      float(np.linalg.norm(features, axis=1).mean()))
    (start / "model_config.json").parent.mkdir(parents=True, exist_ok=True)
    (start / "model_config.json").write_text(json.dumps(clf.classifier_config(spec, classes), indent=2))
    return clf.write_start(start / "model.safetensors", spec, encoder_state, classes, head, s.seed)


def prepare(s: Settings) -> Config:
    """Split, shards and starting weights under ``s.output_dir`` (each kept when already there, so a prepared run
    resumes), and the ``classify`` run's ``Config`` (before ``--set`` overrides)."""
    from mmcontrast.evaluate import class_folders

    if s.init not in HEAD_INITS:
        raise UsageError(f"--init must be one of {', '.join(HEAD_INITS)}, got {s.init!r}")
    run = Path(s.output_dir)
    data = run / DATA_DIR
    if s.val_dir:
        train_dir, val_dir = Path(s.train_dir), Path(s.val_dir)
    else:
        train_dir, val_dir = _link_split(Path(s.train_dir), data / "split", s.seed)
    _, names = class_folders(train_dir)
    classes = sorted(set(names))
    if len(classes) < 2:
        raise UsageError(f"{s.train_dir} holds {len(classes)} class folder(s); a classifier needs at least 2")
    n_train = _write_shards(train_dir, data / "shards", s.seed)
    start = run / START_DIR
    if not (start / "model.safetensors").is_file():
        _start(s, train_dir, classes, start)
    return _config(s, start, data / "shards", val_dir, n_train, _class_weights(train_dir, classes))


def _config(s: Settings, start: Path, shards: Path, val_dir: Path, n_train: int, class_weights: list | None) -> Config:
    cfg = Config(mode="classify")
    steps_per_epoch = max(1, n_train // s.batch_size)
    cfg.model.name, cfg.model.pretrained = str(start / "model_config.json"), str(start / "model.safetensors")
    cfg.data.train_shards, cfg.data.workers = str(shards), s.workers
    cfg.data.augment.preset = "finetune"
    cfg.model.sync_batchnorm = False  # frozen BatchNorm (model.frozen_batchnorm) has no batch statistics to share
    cfg.loss.class_weights = class_weights
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas = s.lr, 0.05, [0.9, 0.999]
    cfg.optim.lr_scale = {"image": s.backbone_lr_scale, "head": 1.0}
    cfg.optim.warmup_steps = steps_per_epoch  # one epoch: a probe-initialised head is not moved hard at first
    cfg.train.output_dir, cfg.train.epochs, cfg.train.batch_size, cfg.train.seed = s.output_dir, s.epochs, s.batch_size, s.seed
    cfg.log.every = cfg.log.eval_every = steps_per_epoch  # a record and a validation per epoch
    cfg.log.checkpoint_every = steps_per_epoch * max(1, math.ceil(s.epochs / 5))
    cfg.log.eval_images = str(val_dir)
    cfg.log.diagnostics_every = 0
    cfg.log.trackers = []
    return cfg
