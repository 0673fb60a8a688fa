"""Near-duplicates in an index: groups of resized, recompressed or slightly cropped copies, and the one to keep.

Owns finding pairs above a cosine threshold with the index's range search, a chunk of queries at a time (memory
grows with the pairs found, never with N x N), grouping them (single linkage), choosing each group's keeper, and
calibrating the threshold on the index's own images (``calibrate_threshold``: copies planted and embedded), and
measuring precision and recall against planted copies (``plant_copy``, ``pair_precision_recall``: the tests and
bench/dedup_threshold.py). Does not build indices (``search.py``), parse arguments or render pages.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcontrast.errors import UsageError
from mmcontrast.search import Searcher, load_embeddings

COPY_KINDS = ("resized", "recompressed", "cropped")
# The threshold by default: calibrated on the index itself, since every checkpoint has its own scale of cosines. Copies
# of CALIBRATION_IMAGES indexed images, one of each kind, are embedded, and the threshold is the cosine that
# CALIBRATION_RECALL of them reach with their original.
CALIBRATION_IMAGES = 64
CALIBRATION_RECALL = 0.975




@dataclass
class DuplicateGroup:
    ids: list[int]  # the one to keep first, then the others by similarity to it
    scores: list[float]  # cosine similarity of each to the one kept (1.0 for itself)


def _range_pairs(index, vectors: np.ndarray, threshold: float, chunk: int = 4096) -> np.ndarray:
    """``(P, 2)`` pairs ``i < j`` whose cosine is at least ``threshold``: the index's range search, a chunk of
    queries at a time (an exact index for indices that have none), each pair re-scored exactly."""
    import faiss

    try:
        index.range_search(vectors[:1], threshold)
    except RuntimeError:  # e.g. an index with no range search: an exact one over the same vectors
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
    pairs = []
    for start in range(0, len(vectors), chunk):
        lims, _, found = index.range_search(vectors[start : start + chunk], threshold - 1e-6)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = found > rows
        pairs.append(np.stack([rows[keep], found[keep]], axis=1))
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    exact = np.einsum("pd,pd->p", vectors[pairs[:, 0]], vectors[pairs[:, 1]])
    return pairs[exact >= threshold]


def _components(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components of size > 1 of the graph of ``pairs`` (union-find), each sorted, by their first item."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in sorted(set(pairs.ravel().tolist())):
        groups.setdefault(root(i), []).append(i)
    return [members for _, members in sorted(groups.items())]


def find_duplicates(searcher: Searcher, threshold: float) -> list[DuplicateGroup]:
    """Groups of items linked by a cosine of at least ``threshold`` (single linkage), from the index's range search.

    In each group the item kept is the largest image (pixels: a resized or cropped copy has fewer), then the largest
    file (a recompressed copy is smaller), then the first indexed; the others follow by their similarity to it.
    """
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold must be a cosine similarity in (0, 1], not {threshold}")
    vectors = load_embeddings(searcher.dir, searcher.infos["parts"])
    meta = searcher.metadata
    pixels = [w * h for w, h in zip(meta.get("width") or [0] * len(vectors), meta.get("height") or [0] * len(vectors))]
    sizes = meta.get("bytes") or [0] * len(vectors)
    groups = []
    for members in _components(len(vectors), _range_pairs(searcher.index, vectors, threshold)):
        keeper = max(members, key=lambda i: (pixels[i], sizes[i], -i))
        scores = vectors[members] @ vectors[keeper]
        order = sorted(range(len(members)), key=lambda m: (members[m] != keeper, -scores[m], members[m]))
        groups.append(DuplicateGroup([members[m] for m in order], [round(float(min(1.0, scores[m])), 6) for m in order]))
    return groups


def duplicate_rows(searcher: Searcher, groups: Sequence[DuplicateGroup]) -> list[dict]:
    """``group, path, score`` rows (``path`` is the shard key for shard items), each group's keeper first."""
    rows = []
    for g, group in enumerate(groups):
        for i, score in zip(group.ids, group.scores):
            item = searcher.item(i)
            rows.append({"group": g, "path": item.get("path") or item.get("key"), "score": score})
    return rows


# ---------------------------------------------------------------- planted copies, to measure a threshold


def plant_copy(image, kind: str, rng: np.random.Generator):
    """A near-duplicate of a PIL image: ``resized`` (to 40-80 % of its sides), ``recompressed`` (JPEG quality
    20-60) or ``cropped`` (2-5 % off each side)."""
    from PIL import Image

    w, h = image.size
    if kind == "resized":
        f = rng.uniform(0.4, 0.8)
        return image.resize((max(8, round(w * f)), max(8, round(h * f))), Image.BILINEAR)
    if kind == "recompressed":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=int(rng.integers(20, 61)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "cropped":
        m = rng.uniform(0.02, 0.05)
        return image.crop((round(w * m), round(h * m), w - round(w * m), h - round(h * m)))
    raise ValueError(f"unknown copy kind {kind!r}; one of {COPY_KINDS}")


def pair_precision_recall(groups: Sequence[Sequence[str]], truth: dict[str, str]) -> dict:
    """Precision and recall over pairs: a pair in one found group is right when ``truth`` gives both items the same
    original (``truth[item]``: the item it is a copy of, or itself); recall counts the true pairs found together."""
    found = {(a, b) for group in groups for a in group for b in group if a < b}
    originals: dict[str, list[str]] = {}
    for item, original in truth.items():
        originals.setdefault(original, []).append(item)
    true_pairs = {(a, b) for items in originals.values() for a in items for b in items if a < b}
    right = len(found & true_pairs)
    return {"precision": right / len(found) if found else 1.0, "recall": right / len(true_pairs) if true_pairs else 1.0,
            "pairs_found": len(found), "pairs_true": len(true_pairs)}


def calibrate_threshold(searcher: Searcher, n_images: int = CALIBRATION_IMAGES, recall: float = CALIBRATION_RECALL,
                        seed: int = 0) -> dict:
    """The cosine that ``recall`` of planted copies reach with their original, for this index's checkpoint.

    ``n_images`` indexed images (a seeded draw) each get one copy of every kind (``plant_copy``), embedded with the
    index's encoders through ``evaluate.encode_images``; the cosine of each copy with its original's stored embedding
    gives the threshold. Returns ``{"threshold", "copies", "copy_cosine": {"min", "median"}}``.
    """
    from data_tools.formats import ImageDecodeError, decode_image
    from mmcontrast.evaluate import encode_images

    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(len(searcher), min(n_images, len(searcher)), replace=False)).tolist()
    model, preprocess, _ = searcher.model
    with tempfile.TemporaryDirectory(prefix="mmcontrast-calibrate-") as tmp:
        paths, owners = [], []
        for i in ids:
            try:
                image = decode_image(searcher.image_bytes(i))
            except (OSError, ImageDecodeError, UsageError):  # moved, damaged or remote since indexing: another one serves
                continue
            for kind in COPY_KINDS:
                paths.append(Path(tmp) / f"{i}_{kind}.png")  # lossless: the copy is what plant_copy made, no more
                plant_copy(image, kind, rng).save(paths[-1])
                owners.append(i)
        if not paths:
            raise UsageError("none of the indexed images can be read to calibrate the threshold; give --threshold T")
        encoded = encode_images(model, preprocess, paths, batch_size=64, workers=0)
    cosines = np.einsum("nd,nd->n", encoded.features.numpy(), searcher.vectors([owners[j] for j in encoded.ok]))
    return {"threshold": round(float(np.quantile(cosines, 1 - recall)), 4), "copies": len(cosines),
            "copy_cosine": {"min": round(float(cosines.min()), 4), "median": round(float(np.median(cosines)), 4)}}
