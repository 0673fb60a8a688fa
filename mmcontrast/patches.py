"""Patch-level scores: how far each region of an image lies from the regions of each class's images.

Globally pooled features average a small local defect away (a crack in a solar cell, a 10 px speckle in a fabric):
on ELPV the frozen probe finds it no better with every label than with 50 per class. PatchCore (Roth et al., 2022)
keeps instead the mid-level feature of every region of the nominal images in a memory bank and scores an image by
its region farthest from the bank. Here every class has a bank (no class has to be named nominal): an image's
``distances`` are, per class, the largest over its regions of the distance to the nearest region of that class's
images. The classifier that uses them (``classifier.PatchClassifier``) stacks the logarithms of the distances to the
banks it reads (below) beside the frozen probe's logits in a second probe, fitted on out-of-fold logits and
leave-one-out distances of the labelled images — so it learns how much each of those banks says, measured on images
no bank held.

Only the banks that set their class apart are read (``separation``): the area under the ROC curve of "this image is
of the class" from the leave-one-out distance to the class's bank, nearer meaning yes, kept at ``SEPARATES`` or more
(and always the best one). A defective cell is a functional cell plus a crack: every region of it but the crack has
near neighbours in the functional bank, so the distance to that bank is PatchCore's anomaly score; while the cracks
in the defective bank are each unlike the next, so that bank sets defective cells apart no better than chance (a
bank reliably farther from its own class, AUC well below 0.5, is left out too: in the binary case the other bank says
the same, and reading both scored lower on ELPV). On ELPV (50 labelled cells per class, three draws) the functional
bank separated 0.73-0.83 with the labelled cells alone and 0.83-0.89 with the unlabelled ones added, the defective
bank 0.38-0.54; fitted on each draw's 100 labelled cells, the probe stacked with the functional bank alone scored
81.2 / 81.8 / 80.3% top-1 on the test cells where both banks scored 78.8 / 81.4 / 78.8%.

Regions: the timm encoder's stride-8 and stride-16 feature maps (PatchCore's mid-level pair; early enough to keep
where things are, late enough to say what they are), the stride-8 map averaged down to the stride-16 grid,
concatenated, then averaged over each 3 × 3 neighbourhood (PatchCore's local aggregation). A bank holds at most
``BANK_PATCHES`` regions, a seeded random subset (PatchCore's coreset keeps 1-10%).

Unlabelled images (``finetune --unlabelled``) fill the banks: the frozen probe of the labelled images labels them,
and each class's bank takes the more confident three quarters of the images it was given (``pseudo_members``). On
ELPV draw s0 (test cells, top-1 / mean per-class recall; both banks read): banks of the labelled cells alone 78.8 /
75.4; with the confident half of the unlabelled cells 79.2 / 78.5, three quarters 80.0 / 78.3 (90% of those called
functional are); pseudo-labels from the stacked classifier instead of the probe 75.7 / 76.0 (and a pass over every
unlabelled region).

Does not own the classifier (``classifier.py``), the probe (``probe.py``) or the cross-validation that chooses
between classifiers (``finetune.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmcontrast.errors import UsageError

REDUCTIONS = (8, 16)  # the feature maps whose regions are compared (output stride)
BANK_PATCHES = 50_000  # regions per class bank at most (a random subset beyond)
LABELLED_MOST = 500  # labelled images the patch classifier is fitted on at most: their pairwise distances are kept
UNLABELLED_MOST = 4000  # unlabelled images encoded at most (a seeded sample): the banks keep 50,000 regions anyway
PSEUDO_SHARE = 0.75  # of the unlabelled images the probe gives a class, the more confident three quarters join its bank
SEPARATES = 0.6  # a bank is read by the stacking probe when its leave-one-out ROC AUC for its class is at least this


def tap_layers(backbone: nn.Module) -> list[str]:
    """The module names of a timm model's stride-8 and stride-16 outputs (its ``feature_info``); a UsageError for
    encoders that do not say (open_clip towers, timm models without them)."""
    info = getattr(backbone, "feature_info", None)
    by_reduction = {}
    for entry in (info.info if hasattr(info, "info") else info) or []:
        by_reduction[entry.get("reduction")] = entry.get("module")  # the last module at a stride is its output
    if not all(by_reduction.get(r) for r in REDUCTIONS):
        raise UsageError("patch scores need a timm image encoder with stride-8 and stride-16 feature maps (timm:NAME)")
    return [by_reduction[r] for r in REDUCTIONS]


def has_patches(backbone: nn.Module) -> bool:
    try:
        tap_layers(backbone)
        return True
    except UsageError:
        return False


class MapTap:
    """``with MapTap(backbone, names) as tap:`` — the outputs of the named modules during a forward, in ``tap.maps``."""

    def __init__(self, backbone: nn.Module, names: Sequence[str]):
        self.modules = [backbone.get_submodule(name) for name in names]
        self.maps: list[torch.Tensor | None] = [None] * len(names)
        self.handles = []

    def __enter__(self) -> MapTap:
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(lambda _m, _in, out, i=i: self.maps.__setitem__(i, out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def region_features(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, regions, C)`` float32 from the stride-8 and stride-16 maps ``(B, c, h, w)`` (module docstring)."""
    fine, coarse = (m.float() for m in maps)
    fine = nn.functional.adaptive_avg_pool2d(fine, coarse.shape[-2:])
    joined = nn.functional.avg_pool2d(torch.cat([fine, coarse], 1), 3, stride=1, padding=1, count_include_pad=False)
    return joined.flatten(2).transpose(1, 2)


def nearest(queries: torch.Tensor, bank: torch.Tensor | object) -> torch.Tensor:
    """``(n,)`` Euclidean distance of each query row to its nearest row of ``bank`` (a tensor, or a ``flat_index``
    of one); inf for an empty bank. Exact: faiss's brute-force search, 1.35x torch's matmul-and-min here."""
    index = bank if not isinstance(bank, torch.Tensor) else flat_index(bank)
    if index.ntotal == 0:
        return torch.full((len(queries),), float("inf"))
    found, _ = index.search(np.ascontiguousarray(queries.float().numpy()), 1)
    return torch.from_numpy(found[:, 0]).clamp_min(0).sqrt()


def flat_index(bank: torch.Tensor):
    """An exact faiss index of a bank's rows (searched with the process's torch thread count)."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(bank.shape[1])
    if len(bank):
        index.add(np.ascontiguousarray(bank.float().numpy()))
    return index


class PatchMemory(nn.Module):
    """The banks of regions the stacking probe reads, one per class it reads (buffers ``bank_K``, saved with the
    classifier's weights): ``bank_K`` holds the regions of the K-th of ``PatchClassifier.bank_classes``, not of class
    K (``bank_0`` may be class 1's); the names stay so that runs written with a bank per class load."""

    def __init__(self, sizes: Sequence[int], dim: int):
        super().__init__()
        for k, size in enumerate(sizes):
            self.register_buffer(f"bank_{k}", torch.zeros(size, dim))

    def _apply(self, fn, recurse: bool = True):
        """Moves with the model but stays float32: ``--precision auto`` casts encoders to bf16, whose 8-bit mantissa
        would blur the distances the classifier reads."""
        self.indexes = None
        return super()._apply(lambda t: fn(t).float() if t.is_floating_point() else fn(t), recurse)

    @property
    def banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"bank_{k}") for k in range(len(list(self.buffers())))]

    def fill(self, banks: Sequence[torch.Tensor]) -> None:
        for k, bank in enumerate(banks):
            setattr(self, f"bank_{k}", bank.float().contiguous())
        self.indexes = None

    def distances(self, regions: torch.Tensor) -> torch.Tensor:
        """``(B, banks)``: per image, its largest region distance to each bank."""
        if getattr(self, "indexes", None) is None:  # built once, after the weights are loaded
            self.indexes = [flat_index(bank.detach().cpu()) for bank in self.banks]
        flat = regions.reshape(-1, regions.shape[-1]).float().cpu()
        return torch.stack([nearest(flat, index).reshape(regions.shape[:2]).amax(1) for index in self.indexes], 1).to(regions.device)


def stack_inputs(logits: torch.Tensor | np.ndarray, distances: torch.Tensor | np.ndarray) -> np.ndarray:
    """What the stacking probe reads: the frozen probe's logits and the log distances to the banks it reads, side by
    side."""
    logits, distances = np.asarray(logits, dtype=np.float64), np.asarray(distances, dtype=np.float64)
    return np.concatenate([logits, np.log(np.maximum(distances, 1e-6))], axis=1)


def separation(distances: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(classes,)``: per class k, the ROC AUC of telling k's images from the rest by their distance to k's bank
    (nearer: k), from ``distances`` ``(n, classes)``; ties count half (Mann-Whitney), NaN where a side is empty.
    Not sklearn's ``roc_auc_score``: it refuses inf, the distance of an image whose class has no other image."""
    from scipy.stats import rankdata  # scikit-learn's own dependency

    out = np.full(distances.shape[1], np.nan)
    for k in range(distances.shape[1]):
        own = labels == k
        n_own, n_rest = int(own.sum()), int((~own).sum())
        if n_own and n_rest:
            ranks = rankdata(-distances[:, k])  # the nearest ranks highest
            out[k] = (ranks[own].sum() - n_own * (n_own + 1) / 2) / (n_own * n_rest)
    return out


def read_banks(separations: np.ndarray) -> np.ndarray:
    """The classes whose banks the stacking probe reads, ascending: those separating at ``SEPARATES`` or more, else
    the best one (a class whose separation is undefined, NaN, only when none is defined)."""
    filled = np.nan_to_num(separations, nan=-1.0)
    kept = np.flatnonzero(filled >= SEPARATES)
    return kept if len(kept) else np.array([int(np.argmax(filled))])


# ---------------------------------------------------------------- encoding and fitting


class PooledAndRegions(nn.Module):
    """An ``ImageEncoder`` seen by ``evaluate.encode_images``: each image's pooled features, then its regions
    flattened, in one row (``split`` takes them apart)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.names = encoder, tap_layers(encoder.backbone)
        self.regions_shape: tuple[int, int] | None = None

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        with MapTap(self.encoder.backbone, self.names) as tap:
            pooled = self.encoder.encode_image(image).float()
        regions = region_features(tap.maps)
        self.regions_shape = tuple(regions.shape[1:])
        return torch.cat([pooled, regions.flatten(1)], 1)

    def split(self, rows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """(pooled features ``(n, d)``, regions ``(n, regions, C)`` in float16) of ``encode_image``'s rows."""
        n_regions, dim = self.regions_shape
        pooled = rows[:, : rows.shape[1] - n_regions * dim]
        return pooled.numpy(), rows[:, pooled.shape[1]:].reshape(len(rows), n_regions, dim).half()


@dataclass
class Regions:
    """The regions of a set of images, ``(n, regions, C)`` float16, and each labelled image's region distances to
    every other labelled image (``pairwise[i, j]``: ``(regions,)`` of i's regions to j's nearest; filled lazily)."""

    regions: torch.Tensor
    pairwise: torch.Tensor | None = None

    def compute_pairwise(self) -> torch.Tensor:
        if self.pairwise is None:
            n, r, dim = self.regions.shape
            everything = self.regions.float().reshape(n * r, dim)
            self.pairwise = torch.empty(n, n, r, dtype=torch.float16)
            for i in range(n):  # i's regions against every image's at once: (r, n, r), the nearest per image
                query = self.regions[i].float()
                sq = (query * query).sum(1, keepdim=True) - 2 * query @ everything.T + (everything * everything).sum(1)
                self.pairwise[i] = sq.reshape(r, n, r).amin(2).clamp_min(0).sqrt().T.half()
                self.pairwise[i, i] = float("inf")
        return self.pairwise


def pseudo_members(probabilities: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """Per class, the unlabelled images (row indices) its bank takes: of those the probe gives the class, the more
    confident ``PSEUDO_SHARE`` (at least one when any)."""
    given = probabilities.argmax(1)
    out = []
    for k in range(n_classes):
        rows = np.flatnonzero(given == k)
        order = rows[np.argsort(-probabilities[rows, k], kind="stable")]
        out.append(np.sort(order[: max(1, int(round(PSEUDO_SHARE * len(order))))]) if len(order) else order)
    return out


@dataclass
class PatchSet:
    """What the patch classifier is fitted from: the labelled images' pooled features, labels and ``Regions``, and
    the unlabelled images' pooled features and regions (None without ``--unlabelled``)."""

    features: np.ndarray
    labels: np.ndarray
    regions: Regions
    n_classes: int
    unlabelled_features: np.ndarray | None = None
    unlabelled_regions: torch.Tensor | None = None


@dataclass
class PatchFit:
    """A fitted patch classifier: the frozen probe's head, the stacking probe, per class the unlabelled regions its
    bank holds beside the labelled images' (``pseudo``), and which banks the stacking probe reads (``read``, class
    indices, chosen by their ``separations``)."""

    head: tuple[np.ndarray, np.ndarray]
    stack: object  # probe.Probe on stack_inputs
    pseudo: list[torch.Tensor]
    train: np.ndarray  # the labelled rows it was fitted on
    read: np.ndarray  # (banks,) class indices, ascending: the order of the exported banks and the stack's distances
    separations: np.ndarray  # (classes,) each class's own bank's leave-one-out ROC AUC (``separation``)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.head[0].T + self.head[1]

    def banks(self, data: PatchSet) -> list[torch.Tensor]:
        """The banks to export, those it reads: every labelled region of the class, then its unlabelled ones."""
        y = data.labels[self.train]
        return [torch.cat([data.regions.regions[self.train[y == k]].reshape(-1, data.regions.regions.shape[-1]).float(),
                           self.pseudo[k]]) for k in self.read]

    def describe(self, classes: Sequence[str]) -> str:
        """Which banks it reads and how well each class's bank separated, in words."""
        def said(ks) -> str:
            return ", ".join(f"{classes[k]} ({self.separations[k]:.2f})" for k in ks)

        left = [k for k in range(len(classes)) if k not in set(self.read.tolist())]
        fallback = not (self.separations[self.read] >= SEPARATES).all()
        return (f"the stacking probe reads the region distance to the bank of {said(self.read)}"
                + (f" (none reached {SEPARATES}: the best is read)" if fallback else "")
                + (f"; left out, separating their class below {SEPARATES}: {said(left)}" if left else "")
                + " (ROC AUC of each class's images from its bank's leave-one-out distances)")


def _distances(data: PatchSet, rows: np.ndarray, members: np.ndarray, pseudo: list[torch.Tensor],
               classes: Sequence[int] | None = None) -> np.ndarray:
    """``(len(rows), len(classes))`` region distances of labelled images ``rows`` to each of ``classes``' banks (all
    by default): the labelled ``members`` of the class (never the image itself) and its unlabelled regions."""
    pairwise = data.regions.compute_pairwise()
    classes = range(data.n_classes) if classes is None else classes
    out = np.zeros((len(rows), len(classes)))
    for col, k in enumerate(classes):
        same = members[data.labels[members] == k]
        unlabelled = flat_index(pseudo[k])
        for i, row in enumerate(rows):
            others = same[same != row]
            per_region = pairwise[row, others].float().amin(0) if len(others) else torch.full((pairwise.shape[2],), float("inf"))
            if unlabelled.ntotal:
                per_region = torch.minimum(per_region, nearest(data.regions.regions[row].float(), unlabelled))
            out[i, col] = float(per_region.amax())
    return out


def _out_of_fold_logits(data: PatchSet, train: np.ndarray, seed: int, c: float) -> np.ndarray:
    """The frozen probe's logits of each training image from a probe that did not see it (inner stratified folds),
    each fitted with the C the probe of all of ``train`` chose: the stacking probe learns a weight for logits of that
    probe's scale (letting each inner probe choose its own C mixed scales: on ELPV s0 inner C ranged over 10x, and
    the patch classifier's CV top-1 rose from 66% to 68% with one C, its test top-1 from 81.2% to 81.8%)."""
    from sklearn.model_selection import StratifiedKFold

    from mmcontrast.probe import cross_validation_folds, fit_probe

    y = data.labels[train]
    out = np.zeros((len(train), data.n_classes))
    folds = max(2, cross_validation_folds(y))
    for inner, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(train, y):
        weight, bias = fit_probe(data.features[train[inner]], y[inner], seed, c=c).head(data.n_classes)
        out[held] = data.features[train[held]] @ weight.T + bias
    return out


def _pseudo_banks(data: PatchSet, head: tuple[np.ndarray, np.ndarray], train: np.ndarray, seed: int) -> list[torch.Tensor]:
    """Per class, the regions of the unlabelled images the probe gives it most confidently (``pseudo_members``), a
    random subset so that the class's bank stays within ``BANK_PATCHES`` with its labelled regions."""
    empty = [torch.zeros(0, data.regions.regions.shape[-1])] * data.n_classes
    if data.unlabelled_features is None or not len(data.unlabelled_features):
        return empty
    logits = data.unlabelled_features @ head[0].T + head[1]
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    members = pseudo_members(probabilities / probabilities.sum(1, keepdims=True), data.n_classes)
    per_image = data.regions.regions.shape[1]
    banks = []
    for k, rows in enumerate(members):
        room = max(0, BANK_PATCHES - per_image * int((data.labels[train] == k).sum()))
        regions = data.unlabelled_regions[torch.from_numpy(rows)].reshape(-1, data.unlabelled_regions.shape[-1])
        if len(regions) > room:
            regions = regions[torch.from_numpy(np.sort(np.random.default_rng(seed + k).choice(len(regions), room, replace=False)))]
        banks.append(regions.float())
    return banks


def fit(data: PatchSet, train: np.ndarray, seed: int = 0) -> PatchFit:
    """The patch classifier of the labelled rows ``train`` (and the unlabelled images): the frozen probe, the banks,
    the banks that separate their class (``read_banks``), and the stacking probe fitted on out-of-fold logits and
    leave-one-out distances of ``train`` to those."""
    from mmcontrast.probe import fit_probe

    probe = fit_probe(data.features[train], data.labels[train], seed)
    head = probe.head(data.n_classes)
    pseudo = _pseudo_banks(data, head, train, seed)
    distances = _distances(data, train, train, pseudo)
    separations = separation(distances, data.labels[train])
    read = read_banks(separations)
    inputs = stack_inputs(_out_of_fold_logits(data, train, seed, probe.C), distances[:, read])
    return PatchFit(head, fit_probe(inputs, data.labels[train], seed), pseudo, train, read, separations)


def score_rows(model: PatchFit, data: PatchSet, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), classes)`` probabilities of labelled rows the fit did not see (a cross-validation fold's
    held-out images)."""
    inputs = stack_inputs(model.logits(data.features[rows]), _distances(data, rows, model.train, model.pseudo, model.read))
    return model.stack.scores(inputs, data.n_classes)


def score_images(model: PatchFit, data: PatchSet, features: np.ndarray, regions: torch.Tensor) -> np.ndarray:
    """``(n, classes)`` probabilities of new images (pooled ``features``, ``regions``) against the fit's banks
    (``--val``)."""
    banks = model.banks(data)
    memory = PatchMemory([len(bank) for bank in banks], banks[0].shape[1])
    memory.fill(banks)
    distances = torch.cat([memory.distances(chunk) for chunk in regions.split(64)])  # as the exported model, a batch at a time
    return model.stack.scores(stack_inputs(model.logits(features), distances.numpy()), data.n_classes)


def encode(encoder: nn.Module, preprocess, paths: Sequence[Path], progress: str | None = None):
    """``(pooled (n_ok, d), regions (n_ok, regions, C) float16, ok row indices, {index: error})`` of ``paths``."""
    from mmcontrast.evaluate import encode_images

    both = PooledAndRegions(encoder.eval())
    encoded = encode_images(both, preprocess, paths, workers=0, normalize=False, progress=progress is not None,
                            desc=progress or "encode")
    if not encoded.ok:
        return np.zeros((0, encoder.output_dim), np.float32), torch.zeros(0, 0, 0, dtype=torch.float16), [], encoded.errors
    pooled, regions = both.split(encoded.features)
    return pooled, regions, encoded.ok, encoded.errors
