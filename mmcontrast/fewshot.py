"""Label efficiency: accuracy against the number of labelled images per class, with baselines beside it.

Owns drawing k labelled images per class (seeded, ``repeats`` times), the rules fit on each draw — a
logistic-regression probe whose regularisation is chosen by cross-validation within the draw, a
nearest-class-mean rule, and for CLIP a probe that starts from (and is pulled towards) the class names'
text embeddings — and the curves they give. Features are computed once per image by the caller
(``evaluate.encode_class_folders``), never once per draw; ``pixel_features`` is the raw-pixel baseline.

Does not own encoding images (``evaluate.py``), loading models (``models.py``) or drawing the figure
(``plots.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcontrast.errors import UsageError

DEFAULT_SHOTS = (1, 2, 5, 10, 20, 50)
PIXEL_SIDE = 32  # raw-pixel baseline: images resized to 32 x 32 RGB (3,072 values), L2-normalised


@dataclass
class Split:
    """Features of a labelled train folder and a test folder; labels index ``classes``."""

    train_x: np.ndarray  # (n_train, d)
    train_y: np.ndarray  # (n_train,)
    test_x: np.ndarray  # (n_test, d)
    test_y: np.ndarray  # (n_test,)


Rule = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (train_x, train_y, test_x) -> predicted classes


def check_shots(train_y: np.ndarray, classes: Sequence[str], shots: Sequence[int]) -> None:
    """A UsageError naming the first class with fewer training images than the largest shot count."""
    counts = np.bincount(train_y, minlength=len(classes))
    need = max(shots)
    short = [(classes[c], int(n)) for c, n in enumerate(counts) if n < need]
    if short:
        name, n = min(short, key=lambda item: item[1])
        raise UsageError(f"class {name!r} has {n} training image(s) but --shots asks for {need} per class; "
                         f"give smaller --shots (at most {n}) or add images to that class")


def draw(train_y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` training images of every class, drawn without replacement (seeded), in folder order: a draw
    of every image is the folder itself, and a probe fitted on it is ``eval linear-probe``'s."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(train_y == c), k, replace=False) for c in np.unique(train_y)]))


def logistic_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The probe every command fits (``probe.fit_probe``: standardised features, C by stratified cross-validation
    within the draw), fitted on the draw; the predicted class of each test row."""
    from mmcontrast.probe import fit_probe

    return fit_probe(train_x, train_y, seed).predict(test_x)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_class_mean(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each test image takes the class whose mean (L2-normalised) training feature is most cosine-similar."""
    classes = np.unique(train_y)
    train_x, test_x = _unit(train_x), _unit(test_x)
    means = np.stack([train_x[train_y == c].mean(axis=0) for c in classes])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return classes[(test_x @ means.T).argmax(axis=1)]


def text_prior_probe(text_weights: np.ndarray, logit_scale: float, steps: int = 100) -> Rule:
    """A linear head that starts from the class names' text embeddings (``text_weights``: (classes, d),
    L2-normalised, times ``logit_scale`` — the zero-shot classifier) and is fit to the draw with an L2 pull
    back towards them: with few images it stays near zero-shot, with more it moves (as WiSE-FT's and
    Tip-Adapter's text-initialised heads do)."""

    def rule(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
        import torch

        prior = torch.as_tensor(text_weights, dtype=torch.float32) * logit_scale  # (C, d)
        weight = prior.clone().requires_grad_(True)
        bias = torch.zeros(len(prior), requires_grad=True)
        x, y = torch.as_tensor(_unit(train_x), dtype=torch.float32), torch.as_tensor(train_y)
        pull = 1.0 / len(x)  # the prior's weight falls as labelled images arrive
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + pull * (weight - prior).pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            return (torch.as_tensor(_unit(test_x), dtype=torch.float32) @ weight.T + bias).argmax(dim=1).numpy()

    return rule


def curve(split: Split, rule: Rule, shots: Sequence[int], repeats: int, seed: int = 0) -> list[dict]:
    """``[{"shots": k, "mean", "std", "runs", "recall_mean", "recall_std", "recall_runs"}]``: test accuracy (top-1) and
    mean per-class recall (what an uneven test set's top-1 hides) of ``rule`` fit on ``repeats`` seeded draws of k
    images per class. The same draws for every feature set (the seed depends on k and the repeat only)."""
    points = []
    classes = np.unique(split.test_y)
    for k in shots:
        accuracies, recalls = [], []
        for r in range(repeats):
            idx = draw(split.train_y, k, seed=seed + 1000 * k + r)
            predicted = rule(split.train_x[idx], split.train_y[idx], split.test_x, seed=r)
            accuracies.append(float((predicted == split.test_y).mean()))
            recalls.append(float(np.mean([(predicted[split.test_y == c] == c).mean() for c in classes])))
        points.append({"shots": int(k), "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                       "runs": accuracies, "recall_mean": float(np.mean(recalls)), "recall_std": float(np.std(recalls)),
                       "recall_runs": recalls})
    return points


def pixel_features(paths: Sequence[Path], side: int = PIXEL_SIDE) -> tuple[np.ndarray, list[int]]:
    """Raw pixels as features: each image (decoded like every other path) resized to ``side`` x ``side`` RGB,
    flattened and L2-normalised. Returns the features of the readable images and their indices in ``paths``."""
    from data_tools.formats import ImageDecodeError, decode_image

    rows, ok = [], []
    for i, path in enumerate(paths):
        try:
            image = decode_image(path).convert("RGB").resize((side, side))
        except (ImageDecodeError, OSError):  # unreadable: left out, as the encoders' path leaves it out
            continue
        rows.append(np.asarray(image, dtype=np.float32).ravel())
        ok.append(i)
    x = np.stack(rows) if rows else np.zeros((0, side * side * 3), dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), ok


# ---------------------------------------------------------------- the curves of a checkpoint and its baselines

BASELINES = ("pixels", "random-init")
Loader = Callable[[bool], tuple]  # random_init -> (model, preprocess, tokenizer or None), as ``models.load``


def _encoded_split(model, preprocess, train_dir: str | Path, test_dir: str | Path, encode: dict) -> tuple[Split, list[str], int]:
    from mmcontrast import evaluate

    train, test, classes = evaluate.encode_class_folders(model, preprocess, train_dir, test_dir, normalize=False, **encode)
    split = Split(train.features.numpy(), train.labels.numpy(), test.features.numpy(), test.labels.numpy())
    return split, classes, len(train.errors) + len(test.errors)


def _pixel_split(train_dir: str | Path, test_dir: str | Path, classes: Sequence[str]) -> Split:
    from mmcontrast import evaluate

    def features(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
        paths, names = evaluate.class_folders(root)
        x, ok = pixel_features(paths)
        return x, np.array([classes.index(names[i]) for i in ok], dtype=np.int64)

    return Split(*features(train_dir), *features(test_dir))


def _zero_shot(model, tokenizer, classes: Sequence[str], templates: str, split: Split) -> tuple[float, np.ndarray, float]:
    """Zero-shot top-1 on the test features, and the classifier's (class embeddings, logit scale)."""
    from mmcontrast.evaluate import prompt_name
    from mmcontrast.zeroshot import ZeroShotClassifier

    classifier = ZeroShotClassifier(model, tokenizer, [prompt_name(c) for c in classes], templates)
    weights = classifier.class_embeddings.cpu().numpy()  # (C, d) L2-normalised
    accuracy = float(((split.test_x @ weights.T).argmax(axis=1) == split.test_y).mean())
    return accuracy, weights, classifier.logit_scale


def label_efficiency(load: Loader, train_dir: str | Path, test_dir: str | Path, shots: Sequence[int] = DEFAULT_SHOTS,
                     repeats: int = 5, baselines: Sequence[str] = BASELINES, templates: str = "default",
                     encode: dict | None = None, seed: int = 0) -> dict:
    """Accuracy on ``test_dir`` against labelled images per class drawn from ``train_dir`` (class folders).

    Curves (each ``[{"shots", "mean", "std", "runs"}]``): ``checkpoint`` (logistic probe on the checkpoint's
    frozen features), ``checkpoint_ncm`` (nearest class mean), the ``baselines`` (``pixels``, ``random_init``:
    the same probe), and for a CLIP checkpoint ``zero_shot`` (k = 0) and ``text_init`` (the probe started from
    the class names' text embeddings). Raises UsageError when a class has fewer images than ``max(shots)``.
    """
    encode = encode or {}
    model, preprocess, tokenizer = load(False)
    split, classes, n_errors = _encoded_split(model, preprocess, train_dir, test_dir, encode)
    check_shots(split.train_y, classes, shots)
    curves = {"checkpoint": curve(split, logistic_probe, shots, repeats, seed),
              "checkpoint_ncm": curve(split, nearest_class_mean, shots, repeats, seed)}
    if tokenizer is not None and hasattr(model, "encode_text"):
        accuracy, weights, scale = _zero_shot(model, tokenizer, classes, templates, split)
        curves["zero_shot"] = [{"shots": 0, "mean": accuracy, "std": 0.0, "runs": [accuracy]}]
        curves["text_init"] = curve(split, text_prior_probe(weights, scale), shots, repeats, seed)
    if "random-init" in baselines:
        random_model, random_preprocess, _ = load(True)
        random_split, _, _ = _encoded_split(random_model, random_preprocess, train_dir, test_dir, encode)
        curves["random_init"] = curve(random_split, logistic_probe, shots, repeats, seed)
    if "pixels" in baselines:
        curves["pixels"] = curve(_pixel_split(train_dir, test_dir, classes), logistic_probe, shots, repeats, seed)
    return {"curves": curves, "classes": list(classes), "n_train": int(len(split.train_y)), "n_test": int(len(split.test_y)),
            "n_errors": n_errors, "shots": [int(k) for k in shots], "repeats": int(repeats),
            "chance": 1.0 / len(classes), "dim": int(split.train_x.shape[1])}
