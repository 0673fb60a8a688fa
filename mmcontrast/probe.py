"""The linear probe: the one way a logistic-regression head is fitted on frozen features, wherever one is fitted.

``eval linear-probe``, every draw of ``eval few-shot``, ``finetune``'s starting head (LP-FT) and its
cross-validated choice between that head and fine-tuning all call ``fit_probe``, so the same features and labels
give the same predictions in every command. The recipe: features (the encoder's raw output, not L2-normalised:
the head a fine-tuning run starts from applies to raw features) standardised with the training images' mean and
standard deviation; multinomial logistic regression; its inverse regularisation C chosen from ``PROBE_CS`` by
stratified k-fold cross-validation on the training images (up to ``PROBE_FOLDS`` folds, log-loss: smoother than
accuracy on a few images, where folds tie), then refitted on all of them. Standardised, one C grid suits every
feature set (64-d embeddings and 3,072 raw pixels alike).

Does not own encoding images (``evaluate.py``) or the heads' files (``classifier.py``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np

PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse regularisation strengths tried, on standardised features
PROBE_FOLDS = 5  # cross-validation folds choosing C (fewer when a class has fewer images)
PROBE_MAX_ITER = 1000


def quiet_sklearn() -> contextlib.ExitStack:
    """scikit-learn's notices of its own coming API changes (FutureWarning) and of an iteration cap reached while C
    is being chosen, not meant for our users, silenced."""
    from sklearn.exceptions import ConvergenceWarning

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    return stack


@dataclass
class Probe:
    """A fitted probe: standardisation and logistic regression over the classes seen in training."""

    mean: np.ndarray  # (d,) of the training features
    scale: np.ndarray  # (d,) their standard deviation (1 where constant)
    coef: np.ndarray  # (k, d) on standardised features; k = 1 for two classes (scikit-learn's convention)
    intercept: np.ndarray  # (k,)
    classes: np.ndarray  # (c,) the class indices seen in training, sorted
    C: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        """``(n, c)`` logits over ``classes`` of raw features ``x`` ``(n, d)``."""
        if len(self.classes) == 1:
            return np.zeros((len(x), 1))
        z = ((x - self.mean) / self.scale) @ self.coef.T + self.intercept
        return np.concatenate([-z / 2, z / 2], axis=1) if self.coef.shape[0] == 1 else z

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The class index of each row of ``x``."""
        return self.classes[self.decision(x).argmax(axis=1)]

    def scores(self, x: np.ndarray, n_classes: int) -> np.ndarray:
        """``(n, n_classes)`` probabilities; classes never seen in training get 0."""
        z = self.decision(x)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        out = np.zeros((len(x), n_classes), dtype=np.float32)
        out[:, self.classes] = z / z.sum(axis=1, keepdims=True)
        return out

    def head(self, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(weight ``(n_classes, d)``, bias ``(n_classes,)``) of a linear layer on raw features giving ``decision``'s
        logits: the standardisation folded in, w·((x − μ)/σ) + b = (w/σ)·x + (b − w·μ/σ); unseen classes get zero rows
        (and a logit far below the others)."""
        coef = self.coef / self.scale
        intercept = self.intercept - coef @ self.mean
        if len(self.classes) == 1:
            coef, intercept = np.zeros((1, coef.shape[1])), np.zeros(1)
        elif coef.shape[0] == 1:
            coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        weight, bias = np.zeros((n_classes, coef.shape[1])), np.full(n_classes, -1e4 if len(self.classes) < n_classes else 0.0)
        weight[self.classes], bias[self.classes] = coef, intercept
        return weight.astype(np.float32), bias.astype(np.float32)


def cross_validation_folds(labels: np.ndarray, most: int = PROBE_FOLDS) -> int:
    """Stratified folds the labels allow: ``most``, or the smallest class's count when it is smaller (1: none)."""
    present = np.unique(labels)
    return int(min(most, np.bincount(labels)[present].min()))


def fit_probe(x: np.ndarray, y: np.ndarray, seed: int = 0, c: float | None = None) -> Probe:
    """The probe of the module docstring, fitted on raw features ``x`` ``(n, d)`` with class indices ``y`` ``(n,)``.
    ``seed`` decides the cross-validation folds; with one image per class nothing can be held out and C = 1. ``c``:
    that C, not chosen (out-of-fold probes whose logits must be on the scale of a probe already fitted)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(x, dtype=np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    folds = cross_validation_folds(y)
    with quiet_sklearn():
        if folds < 2 or len(np.unique(y)) < 2 or c is not None:
            c = 1.0 if c is None else c
            model = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER).fit(z, y) if len(np.unique(y)) > 1 else None
        else:
            cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            model = LogisticRegressionCV(Cs=list(PROBE_CS), cv=cv, scoring="neg_log_loss", max_iter=PROBE_MAX_ITER).fit(z, y)
            c = float(np.atleast_1d(model.C_)[0])
    if model is None:  # one class: every image is that class
        return Probe(mean, scale, np.zeros((1, x.shape[1])), np.zeros(1), np.unique(y), c)
    return Probe(mean, scale, model.coef_, model.intercept_, model.classes_, c)
