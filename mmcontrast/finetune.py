"""``mmcontrast finetune``: a labelled folder and any checkpoint into the best of three classifiers, chosen honestly.

Owns the command's plan. The class list (``class_list``); the frozen features of the labelled images and the probe on
them (``probe.fit_probe``, the one every command fits); the choice between that probe, the patch classifier
(``patches.py``, timm encoders) and fine-tuning, by stratified
K-fold cross-validation over the labelled images (``--folds``, 5) or on ``--val`` — each fold a run of the trainer's
``classify`` mode that starts from the fold's probe (LP-FT) and is scored on the fold it did not see, after its last
epoch (one recipe, no epoch picked on the held-out images, so the estimate is not flattered), the candidate whose
held-out images have the lowest log-loss kept (``choose``: steadier than top-1 on a few images); then the final model,
the fine-tuning recipe refitted on every labelled image or the probe itself, written to the run dir; and
``best.json``: every estimate with its spread over the folds, the per-epoch curve, the choice and why. With few
labels fine-tuning can lose to the frozen probe it starts from (it trades one class against another, or overfits);
the probe is then what the run exports.

Run dir: the final classifier (``model_config.json``, ``model.safetensors``) and, when fine-tuning won, the trainer's
files of the refit (config, metrics, checkpoints); ``best.json``; ``cv/fold_K/`` the folds' trainer runs; ``data/``
their split folders (symlinks) and shards; ``start/`` the refit's starting weights. Everything already there is
kept, so ``--resume`` goes on where a killed run stopped (a finished fold is read, not trained again).

Does not own the classifier model or its files (``classifier.py``, imported where used: ``mmcontrast --help``
stays free of torch), the probe (``probe.py``) or the loop (``train.py``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmcontrast.config import Config
from mmcontrast.errors import UsageError
from mmcontrast.labelled import (
    Labelled,
    fold_indices,
    labelled_images,
    native_size,
    starting_encoder,
    zero_shot_head,
)

UNEVEN = 1.5  # largest class / smallest class above which the loss weighs classes by inverse frequency
START_DIR, DATA_DIR, CV_DIR = "start", "data", "cv"  # RUN_DIR/start, RUN_DIR/data, RUN_DIR/cv/fold_K
SELECTION_FILE = "best.json"  # RUN_DIR/: the cross-validated estimates and the choice
HEAD_INITS = ("probe", "zero-shot", "random")  # --init: a linear probe (LP-FT), the class names (CLIP), random
DEFAULT_FOLDS = 5
CHOICES = ("probe", "patches", "finetuned")  # a tie keeps the earlier: cheaper, and closer to the frozen start


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
    image_size: int | str | None = None  # a timm:NAME or SimCLR run's input size; "native": the labelled images' own
    pool: str | None = None  # a timm:NAME or SimCLR run's global pooling (models.POOLS); None: its own
    init: str = "probe"
    templates: str = "default"
    seed: int = 0
    workers: int = 1
    classes: list[str] | None = None  # the class list in the user's order (--classes); None: the folder names, sorted
    folds: int = DEFAULT_FOLDS
    unlabelled_dir: str | None = None  # images without labels: they fill the patch classifier's banks
    resume: bool = False
    overrides: list[str] = field(default_factory=list)  # --set key=value for every classify run


# ---------------------------------------------------------------- the pieces a run is made of


def _link(paths: Sequence[Path], labels: np.ndarray, classes: list[str], folder: Path) -> Path:
    """Class folders of symlinks to ``paths`` under ``folder`` (kept when already there)."""
    for i, (path, label) in enumerate(zip(paths, labels)):
        target = folder / classes[label]
        target.mkdir(parents=True, exist_ok=True)
        link = target / f"{i:06d}{Path(path).suffix.lower()}"
        if not link.is_symlink():
            link.symlink_to(Path(path).resolve())
    return folder


def _write_shards(folder: Path, shards: Path, seed: int) -> int:
    """Class folders to shards (labels from the folder names); returns the number of samples written."""
    from data_tools import make_shards

    if not (shards / "stats.json").is_file():
        code = make_shards.main([str(folder), str(shards), "--layout", "classes", "--follow-symlinks", "--seed", str(seed),
                                 "--shard-size", "1000", "--workers", "1", *(["--resume"] if shards.exists() else [])])
        if code != 0:
            raise UsageError(f"could not write the training shards from {folder} (make_shards exit {code}); see above")
    return json.loads((shards / "stats.json").read_text())["written"]


def _class_weights(labels: np.ndarray, n_classes: int) -> list[float] | None:
    """Inverse-frequency weights (mean 1) when the largest class is over ``UNEVEN`` times the smallest, else None."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if counts.max() <= UNEVEN * counts.min():
        return None
    return (counts.sum() / (n_classes * counts)).round(6).tolist()


def _config(s: Settings, start: Path, shards: Path, output_dir: Path, eval_dir: Path | None, n_train: int,
            class_weights: list | None) -> Config:
    """The ``classify`` run: cadences in epochs, so they follow the real number of processes whoever launches it."""
    cfg = Config(mode="classify")
    cfg.model.name, cfg.model.pretrained = str(start / "model_config.json"), str(start / "model.safetensors")
    cfg.data.train_shards, cfg.data.workers = str(shards), s.workers
    cfg.data.augment.preset = "finetune"
    cfg.model.sync_batchnorm = False  # frozen BatchNorm (model.frozen_batchnorm) has no batch statistics to share
    cfg.loss.class_weights = class_weights
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas = s.lr, 0.05, [0.9, 0.999]
    cfg.optim.lr_scale = {"image": s.backbone_lr_scale, "head": 1.0}
    cfg.train.output_dir, cfg.train.epochs, cfg.train.seed = str(output_dir), s.epochs, s.seed
    cfg.train.batch_size = max(1, min(s.batch_size, n_train))
    cfg.train.cadence = "epochs"
    cfg.optim.warmup_steps = 1  # one epoch: a probe-initialised head is not moved hard at first
    cfg.log.every, cfg.log.checkpoint_every = 1, max(1, math.ceil(s.epochs / 5))
    cfg.log.eval_every, cfg.log.eval_images = (1, str(eval_dir)) if eval_dir else (0, None)
    cfg.log.diagnostics_every = 0
    cfg.log.trackers = []
    return cfg


def _head(s: Settings, classes: list[str], features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The head a run starts from: the probe on these features (LP-FT), the class names (CLIP), or None (random)."""
    from mmcontrast import classifier as clf

    if s.init == "probe":
        return clf.probe_head(features, labels, len(classes), s.seed)
    if s.init == "zero-shot":
        return zero_shot_head(s.checkpoint, s.pretrained, classes, s.templates, float(np.linalg.norm(features, axis=1).mean()))
    return None


def _write_start(start: Path, spec: dict, encoder_state: dict, classes: list[str], head) -> Path:
    from mmcontrast import classifier as clf

    start.mkdir(parents=True, exist_ok=True)
    (start / "model_config.json").write_text(json.dumps(clf.classifier_config(spec, classes), indent=2))
    return clf.write_start(start / "model.safetensors", spec, encoder_state, classes, head)


# ---------------------------------------------------------------- one fine-tuning run, and its score


@dataclass
class Encoder:
    """The starting encoder: its spec and weights (``starting_encoder``)."""

    spec: dict
    state: dict


def _train_run(s: Settings, enc: Encoder, classes: list[str], train: Labelled, run_dir: Path, data_dir: Path,
               eval_dir: Path | None, train_fn: Callable[[Config], Path]) -> Path:
    """A ``classify`` run of the recipe on ``train`` in ``run_dir`` (resumed if it was stopped, read if it finished)."""
    from mmcontrast.checkpoint import has_checkpoint
    from mmcontrast.config import apply_overrides, validate

    start = run_dir / START_DIR
    if not (start / "model.safetensors").is_file():
        _write_start(start, enc.spec, enc.state, classes, _head(s, classes, train.features, train.labels))
    folder = _link(train.paths, train.labels, classes, data_dir / "train")
    n_train = _write_shards(folder, data_dir / "shards", s.seed)
    cfg = _config(s, start, data_dir / "shards", run_dir, eval_dir, n_train, _class_weights(train.labels, len(classes)))
    apply_overrides(cfg, s.overrides)
    cfg.train.resume = has_checkpoint(run_dir)
    validate(cfg)
    if cfg.train.resume and _finished(run_dir, cfg.train.epochs):
        return run_dir  # finished before: its record stands
    return train_fn(cfg)


def _finished(run_dir: Path, epochs: int) -> bool:
    """Whether the run in ``run_dir`` trained all its epochs and exported its model."""
    from mmcontrast.models import WEIGHTS_FILE

    state = run_dir / "checkpoints" / "last" / "train_state.json"
    return (run_dir / WEIGHTS_FILE).is_file() and state.is_file() and json.loads(state.read_text()).get("epoch", 0) >= epochs


def _held_out_curve(run_dir: Path) -> list[dict]:
    """``[{"epoch", "top1", "mean_per_class_recall", "loss"}]`` of a run's in-loop scores on its held-out images."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"epoch": round(r["epoch"]), **{key: r[f"eval/val_{key}"] for key in SCORES}} for r in rows if "eval/val_top1" in r]


# ---------------------------------------------------------------- the command


SCORES = ("top1", "mean_per_class_recall", "loss")  # per held-out fold; loss: mean negative log-likelihood


def fold_scores(probabilities: np.ndarray, truth: np.ndarray) -> dict:
    """``SCORES`` of ``(n, classes)`` class probabilities against the true class indices ``truth`` (what the
    classify task's in-loop evaluation reports: ``classifier.held_out_scores``)."""
    from mmcontrast.evaluate import classification_metrics, log_loss

    metrics = classification_metrics(probabilities, truth.tolist(), [str(c) for c in range(probabilities.shape[1])])
    return {"top1": metrics["top1"], "mean_per_class_recall": metrics["mean_per_class_recall"], "loss": log_loss(probabilities, truth)}


def summarise(per_fold: list[dict]) -> dict:
    """A candidate's estimate (what ``choose`` compares and ``best.json`` holds): each of ``SCORES`` averaged over
    the folds' ``fold_scores``, its standard deviation as ``KEY_std``, and the folds themselves."""
    out = {"folds": per_fold}
    for key in SCORES:
        values = [f[key] for f in per_fold]
        out[key], out[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    return out


@dataclass
class Selection:
    """What the command found: both estimates, the choice, the final run dir."""

    probe: dict
    finetuned: dict | None  # None: --epochs 0, no fine-tuning
    choice: str
    reason: str
    run_dir: Path
    folds: int  # 0: chosen on --val
    per_epoch: list = field(default_factory=list)
    views: dict | None = None  # data.augment.preset=auto: the preset chosen and the measurement behind it
    patches: dict | None = None  # the patch classifier's estimate (None: an encoder without feature maps)
    patches_note: str | None = None  # why there is none, or what filled its banks (and which the exported one reads)

    def record(self) -> dict:
        return {"choice": self.choice, "reason": self.reason, "selected_on": f"{self.folds}-fold cross-validation"
                if self.folds else "--val", "probe": self.probe, "patches": self.patches, "patches_note": self.patches_note,
                "finetuned": self.finetuned, "finetuned_per_epoch": self.per_epoch,
                **({"views": self.views} if self.views else {})}


def _encode(enc: Encoder, classes: list[str], paths: list[Path]) -> np.ndarray:
    """Frozen features (raw, float32, in ``paths`` order) of the starting encoder; unreadable images are a UsageError."""
    from mmcontrast.evaluate import encode_images

    encoded = encode_images(_frozen_encoder(enc, classes), _transform(enc), paths, workers=0, normalize=False)
    _refuse_unreadable(encoded.errors, paths, "the labelled folders")
    return encoded.features.numpy()


def _cross_validate(s: Settings, enc: Encoder, classes: list[str], labelled: Labelled, run: Path,
                    train_fn: Callable[[Config], Path], patch_data) -> tuple[dict, list]:
    """Each candidate scored on each held-out fold: ({candidate: summary, or None when not tried}, the fine-tuning
    runs' mean per-epoch curve)."""
    from mmcontrast import patches
    from mmcontrast.probe import fit_probe

    scores = {"probe": [], "patches": [] if patch_data is not None else None, "finetuned": [] if s.epochs else None}
    curves = []
    for k, held in enumerate(fold_indices(labelled.labels, s.folds, s.seed)):
        kept = np.setdiff1d(np.arange(len(labelled.paths)), held)
        truth = labelled.labels[held]
        probe = fit_probe(labelled.features[kept], labelled.labels[kept], s.seed)
        scores["probe"].append(fold_scores(probe.scores(labelled.features[held], len(classes)), truth))
        if patch_data is not None:
            fitted = patches.fit(patch_data, kept, s.seed)
            scores["patches"].append(fold_scores(patches.score_rows(fitted, patch_data, held), truth))
        if not s.epochs:
            continue
        part = Labelled([labelled.paths[i] for i in kept], labelled.labels[kept], labelled.features[kept])
        data = run / DATA_DIR / f"fold_{k}"
        held_dir = _link([labelled.paths[i] for i in held], truth, classes, data / "held_out")
        fold_run = _train_run(s, enc, classes, part, run / CV_DIR / f"fold_{k}", data, held_dir, train_fn)
        curves.append(_held_out_curve(fold_run))
        scores["finetuned"].append({key: curves[-1][-1][key] for key in SCORES})
    per_epoch = [{"epoch": point["epoch"], **{key: float(np.mean([c[i][key] for c in curves])) for key in SCORES}}
                 for i, point in enumerate(curves[0])] if curves else []
    return {c: summarise(v) if v is not None else None for c, v in scores.items()}, per_epoch


NAMES = {"probe": "the frozen probe", "patches": "the patch classifier", "finetuned": "fine-tuning"}


def choose(estimates: dict[str, dict | None]) -> tuple[str, str]:
    """The candidate whose held-out images' mean negative log-likelihood (log-loss) is lowest; a tie keeps the
    earlier of ``CHOICES`` (the probe first: cheaper, and what fine-tuning began at). Log-loss, not top-1: with a few
    labels a fold's top-1 moves in steps of one image and ties, while log-loss weighs how sure each answer was (the
    probe chooses its C on it too); measured in docs/labelled.md ("How the choice is scored")."""
    scored = [c for c in CHOICES if estimates.get(c)]
    best = min(scored, key=lambda c: (estimates[c]["loss"], CHOICES.index(c)))
    said = "held-out log-loss " + ", ".join(f"{NAMES[c]} {estimates[c]['loss']:.3f} ± {estimates[c]['loss_std']:.3f} "
                                            f"(top-1 {estimates[c]['top1']:.1%})" for c in scored)
    if best == "probe" and estimates.get("finetuned"):
        return best, f"{said}: fine-tuning did not help"
    return best, f"{said}: {NAMES[best]} scored best" if len(scored) > 1 else f"{said}: the only candidate"


AUTO_VIEWS = "data.augment.preset=auto"


def _auto_views(s: Settings, enc: Encoder, classes: list[str]) -> dict | None:
    """With ``--set data.augment.preset=auto``: the preset ``views.auto_preset`` picks on the labelled images for the
    starting encoder, put in the overrides in place of ``auto`` (every fold and the refit train with it)."""
    if AUTO_VIEWS not in [o.replace(" ", "") for o in s.overrides]:
        return None
    from mmcontrast.classifier import ImageClassifier
    from mmcontrast.views import auto_preset

    encoder = ImageClassifier(enc.spec, classes).encoder
    encoder.load_state_dict(enc.state)
    chosen, measured = auto_preset(encoder, enc.spec, s.train_dir, s.seed)
    s.overrides = [f"data.augment.preset={chosen}" if o.replace(" ", "") == AUTO_VIEWS else o for o in s.overrides]
    return {"chosen": chosen, **measured}


def check_run_dir(s: Settings) -> Path:
    """RUN_DIR as a Path; a UsageError when it holds an earlier run and ``--resume`` was not given."""
    run = Path(s.output_dir)
    if not s.resume and any((run / name).exists() for name in (CV_DIR, START_DIR, SELECTION_FILE, "checkpoints", "model.safetensors")):
        raise UsageError(f"{run} already holds a run; pass --resume to continue it or choose another --output-dir")
    return run


def run(s: Settings, train_fn: Callable[[Config], Path] | None = None) -> Selection:
    """The whole command (module docstring): returns what it chose. ``train_fn`` runs a classify config (the trainer's
    ``train``; tests may pass another)."""
    if train_fn is None:
        from mmcontrast.train import train as train_fn
    if s.init not in HEAD_INITS:
        raise UsageError(f"--init must be one of {', '.join(HEAD_INITS)}, got {s.init!r}")
    if s.folds < 2 and not s.val_dir:
        raise UsageError(f"--folds {s.folds}: cross-validation needs at least 2 folds (or give --val DIR)")
    run_dir = check_run_dir(s)
    classes, labelled = labelled_images(s.train_dir, s.classes)
    if not s.val_dir:
        fold_indices(labelled.labels, s.folds, s.seed)  # too many folds for a class: said before any encoding
    if s.image_size == "native":
        s.image_size = native_size(labelled.paths)
    enc = Encoder(*starting_encoder(s.checkpoint, s.pretrained, s.image_size, s.pool))
    patch_data, patch_note = patch_set(s, enc, classes, labelled)
    if patch_data is None:
        labelled.features = _encode(enc, classes, labelled.paths)
    views = _auto_views(s, enc, classes)
    if s.val_dir:
        estimates, per_epoch = _on_val(s, enc, classes, labelled, run_dir, train_fn, patch_data)
    else:
        estimates, per_epoch = _cross_validate(s, enc, classes, labelled, run_dir, train_fn, patch_data)
    choice, reason = choose(estimates)
    if choice == "finetuned" and not s.val_dir:
        _train_run(s, enc, classes, labelled, run_dir, run_dir / DATA_DIR / "all", None, train_fn)
    elif choice != "finetuned":
        read_note = _export_frozen(run_dir, enc, classes, labelled, patch_data if choice == "patches" else None, s.seed)
        patch_note = f"{patch_note}; {read_note}" if read_note else patch_note
    selection = Selection(estimates["probe"], estimates["finetuned"], choice, reason, run_dir, 0 if s.val_dir else s.folds,
                          per_epoch, views, estimates["patches"], patch_note)
    from mmcontrast.models import atomic_save

    atomic_save(lambda record, path: Path(path).write_text(json.dumps(record, indent=2) + "\n"), selection.record(),
                run_dir / SELECTION_FILE)
    return selection


def _on_val(s: Settings, enc: Encoder, classes: list[str], labelled: Labelled, run_dir: Path,
            train_fn: Callable[[Config], Path], patch_data) -> tuple[dict, list]:
    """Each candidate fitted on every labelled image and scored on ``--val``; fine-tuning trains in ``run_dir``."""
    from mmcontrast import patches
    from mmcontrast.probe import fit_probe

    _, val = labelled_images(s.val_dir, classes, every_class=False)
    estimates: dict = {"patches": None, "finetuned": None}
    if patch_data is not None:
        pooled, regions, _, errors = patches.encode(_frozen_encoder(enc, classes), _transform(enc), val.paths)
        _refuse_unreadable(errors, val.paths, "--val")
        val.features = pooled
        fitted = patches.fit(patch_data, np.arange(len(labelled.paths)), s.seed)
        estimates["patches"] = summarise([fold_scores(patches.score_images(fitted, patch_data, pooled, regions), val.labels)])
    else:
        val.features = _encode(enc, classes, val.paths)
    probe = fit_probe(labelled.features, labelled.labels, s.seed)
    estimates["probe"] = summarise([fold_scores(probe.scores(val.features, len(classes)), val.labels)])
    per_epoch = []
    if s.epochs:
        per_epoch = _held_out_curve(_train_run(s, enc, classes, labelled, run_dir, run_dir / DATA_DIR, Path(s.val_dir), train_fn))
        estimates["finetuned"] = summarise([{k: per_epoch[-1][k] for k in SCORES}])
    return estimates, per_epoch


# ---------------------------------------------------------------- the frozen candidates and their files


def _frozen_encoder(enc: Encoder, classes: list[str]):
    from mmcontrast.classifier import ImageClassifier

    encoder = ImageClassifier(enc.spec, classes).encoder
    encoder.load_state_dict(enc.state)
    return encoder.eval()


def _transform(enc: Encoder):
    from mmcontrast.models import image_eval_transform

    return image_eval_transform(enc.spec)


def _refuse_unreadable(errors: dict, paths: Sequence[Path], what: str) -> None:
    if errors:
        i, error = next(iter(sorted(errors.items())))
        raise UsageError(f"{len(errors)} image(s) of {what} cannot be read (first: {paths[i]}: {error}); remove or replace them")


def patch_set(s: Settings, enc: Encoder, classes: list[str], labelled: Labelled):
    """``(patches.PatchSet or None, a note for best.json)``: the labelled images' pooled features (set on
    ``labelled``) and regions, and the unlabelled images' (``--unlabelled``), when the encoder has feature maps."""
    from mmcontrast import patches

    encoder = _frozen_encoder(enc, classes)
    why = (None if patches.has_patches(encoder.backbone) else "the encoder has no stride-8 and stride-16 feature maps (timm:NAME has)")
    if why is None and len(labelled.paths) > patches.LABELLED_MOST:
        why = f"more than {patches.LABELLED_MOST} labelled images (region banks are for few labels)"
    if why:
        if s.unlabelled_dir:
            raise UsageError(f"--unlabelled fills the patch classifier's region banks, and there is none here: {why}")
        return None, f"no patch classifier: {why}"
    pooled, regions, _, errors = patches.encode(encoder, _transform(enc), labelled.paths)
    _refuse_unreadable(errors, labelled.paths, "--train")
    labelled.features = pooled
    data = patches.PatchSet(pooled, labelled.labels, patches.Regions(regions), len(classes))
    if not s.unlabelled_dir:
        return data, "banks: the labelled images' regions"
    return data, _add_unlabelled(s, data, encoder, enc, labelled)


def _add_unlabelled(s: Settings, data, encoder, enc: Encoder, labelled: Labelled) -> str:
    """Encode ``--unlabelled`` (its images identical to labelled ones left out, at most ``UNLABELLED_MOST``, a
    seeded sample) into ``data``; unreadable ones are skipped and counted. Returns what was used, in words."""
    import sys

    from data_tools.inputs import identical_files
    from mmcontrast import patches
    from mmcontrast.evaluate import discover_images

    found = discover_images(s.unlabelled_dir)
    labelled_copies = {b for _, b in identical_files(labelled.paths, found)}
    paths = [p for p in found if p not in labelled_copies]
    if not paths:
        raise UsageError(f"--unlabelled {s.unlabelled_dir}: every image there is one of --train's; give images without labels")
    if len(paths) > patches.UNLABELLED_MOST:
        rows = np.sort(np.random.default_rng(s.seed).choice(len(paths), patches.UNLABELLED_MOST, replace=False))
        paths = [paths[i] for i in rows]
    pooled, regions, _, errors = patches.encode(encoder, _transform(enc), paths, progress="unlabelled" if sys.stderr.isatty() else None)
    if errors:
        i, error = next(iter(sorted(errors.items())))
        print(f"warning: {len(errors)} unlabelled image(s) could not be read and were skipped (first: {paths[i]}: {error})",
              file=sys.stderr)
    if not len(pooled):
        raise UsageError(f"--unlabelled {s.unlabelled_dir}: none of its {len(paths)} images could be read")
    data.unlabelled_features, data.unlabelled_regions = pooled, regions
    beyond = len(found) - len(labelled_copies) - len(paths)
    return (f"banks: the labelled images' regions and those of the unlabelled images the probe gives each class most "
            f"confidently, from {len(pooled)} of the {len(found)} images of --unlabelled ({len(labelled_copies)} identical "
            f"to labelled ones, {len(errors)} unreadable, {beyond} beyond a sample of {patches.UNLABELLED_MOST})")


def _keep_finetuned_files(run_dir: Path) -> None:
    """The trainer's own files of a fine-tuning run in the same dir (``--val``: it trained here) are kept beside the
    exported classifier, its weights as ``model_finetuned.safetensors`` (with ``train.ema_decay``, the averaged ones;
    the raw ones as ``model_finetuned_raw.safetensors``)."""
    from mmcontrast.ema import RAW_WEIGHTS_FILE
    from mmcontrast.models import WEIGHTS_FILE

    for name, kept in ((WEIGHTS_FILE, "model_finetuned.safetensors"), (RAW_WEIGHTS_FILE, "model_finetuned_raw.safetensors")):
        if (run_dir / name).is_file():
            shutil.move(str(run_dir / name), str(run_dir / kept))


def _export_frozen(run_dir: Path, enc: Encoder, classes: list[str], labelled: Labelled, patch_data, seed: int) -> str | None:
    """The frozen probe (``patch_data`` None) or the patch classifier fitted on every labelled image, as the run's
    classifier files; for the patch classifier, which banks it reads (``PatchFit.describe``)."""
    from mmcontrast import classifier as clf

    _keep_finetuned_files(run_dir)
    if patch_data is None:
        _write_start(run_dir, enc.spec, enc.state, classes, clf.probe_head(labelled.features, labelled.labels, len(classes), seed))
        return None
    from mmcontrast import patches

    fitted = patches.fit(patch_data, np.arange(len(labelled.paths)), seed)
    clf.write_patch_classifier(run_dir, enc.spec, enc.state, classes, fitted.head, fitted.banks(patch_data),
                               fitted.stack.head(len(classes)), [classes[k] for k in fitted.read])
    return fitted.describe(classes)
