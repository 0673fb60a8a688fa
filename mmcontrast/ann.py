"""Approximate nearest neighbours: which faiss index suits a collection, building it part by part, tuning and
measuring it honestly, and searching it with exact re-ranking.

Owns the choice autofaiss makes for a memory budget (``choose_index_key``: exact below a size, then HNSW, IVF of
flat vectors, IVF + PQ as memory allows), training on a sample and filling from chunks (``build``), the search
parameter (``efSearch``, ``nprobe``) that reaches a recall target at the least cost, recall@1/@k against exact
search on *held-out* queries (vectors kept out of the index while it is measured, so no query finds itself), and
``search``: an approximate search whose candidates are re-scored exactly from the stored vectors when the index
compresses them (PQ). Everything is inner product on L2-normalised vectors (= cosine).

Knows nothing of images or files: vectors come from a source with ``len()``, ``dim``, ``chunks()``, ``vectors(ids)``
and ``sample_ids()`` (``collection.Collection``). autofaiss is not a dependency: it pins numpy<2 and pandas<3,
which this project has left behind; the choice below follows its ``get_optimal_index_keys_v2`` and
``get_optimal_nb_clusters``, and its memory-mapped serving (clip-retrieval's ``enable_faiss_memory_mapping``) is
faiss's ``IO_FLAG_MMAP``, used by ``read``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from math import log2, sqrt

import numpy as np

from mmcontrast.errors import UsageError

EXACT_BELOW = 10_000  # vectors; below this a brute-force query takes about a millisecond, so the index is exact
RECALL_TARGET = 0.98  # an approximate index's search parameter is the cheapest that reaches this recall@10
RECALL_K = 10
RECALL_QUERIES = 1000  # held-out queries (at most a tenth of the collection) for recall and tuning
RERANK = 10  # a compressed (PQ) index returns RERANK x k candidates, re-scored exactly from the stored vectors
RERANK_BLOCK = 256  # queries re-ranked together: 256 x 100 candidates x 512 floats is 50 MB
TRAIN_PER_CLUSTER = 40  # training vectors per IVF list (faiss warns below 39; autofaiss uses 30 to 256)
MIN_INDEX_MEMORY, MAX_DEFAULT_MEMORY = 256 * 2**20, 4 * 2**30
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)


def parse_memory(text: str) -> int:
    """Bytes in ``4G``, ``512M``, ``1.5G``, ``300K`` or a plain number of bytes; a UsageError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UsageError(f"--max-index-memory {text!r}: give a size such as 4G, 512M or 1.5G")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def default_index_memory(n: int, dim: int) -> int:
    """The budget when none is given: a quarter of the float32 vectors, between 256 MiB and 4 GiB (HNSW up to a few
    hundred thousand vectors, then IVF + PQ with exact re-ranking from the vectors on disk)."""
    return int(min(MAX_DEFAULT_MEMORY, max(MIN_INDEX_MEMORY, n * dim)))


def check_index_key(key: str) -> None:
    """UsageError for an index key faiss's ``index_factory`` does not know (``auto`` chooses by size)."""
    if key == "auto":
        return
    import faiss

    try:
        faiss.index_factory(768, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise UsageError(f"--index-key {key!r} is not a faiss index_factory string (e.g. Flat, HNSW32, IVF256,Flat); "
                         "or leave it at auto") from None


def nb_clusters(n: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest 4 sqrt(n) (autofaiss's first choice), 16 to 65,536."""
    return int(min(65_536, max(16, 2 ** round(log2(4 * sqrt(max(n, 1)))))))


def index_memory(key: str, n: int, dim: int) -> int:
    """Bytes an index of ``key`` takes for ``n`` vectors of ``dim`` (codes, ids, links; the quantizer is small)."""
    if key == "Flat":
        return 4 * n * dim
    if key.startswith("HNSW"):
        return n * (4 * dim + 8 * int(key[4:]))
    if key.endswith(",Flat"):
        return n * (4 * dim + 8)
    return n * (int(re.search(r"PQ(\d+)", key).group(1)) + 8)


def choose_index_key(n: int, dim: int, max_memory: int | None = None, exact_below: int = EXACT_BELOW) -> str:
    """The faiss index for ``n`` vectors of ``dim`` floats within ``max_memory`` bytes (default: ``default_index_memory``).

    Exact (``Flat``) below ``exact_below``; else HNSW with as many links as fit (8 to 32); else an IVF of flat vectors
    when they fit; else IVF + PQ with the largest code that fits, at least 4 dimensions a byte (searched with exact
    re-ranking, which makes up for the coarser codes: faiss trains finer ones slowly). A budget too small
    for the smallest code is a UsageError saying what it needs.
    """
    max_memory = default_index_memory(n, dim) if max_memory is None else max_memory
    if n < exact_below and index_memory("Flat", n, dim) <= max_memory:
        return "Flat"
    links = int((max_memory / n - 4 * dim) // 8)
    if links >= 8:
        return f"HNSW{min(links, 32)}"
    clusters = nb_clusters(n)
    if index_memory("IVF,Flat", n, dim) <= max_memory:
        return f"IVF{clusters},Flat"
    fitting = [m for m in PQ_SIZES if m <= max(1, dim // 4) and dim % m == 0 and n * (m + 8) <= max_memory]
    if not fitting:
        raise UsageError(f"--max-index-memory {max_memory / 2**20:.0f}M is too small for {n} vectors: the smallest index "
                         f"(IVF,PQ4) takes {n * 12 / 2**20:.0f}M")
    return f"IVF{clusters},PQ{fitting[0]}x8"


def rerank_factor(key: str) -> int:
    """Candidates per result re-scored exactly: RERANK for compressed codes, 1 (none) where the index's scores are exact."""
    return RERANK if "PQ" in key or "SQ" in key else 1


def _search_parameter(key: str) -> tuple[str, list[int]] | None:
    """The knob that trades speed for recall, and the values tried (cheapest first); None for exact indices."""
    if "IVF" in key:
        clusters = int(re.search(r"IVF(\d+)", key).group(1))
        return "nprobe", [2**i for i in range(int(log2(clusters)) + 1)] + ([clusters] if clusters & (clusters - 1) else [])
    if key.startswith("HNSW"):
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    return None


def set_parameter(index, text: str) -> None:
    """Apply ``nprobe=8``-style search parameters (empty: none)."""
    if text:
        import faiss

        faiss.ParameterSpace().set_index_parameters(index, text)


# ---------------------------------------------------------------- building


@dataclass
class Measured:
    """Held-out queries and their exact top-k among the indexed vectors: ``(q, d)``, ``(q, k)`` cosines best first."""

    queries: np.ndarray
    exact: np.ndarray
    kinds: dict[str, slice]  # which rows are image queries, which text queries


def _train(key: str, source, held: np.ndarray, seed: int):
    import faiss

    index = faiss.index_factory(source.dim, key, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "pq"):
        # index_factory turns on polysemous training (codes ordered for Hamming filtering, which is not used here):
        # it takes 95 % of the training time. PQ's k-means on a sample of 64 per code loses nothing measurable after
        # exact re-ranking.
        ivfpq = faiss.downcast_index(ivf)
        ivfpq.do_polysemous_training = False
        ivfpq.pq.cp.max_points_per_centroid, ivfpq.pq.cp.niter = 64, 15
    if not index.is_trained:
        param = _search_parameter(key)
        clusters = max(param[1]) if param and param[0] == "nprobe" else 256
        size = max(TRAIN_PER_CLUSTER * clusters, 256 * 40)
        try:
            index.train(source.vectors(source.sample_ids(size, seed, exclude=held)))
        except RuntimeError as err:
            raise UsageError(f"faiss cannot train {key!r} on {len(source)} vectors of {source.dim} dimensions: "
                             f"{str(err).strip().splitlines()[-1][:200]}") from None
    return index if "IVF" in key or key == "Flat" else faiss.IndexIDMap(index)  # HNSW: ids as rows, added out of order


def build(source, key: str, queries: dict[str, np.ndarray] | None = None, held: np.ndarray | None = None,
          k: int = RECALL_K, seed: int = 0, on_chunk: Callable[[int], None] | None = None) -> tuple[object, Measured | None]:
    """An index of ``key`` over every vector of ``source``, trained on a sample and filled a chunk at a time.

    With ``held`` (sorted ids) and ``queries`` (``{"image": (q, d), "text": (t, d)}`` normalised), the ``held`` items are
    added last, after the same pass has found each query's exact top ``k`` among the others: the caller measures and
    tunes on them (``tune``) between ``build`` and ``add_held``. Returns ``(index, Measured | None)``.
    """
    import faiss

    held = np.zeros(0, np.int64) if held is None else np.asarray(held, np.int64)
    index = _train(key, source, held, seed)
    stacked = np.concatenate([q for q in (queries or {}).values() if len(q)]) if queries else np.zeros((0, source.dim), np.float32)
    heap = faiss.ResultHeap(len(stacked), k, keep_max=True) if len(stacked) else None
    for start, chunk in source.chunks():
        ids = np.arange(start, start + len(chunk), dtype=np.int64)
        keep = ~np.isin(ids, held)
        if key == "Flat":
            index.add(chunk)  # exact: nothing is held out, ids are rows
        else:
            index.add_with_ids(chunk[keep], ids[keep])
        if heap is not None and keep.any():
            scores, found = faiss.knn(stacked, chunk[keep], min(k, int(keep.sum())), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, ids[keep][found])
        if on_chunk:
            on_chunk(len(chunk))
    if heap is None:
        return index, None
    heap.finalize()
    bounds, kinds = np.cumsum([0, *(len(q) for q in queries.values())]), {}
    for (name, _), a, b in zip(queries.items(), bounds[:-1], bounds[1:]):
        if b > a:
            kinds[name] = slice(int(a), int(b))
    return index, Measured(stacked, heap.D, kinds)


def add_held(index, source, held: np.ndarray) -> None:
    """Add the held-out items, measured and tuned without them, under their own ids."""
    if len(held):
        index.add_with_ids(source.vectors(held), np.asarray(held, np.int64))


# ---------------------------------------------------------------- searching, measuring, tuning


def search(index, queries: np.ndarray, k: int, rerank: int = 1, vectors: Callable[[np.ndarray], np.ndarray] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``(q, k)`` best first (id -1, score -inf where fewer exist), of ``(q, d)`` normalised
    ``queries``; with ``rerank > 1``, ``rerank * k`` candidates re-scored exactly with ``vectors(ids) -> (m, d)``,
    RERANK_BLOCK queries at a time (their candidates' vectors are what the re-ranking holds)."""
    k = min(k, int(index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if rerank <= 1 or vectors is None:
        scores, ids = index.search(queries, k)
        return np.where(ids >= 0, scores, -np.inf), ids
    out_scores, out_ids = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(queries), RERANK_BLOCK):
        block = queries[start : start + RERANK_BLOCK]
        _, ids = index.search(block, k * rerank)  # (b, c) candidates
        valid = ids >= 0
        exact = np.full(ids.shape, -np.inf, np.float32)
        rows, cols = np.nonzero(valid)
        exact[rows, cols] = np.einsum("nd,nd->n", vectors(ids[valid]), block[rows])
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        out_scores[start : start + len(block)] = np.take_along_axis(exact, order, 1)
        out_ids[start : start + len(block)] = np.where(np.isfinite(out_scores[start : start + len(block)]),
                                                       np.take_along_axis(ids, order, 1), -1)
    return out_scores, out_ids


def recall(scores: np.ndarray, exact: np.ndarray, tol: float = 1e-5) -> dict:
    """Recall@1 and @k of returned exact ``scores`` against the ``exact`` top k (``(q, k)`` each): a returned item is
    a hit when its cosine reaches the k-th exact one (ties count, whichever of them is returned)."""
    k = exact.shape[1]
    return {"recall@1": round(float(np.mean(scores[:, 0] >= exact[:, 0] - tol)), 4),
            f"recall@{k}": round(float(np.mean(scores[:, :k] >= exact[:, -1:] - tol)), 4)}


def measure(index, measured: Measured, rerank: int, vectors) -> dict:
    """Recall of ``index`` as it is set now, on every kind of held-out query (``{"image": {...}, "text": {...}}``)."""
    k = measured.exact.shape[1]
    scores, _ = search(index, measured.queries, k, rerank, vectors)
    return {kind: recall(scores[rows], measured.exact[rows]) for kind, rows in measured.kinds.items()}


def tune(index, key: str, measured: Measured, rerank: int, vectors, target: float = RECALL_TARGET
         ) -> tuple[str, dict, int]:
    """The cheapest search setting whose recall@k on the held-out queries reaches ``target`` (all kinds: the worst
    counts), else the best one tried; the index is left set to it. Returns ``(parameter text, recall per kind,
    re-rank factor)``.

    The parameter (``nprobe``, ``efSearch``) grows until the target is reached or recall stops growing; on a
    compressed index the re-rank factor then doubles (twice at most), since there the codes, not the lists probed,
    can be what caps recall.
    """
    param = _search_parameter(key)
    if param is None:
        return "", measure(index, measured, rerank, vectors), rerank
    name, values = param
    k = measured.exact.shape[1]
    best: tuple[float, str, dict, int] | None = None
    for factor in [rerank] if rerank == 1 else [rerank, 2 * rerank, 4 * rerank]:
        previous = -1.0
        for value in values:
            text = f"{name}={value}"
            set_parameter(index, text)
            got = measure(index, measured, factor, vectors)
            worst = min(r[f"recall@{k}"] for r in got.values())
            if best is None or worst > best[0]:
                best = (worst, text, got, factor)
            if worst >= target or worst <= previous:  # reached, or more probing no longer helps
                break
            previous = worst
        if best[0] >= target:
            break
    set_parameter(index, best[1])
    return best[1], best[2], best[3]


def write(index, path: str) -> None:
    import faiss

    faiss.write_index(index, path)


def read(path: str, key: str, param: str = ""):
    """An index of ``key`` written by ``write``, memory-mapped: an IVF's inverted lists (``IO_FLAG_MMAP``), or the flat
    codes of the others (``IO_FLAG_MMAP_IFC``; HNSW's graph is read into memory) stay on disk, paged in as searched."""
    import faiss

    flag = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if "IVF" in key else faiss.IO_FLAG_MMAP_IFC
    index = faiss.read_index(path, flag)
    set_parameter(index, param)
    return index
