"""Zero-shot classification with a CLIP model: prompt templates and the classifier.

Owns the template sets (``default``, ``openai``, or a text file of templates) and
``ZeroShotClassifier``, which holds one L2-normalised text embedding per label (the prompt
ensemble) and turns image features into probabilities with the model's learned temperature.
The class embeddings are built by ``open_clip.build_zero_shot_classifier`` itself, so they are
exactly open_clip's. Does not own image discovery, decoding or metrics: see ``evaluate.py``.

Example:
    >>> model, preprocess, tokenizer = mmcontrast.load("runs/x")  # doctest: +SKIP
    >>> clf = ZeroShotClassifier(model, tokenizer, ["cat", "dog"], preprocess=preprocess)  # doctest: +SKIP
    >>> probs = clf.predict([Image.open("cat.jpg")])  # (1, 2), rows sum to 1  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from open_clip import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from mmcontrast.errors import UsageError

# A small general set: cheap to encode, robust across domains (a subset of CLIP's prompt ensemble).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
)
# The 80 ImageNet templates of the CLIP paper, as open_clip ships them (callables there, strings here).
OPENAI_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_TEMPLATES, "openai": OPENAI_TEMPLATES}
CLASSES_PER_BATCH = 10  # labels whose prompts are encoded in one forward pass (open_clip's default)


def load_templates(spec: str | Sequence[str]) -> list[str]:
    """Templates from a set name (``default``, ``openai``), a file, or a sequence of strings.

    A file holds one template per line, each containing ``{}`` where the label goes; blank lines
    and lines starting with ``#`` are ignored.
    """
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[spec])
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"templates {spec!r}: give one of {', '.join(TEMPLATE_SETS)} or a text file with one template per line")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"templates file {spec} is not UTF-8 text") from None
        templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        source = f"templates file {spec}"
    else:
        templates, source = list(spec), "templates"
    if not templates:
        raise UsageError(f"{source} holds no templates; write one per line, each containing {{}}")
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise UsageError(f"{source}: template {missing[0]!r} has no {{}} where the label goes")
    return templates


def check_labels(labels: Sequence[str]) -> list[str]:
    """Strip labels and reject an empty list, empty labels or duplicates (UsageError)."""
    labels = [str(label).strip() for label in labels]
    if not labels:
        raise UsageError("the label list is empty; give labels with --labels cat,dog or --labels-file FILE (one per line)")
    if any(not label for label in labels):
        raise UsageError("a label is empty (two commas in a row, or a blank line?); remove it")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UsageError(f"labels are repeated: {', '.join(duplicates)}; give each label once")
    return labels


class ZeroShotClassifier:
    """Classify images among ``labels`` by their similarity to prompt-ensembled label embeddings.

    Args:
        model: an open_clip CLIP model (anything with ``encode_image``, ``encode_text`` and ``logit_scale``).
        tokenizer: its tokenizer; ``None`` (an image-only encoder) is a UsageError.
        labels: label names, inserted verbatim into the templates.
        templates: a set name, a templates file, or a sequence of strings containing ``{}``.
        preprocess: the model's eval transform; needed only to pass PIL images to ``predict``.

    Attributes:
        class_embeddings: ``(n_labels, d)`` L2-normalised, row i for ``labels[i]``.
        logit_scale: the multiplier applied to cosine similarities (1/temperature).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable | None,
        labels: Sequence[str],
        templates: str | Sequence[str] = "default",
        preprocess: Callable | None = None,
    ):
        if tokenizer is None or not hasattr(model, "encode_text"):
            raise UsageError("zero-shot classification needs a text tower; this checkpoint is an image-only encoder "
                             "(use `mmcontrast eval linear-probe` or `eval knn` for it)")
        self.model = model
        self.preprocess = preprocess
        self.labels = check_labels(labels)
        self.templates = load_templates(templates)
        self.device = next(model.parameters()).device
        weights = build_zero_shot_classifier(
            model, tokenizer, self.labels, self.templates,
            num_classes_per_batch=CLASSES_PER_BATCH, device=self.device, use_tqdm=False,
        )  # (d, n_labels)
        self.class_embeddings = weights.T.float().contiguous()  # (n_labels, d) L2-normalised, float32 under autocast too
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor | Sequence) -> torch.Tensor:
        """``(B, 3, H, W)`` preprocessed tensor, or a list of PIL images → ``(B, d)`` L2-normalised."""
        if not isinstance(images, torch.Tensor):
            if self.preprocess is None:
                raise TypeError("pass preprocess= to ZeroShotClassifier to classify PIL images, or pass a tensor")
            images = torch.stack([self.preprocess(image) for image in images])
        features = self.model.encode_image(images.to(self.device, non_blocking=True))
        return nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """``(B, d)`` L2-normalised features → ``(B, n_labels)`` scaled cosine similarities."""
        return self.logit_scale * image_features.to(self.class_embeddings) @ self.class_embeddings.T

    def predict(self, images: torch.Tensor | Sequence) -> torch.Tensor:
        """Images → ``(B, n_labels)`` probabilities (softmax over labels; rows sum to 1)."""
        return self.logits(self.encode_images(images)).softmax(dim=-1)

    def top_k(self, probs: torch.Tensor, k: int = 1) -> list[list[tuple[str, float]]]:
        """``(B, n_labels)`` probabilities → per image the ``k`` best ``(label, probability)``, best first."""
        values, indices = probs.topk(min(k, len(self.labels)), dim=-1)
        return [[(self.labels[i], float(v)) for v, i in zip(row_v.tolist(), row_i.tolist())] for row_v, row_i in zip(values, indices)]
