"""``mmcontrast.load``: any checkpoint the commands take, above the rooms that know each kind.

A fine-tuned classifier (``classifier``) is told apart from everything ``models`` loads (CLIP runs, SimCLR encoders,
open_clip names, ``timm:NAME``) by its ``model_config.json``; this module reads that and asks the right room, so
neither imports the other for it. Accepts a run dir (final weights, or ``checkpoints/last`` of a run still
training), a weights file with its ``model_config.json`` beside it, an open_clip model name plus a local
``pretrained`` file, or ``timm:NAME`` plus a local ``pretrained`` file in timm's state-dict layout. ``image_size`` and
``pool`` (global pooling, ``models.POOLS``) apply to ``timm:NAME`` (default: its pretrained input size, average
pooling) and to a SimCLR run's timm encoder (default: the run's own); every other kind refuses them. Nothing is
downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import nn

from mmcontrast import classifier, models
from mmcontrast.config import CHECKPOINTS_DIR, LAST_CHECKPOINT
from mmcontrast.errors import UsageError

# what open_clip raises for a config it cannot build (TypeError: a key the model's constructor does not take)
BUILD_ERRORS = (RuntimeError, ValueError, TypeError, KeyError)


def checkpoint_files(path_or_name: str | Path) -> tuple[Path, Path, dict] | None:
    """``(weights, model_config.json, its contents)`` of a run dir (final weights, or ``checkpoints/last`` of a run
    still training) or of a weights file with its config beside it; None for a name (an open_clip model). A path that
    does not exist or holds no checkpoint is a UsageError."""
    target = Path(path_or_name)
    if target.is_dir():
        weights = target / models.WEIGHTS_FILE
        in_training = target / CHECKPOINTS_DIR / LAST_CHECKPOINT / models.WEIGHTS_FILE
        if not weights.is_file() and in_training.is_file():
            weights = in_training
        config_file = target / models.MODEL_CONFIG_FILE
    elif target.is_file():
        weights, config_file = target, target.parent / models.MODEL_CONFIG_FILE
    elif str(path_or_name).endswith((".safetensors", ".pt", ".pth", ".bin")) or "/" in str(path_or_name):
        raise UsageError(f"checkpoint {path_or_name} does not exist")
    else:
        return None
    if not config_file.is_file() or not weights.is_file():
        raise UsageError(
            f"{path_or_name} is not a checkpoint: expected {models.WEIGHTS_FILE} and {models.MODEL_CONFIG_FILE} "
            "(a run dir of mmcontrast.train, or a weights file with its model_config.json beside it)"
        )
    try:
        return weights, config_file, json.loads(config_file.read_text())
    except json.JSONDecodeError:
        raise UsageError(f"{config_file} is not valid JSON") from None


def load(path_or_name: str | Path, pretrained: str | None = None, device: str = "cpu", image_size: int | None = None,
         random_init: bool = False, pool: str | None = None) -> tuple[nn.Module, Callable, Callable | None]:
    """Load a model for inference: ``(model, preprocess, tokenizer)`` (tokenizer None for image-only encoders and
    classifiers). ``random_init``: the same architecture and preprocessing with fresh weights (a baseline);
    ``image_size``, ``pool``: a timm encoder's input size and global pooling (the module docstring says which).

    Example:
        >>> model, preprocess, tokenizer = load("runs/x")  # doctest: +SKIP
    """
    oc = models.open_clip_module()
    if str(path_or_name).startswith("timm:"):
        if not pretrained and not random_init:
            raise UsageError(f"{path_or_name} needs its weights: --pretrained LOCAL_FILE (timm's state-dict layout; nothing is downloaded)")
        if pretrained:
            models.check_pretrained(pretrained)
        return models.load_image_encoder(models.timm_encoder_spec(str(path_or_name), image_size, pool), None if random_init else Path(pretrained), device)
    files = checkpoint_files(path_or_name)
    if (image_size is not None or pool is not None) and (files is None or models.IMAGE_ENCODER_KEY not in files[2]):
        raise UsageError(f"--image-size and --pool apply to timm:NAME and image-only encoder runs (SimCLR); {path_or_name} "
                         "preprocesses at its own size and keeps its pooling")
    if files is None:
        bundle = models.create_clip(str(path_or_name), None if random_init else pretrained)
        return bundle.model.to(device).eval(), bundle.preprocess_val, bundle.tokenizer
    weights, config_file, cfg = files
    target = Path(path_or_name)
    if models.IMAGE_ENCODER_KEY in cfg:
        spec = models.resized_encoder_spec(cfg[models.IMAGE_ENCODER_KEY], image_size, pool)
        return models.load_image_encoder(spec, None if random_init else weights, device)
    if models.CLASSIFIER_KEY in cfg:
        return classifier.load_classifier(cfg, None if random_init else weights, device)
    if target.is_dir() and (target / models.OPEN_CLIP_CONFIG_FILE).is_file() and weights.parent == target and not random_init:
        try:
            model, _, preprocess = oc.create_model_and_transforms(f"local-dir:{target}", weights_only=True)
        except BUILD_ERRORS as err:
            raise UsageError(f"{target} does not load as an open_clip model: {str(err).splitlines()[0][:300]}") from None
        return model.to(device).eval(), preprocess, oc.get_tokenizer(f"local-dir:{target}")
    key = f"mmcontrast-{abs(hash(str(config_file.resolve())))}"
    models.register_config(key, models.resolve_paths_in_cfg(cfg.get("model_cfg", cfg)))
    try:
        model, _, preprocess = oc.create_model_and_transforms(key)
    except BUILD_ERRORS as err:
        raise UsageError(f"{config_file} does not describe a model open_clip builds: {str(err).splitlines()[0][:300]}") from None
    if not random_init:
        state = models.load_weights_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise UsageError(f"{weights} does not match {config_file}: {str(err).splitlines()[0][:300]}") from None
    return model.to(device).eval(), preprocess, oc.get_tokenizer(key)
