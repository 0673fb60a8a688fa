"""Run configuration: typed dataclasses, YAML loading and ``key.sub=value`` overrides.

Owns the schema of a run (what can be configured, the defaults, and the check that every key a
user writes exists) and nothing else: functions downstream take the fields they need, never the
whole ``Config``. Config flows one way: YAML → ``Config`` → CLI flags → ``--set`` overrides →
``validate`` → the resolved YAML written to the run dir.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmcontrast.errors import UsageError

MODES = ("clip", "simclr", "classify")

# Files of a run directory written by the trainer (model files are named in models.py).
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TRAIN_STATE_FILE = "train_state.json"
CHECKPOINTS_DIR = "checkpoints"  # RUN_DIR/checkpoints/step_NNNNNN/ and the symlink RUN_DIR/checkpoints/last
LAST_CHECKPOINT = "last"


@dataclass
class ModelConfig:
    name: str = "mmc-tiny"  # open_clip model name, a model-config JSON, or (simclr) timm:NAME
    pretrained: str | None = None  # a local weights file; nothing is ever downloaded
    lock_image: bool = False  # freeze the image tower (LiT-style when the text tower trains; simclr: only its top adapts)
    lock_image_unlocked_groups: int = 0  # leave the last N layer groups of a locked image tower trainable
    lock_text: bool = False  # freeze the text tower (e.g. a pretrained HuggingFace tower)
    lock_text_unlocked_layers: int = 0
    grad_checkpointing: bool = False
    timm_kwargs: dict = field(default_factory=dict)  # simclr with timm:NAME, e.g. {drop_rate: 0.1}
    cifar_stem: bool = False  # simclr ResNets: 3x3 stride-1 stem without max-pool (small images)
    proj_hidden_dim: int = 512  # simclr projection head (2-layer MLP with BN), dropped on export
    proj_dim: int = 128
    proj_batchnorm: bool = True  # BN in the head (SimCLR); off makes gradient caching bit-exact
    sync_batchnorm: bool = True  # several processes: BatchNorm statistics over the global batch (SimCLR's global BN)
    frozen_batchnorm: bool = True  # classify: the encoder's BatchNorm keeps its running statistics (small batches)


# The view recipes of ``data.augment.preset``, per kind of image; explicit ``data.augment.*`` fields override them.
# Each augmentation teaches the encoder to ignore what it changes: keep out of a recipe whatever carries the signal
# (docs/simclr.md, "Choosing the views").
CROP_MODES = ("resized", "fixed")  # RandomResizedCrop, or a window at the image's own scale (data.augment.crop_mode)
_NO_RECOMPRESSION = {"crop_ratio": [0.75, 1.3333], "downscale": [1.0, 1.0], "jpeg_quality": [95, 95], "recompress_p": 0.0}
AUGMENT_PRESETS = {
    # SimCLR's ImageNet recipe (Chen et al., 2020): objects in photos, where colour and scale are nuisances.
    "natural": {"crop_mode": "resized", "crop_scale": [0.08, 1.0], "hflip": 0.5, "vflip": 0.0, "rot90": False, "color_jitter": [0.4, 0.4, 0.4, 0.1],
                "color_jitter_p": 0.8, "grayscale_p": 0.2, "blur_p": 0.5, **_NO_RECOMPRESSION},
    # Surfaces, fabrics, metals, microscopy: views that overlap (a texture's crops all look alike, so two small ones
    # cannot be matched), mild brightness/contrast (a global change of the texture's statistics is often the
    # defect), no hue or saturation (the material's colour is signal), no blur (fine detail is). Vertical flips and
    # quarter turns are left out although a surface has no "up": measured with ImageNet features on crops of a
    # gravel photo, they cut how often a view finds its twin from 0.29 to 0.07 (docs/simclr.md), a task a small
    # encoder does not learn in minutes; set data.augment.rot90 / vflip when the budget allows the invariance.
    "texture": {"crop_mode": "resized", "crop_scale": [0.5, 1.0], "hflip": 0.5, "vflip": 0.0, "rot90": False, "color_jitter": [0.1, 0.1, 0.0, 0.0],
                "color_jitter_p": 0.8, "grayscale_p": 0.0, "blur_p": 0.0, **_NO_RECOMPRESSION},
    # Satellite, aerial and slide images: no "up", so every flip and rotation; scale jitter; brightness/contrast for
    # sun and stain, no hue (vegetation, water and stain colours are signal).
    "overhead": {"crop_mode": "resized", "crop_scale": [0.2, 1.0], "hflip": 0.5, "vflip": 0.5, "rot90": True, "color_jitter": [0.3, 0.3, 0.1, 0.0],
                 "color_jitter_p": 0.8, "grayscale_p": 0.0, "blur_p": 0.2, **_NO_RECOMPRESSION},
    # Inspection images of one kind of part, framed alike (solar cells, wafers, tiles, fabric): the defect may be a few
    # pixels anywhere, so no view crops it away or resamples it (a window at the image's own scale: the whole image
    # when the encoder takes its size), and a part photographed square-on has no "up" (every flip and quarter turn);
    # mild brightness and contrast for the lighting, no hue, saturation or blur (the defect is in the detail).
    "inspection": {"crop_mode": "fixed", "crop_scale": [1.0, 1.0], "hflip": 0.5, "vflip": 0.5, "rot90": True,
                   "color_jitter": [0.1, 0.1, 0.0, 0.0], "color_jitter_p": 0.8, "grayscale_p": 0.0, "blur_p": 0.0, **_NO_RECOMPRESSION},
    # Supervised fine-tuning on a few labelled images (mmcontrast finetune): the label, not a second view, says what
    # to keep, so the views only need to vary a little — SimCLR fine-tunes with crops and flips alone.
    "finetune": {"crop_mode": "resized", "crop_scale": [0.35, 1.0], "hflip": 0.5, "vflip": 0.0, "rot90": False, "color_jitter": [0.1, 0.1, 0.0, 0.0],
                 "color_jitter_p": 0.5, "grayscale_p": 0.0, "blur_p": 0.0, **_NO_RECOMPRESSION},
    # Copy detection (SSCD-style, Pizzi et al. 2022; mmcontrast dedup): the two views are two copies of one picture as
    # collections hold them — slightly cropped, shrunk and blown up again, re-encoded as a poor JPEG — and nothing
    # else, so the features match copies and keep apart look-alikes that differ in content, colour or orientation.
    "copies": {"crop_mode": "resized", "crop_scale": [0.8, 1.0], "crop_ratio": [0.95, 1.05], "hflip": 0.0, "vflip": 0.0,
               "rot90": False, "color_jitter": [0.0, 0.0, 0.0, 0.0], "color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0,
               "downscale": [0.4, 0.8], "jpeg_quality": [20, 60], "recompress_p": 0.5},
}


@dataclass
class AugmentConfig:
    """The training views (simclr's two, classify's one). ``preset`` picks a recipe for a kind of image
    (``AUGMENT_PRESETS``: natural | texture | overhead | inspection | finetune | copies); a field set here overrides the
    preset's value."""

    preset: str = "natural"
    crop_mode: str | None = None  # resized (RandomResizedCrop) | fixed (a window at the image's own scale, never resampled)
    crop_scale: list | None = None  # RandomResizedCrop's area range
    hflip: float | None = None  # probability of a horizontal flip
    vflip: float | None = None  # probability of a vertical flip
    rot90: bool | None = None  # a random multiple of 90 degrees
    color_jitter: list | None = None  # brightness, contrast, saturation, hue
    color_jitter_p: float | None = None
    grayscale_p: float | None = None
    blur_p: float | None = None  # switched off automatically for images under 64 px
    crop_ratio: list | None = None  # RandomResizedCrop's aspect-ratio range
    downscale: list | None = None  # a copy's shrink factor range (shrunk, then blown up again), with recompress_p
    jpeg_quality: list | None = None  # a copy's JPEG re-encoding quality range, with recompress_p
    recompress_p: float | None = None  # probability of each of the shrink and the JPEG re-encoding (the copies preset)
    image_size: int | None = None  # default: the encoder's input size (a timm encoder: 32)
    labelled: str | None = None  # preset auto: class folders on which each preset's views are measured (mmcontrast views)


@dataclass
class DataConfig:
    train_shards: str = ""  # shards (pattern, folder, glob, list file, URLs); "A::B" mixes sources
    val_shards: str = ""  # held-out image-caption pairs: val loss and retrieval R@K every log.val_every steps
    num_samples: int | None = None  # samples in train_shards when no stats file beside remote shards says it
    upsampling_factors: list | None = None  # "A::B" with resampled: each source's shards drawn with this weight
    workers: int = 2
    shuffle_buffer: int = 1000  # samples shuffled together (a window per reader); 0: read in order
    resampled: bool = False  # sample shards with replacement (step-based training on many nodes)
    read_timeout: float = 60.0  # seconds a remote shard may stall before the read is retried
    read_retries: int = 3  # retries of a remote shard that failed mid-read before its rest is skipped and counted
    clip_augment: bool = True  # clip mode: open_clip's train transform (random crop); false: the eval transform
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class LossConfig:
    name: str = "auto"  # clip mode: clip | siglip; simclr mode: nt_xent | supcon; auto picks the first
    clip_mode: str = "plain"  # one of mmcontrast.losses.CLIP_LOSS_MODES: plain | local | chunked
    temperature: float = 0.1  # fixed τ of nt_xent / supcon
    init_temperature: float = 0.07  # learnable τ of clip: logit_scale starts at log(1/0.07)
    max_logit_scale: float = 100.0  # clamp of exp(logit_scale), as CLIP does
    label_smoothing: float = 0.1  # classify: cross-entropy's label smoothing
    class_weights: list | None = None  # classify: per-class loss weights (mmcontrast finetune balances uneven classes)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | lars
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    momentum: float = 0.9  # lars
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 switches clipping off
    lr_scale: dict = field(default_factory=dict)  # lr multiplier per kind of parameter: image, text, logit_scale, head
    layer_decay: float = 1.0  # 1: off. A layer's lr is multiplied by layer_decay ** (its depth below its tower's top)


@dataclass
class TrainConfig:
    output_dir: str = ""
    steps: int | None = None  # optimizer steps; exclusive with epochs
    epochs: int | None = None
    batch_size: int = 64  # per process, per micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step, one loss over all (gradient caching)
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    compile: bool = False  # torch.compile the model (inductor), as `accelerate launch --dynamo_backend inductor`
    fsdp: bool = False  # shard parameters, gradients and optimizer state across processes (FSDP2, mmcontrast.sharding)
    resume: bool = False
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    ema_decay: float = 0.0  # 0: off. A moving average of the weights (mmcontrast.ema): measured, exported as the model
    ema_warmup: bool = True  # the decay is min(ema_decay, (1 + step) / (10 + step)): the start is forgotten quickly
    dist_timeout_s: float = 1800.0  # how long a process waits in a collective (NCCL's own default: 600) before the job fails
    cadence: str = "steps"  # steps | epochs: the unit of log.*_every, log.every, log.checkpoint_every, optim.warmup_steps


@dataclass
class LogConfig:
    every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    trackers: list = field(default_factory=lambda: ["tensorboard"])  # any Accelerate tracker; [] for none
    # The three below are measured at the first log step at or after each multiple of their number of steps.
    val_every: int | None = None  # loss and R@K on data.val_shards; unset: log.checkpoint_every (0: off)
    eval_every: int | None = 0  # 0: off. In-loop eval on eval_images (zero-shot in clip mode, kNN in simclr); unset:
    # log.checkpoint_every when eval_images is given, else off (configs/clip_finetune.yaml: forgetting seen as it happens)
    eval_images: str | None = None  # a folder of class subfolders
    eval_train_images: str | None = None  # kNN reference set in simclr mode (class subfolders)
    diagnostics_every: int = 0  # 0: off. Representation health (mmcontrast.diagnostics) on a fixed batch
    diagnostics_samples: int = 256  # size of that batch
    monitor_samples: int = 4096  # rows of each embedding the log step's monitors see (positive accuracy, std), at most
    min_rank_fraction: float = 0.05  # warn when the effective rank falls below this fraction of the dimension
    min_std_ratio: float = 0.1  # warn when the embedding std falls below this multiple of 1/sqrt(d)
    chance_tolerance: float = 0.05  # health/at_chance: loss within this fraction of guessing's (and positives < 2x chance)


@dataclass
class Config:
    mode: str = "clip"  # clip (image-text) | simclr (image only, two views)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn a YAML/CLI value into the annotated type (YAML reads ``5e-4`` as a string)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            if isinstance(value, bool):  # YAML 1.1 reads `no`/`off` as false: `mixed_precision: no` means "no"
                return "yes" if value else "no"
            return str(value)
        if hint is list or origin is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if hint is dict or origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise UsageError(f"config field {where} expects {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def _from_dict(cls: type, data: Any, where: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"config section {where or 'root'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise UsageError(
            f"unknown config key {prefix}{unknown[0]}; valid keys{' in ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    return _from_dict(Config, data)


def load_config(path: str | Path | None) -> Config:
    """Read a YAML run config; ``None`` gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist (see configs/ for the shipped ones)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return config_from_dict(data)


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``cfg.a.b = value`` with type coercion; unknown keys are a UsageError."""
    obj: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise UsageError(f"unknown config key {dotted!r}: {part!r} is not one of {', '.join(names)} in {where}")
        if i == len(parts) - 1:
            hint = typing.get_type_hints(type(obj))[part]
            setattr(obj, part, _coerce(value, hint, dotted))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise UsageError(f"config key {dotted!r}: {'.'.join(parts[: i + 1])} is not a section")


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``[0.9, 0.98]``, ``true``, ``1e-4``)."""
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set expects key.sub=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_value(cfg, key.strip(), value)


def _validate_simclr_lock(cfg: Config) -> None:
    """Continued pretraining with a locked encoder: from given weights, something left to train, no FSDP."""
    if not cfg.model.pretrained:
        raise UsageError("model.lock_image would freeze randomly initialised layers: give the starting weights with "
                         "--set model.pretrained=FILE (e.g. ImageNet weights, docs/simclr.md), or drop model.lock_image")
    if cfg.model.lock_image_unlocked_groups < 1:
        raise UsageError("model.lock_image in simclr mode needs model.lock_image_unlocked_groups >= 1: with none the "
                         "encoder cannot change and only the projection head, which is not exported, would train")
    if cfg.train.fsdp:  # timm's frozen BatchNorm keeps float32 buffers that FSDP's bf16 policy does not cast
        raise UsageError("model.lock_image and train.fsdp together are not supported in simclr mode; the encoder's "
                         "frozen part needs no sharding: run without train.fsdp")


def validate(cfg: Config) -> None:
    """Cross-field checks that the schema cannot express; each failure is a UsageError."""
    if not cfg.train.output_dir:
        raise UsageError("say where the run goes: --output-dir runs/NAME")
    if not cfg.data.train_shards:
        raise UsageError('say what to train on: --train-shards "DIR/{00000..00007}.tar" (a brace pattern, directory or glob)')
    _validate_choices(cfg)
    _validate_schedule(cfg)
    resolve_augment(cfg.data.augment)
    _validate_log(cfg)
    _validate_for_mode(cfg)
    if cfg.data.upsampling_factors is not None and not cfg.data.resampled:
        raise UsageError("data.upsampling_factors mixes sources by drawing shards with replacement: set data.resampled=true")
    if cfg.data.num_samples is not None and cfg.data.num_samples < 1:
        raise UsageError(f"data.num_samples must be positive, got {cfg.data.num_samples}")
    if cfg.train.dist_timeout_s <= 0 or cfg.log.monitor_samples < 2:
        raise UsageError("train.dist_timeout_s must be positive and log.monitor_samples at least 2")
    if cfg.data.read_timeout <= 0 or cfg.data.read_retries < 0:
        raise UsageError("data.read_timeout must be positive and data.read_retries at least 0")
    unknown_kinds = sorted(set(cfg.optim.lr_scale) - {"image", "text", "logit_scale", "head"})
    if unknown_kinds or any(not isinstance(v, (int, float)) or v < 0 for v in cfg.optim.lr_scale.values()):
        raise UsageError(f"optim.lr_scale maps image, text, logit_scale or head to a multiplier >= 0, got {cfg.optim.lr_scale}")
    if not 0 <= cfg.train.ema_decay < 1:
        raise UsageError(f"train.ema_decay is 0 (off) or a decay in (0, 1) such as 0.999, got {cfg.train.ema_decay}")
    if not 0 < cfg.optim.layer_decay <= 1:
        raise UsageError(f"optim.layer_decay is in (0, 1] (1: every layer at the full lr; 0.75 is typical), got {cfg.optim.layer_decay}")


def _validate_choices(cfg: Config) -> None:
    """The named choices: mode, loss, optimizer, precision."""
    if cfg.mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    # deferred: validation is the only reason config needs torch
    from mmcontrast.losses import CLIP_LOSS_MODES

    if cfg.loss.clip_mode not in CLIP_LOSS_MODES:
        raise UsageError(f"loss.clip_mode must be one of {', '.join(CLIP_LOSS_MODES)}, got {cfg.loss.clip_mode!r}")
    valid_losses = {"clip": ("auto", "clip", "siglip"), "simclr": ("auto", "nt_xent", "supcon"),
                    "classify": ("auto", "cross_entropy")}[cfg.mode]
    if cfg.loss.name not in valid_losses:
        raise UsageError(f"loss.name {cfg.loss.name!r} does not fit mode {cfg.mode}; use one of {', '.join(valid_losses)}")
    if cfg.optim.name not in ("adamw", "lars"):
        raise UsageError(f"optim.name must be adamw or lars, got {cfg.optim.name!r}")
    if cfg.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise UsageError(f"train.mixed_precision must be no, bf16 or fp16, got {cfg.train.mixed_precision!r}")


def _validate_schedule(cfg: Config) -> None:
    """How long, in which unit, in which batches."""
    if cfg.train.steps is not None and cfg.train.epochs is not None:
        raise UsageError("give either --steps or --epochs, not both")
    if cfg.train.cadence not in ("steps", "epochs"):
        raise UsageError(f"train.cadence is steps or epochs (the unit of the log and warm-up counts), got {cfg.train.cadence!r}")
    if cfg.train.steps is None and cfg.train.epochs is None:
        raise UsageError("say how long to train: --steps N or --epochs N (or train.steps in the config)")
    for name, value in (("train.steps", cfg.train.steps), ("train.epochs", cfg.train.epochs)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} must be positive, got {value}")
    for name, value in (
        ("train.batch_size", cfg.train.batch_size),
        ("train.accum_steps", cfg.train.accum_steps),
        ("log.every", cfg.log.every),
        ("log.checkpoint_every", cfg.log.checkpoint_every),
        ("log.keep_checkpoints", cfg.log.keep_checkpoints),
    ):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")


def _validate_log(cfg: Config) -> None:
    """The log's cadences (val_every and eval_every resolved here, so config.yaml records what ran) and thresholds."""
    if cfg.log.val_every is None:
        cfg.log.val_every = cfg.log.checkpoint_every if cfg.data.val_shards else 0
    if cfg.log.eval_every is None:
        cfg.log.eval_every = cfg.log.checkpoint_every if cfg.log.eval_images else 0
    for name in ("eval_every", "diagnostics_every", "val_every"):
        if getattr(cfg.log, name) < 0:
            raise UsageError(f"log.{name} must be 0 (off) or a number of steps, got {getattr(cfg.log, name)}")
    if not 0 < cfg.log.chance_tolerance < 1:
        raise UsageError(f"log.chance_tolerance is a fraction of the chance loss in (0, 1), got {cfg.log.chance_tolerance}")
    if cfg.log.val_every and not cfg.data.val_shards:
        raise UsageError("log.val_every needs held-out pairs: --val-shards PATTERN")
    if cfg.log.eval_every and not cfg.log.eval_images:
        raise UsageError("log.eval_every needs log.eval_images: a folder of class subfolders")
    if cfg.log.eval_every and cfg.mode == "simclr" and not cfg.log.eval_train_images:
        raise UsageError("log.eval_every in simclr mode runs kNN: it needs log.eval_train_images (class subfolders) too")


def _validate_for_mode(cfg: Config) -> None:
    """What one mode cannot do."""
    if cfg.mode == "classify" and cfg.train.fsdp:
        raise UsageError("train.fsdp is not supported in classify mode (mmcontrast finetune): a fine-tuned classifier's "
                         "encoder fits one device; drop train.fsdp")
    if cfg.mode == "classify" and cfg.log.diagnostics_every:
        raise UsageError("log.diagnostics_every measures contrastive embeddings; set it to 0 in classify mode")
    if cfg.mode == "simclr" and cfg.train.batch_size * cfg.train.accum_steps < 2:
        raise UsageError("simclr needs at least 2 samples per step (negatives come from the batch)")
    if cfg.mode == "simclr" and cfg.model.lock_image:
        _validate_simclr_lock(cfg)


CADENCE_FIELDS = ("log.every", "log.checkpoint_every", "log.val_every", "log.eval_every", "log.diagnostics_every",
                  "optim.warmup_steps")  # counted in train.cadence units


def in_steps(cfg: Config, steps_per_epoch: int | None) -> Config:
    """``cfg`` with its ``CADENCE_FIELDS`` in optimizer steps: a copy, multiplied by ``steps_per_epoch`` when
    ``train.cadence`` is ``epochs`` (so "once an epoch" stays once an epoch on any number of processes), else itself."""
    if cfg.train.cadence == "steps":
        return cfg
    if steps_per_epoch is None:
        raise UsageError("train.cadence=epochs needs the data set's size: shards with stats files beside them, or "
                         "--set data.num_samples=N")
    import copy

    out = copy.deepcopy(cfg)
    for dotted in CADENCE_FIELDS:
        section, name = dotted.split(".")
        value = getattr(getattr(out, section), name)
        if value:
            setattr(getattr(out, section), name, max(1, value * steps_per_epoch))
    return out


def resolve_augment(aug: AugmentConfig) -> None:
    """Fill the augment fields left unset from ``aug.preset`` (so config.yaml records the recipe that ran)."""
    if aug.preset == "auto":  # chosen when the encoder is built (views.auto_preset), from data.augment.labelled
        if not aug.labelled or not Path(aug.labelled).is_dir():
            raise UsageError("data.augment.preset=auto measures each preset on labelled images: give their class folders "
                             "with --set data.augment.labelled=DIR (and starting weights, model.pretrained)")
        return
    if aug.preset not in AUGMENT_PRESETS:
        raise UsageError(f"data.augment.preset must be one of {', '.join(AUGMENT_PRESETS)} or auto, got {aug.preset!r}")
    for name, value in AUGMENT_PRESETS[aug.preset].items():
        if getattr(aug, name) is None:
            setattr(aug, name, value)
    if aug.crop_mode not in CROP_MODES:
        raise UsageError(f"data.augment.crop_mode must be one of {', '.join(CROP_MODES)}, got {aug.crop_mode!r}")
    if not 0 < aug.crop_scale[0] <= aug.crop_scale[1] <= 1:
        raise UsageError(f"data.augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {aug.crop_scale}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Fields whose value a checkpoint depends on: what the weights are (mode, model), what the optimizer state
# is (optim.name and its groups: optim.layer_decay; mixed precision's scaler), and what the stored data position means (batch, accumulation,
# seed, workers, shuffling). ``--resume`` refuses a change in any of them; everything else (learning rate,
# log cadence, more steps) may change and is recorded in config.yaml.
RESUME_IDENTITY = (
    "mode", "model", "train.batch_size", "train.accum_steps", "train.seed", "train.mixed_precision", "train.fsdp",
    "data.workers", "data.shuffle_buffer", "data.resampled", "data.num_samples", "data.upsampling_factors", "optim.name",
    "optim.layer_decay",
)


def identity(cfg: Config) -> dict:
    """The ``RESUME_IDENTITY`` fields of ``cfg`` as plain values, for ``resume_conflict``."""
    values = {}
    for dotted in RESUME_IDENTITY:
        obj: Any = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        values[dotted] = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    return values


def resume_conflict(saved: dict, now: dict) -> tuple[str, Any, Any] | None:
    """(dotted field, saved value, value now) of the first field that differs between two ``identity`` dicts.
    A field the saved one lacks was added to the schema after the checkpoint was written: not a change."""
    for key in sorted(saved.keys() | now.keys()):
        if key not in saved:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = resume_conflict(a, b)
            if inner is not None:
                return (f"{key}.{inner[0]}", *inner[1:])
        elif a != b:
            return key, a, b
    return None


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
