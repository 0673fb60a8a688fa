"""Which training views keep the label: each augmentation preset, and each of its parts, measured on labelled images.

An augmentation decides what a model learns to ignore. On photos of objects scale and colour are nuisances; on a
solar cell or a fabric a crop can cut the defect out and a colour change can be the defect, and where orientation is
the class a quarter turn destroys it. ``measure_views`` asks the labelled slice: a probe (``probe.fit_probe``) is fitted
on the frozen features of the training folds, then scored on augmented copies of the held-out images — a view that
keeps the label costs the probe little, one that destroys it costs much. Every preset of ``config.AUGMENT_PRESETS`` is
scored whole and part by part (the crop, each flip, the quarter turns, the colour jitter, greyscale, blur), with its
strength (how far its copies move in feature space: the mean cosine distance to the clean image's features).
``choose_preset`` keeps the presets whose loss stays within the noise of the measurement (2 points, one image's worth or
the folds' standard error, whichever is largest) and returns the strongest of them: the most invariance the labels
allow.

Does not own the view transform itself (``augment.py``), encoding (``evaluate.py``) or the probe (``probe.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcontrast.config import AUGMENT_PRESETS, AugmentConfig, resolve_augment
from mmcontrast.errors import UsageError

COPIES = 2  # augmented copies of each held-out image per view
FOLDS = 5
MIN_LOSS_TOLERANCE = 0.02  # a loss within max(this, one image's worth, the folds' standard error) keeps the label
# A preset's parts: the fields each part keeps from the preset, the rest set to "off" (identity)
OFF = {"crop_mode": "resized", "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "hflip": 0.0, "vflip": 0.0, "rot90": False,
       "color_jitter": [0.0, 0.0, 0.0, 0.0], "color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0,
       "downscale": [1.0, 1.0], "jpeg_quality": [95, 95], "recompress_p": 0.0}
PARTS = {"crop": ("crop_mode", "crop_scale", "crop_ratio"), "hflip": ("hflip",), "vflip": ("vflip",), "rot90": ("rot90",),
         "color_jitter": ("color_jitter", "color_jitter_p"), "grayscale": ("grayscale_p",), "blur": ("blur_p",),
         "recompress": ("downscale", "jpeg_quality", "recompress_p")}


@dataclass
class ViewScore:
    name: str  # a preset, or "preset:part"
    top1: float  # the folds' probes on augmented held-out copies
    loss: float  # clean top-1 minus top1
    strength: float  # mean cosine distance between a copy's features and its clean image's


def _fields(preset: str, part: str | None = None) -> dict:
    """The augment fields of ``preset`` (resolved), or of one of its parts with everything else off."""
    aug = AugmentConfig(preset=preset)
    resolve_augment(aug)
    values = {k: getattr(aug, k) for k in OFF}
    if part is None:
        return values
    return {k: (values[k] if k in PARTS[part] else v) for k, v in OFF.items()}


def _is_identity(fields: dict) -> bool:
    return fields == OFF or (fields["crop_mode"] == "fixed" and {**fields, "crop_mode": "resized", "crop_ratio": OFF["crop_ratio"]} == OFF)


def candidate_views(presets: Sequence[str] = tuple(AUGMENT_PRESETS)) -> dict[str, dict]:
    """``{name: fields}``: every preset, and every part of it that changes an image (a part the same in several
    presets is measured once, under the first preset's name)."""
    views: dict[str, dict] = {}
    seen: list[dict] = []
    for preset in presets:
        views[preset] = _fields(preset)
        for part in PARTS:
            fields = _fields(preset, part)
            if not _is_identity(fields) and fields not in seen:
                seen.append(fields)
                views[f"{preset}:{part}"] = fields
    return views


def _transform(fields: dict, spec: dict) -> Callable:
    from mmcontrast.augment import view_transform

    aug = AugmentConfig(**{k: copy.deepcopy(v) for k, v in fields.items()})
    return view_transform(aug, spec["image_size"], spec["mean"], spec["std"])


def measure_views(encoder, spec: dict, paths: Sequence[Path], labels: np.ndarray, views: dict[str, dict] | None = None,
                  folds: int = FOLDS, copies: int = COPIES, seed: int = 0, progress: bool = False) -> dict:
    """Score ``views`` (default ``candidate_views()``) on labelled images (module docstring).

    ``encoder``: an ``encode_image`` model (eval mode) whose input is ``spec``'s (image size, mean, std). Returns
    ``{"clean": {"top1", "std"}, "views": [ViewScore as dicts, worst loss last], "tolerance"}``.
    """
    import torch

    from mmcontrast.evaluate import encode_images
    from mmcontrast.labelled import fold_indices
    from mmcontrast.models import image_eval_transform
    from mmcontrast.probe import cross_validation_folds, fit_probe

    views = views or candidate_views()
    if cross_validation_folds(labels, folds) < 2:
        raise UsageError("measuring views needs at least 2 labelled images in every class (one to fit, one to score)")
    clean = encode_images(encoder, image_eval_transform(spec), paths, workers=0, normalize=False)
    if clean.errors:
        i = next(iter(clean.errors))
        raise UsageError(f"{len(clean.errors)} labelled image(s) cannot be read (first: {paths[i]}): remove them")
    x = clean.features.numpy()
    held = fold_indices(labels, cross_validation_folds(labels, folds), seed)
    probes = [fit_probe(np.delete(x, h, axis=0), np.delete(labels, h), seed) for h in held]
    fold_right = [int((p.predict(x[h]) == labels[h]).sum()) for p, h in zip(probes, held)]
    fold_top1 = [r / len(h) for r, h in zip(fold_right, held)]
    base = sum(fold_right) / len(paths)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scores = []
    for name, fields in views.items():
        torch.manual_seed(seed)  # the transform draws from torch's RNG: every view sees the same draws
        transform = _transform(fields, spec)
        right, moved, n = 0, 0.0, 0
        for _ in range(copies):
            augmented = encode_images(encoder, transform, paths, workers=0, normalize=False).features.numpy()
            for probe, h in zip(probes, held):
                right += int((probe.predict(augmented[h]) == labels[h]).sum())
            a = augmented / np.maximum(np.linalg.norm(augmented, axis=1, keepdims=True), 1e-12)
            moved += float((1 - (a * unit).sum(axis=1)).sum())
            n += len(paths)
        top1 = right / n
        scores.append(ViewScore(name, top1, base - top1, moved / n))
    tolerance = max(MIN_LOSS_TOLERANCE, 1 / len(paths), float(np.std(fold_top1)) / np.sqrt(len(held)))
    scores.sort(key=lambda s: s.loss)
    return {"clean": {"top1": base, "std": float(np.std(fold_top1)), "folds": len(held)}, "tolerance": tolerance,
            "views": [vars(s) for s in scores]}


def choose_preset(result: dict) -> str | None:
    """The strongest preset (largest ``strength``) whose loss is within ``tolerance``; None when none keeps the label."""
    kept = [v for v in result["views"] if ":" not in v["name"] and v["loss"] <= result["tolerance"]]
    return max(kept, key=lambda v: v["strength"])["name"] if kept else None


def auto_preset(encoder, spec: dict, folder: str | Path, seed: int = 0) -> tuple[str, dict]:
    """``data.augment.preset: auto``: the preset ``choose_preset`` picks on the class folders ``folder`` for ``encoder``
    (or, when none keeps the label, the one that loses least), and the measurement behind it."""
    from mmcontrast.evaluate import class_folders

    paths, names = class_folders(folder)
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names])
    result = measure_views(encoder.eval(), spec, paths, labels, candidate_views(), seed=seed)
    chosen = choose_preset(result) or min((v for v in result["views"] if ":" not in v["name"]), key=lambda v: v["loss"])["name"]
    return chosen, result
