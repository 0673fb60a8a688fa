"""Approximate nearest neighbours: which faiss index suits a collection, training it, tuning it, measuring its recall.

Owns the choice autofaiss makes (``choose_index_key``: exact below a size, then HNSW, IVF, OPQ+IVF+PQ as memory
allows), training an index on a sample, the search parameter (``efSearch``, ``nprobe``) that reaches a recall target
at the least cost, and recall@1/@k against exact search. Works on arrays of L2-normalised vectors with inner
product (= cosine); knows nothing of images, parts or files (``search.py``).
"""

from __future__ import annotations

from math import log2, sqrt

import numpy as np

from mmcontrast.errors import UsageError

EXACT_BELOW = 10_000  # vectors; below this a brute-force query takes about a millisecond, so the index is exact
DEFAULT_INDEX_MEMORY = 16 * 2**30  # bytes the index may take (autofaiss's max_index_memory_usage)
RECALL_TARGET = 0.98  # an approximate index's search parameter is the cheapest that reaches this recall@10
RECALL_K = 10
RECALL_QUERIES = 1000  # indexed vectors used as queries to measure recall against exact search


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


def _nb_clusters(n: int) -> int:
    """IVF lists for ``n`` vectors (autofaiss's ``get_optimal_nb_clusters``: about 4 sqrt(n), then fixed steps)."""
    if n < 1_000_000:
        return 2 ** round(log2(4 * sqrt(n)))
    return 16_384 if n < 10_000_000 else 65_536 if n < 300_000_000 else 2**17


def choose_index_key(n: int, dim: int, max_memory: int = DEFAULT_INDEX_MEMORY, exact_below: int = EXACT_BELOW) -> str:
    """The faiss index for ``n`` vectors of ``dim`` floats, as autofaiss's ``get_optimal_index_keys_v2`` picks it.

    Exact (``Flat``) below ``exact_below``; else HNSW with as many links as ``max_memory`` bytes allow (at most
    32, at least 8); else an IVF of flat vectors below a million when it fits; else OPQ + IVF + PQ with the
    largest code that fits.
    """
    if n < exact_below:
        return "Flat"
    links = int((max_memory / (4 * n) - dim) // 2)
    if links >= 8:
        return f"HNSW{min(links, 32)}"
    clusters = _nb_clusters(n)
    if n < 1_000_000 and n * (4 * dim + 8) <= max_memory:
        return f"IVF{clusters},Flat"
    coarse = f"IVF{clusters}" if clusters < 1000 else f"IVF{clusters}_HNSW32"
    fitting = [pq for pq in (256, 128, 64, 48, 32, 24, 16, 8, 4) if pq < dim and n * (pq + 8) <= max_memory]
    pq = fitting[0] if fitting else 4
    return f"OPQ{pq}_{(min(dim // pq, 6) + 1) * pq},{coarse},PQ{pq}x8"


def _search_parameter(key: str) -> tuple[str, list[int]] | None:
    """The knob that trades speed for recall, and the values tried (cheapest first); None for exact indices."""
    if "IVF" in key:
        clusters = int(key.split("IVF")[1].split(",")[0].split("_")[0])
        return "nprobe", [2**i for i in range(int(log2(clusters)) + 1)] + ([clusters] if clusters & (clusters - 1) else [])
    if key.startswith("HNSW"):
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    return None


def _set_parameter(index, key: str, name: str, value: int) -> str:
    import faiss

    text = f"{name}={value}" + (f",quantizer_efSearch={2 * value}" if "_HNSW" in key else "")
    faiss.ParameterSpace().set_index_parameters(index, text)
    return text


def measure_recall(index, vectors: np.ndarray, k: int = RECALL_K, n_queries: int = RECALL_QUERIES, seed: int = 0) -> dict:
    """Recall@1 and @k of ``index`` against exact search, with ``n_queries`` of the indexed ``vectors`` as queries.

    A hit is a returned item whose exact cosine reaches the k-th exact one (ties count, whichever of them is returned).
    """
    import faiss

    rng = np.random.default_rng(seed)
    queries = vectors[rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False)]
    label, k = f"recall@{k}", min(k, len(vectors))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    best, _ = exact.search(queries, k)  # (q, k) exact cosines, best first
    _, found = index.search(queries, k)
    scores = np.where(found >= 0, np.einsum("qd,qkd->qk", queries, vectors[np.maximum(found, 0)]), -np.inf)
    tol = 1e-5
    return {"recall@1": float(np.mean(scores[:, 0] >= best[:, 0] - tol)),
            label: float(np.mean(scores >= best[:, -1:] - tol))}


def train_index(vectors: np.ndarray, key: str, seed: int = 0):
    """A faiss index of ``key`` (inner product) trained on a sample of ``vectors`` and holding all of them."""
    import faiss

    index = faiss.index_factory(vectors.shape[1], key, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        param = _search_parameter(key)
        clusters = max(param[1]) if param and param[0] == "nprobe" else 256
        sample = np.random.default_rng(seed).choice(len(vectors), min(len(vectors), 100 * clusters), replace=False)
        index.train(vectors[np.sort(sample)])
    index.add(vectors)
    return index


def tune_index(index, key: str, vectors: np.ndarray, target: float = RECALL_TARGET) -> tuple[str, dict]:
    """The cheapest search parameter whose recall@10 reaches ``target`` (the best one when none does), with its recall."""
    param = _search_parameter(key)
    if param is None:
        return "", measure_recall(index, vectors) if key != "Flat" else {"recall@1": 1.0, f"recall@{RECALL_K}": 1.0}
    name, values = param
    best: tuple[str, dict] | None = None
    for value in values:
        text = _set_parameter(index, key, name, value)
        recall = measure_recall(index, vectors)
        if best is None or recall[f"recall@{RECALL_K}"] > best[1][f"recall@{RECALL_K}"]:
            best = (text, recall)
        if recall[f"recall@{RECALL_K}"] >= target:
            return text, recall
    import faiss

    faiss.ParameterSpace().set_index_parameters(index, best[0])
    return best
