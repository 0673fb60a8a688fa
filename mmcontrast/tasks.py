"""What a training mode trains: the one place that knows the difference between ``clip``, ``simclr`` and ``classify``.

``build_task`` reads the mode once and returns a ``Task``: the model, how a batch becomes its inputs,
the loss, the pair of embeddings representation health is measured on, the in-loop evaluation and the
export, each a callable chosen for the mode. The training loop (``mmcontrast.train``) and gradient
caching (``mmcontrast.gradcache``) call these and never ask which mode they are in.

* ``clip``: an open_clip image–text model with a learnable temperature; inputs ``(image, text)``, loss
  CLIP's symmetric InfoNCE (or SigLIP); export in open_clip's layout.
* ``simclr``: an image encoder plus a projection head (``models.SimclrModel``); inputs ``(view1,
  view2)``, loss NT-Xent (or SupCon with labels); only the encoder is exported.
* ``classify``: an image encoder plus a linear head over class names (``classifier.ImageClassifier``, the
  labelled slice: ``mmcontrast finetune``); inputs ``(image,)`` and labels, loss cross-entropy; the export holds
  encoder, head and class names after the last epoch; the in-loop evaluation scores held-out class folders.

Does not own building models (``models.py``), the losses (``losses.py``) or the loop.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmcontrast import losses, models
from mmcontrast.config import Config, DataConfig, LogConfig, LossConfig, ModelConfig, resolve_augment
from mmcontrast.errors import UsageError

Outputs = Sequence[torch.Tensor]  # (embedding a (n, d), embedding b (n, d), scalars such as logit_scale...)
CAPTIONED_MODES = {"clip": True, "simclr": False, "classify": False}  # does the mode read captions
CLIP_ADVICE = ("a lower learning rate or a longer warm-up (optim.lr, optim.warmup_steps), a larger global batch, and check "
               "that the captions describe their images (python -m data_tools.inspect SHARDS)")
SIMCLR_ADVICE = ("views that share more: data.augment.preset=texture (surfaces, microscopy) or overhead (aerial, slides), "
                 "larger crops (data.augment.crop_scale=[0.35,1.0]), weaker colour jitter; more resolution "
                 "(data.augment.image_size); another learning rate (optim.lr) or a higher loss.temperature; "
                 "see docs/simclr.md")


def needs_captions(mode: str) -> bool:
    """Whether a run in ``mode`` reads the shards' captions (checked before any model is built)."""
    return CAPTIONED_MODES[mode]


def _nothing(model: nn.Module, *args, **kwargs) -> None:
    return None


def _no_metrics(model: nn.Module) -> dict:
    return {}


@dataclass
class Task:
    """A mode's model and the callables the loop needs; build with ``clip_task``/``simclr_task``/``build_task``."""

    model: nn.Module
    inputs: Callable[[dict], tuple]  # a batch -> the model's positional arguments
    loss: Callable[[Outputs, torch.Tensor | None], torch.Tensor]  # (outputs, labels or None) -> scalar
    tokenizer: Callable | None  # captions -> token ids; None: the loader reads no captions
    train_transform: Callable | None  # PIL image -> tensor, random; applied ``views`` times per image
    health_transform: Callable | None  # the transform of the fixed health batch
    eval_transform: Callable | None  # deterministic preprocess for in-loop evaluation
    views: int  # image views per sample: 1 gives batch["image"], 2 batch["view1"], batch["view2"]
    with_labels: bool  # batches carry batch["label"] (SupCon, classify)
    health_pair: Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]  # (unwrapped model, batch) -> (x, y)
    export: Callable[..., None]  # (unwrapped model, run dir, write weights?, state_dict=None: gathered weights)
    evaluate: Callable[[nn.Module], dict] | None = None  # in-loop evaluation of the unwrapped model -> eval/* metrics
    clamp: Callable[[nn.Module], None] = _nothing  # after each optimizer step (the logit-scale clamp)
    scalar_metrics: Callable[[nn.Module], dict] = _no_metrics  # per log step (temperature, logit bias)
    n_embeddings: int = 2  # outputs[:n_embeddings] are per-sample embeddings, the rest scalars
    pair_names: tuple[str, str] = ("image", "text")  # what the two embeddings are (validation metrics' names)
    loss_name: str = "clip"  # which loss: its chance level (diagnostics.chance_level) is what guessing scores
    advice: str = CLIP_ADVICE  # what to try when the run sits at chance
    monitor: Callable[[list], dict] | None = None  # a log step's numbers from its outputs; None: the contrastive monitors
    param_kind: Callable[[str], str] = lambda name: "image"  # parameter name -> its optim.lr_scale key
    param_depth: Callable[[str], int] | None = None  # parameter name -> depth below its tower's top (optim.layer_decay)
    classes: list[str] | None = None  # the run's class list labels index into (classify); None: the shards' own

    @property
    def pairs_are_views(self) -> bool:
        """Health and batch monitors compare two views of one image (True) or an image with its caption."""
        return self.views == 2


# ---------------------------------------------------------------- clip


def _clip_loss(mode: str) -> Callable[[Outputs, torch.Tensor | None], torch.Tensor]:
    def loss(outputs: Outputs, labels: torch.Tensor | None) -> torch.Tensor:
        return losses.clip_loss(outputs[0].float(), outputs[1].float(), outputs[2].float(), mode=mode)

    return loss


def _siglip_loss(outputs: Outputs, labels: torch.Tensor | None) -> torch.Tensor:
    return losses.siglip_loss(*(o.float() for o in outputs[:4]))


def _image_text(batch: dict) -> tuple:
    return batch["image"], batch["text"]


def _image_text_embeddings(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(batch["image"], normalize=True), model.encode_text(batch["text"], normalize=True)


def _clip_kind(name: str) -> str:
    """open_clip's layout: ``visual.*`` is the image tower, ``logit_scale``/``logit_bias`` the temperature, the rest text."""
    if name.startswith("visual."):
        return "image"
    return "logit_scale" if name.startswith(("logit_scale", "logit_bias")) else "text"


def _temperature_metrics(model: nn.Module) -> dict:
    metrics = {"temperature": float(1.0 / model.logit_scale.detach().exp())}
    if getattr(model, "logit_bias", None) is not None:
        metrics["logit_bias"] = float(model.logit_bias.detach())
    return metrics


def clip_task(model: nn.Module, tokenizer: Callable, *, loss_name: str = "clip", clip_mode: str = "plain",
              max_logit_scale: float = 100.0, train_transform: Callable | None = None,
              eval_transform: Callable | None = None, export: Callable | None = None,
              evaluate: Callable | None = None) -> Task:
    """A CLIP task around an open_clip model: inputs (image, text), CLIP's loss (``clip``) or SigLIP's."""
    max_scale = math.log(max_logit_scale)

    def clamp(m: nn.Module) -> None:
        with torch.no_grad():
            m.logit_scale.clamp_(0, max_scale)

    return Task(
        model=model, inputs=_image_text, loss=_siglip_loss if loss_name == "siglip" else _clip_loss(clip_mode),
        tokenizer=tokenizer, train_transform=train_transform, health_transform=eval_transform,
        eval_transform=eval_transform, views=1, with_labels=False, health_pair=_image_text_embeddings,
        export=export or _nothing, evaluate=evaluate, clamp=clamp, scalar_metrics=_temperature_metrics,
        loss_name=loss_name, advice=CLIP_ADVICE, param_kind=_clip_kind,
    )


def _build_clip(model_cfg: ModelConfig, loss_cfg: LossConfig, loss_name: str, clip_augment: bool, log_cfg: LogConfig) -> Task:
    if model_cfg.name.startswith("timm:"):
        raise UsageError("timm:NAME is an image-only encoder; in clip mode give an open_clip model name or JSON")
    extra = {"init_logit_scale": math.log(1 / loss_cfg.init_temperature)}
    if loss_name == "siglip":
        extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}  # SigLIP's initialisation
    bundle = models.create_clip(model_cfg.name, model_cfg.pretrained, model_kwargs=extra)
    models.lock_towers(bundle.model, model_cfg.lock_image, model_cfg.lock_image_unlocked_groups, model_cfg.lock_text,
                       model_cfg.lock_text_unlocked_layers)
    if model_cfg.grad_checkpointing:
        bundle.model.set_grad_checkpointing(True)

    def export(model: nn.Module, out_dir: Path, weights: bool, state_dict: dict | None = None) -> None:
        models.save_clip_run_files(model, bundle.model_cfg, out_dir, bundle.tokenizer, weights=weights, state_dict=state_dict)

    evaluate = None
    if log_cfg.eval_every:
        from mmcontrast.evaluate import class_folders, zero_shot_top1_top5

        class_folders(log_cfg.eval_images)  # a wrong folder fails now, not at the first evaluation hours later

        def evaluate(model: nn.Module) -> dict:
            result = zero_shot_top1_top5(model, bundle.tokenizer, bundle.preprocess_val, log_cfg.eval_images)
            return {"eval/zeroshot_top1": result["top1"], "eval/zeroshot_top5": result["top5"]}

    return clip_task(
        bundle.model, bundle.tokenizer, loss_name=loss_name, clip_mode=loss_cfg.clip_mode,
        max_logit_scale=loss_cfg.max_logit_scale, train_transform=bundle.preprocess_train if clip_augment else bundle.preprocess_val,
        eval_transform=bundle.preprocess_val, export=export, evaluate=evaluate,
    )


# ---------------------------------------------------------------- simclr


def _views(batch: dict) -> tuple:
    return batch["view1"], batch["view2"]


def _backbone_embeddings(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported backbone's features of both views, not the projection head's."""
    return model.encoder.encode_image(batch["view1"]), model.encoder.encode_image(batch["view2"])


def simclr_task(model: models.SimclrModel, *, loss_name: str = "nt_xent", temperature: float = 0.1,
                transform: Callable | None = None, eval_transform: Callable | None = None,
                export: Callable | None = None, evaluate: Callable | None = None) -> Task:
    """A SimCLR task: inputs (view1, view2) through encoder + head, NT-Xent or (``supcon``) SupCon on labels."""
    if loss_name == "supcon":
        def loss(outputs: Outputs, labels: torch.Tensor | None) -> torch.Tensor:
            return losses.supcon_loss(torch.stack([outputs[0].float(), outputs[1].float()], dim=1), labels, temperature=temperature)
    else:
        def loss(outputs: Outputs, labels: torch.Tensor | None) -> torch.Tensor:
            return losses.nt_xent_loss(outputs[0].float(), outputs[1].float(), temperature=temperature)

    return Task(
        model=model, inputs=_views, loss=loss, tokenizer=None, train_transform=transform, health_transform=transform,
        eval_transform=eval_transform, views=2, with_labels=loss_name == "supcon", health_pair=_backbone_embeddings,
        export=export or _nothing, evaluate=evaluate, pair_names=("view1", "view2"), loss_name=loss_name,
        advice=SIMCLR_ADVICE, param_kind=_head_or_image,
    )


def _build_simclr(model_cfg: ModelConfig, loss_cfg: LossConfig, loss_name: str, data_cfg: DataConfig, log_cfg: LogConfig) -> Task:
    from mmcontrast.augment import view_transform

    spec = models.image_encoder_spec(model_cfg.name, model_cfg.timm_kwargs, model_cfg.cifar_stem, data_cfg.augment.image_size)
    encoder = models.ImageEncoder(spec)
    if model_cfg.pretrained:
        models.load_image_encoder_weights(encoder, model_cfg.pretrained)
    if model_cfg.lock_image:
        encoder.lock(model_cfg.lock_image_unlocked_groups)
    if model_cfg.grad_checkpointing and hasattr(encoder.backbone, "set_grad_checkpointing"):
        encoder.backbone.set_grad_checkpointing(True)
    model = models.SimclrModel(encoder, model_cfg.proj_hidden_dim, model_cfg.proj_dim, batchnorm=model_cfg.proj_batchnorm)
    aug = data_cfg.augment
    if aug.preset == "auto":  # the strongest views that keep the labels of data.augment.labelled, for this encoder
        from mmcontrast.views import auto_preset

        aug.preset, _ = auto_preset(encoder, spec, aug.labelled)
    resolve_augment(aug)  # the preset's values where the config left fields unset (validate has done it for a run)
    transform = view_transform(aug, aug.image_size or spec["image_size"], spec["mean"], spec["std"])
    eval_transform = models.image_eval_transform(spec)

    def export(model: nn.Module, out_dir: Path, weights: bool, state_dict: dict | None = None) -> None:
        encoder_state = None if state_dict is None else {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
        models.save_image_encoder_files(model.encoder, out_dir, weights=weights, state_dict=encoder_state)

    evaluate = None
    if log_cfg.eval_every:
        from mmcontrast.evaluate import class_folders, knn_top1

        class_folders(log_cfg.eval_images)  # wrong folders fail now, not at the first evaluation hours later
        class_folders(log_cfg.eval_train_images)

        def evaluate(model: nn.Module) -> dict:
            return {"eval/knn_top1": knn_top1(model.encoder, eval_transform, log_cfg.eval_train_images, log_cfg.eval_images)}

    return simclr_task(model, loss_name=loss_name, temperature=loss_cfg.temperature, transform=transform,
                       eval_transform=eval_transform, export=export, evaluate=evaluate)


# ---------------------------------------------------------------- classify (fine-tuning on the labelled slice)


def _image(batch: dict) -> tuple:
    return (batch["image"],)


def _confidence(outputs: list) -> dict:
    """The step's mean top probability: rises as the head commits, 1/classes while it guesses."""
    return {"mean_confidence": float(outputs[0].float().softmax(dim=1).amax(dim=1).mean())}


def _head_or_image(name: str) -> str:
    return "head" if name.startswith("head.") else "image"


def _build_classify(model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig, log_cfg: LogConfig) -> Task:
    """Encoder + linear head from ``model.name`` (a classifier ``model_config.json`` that ``mmcontrast finetune``
    writes) and ``model.pretrained`` (its starting weights); cross-entropy with label smoothing and class weights;
    the simclr views' presets as one augmented view; in-loop accuracy on ``log.eval_images``."""
    from mmcontrast import classifier as clf
    from mmcontrast.augment import view_transform

    try:
        entry = json.loads(Path(model_cfg.name).read_text())[clf.CLASSIFIER_KEY]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"mode classify needs model.name = a classifier model_config.json (mmcontrast finetune writes "
                         f"one); {model_cfg.name!r} is not") from None
    model = clf.ImageClassifier(entry["encoder"], entry["classes"], frozen_batchnorm=model_cfg.frozen_batchnorm)
    if model_cfg.pretrained:
        state = models.load_weights_file(Path(model_cfg.pretrained))
        model.load_state_dict(models.strip_wrapper_prefixes(state))
    spec, aug = entry["encoder"], data_cfg.augment
    if aug.preset == "auto":  # the strongest views that keep the labels of data.augment.labelled, for this encoder
        from mmcontrast.views import auto_preset

        aug.preset, _ = auto_preset(model.encoder, spec, aug.labelled)
    resolve_augment(aug)
    transform = view_transform(aug, spec["image_size"], spec["mean"], spec["std"])
    eval_transform = models.image_eval_transform(spec)
    weights = torch.tensor(loss_cfg.class_weights, dtype=torch.float32) if loss_cfg.class_weights else None

    def loss(outputs: Outputs, labels: torch.Tensor | None) -> torch.Tensor:
        w = None if weights is None else weights.to(outputs[0].device)
        return F.cross_entropy(outputs[0].float(), labels, weight=w, label_smoothing=loss_cfg.label_smoothing)

    def export(model: nn.Module, out_dir: Path, weights_too: bool, state_dict: dict | None = None) -> None:
        clf.save_classifier_files(model, out_dir, weights=weights_too, state_dict=state_dict)

    evaluate = clf.held_out_scores(eval_transform, log_cfg.eval_images, model.classes) if log_cfg.eval_every else None
    return Task(
        model=model, inputs=_image, loss=loss, tokenizer=None, train_transform=transform, health_transform=eval_transform,
        eval_transform=eval_transform, views=1, with_labels=True, health_pair=_nothing, export=export, evaluate=evaluate,
        n_embeddings=1, pair_names=("image", "label"), loss_name="cross_entropy", monitor=_confidence,
        param_kind=_head_or_image, classes=list(model.classes),
    )


# ---------------------------------------------------------------- the one decision


DEFAULT_LOSS = {"clip": "clip", "simclr": "nt_xent", "classify": "cross_entropy"}  # what loss.name: auto means in each mode


def build_task(cfg: Config) -> Task:
    """The task of ``cfg.mode``, with its model built (random init or ``model.pretrained``)."""
    loss_name = DEFAULT_LOSS[cfg.mode] if cfg.loss.name == "auto" else cfg.loss.name
    builders = {
        "clip": lambda: _build_clip(cfg.model, cfg.loss, loss_name, cfg.data.clip_augment, cfg.log),
        "simclr": lambda: _build_simclr(cfg.model, cfg.loss, loss_name, cfg.data, cfg.log),
        "classify": lambda: _build_classify(cfg.model, cfg.loss, cfg.data, cfg.log),
    }
    return builders[cfg.mode]()
