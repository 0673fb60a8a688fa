"""The labelled slice: an image encoder with a linear head over class names, its starting points and its files.

Owns ``ImageClassifier`` (encoder + head; ``forward`` gives logits, ``encode_image`` the encoder's features) and
``PatchClassifier`` (a frozen one with region banks and a stacking probe, ``patches.py``),
turning any checkpoint into a starting encoder (a SimCLR run, a CLIP run's image tower, ``timm:NAME`` with a
local weights file), the head's starting values (a linear probe on frozen features — LP-FT — or a CLIP
checkpoint's class-name text embeddings), and the run files: ``model.safetensors`` (encoder and head),
``model_config.json`` (the encoder's spec, the class names). Training it is the trainer's ``classify`` mode
(``mmcontrast.tasks``); ``mmcontrast finetune`` prepares such a run.

Does not own the training loop, the encoders themselves (``models.py``) or the metrics (``evaluate.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmcontrast import models
from mmcontrast.errors import UsageError

CLASSIFIER_KEY = models.CLASSIFIER_KEY  # marks the model_config.json of a fine-tuned classifier


class ImageClassifier(nn.Module):
    """``models.ImageEncoder`` (``spec``) and a linear head to ``len(classes)`` logits.

    ``frozen_batchnorm``: the encoder's BatchNorm layers normalise with their running statistics in training too
    (their gains and shifts still learn). Fine-tuning on a few labelled images runs small batches, whose statistics
    are noisy and differ from those the head's probe was fit under; frozen, the features the probe saw are the
    features training starts from.
    """

    def __init__(self, spec: dict, classes: Sequence[str], frozen_batchnorm: bool = False):
        super().__init__()
        self.encoder = models.ImageEncoder(spec)
        self.classes = list(classes)
        self.head = nn.Linear(self.encoder.output_dim, len(self.classes))
        self.frozen_batchnorm = frozen_batchnorm

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode and self.frozen_batchnorm:
            for module in self.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @property
    def spec(self) -> dict:
        return self.encoder.spec

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encoder.encode_image(image, normalize=normalize)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.head(self.encoder.encode_image(image)),)  # (B, classes) logits, as a tuple like every task's outputs

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, classes)`` float32 logits (the encoder may run in bf16: ``evaluate.encoders_in_precision``)."""
        return nn.functional.linear(self.encode_image(image).float(), self.head.weight.float(), self.head.bias.float())


class PatchClassifier(ImageClassifier):
    """A frozen encoder, its probe's head, a bank of regions for each class in ``bank_classes`` (by default every
    class; runs exported before the choice of banks have one each) and a stacking probe (``patches.py``): the logits
    are the stacking probe's, on the head's logits and the log region distances to each bank. Not trained by the
    trainer: ``mmcontrast finetune`` fits it, and exports it when cross-validation prefers it."""

    def __init__(self, spec: dict, classes: Sequence[str], bank_sizes: Sequence[int], region_dim: int,
                 bank_classes: Sequence[str] | None = None):
        from mmcontrast.patches import PatchMemory, tap_layers

        super().__init__(spec, classes)
        self.bank_classes = list(self.classes if bank_classes is None else bank_classes)
        distinct = set(self.bank_classes)
        if not distinct or len(distinct) != len(self.bank_classes) or len(distinct) != len(bank_sizes) or not distinct <= set(self.classes):
            raise UsageError(f"{models.MODEL_CONFIG_FILE}: patches.bank_classes {self.bank_classes} must name "
                             f"{len(bank_sizes)} distinct classes of {self.classes}; export the run again with mmcontrast finetune")
        self.layers = tap_layers(self.encoder.backbone)
        self.memory = PatchMemory(bank_sizes, region_dim)
        self.stack = nn.Linear(len(self.classes) + len(bank_sizes), len(self.classes))

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        from mmcontrast.patches import MapTap, region_features

        with MapTap(self.encoder.backbone, self.layers) as tap:
            pooled = self.encoder.encode_image(image).float()
        with torch.autocast(image.device.type, enabled=False):  # distances in float32, whatever the encoder ran in
            base = nn.functional.linear(pooled, self.head.weight.float(), self.head.bias.float())
            distances = self.memory.distances(region_features(tap.maps))
            inputs = torch.cat([base, distances.clamp_min(1e-6).log()], 1)
            return nn.functional.linear(inputs, self.stack.weight.float(), self.stack.bias.float())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.logits(image),)


# ---------------------------------------------------------------- starting points


def probe_head(features: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, d), bias (C,)) of the linear probe every command fits (``probe.fit_probe``) on raw features, folded
    into a linear layer on raw features: LP-FT's start. Classes absent from ``labels`` get zero rows."""
    from mmcontrast.probe import fit_probe

    return fit_probe(features, labels, seed).head(n_classes)


def write_start(path: Path, spec: dict, encoder_state: dict, classes: Sequence[str],
                head: tuple[np.ndarray, np.ndarray] | None, seed: int = 0) -> Path:
    """The starting weights of a fine-tuning run (encoder + head) as one safetensors file; ``head=None``: random."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = ImageClassifier(spec, classes)
    model.encoder.load_state_dict(encoder_state)
    if head is not None:
        with torch.no_grad():
            model.head.weight.copy_(torch.from_numpy(head[0]))
            model.head.bias.copy_(torch.from_numpy(head[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    models.atomic_save(save_file, models.state_dict_for_file(model), path)  # a killed preparation starts again cleanly
    return path


def write_patch_classifier(run_dir: Path, spec: dict, encoder_state: dict, classes: Sequence[str],
                           head: tuple[np.ndarray, np.ndarray], banks: Sequence[torch.Tensor],
                           stack: tuple[np.ndarray, np.ndarray], bank_classes: Sequence[str]) -> None:
    """A ``PatchClassifier``'s files in ``run_dir``: ``model_config.json`` (with the banks' classes and sizes) and
    ``model.safetensors`` (encoder, probe head, banks, stacking probe)."""
    from safetensors.torch import save_file

    model = PatchClassifier(spec, classes, [len(b) for b in banks], banks[0].shape[1], bank_classes)
    model.encoder.load_state_dict(encoder_state)
    model.memory.fill(banks)
    with torch.no_grad():
        for layer, (weight, bias) in ((model.head, head), (model.stack, stack)):
            layer.weight.copy_(torch.from_numpy(np.asarray(weight, dtype=np.float32)))
            layer.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    patches = {"bank_classes": list(bank_classes), "bank_sizes": [len(b) for b in banks], "region_dim": int(banks[0].shape[1])}
    (run_dir / models.MODEL_CONFIG_FILE).write_text(json.dumps(classifier_config(spec, classes, patches), indent=2))
    models.atomic_save(save_file, models.state_dict_for_file(model), run_dir / models.WEIGHTS_FILE)


def classifier_config(spec: dict, classes: Sequence[str], patches: dict | None = None) -> dict:
    """What ``model_config.json`` holds for a classifier run (``patches``: a ``PatchClassifier``'s bank classes, bank
    sizes and region width)."""
    return {CLASSIFIER_KEY: {"encoder": spec, "classes": list(classes), **({"patches": patches} if patches else {})}}


def save_classifier_files(model: ImageClassifier, out_dir: str | Path, weights: bool = True,
                          state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model_config.json`` and (``weights``) ``model.safetensors``: encoder and head."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / models.MODEL_CONFIG_FILE).write_text(json.dumps(classifier_config(model.spec, model.classes), indent=2))
    if weights:
        models.atomic_save(save_file, models.state_dict_for_file(model, state_dict), out / models.WEIGHTS_FILE)


def load_classifier(cfg: dict, weights: Path | None, device: str) -> tuple[ImageClassifier, Callable, None]:
    """``(classifier, preprocess, None)`` from a ``model_config.json`` dict and its weights (None: random)."""
    entry = cfg[CLASSIFIER_KEY]
    patches = entry.get("patches")
    model = (PatchClassifier(entry["encoder"], entry["classes"], patches["bank_sizes"], patches["region_dim"],
                             patches.get("bank_classes")) if patches
             else ImageClassifier(entry["encoder"], entry["classes"]))
    if weights is not None:
        state = models.strip_wrapper_prefixes(models.load_weights_file(weights))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise UsageError(f"{weights} does not match its classifier config: {str(err).splitlines()[0][:300]}") from None
    return model.to(device).eval(), models.image_eval_transform(entry["encoder"]), None


@torch.inference_mode()
def predict(model: ImageClassifier, preprocess: Callable, paths: Sequence[Path], batch_size: int = 128,
            workers: int = 0, progress: bool = False, on_batch=None):
    """``(EncodedImages of the readable paths, probabilities (n_ok, classes))`` — softmax of the head's logits."""
    from mmcontrast.evaluate import encode_images

    logits_model = _LogitsAsFeatures(model)
    encoded = encode_images(logits_model, preprocess, paths, batch_size, workers, progress=progress, desc="predict",
                            on_batch=on_batch, normalize=False)
    return encoded, encoded.features.softmax(dim=1)


class _LogitsAsFeatures(nn.Module):
    """The classifier seen through ``encode_image``: the head's logits are the "features" (evaluate's encoding path)."""

    def __init__(self, model: ImageClassifier):
        super().__init__()
        self.model = model

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.logits(image)


# ---------------------------------------------------------------- during training: scores on held-out images


def held_out_scores(preprocess: Callable, folder: str | Path, classes: Sequence[str]) -> Callable[[nn.Module], dict]:
    """The classify task's in-loop evaluation: top-1, mean per-class recall and loss (mean negative log-likelihood)
    of the model on ``folder`` (class folders). Folders missing from ``classes`` are a UsageError now. Nothing is
    kept: a run exports its last epoch, and ``mmcontrast finetune`` reads these scores to choose between runs."""
    from mmcontrast.evaluate import class_folders, classification_metrics, log_loss

    paths, names = class_folders(folder)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise UsageError(f"validation classes {', '.join(unknown)} are not among the training classes {', '.join(classes)}")
    targets = [list(classes).index(n) for n in names]

    def evaluate(model: nn.Module) -> dict:
        encoded, probs = predict(model, preprocess, paths)
        ok_targets = torch.tensor([targets[i] for i in encoded.ok])
        metrics = classification_metrics(probs, ok_targets.tolist(), list(classes))
        return {"eval/val_top1": metrics["top1"], "eval/val_mean_per_class_recall": metrics["mean_per_class_recall"],
                "eval/val_loss": log_loss(probs, ok_targets)}

    return evaluate
