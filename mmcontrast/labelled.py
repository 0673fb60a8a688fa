"""The labelled slice: its class list, its folds, its images and the encoder they are read with.

Shared by ``finetune`` (the choice between the frozen probe and fine-tuning) and ``views`` (which augmentations keep
the label): the class list (the folder names sorted as strings, or the user's order), stratified folds, the starting
encoder of any image checkpoint (a SimCLR or CLIP run, an open_clip name, ``timm:NAME``, a fine-tuned classifier)
and a zero-shot head from a CLIP's class names. Owns no training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcontrast.errors import UsageError


@dataclass
class Labelled:
    """The labelled images, their class indices and (once encoded) their frozen features."""

    paths: list[Path]
    labels: np.ndarray  # (n,) index into the class list
    features: np.ndarray | None = None  # (n, d) raw encoder output, the probe's input


def class_list(found: list[str], given: list[str] | None, folder: str | Path, every_class: bool = True) -> list[str]:
    """The run's class list: ``given`` (the user's order) or the folder names ``found`` sorted as strings (folders 1, 2,
    10 are the classes "1", "10", "2"). A folder missing from ``given`` — or, with ``every_class``, a class of it without
    a folder — is a UsageError naming both lists."""
    classes = list(given) if given else sorted(found)
    unknown, absent = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
    if unknown or (every_class and absent):
        problem = f"has no folder for {', '.join(absent)}" if not unknown else f"holds class folders {', '.join(unknown)} not in the list"
        raise UsageError(f"{folder} {problem}: its classes are {', '.join(sorted(found))}; the class list is {', '.join(classes)}")
    if len(classes) < 2:
        raise UsageError(f"{folder} holds {len(classes)} class folder(s); a classifier needs at least 2")
    return classes


def labelled_images(folder: str | Path, given: list[str] | None = None, every_class: bool = True) -> tuple[list[str], Labelled]:
    """``(class list, images)`` of a folder of class folders, listed once: the class list is ``class_list``'s (``given``
    or the folder names sorted as strings), every image's label its place in it."""
    from mmcontrast.evaluate import class_folders

    paths, names = class_folders(folder)
    classes = class_list(sorted(set(names)), given, folder, every_class)
    return classes, Labelled(list(paths), np.array([classes.index(n) for n in names], dtype=np.int64))


def fold_indices(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out indices of each of ``folds`` stratified folds (seeded); a UsageError when a class has fewer images."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if folds > smallest:
        raise UsageError(f"--folds {folds} needs at least {folds} labelled images per class; the smallest class has "
                         f"{smallest}: give --folds {max(2, smallest)} or fewer" + ("" if smallest >= 2 else ", or --val DIR"))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros(len(labels)), labels)]


def labelled_encoder(folder: str | Path, checkpoint: str, pretrained: str | None, image_size: int | str | None,
                     pool: str | None = None):
    """(encoder in eval mode, its spec, the labelled images' paths, their class indices) of class folders and any
    image checkpoint, at ``image_size`` (``native``: the images' own)."""
    from mmcontrast.classifier import ImageClassifier

    classes, labelled = labelled_images(folder)
    size = native_size(labelled.paths) if image_size == "native" else image_size
    spec, state = starting_encoder(checkpoint, pretrained, size, pool)
    encoder = ImageClassifier(spec, classes).encoder
    encoder.load_state_dict(state)
    return encoder.eval(), spec, labelled.paths, labelled.labels


def starting_encoder(checkpoint: str, pretrained: str | None = None, image_size: int | None = None,
                     pool: str | None = None) -> tuple[dict, dict]:
    """(encoder spec, encoder state dict in ``ImageEncoder``'s layout) of any image checkpoint.

    ``checkpoint``: a SimCLR run (or weights file), a CLIP run (its image tower), an open_clip model name with a
    local ``pretrained`` file, a fine-tuned classifier (its encoder), or ``timm:NAME`` with ``pretrained`` in
    timm's layout. ``image_size`` and ``pool`` apply to ``timm:NAME`` (default: its pretrained input size, average
    pooling) and to a SimCLR run's timm encoder (default: its own); ``loading.load`` refuses them for the others.
    """
    from mmcontrast import models
    from mmcontrast.classifier import ImageClassifier
    from mmcontrast.loading import load

    model, _, _ = load(checkpoint, pretrained=pretrained, image_size=image_size, pool=pool)
    if isinstance(model, ImageClassifier):
        return model.spec, model.encoder.state_dict()
    if isinstance(model, models.ImageEncoder):
        return model.spec, model.state_dict()
    visual = getattr(model, "visual", None)
    if visual is None:
        raise UsageError(f"{checkpoint} has no image tower to fine-tune")
    target = Path(checkpoint)
    config = (target if target.is_dir() else target.parent) / models.MODEL_CONFIG_FILE if target.exists() else checkpoint
    spec = models.image_encoder_spec(str(config), {}, cifar_stem=False)  # the CLIP config's vision tower alone
    return spec, {f"backbone.{k}": v for k, v in visual.state_dict().items()}


def zero_shot_head(checkpoint: str, pretrained: str | None, classes: Sequence[str], templates: str,
                   feature_norms: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of a head that scores a feature by its cosine with each class name's text embedding (the
    zero-shot classifier), scaled for raw features of mean norm ``feature_norms``. Needs a CLIP checkpoint."""
    from mmcontrast.evaluate import prompt_name
    from mmcontrast.loading import load
    from mmcontrast.zeroshot import ZeroShotClassifier

    model, _, tokenizer = load(checkpoint, pretrained=pretrained)
    if tokenizer is None or not hasattr(model, "encode_text"):
        raise UsageError(f"--init zero-shot needs a CLIP checkpoint (a text tower for the class names); {checkpoint} has none: "
                         "use --init probe")
    zs = ZeroShotClassifier(model, tokenizer, [prompt_name(c) for c in classes], templates)
    weight = zs.class_embeddings.cpu().numpy() * zs.logit_scale / max(feature_norms, 1e-12)
    return weight.astype(np.float32), np.zeros(len(classes), dtype=np.float32)


# ---------------------------------------------------------------- files


def native_size(paths: Sequence[Path]) -> int:
    """The labelled images' own size: the most common shorter side (``--image-size native``: no resampling for them)."""
    from PIL import Image

    sides = []
    for path in paths[:200]:
        with Image.open(path) as image:
            sides.append(min(image.size))
    values, counts = np.unique(sides, return_counts=True)
    return int(values[counts.argmax()])
