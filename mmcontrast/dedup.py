"""Near-duplicates in an index: groups of resized, recompressed or slightly cropped copies, and the one to keep.

Owns finding pairs, grouping them, choosing each group's keeper, and the threshold:

* pairs by embedding (``embedding_pairs``): a chunk of the collection at a time (memory grows with the pairs found,
  never with N x N); an exact index's range search, or on an approximate one each item's nearest neighbours, more of
  them while they all pass (on a PQ index, all within COMPRESSED_MARGIN of the threshold by the codes' scores);
  every candidate re-scored exactly from the stored vectors. On an approximate index
  ``pair_recall`` measures, on a sample, the share of the exact pairs found;
* pairs by perceptual hash (``phash_pairs``, imagehash's pHash: 64 bits of the image's low DCT frequencies, of the
  whole image and of its centre, so that cropped copies match too): copies found whatever a checkpoint learned, at a
  Hamming distance of at most ``PHASH_DISTANCE``;
* groups that never chain (``group_pairs``): every member is a pair with its group's first row, the one kept (the
  largest image, then the largest file, then the first indexed) — single linkage would join a collection of
  look-alikes into one group through near pairs;
* the threshold (``calibrate_threshold``), calibrated on both sides: planted copies of indexed images (the cosine
  they reach with their original) and random distinct pairs of the collection (the false pairs a threshold lets
  through), with its spread over resamples, and a verdict when the checkpoint cannot tell them apart;
* measuring against planted copies (``plant_copy``, ``pair_precision_recall``: tests and bench/dedup_threshold.py).

Does not build indices (``search.py``), parse arguments or render pages.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcontrast.errors import UsageError
from mmcontrast.search import Searcher

COPY_KINDS = ("resized", "recompressed", "cropped")
METHODS = ("embedding", "phash", "both")
CALIBRATION_IMAGES = 128  # indexed images that get one planted copy of each kind
CALIBRATION_RECALL = 0.975  # the share of planted copies the threshold keeps
CALIBRATION_PAIRS = 20_000  # random distinct pairs, the other side
FALSE_PAIRS_PER_IMAGE = 0.01  # the distinct side: the cosine at most this many distinct pairs per image reach
MAX_FALSE_PAIRS_PER_IMAGE = 0.5  # a checkpoint separates when its threshold lets through no more than this
BOOTSTRAP = 5  # resamples of both sides for the threshold's spread
NEIGHBOURS = 16  # first candidates per item on an approximate index (more while they all pass)
COMPRESSED_MARGIN = 0.1  # a PQ index's candidates within this of the threshold are re-scored (PQ errors are ~0.02)
MAX_NEIGHBOURS = 1024
PHASH_DISTANCE = 8  # bits of 64 (imagededup's default for pHash is 10): copies measure at most 6, distinct pictures 10+
PHASH_CROP = 0.035  # each image is hashed whole and without this much of each side (the middle of 2-5 % crops)
CHUNK = 4096


@dataclass
class DuplicateGroup:
    ids: list[int]  # the one to keep first, then the others by similarity to it
    scores: list[float]  # similarity of each to the one kept (1.0 for itself)


@dataclass
class Pairs:
    """``(P, 2)`` item pairs ``i < j`` and their ``(P,)`` similarity (cosine, or 1 - Hamming/64 for pHash)."""

    ids: np.ndarray
    scores: np.ndarray

    @staticmethod
    def merge(found: Sequence[tuple[np.ndarray, np.ndarray]]) -> Pairs:
        """One ``Pairs`` of several ``(ids, scores)`` chunks: each pair once, ``i < j``, its highest score."""
        ids = np.concatenate([f[0] for f in found]) if found else np.zeros((0, 2), np.int64)
        scores = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.float32)
        ids = np.sort(ids, axis=1)
        order = np.lexsort((-scores, ids[:, 1], ids[:, 0]))
        ids, scores = ids[order], scores[order]
        first = np.ones(len(ids), bool)
        first[1:] = np.any(ids[1:] != ids[:-1], axis=1)
        return Pairs(ids[first], scores[first])


# ---------------------------------------------------------------- pairs by embedding


def _neighbour_pairs(searcher: Searcher, start: int, chunk: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of one chunk of items: range search on an exact index, else nearest neighbours while all pass."""
    from mmcontrast import ann

    if searcher.infos.get("exact"):
        lims, _, found = searcher.index.range_search(chunk, threshold - 1e-4)
        rows = np.repeat(np.arange(start, start + len(chunk)), np.diff(lims).astype(np.int64))
        return rows, found.astype(np.int64)
    rows, cols = [], []
    todo, k = np.arange(len(chunk)), NEIGHBOURS
    margin = COMPRESSED_MARGIN if searcher.rerank > 1 else 1e-4  # compressed codes' scores are approximate
    while len(todo):
        scores, ids = ann.search(searcher.index, chunk[todo], k + 1)  # no re-ranking: the pairs are re-scored after
        passing = (scores >= threshold - margin) & (ids >= 0)
        rows.append(np.repeat(start + todo, passing.sum(axis=1)))
        cols.append(ids[passing])
        full = passing.all(axis=1) & (k < min(MAX_NEIGHBOURS, len(searcher) - 1))  # maybe more beyond the k-th
        todo, k = todo[full], k * 4
    return np.concatenate(rows), np.concatenate(cols)


def embedding_pairs(searcher: Searcher, threshold: float, on_chunk: Callable[[int], None] | None = None) -> Pairs:
    """Every pair of items at cosine >= ``threshold`` that the index finds, re-scored exactly, a chunk at a time."""
    found = []
    for start, chunk in searcher.collection.chunks(CHUNK):
        rows, cols = _neighbour_pairs(searcher, start, chunk, threshold)
        keep = cols != rows
        rows, cols = rows[keep], cols[keep]
        exact = np.einsum("pd,pd->p", chunk[rows - start], searcher.vectors(cols))
        passing = exact >= threshold
        found.append((np.stack([rows[passing], cols[passing]], axis=1), exact[passing]))
        if on_chunk:
            on_chunk(len(chunk))
    return Pairs.merge(found)


def pair_recall(searcher: Searcher, pairs: Pairs, threshold: float, n_items: int = 200, seed: int = 0) -> dict:
    """The share of exact pairs (brute force over the collection, for ``n_items`` sampled items) that ``pairs`` holds."""
    ids = searcher.collection.sample_ids(n_items, seed)
    queries = searcher.vectors(ids)
    exact = set()
    for start, chunk in searcher.collection.chunks(8192):  # (n_items, 8192) cosines at a time
        q, j = np.nonzero(queries @ chunk.T >= threshold)
        exact |= {(int(ids[a]), int(start + b)) for a, b in zip(q, j) if ids[a] != start + b}
    exact = {(min(a, b), max(a, b)) for a, b in exact}
    have = {tuple(p) for p in pairs.ids.tolist()}
    hit = len(exact & have)
    return {"pair_recall": round(hit / len(exact), 4) if exact else None, "sampled_items": len(ids), "exact_pairs": len(exact)}


# ---------------------------------------------------------------- pairs by perceptual hash


def _centre(image, margin: float = PHASH_CROP):
    w, h = image.size
    return image.crop((round(w * margin), round(h * margin), w - round(w * margin), h - round(h * margin)))


def phash_codes(searcher: Searcher, on_item: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(2N, 8)`` uint8 pHashes: rows ``0..N-1`` of every indexed image, rows ``N..2N-1`` of its centre (PHASH_CROP
    off each side); and ``(N,)`` which images could be read (the others are never paired)."""
    import imagehash

    from data_tools.formats import ImageDecodeError, decode_image

    n = len(searcher)
    codes = np.zeros((2 * n, 8), np.uint8)
    readable = np.zeros(n, bool)
    for i in range(n):
        try:
            image = decode_image(searcher.image_bytes(i)).convert("RGB")
            codes[i] = np.packbits(imagehash.phash(image).hash.ravel())
            codes[n + i] = np.packbits(imagehash.phash(_centre(image)).hash.ravel())
            readable[i] = True
        except (OSError, ImageDecodeError, UsageError, KeyError):
            pass
        if on_item:
            on_item()
    if not readable.any():
        raise UsageError("none of the indexed images can be read for --method phash (an index of embeddings without "
                         "image files?); use --method embedding")
    return codes, readable


def phash_pairs(searcher: Searcher, distance: int = PHASH_DISTANCE, on_item: Callable[[], None] | None = None) -> Pairs:
    """Every pair of readable images whose pHashes differ in at most ``distance`` of 64 bits, whole image against
    whole image or against the other's centre (a copy cropped a few percent a side matches the original's centre:
    measured, 6 bits at most where whole against whole is 14 to 22); faiss's exact binary range search, a chunk of
    queries at a time. Score ``1 - distance / 64``."""
    import faiss

    codes, readable = phash_codes(searcher, on_item)
    n = len(readable)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)  # whole images and centres; each whole image is a query against both
    found = []
    for start in range(0, n, CHUNK):
        lims, dist, cols = index.range_search(codes[start : min(start + CHUNK, n)], distance + 1)  # faiss: < radius
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        cols = cols % n
        keep = (cols != rows) & readable[rows] & readable[cols]
        found.append((np.stack([rows[keep], cols[keep]], axis=1), 1 - dist[keep].astype(np.float32) / 64))
    return Pairs.merge(found)


# ---------------------------------------------------------------- groups


def _keep_order(searcher: Searcher, ids: np.ndarray) -> np.ndarray:
    """``ids`` ordered by which to keep first: the most pixels (a resized or cropped copy has fewer), the largest file
    (a recompressed copy is smaller), then the first indexed."""
    rows = searcher.collection.rows(ids.tolist(), ("width", "height", "bytes"))
    pixels = np.array([r.get("width", 0) * r.get("height", 0) for r in rows], np.int64)
    sizes = np.array([r.get("bytes", 0) for r in rows], np.int64)
    return ids[np.lexsort((ids, -sizes, -pixels))]


def group_pairs(searcher: Searcher, pairs: Pairs) -> list[DuplicateGroup]:
    """Groups without chains: items in keep order; each one not yet grouped takes its ungrouped partners, so every
    member is a pair with (within the threshold of) its group's first row. Groups in order of their first id."""
    if not len(pairs.ids):
        return []
    both = np.concatenate([pairs.ids, pairs.ids[:, ::-1]])  # (2P, 2) each pair from both ends
    scores = np.concatenate([pairs.scores, pairs.scores])
    order = np.argsort(both[:, 0], kind="stable")
    both, scores = both[order], scores[order]
    nodes, starts = np.unique(both[:, 0], return_index=True)
    ends = np.append(starts[1:], len(both))
    where = {int(n): (int(a), int(b)) for n, a, b in zip(nodes, starts, ends)}
    grouped: set[int] = set()
    groups = []
    for u in _keep_order(searcher, nodes).tolist():
        if u in grouped:
            continue
        a, b = where[u]
        members = [(int(v), float(s)) for v, s in zip(both[a:b, 1], scores[a:b]) if int(v) not in grouped]
        if not members:
            continue
        members.sort(key=lambda m: (-m[1], m[0]))
        grouped |= {u, *(v for v, _ in members)}
        groups.append(DuplicateGroup([u, *(v for v, _ in members)], [1.0, *(round(min(1.0, s), 6) for _, s in members)]))
    return sorted(groups, key=lambda g: min(g.ids))


def find_duplicates(searcher: Searcher, threshold: float) -> list[DuplicateGroup]:
    """Groups of items at cosine >= ``threshold`` with their group's first row (the one kept)."""
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold must be a cosine similarity in (0, 1], not {threshold}")
    return group_pairs(searcher, embedding_pairs(searcher, threshold))


def duplicate_rows(searcher: Searcher, groups: Sequence[DuplicateGroup]) -> list[dict]:
    """``group, path, score`` rows (``path`` is the shard key for shard items, the id for bare embeddings)."""
    rows = []
    for g, group in enumerate(groups):
        items = searcher.collection.rows(group.ids)
        for i, item, score in zip(group.ids, items, group.scores):
            rows.append({"group": g, "path": item.get("path") or item.get("key") or str(i), "score": score})
    return rows


# ---------------------------------------------------------------- planted copies, to measure and calibrate


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


def _copy_cosines(searcher: Searcher, n_images: int, rng: np.random.Generator) -> np.ndarray:
    """Cosines of planted copies (one of each kind of ``n_images`` indexed images) with their originals."""
    from data_tools.formats import ImageDecodeError, decode_image
    from mmcontrast.evaluate import encode_images

    ids = searcher.collection.sample_ids(n_images, int(rng.integers(2**31))).tolist()
    model, preprocess, _ = searcher.model
    with tempfile.TemporaryDirectory(prefix="mmcontrast-calibrate-") as tmp:
        paths, owners = [], []
        for i in ids:
            try:
                image = decode_image(searcher.image_bytes(i))
            except (OSError, ImageDecodeError, UsageError, KeyError):  # moved, damaged or remote: another one serves
                continue
            for kind in COPY_KINDS:
                paths.append(Path(tmp) / f"{i}_{kind}.png")  # lossless: the copy is what plant_copy made, no more
                plant_copy(image, kind, rng).save(paths[-1])
                owners.append(i)
        if not paths:
            raise UsageError("none of the indexed images can be read to calibrate the threshold; give --threshold T")
        encoded = encode_images(model, preprocess, paths, batch_size=64, workers=0)
    return np.einsum("nd,nd->n", encoded.features.numpy(), searcher.vectors([owners[j] for j in encoded.ok]))


def _distinct_cosines(searcher: Searcher, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    n = len(searcher)
    a = rng.integers(0, n, n_pairs)
    b = (a + rng.integers(1, n, n_pairs)) % n  # never a itself
    return np.einsum("nd,nd->n", searcher.vectors(a), searcher.vectors(b))


def _threshold(copies: np.ndarray, distinct: np.ndarray, n_items: int, recall: float) -> tuple[float, float, bool]:
    """``(threshold, copy side, separable)``. The copy side is the cosine ``recall`` of the copies reach; the distinct
    side the cosine above which at most FALSE_PAIRS_PER_IMAGE distinct pairs per image fall. When the distinct side is
    the lower, the threshold is midway (more copies kept, as few false pairs); else it is the copy side. Separable:
    at most MAX_FALSE_PAIRS_PER_IMAGE sampled pairs per image pass it. (The sample holds the collection's own true
    copies too, a few per thousand pairs in a small collection: the looser bound leaves room for them.)"""
    pairs = max(1, n_items * (n_items - 1) / 2)
    copy_side = float(np.quantile(copies, 1 - recall))
    allowed = FALSE_PAIRS_PER_IMAGE * n_items / pairs  # false-positive rate
    distinct_side = float(np.quantile(distinct, 1 - allowed)) if allowed * len(distinct) >= 1 else float(distinct.max())
    threshold = (copy_side + distinct_side) / 2 if distinct_side < copy_side else copy_side
    separable = float(np.mean(distinct >= threshold)) * pairs <= MAX_FALSE_PAIRS_PER_IMAGE * n_items
    return threshold, copy_side, separable


def calibrate_threshold(searcher: Searcher, n_images: int = CALIBRATION_IMAGES, recall: float = CALIBRATION_RECALL,
                        n_pairs: int = CALIBRATION_PAIRS, seed: int = 0) -> dict:
    """The cosine threshold for this index's checkpoint, calibrated on both sides of what it separates.

    One side: planted copies (``plant_copy``, each kind) of ``n_images`` indexed images, embedded with the index's
    encoders through ``evaluate.encode_images``. The other: ``n_pairs`` random distinct pairs of the collection.
    The threshold lies between the cosine ``recall`` of the copies reach and the one that lets through at most
    FALSE_PAIRS_PER_IMAGE distinct pairs per image (``_threshold``); ``separable`` is False when the sampled pairs say
    it would let through more than MAX_FALSE_PAIRS_PER_IMAGE false pairs per image (the checkpoint scores distinct
    images as high as copies).
    Returns ``{"threshold", "separable", "spread", "false_positive_rate", "expected_false_pairs", ...}``.
    """
    rng = np.random.default_rng(seed)
    copies, distinct = _copy_cosines(searcher, n_images, rng), _distinct_cosines(searcher, n_pairs, rng)
    n = len(searcher)
    threshold, copy_side, separable = _threshold(copies, distinct, n, recall)
    resampled = [_threshold(rng.choice(copies, len(copies)), rng.choice(distinct, len(distinct)), n, recall)[0]
                 for _ in range(BOOTSTRAP)]
    rate = float(np.mean(distinct >= threshold))
    return {"threshold": round(threshold, 4), "separable": separable, "spread": round(float(np.std(resampled)), 4),
            "copies": len(copies), "copy_recall": round(float(np.mean(copies >= threshold)), 4),
            "copy_cosine": {"min": round(float(copies.min()), 4), "median": round(float(np.median(copies)), 4),
                            f"q{1 - recall:.3f}": round(copy_side, 4)},
            "distinct_pairs": len(distinct), "distinct_cosine": {"median": round(float(np.median(distinct)), 4),
                                                                 "max": round(float(distinct.max()), 4)},
            "false_positive_rate": rate, "expected_false_pairs": round(rate * n * (n - 1) / 2, 1)}
