"""Search at scale without a model: indexes from clip-retrieval-layout folders, batched vector queries, bounded reads,
held-out recall, the memory budget, near-duplicates on approximate indexes, and the server's network warning."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmcontrast import ann, cli, collection, dedup, search, web

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def clustered(n: int, dim: int, seed: int, clusters: int = 50) -> np.ndarray:
    """``(n, dim)`` unit vectors around ``clusters`` centres (a fixed seed): what real embeddings look like to an index."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_clip_retrieval(folder: Path, vectors: np.ndarray, sizes: list[int], dtype=np.float16, row_group: int | None = None) -> Path:
    """``vectors`` cut into parts as clip-retrieval writes them: ``img_emb/img_emb_{i}.npy`` (no zero padding) and
    ``metadata/metadata_{i}.parquet`` written by pandas, with ``image_path`` and ``caption`` columns."""
    import pandas as pd

    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    start = 0
    for i, size in enumerate(sizes):
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", vectors[start : start + size].astype(dtype))
        frame = pd.DataFrame({"image_path": [f"images/{j:06d}.jpg" for j in range(start, start + size)],
                              "caption": [f"item {j}" for j in range(start, start + size)]})
        frame.to_parquet(folder / "metadata" / f"metadata_{i}.parquet", row_group_size=row_group)
        start += size
    return folder


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """3,000 x 32 vectors in 12 parts of unequal sizes (part 10 and 11 sort after 2 by number, not by name)."""
    vectors = clustered(3000, 32, seed=0)
    sizes = [400, 100, 300, 250, 250, 200, 300, 150, 350, 200, 300, 200]
    return write_clip_retrieval(tmp_path_factory.mktemp("cr") / "emb", vectors, sizes, row_group=64), vectors


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ vectors.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


# ---------------------------------------------------------------- the folder


def test_a_collection_reads_vectors_and_metadata_by_id_in_part_order(small_folder, monkeypatch):
    folder, vectors = small_folder
    monkeypatch.setattr(collection, "WINDOW", 97)  # many windows per part: the gather crosses their edges
    c = collection.Collection(folder)
    assert len(c) == 3000 and c.dim == 32 and c.rows_per_part[10] == 300  # img_emb_10 is the eleventh part
    ids = np.random.default_rng(1).integers(0, 3000, 500)
    assert np.allclose(c.vectors(ids), vectors[ids].astype(np.float16).astype(np.float32) /
                       np.linalg.norm(vectors[ids].astype(np.float16).astype(np.float32), axis=1, keepdims=True), atol=1e-6)
    assert c.rows([0, 399, 400, 2999]) == [{"path": f"images/{i:06d}.jpg", "caption": f"item {i}"} for i in (0, 399, 400, 2999)]
    chunks = list(c.chunks(size=128))
    assert [s for s, _ in chunks][:4] == [0, 128, 256, 384] and sum(len(x) for _, x in chunks) == 3000
    held = c.sample_ids(100, seed=3)
    rest = c.sample_ids(2900, seed=4, exclude=held)
    assert len(set(held) | set(rest)) == 3000 and not set(held) & set(rest)


@pytest.mark.parametrize("damage, named", [
    ("dim", "img_emb/img_emb_3.npy has 16 dimensions"),
    ("rows", "metadata/metadata_2.parquet has 300 rows but img_emb/img_emb_2.npy has 299"),
    ("no_meta", "img_emb/img_emb_5.npy has no metadata/metadata_5.parquet"),
    ("garbage", "img_emb/img_emb_1.npy is not a readable .npy"),
    ("one_d", "img_emb/img_emb_4.npy is a float32 array of shape (7,)"),
])
def test_parts_that_disagree_are_one_line_naming_the_part(small_folder, damage, named, capsys, tmp_path):
    import shutil

    folder = tmp_path / "emb"
    shutil.copytree(small_folder[0], folder)
    if damage == "dim":
        np.save(folder / "img_emb/img_emb_3.npy", np.zeros((250, 16), np.float32))
    elif damage == "rows":
        np.save(folder / "img_emb/img_emb_2.npy", np.zeros((299, 32), np.float32))
    elif damage == "no_meta":
        (folder / "metadata/metadata_5.parquet").unlink()
    elif damage == "garbage":
        (folder / "img_emb/img_emb_1.npy").write_bytes(b"not an array")
    else:
        np.save(folder / "img_emb/img_emb_4.npy", np.zeros(7, np.float32))
    rc, _, err = run_cli(["index", "--embeddings", folder, "--output-dir", tmp_path / "idx", "--quiet"], capsys)
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and named in err, err
    assert not (tmp_path / "idx").exists()  # checked before anything is written


# ---------------------------------------------------------------- index --embeddings and search --vectors


def test_index_embeddings_answers_vector_queries_as_exact_search(small_folder, capsys, tmp_path):
    folder, vectors = small_folder
    rc, out, _ = run_cli(["index", "--embeddings", folder, "--output-dir", tmp_path / "idx", "--quiet"], capsys)
    infos = json.loads(out)
    assert rc == 0 and infos["index_key"] == "Flat" and infos["n_indexed"] == 3000 and infos["embeddings"] == str(folder.resolve())
    stored = vectors.astype(np.float16).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    queries = np.concatenate([clustered(20, 32, seed=9), vectors[[5, 1234, 2999]] * 3.0])  # any norm: cosine is used
    np.save(tmp_path / "q.npy", queries)
    rc, _, _ = run_cli(["search", "--index", tmp_path / "idx", "--vectors", tmp_path / "q.npy", "--k", "7",
                        "--output", tmp_path / "r.json"], capsys)  # fmt: skip
    answers = json.loads((tmp_path / "r.json").read_text())["queries"]
    scores, ids = exact_top(stored, queries, 7)
    assert rc == 0 and len(answers) == 23
    for answer, s, i in zip(answers, scores, ids):
        assert [r["id"] for r in answer["results"]] == i.tolist()
        assert np.allclose([r["score"] for r in answer["results"]], s, atol=1e-5)
        assert [r["path"] for r in answer["results"]] == [f"images/{j:06d}.jpg" for j in i]
    assert [a["results"][0]["id"] for a in answers[20:]] == [5, 1234, 2999]


def test_bad_vector_queries_are_one_line_and_exit_2(small_folder, capsys, tmp_path):
    folder, _ = small_folder
    assert run_cli(["index", "--embeddings", folder, "--output-dir", tmp_path / "idx", "--quiet"], capsys)[0] == 0
    np.save(tmp_path / "wrong_dim.npy", np.ones((3, 31), np.float32))
    np.save(tmp_path / "nan.npy", np.full((2, 32), np.nan, np.float32))
    (tmp_path / "text.npy").write_text("hello")
    for args in [["--vectors", tmp_path / "wrong_dim.npy", "--output", tmp_path / "r.json"],
                 ["--vectors", tmp_path / "nan.npy", "--output", tmp_path / "r.json"],
                 ["--vectors", tmp_path / "text.npy", "--output", tmp_path / "r.json"],
                 ["--vectors", tmp_path / "missing.npy", "--output", tmp_path / "r.json"],
                 ["--vectors", tmp_path / "wrong_dim.npy"],  # the results need a file
                 ["--text", "a cat"]]:  # no checkpoint behind an index of embeddings
        rc, _, err = run_cli(["search", "--index", tmp_path / "idx", *args], capsys)
        assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (args, err)
    for extra in (["--max-index-memory", "lots"], ["--max-index-memory", "1K", "--index-key", "auto"],
                  ["--checkpoint", "x"]):
        rc, _, err = run_cli(["index", "--embeddings", folder, "--output-dir", tmp_path / "other", "--quiet", *extra], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (extra, err)


def test_the_memory_budget_picks_the_index(small_folder, capsys, tmp_path):
    folder, _ = small_folder
    for budget, key in [("100M", "HNSW32"), ("500K", "IVF256,Flat"), ("50K", "IVF256,PQ8x8")]:
        c = collection.Collection(folder)
        assert ann.choose_index_key(len(c), c.dim, ann.parse_memory(budget), exact_below=1000) == key


# ---------------------------------------------------------------- approximate indexes: honest recall, memory-mapped


@pytest.fixture(scope="module")
def approximate(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """20,000 x 32 vectors (clip-retrieval layout) under IVF + PQ with exact re-ranking."""
    root = tmp_path_factory.mktemp("approx")
    vectors = clustered(20_000, 32, seed=1)
    write_clip_retrieval(root / "emb", vectors, [8000, 8000, 4000], dtype=np.float32)
    assert cli.main(["index", "--embeddings", str(root / "emb"), "--output-dir", str(root / "idx"), "--quiet",
                     "--index-key", "IVF128,PQ8x8"]) == 0  # fmt: skip
    return root / "emb", root / "idx", vectors


def test_recall_is_measured_on_held_out_queries_and_holds_for_new_ones(approximate, tmp_path, capsys):
    import faiss

    _, index_dir, vectors = approximate
    infos = json.loads((index_dir / search.INFOS_FILE).read_text())
    assert infos["rerank"] in (ann.RERANK, 2 * ann.RERANK, 4 * ann.RERANK) and "held-out" in infos["recall_measured_on"]
    assert infos["recall@10"] >= ann.RECALL_TARGET and infos["recall@1"] <= 1.0
    queries = clustered(20_200, 32, seed=1)[20_000:]  # same clusters, never indexed
    np.save(tmp_path / "q.npy", queries)
    assert run_cli(["search", "--index", index_dir, "--vectors", tmp_path / "q.npy", "--k", "10",
                    "--output", tmp_path / "r.json"], capsys)[0] == 0  # fmt: skip
    answers = json.loads((tmp_path / "r.json").read_text())["queries"]
    exact, _ = exact_top(vectors, queries, 10)
    got = np.array([[r["score"] for r in a["results"]] for a in answers])
    assert ann.recall(got, exact)["recall@10"] >= 0.95  # what the infos promise, on queries the build never saw
    searcher = search.Searcher(index_dir)
    lists = faiss.extract_index_ivf(searcher.index).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)  # memory-mapped, not read in


def test_held_out_items_are_out_of_the_index_while_it_is_measured(approximate):
    emb, _, _ = approximate
    c = collection.Collection(emb)
    held = c.sample_ids(300, seed=5)
    index, measured = ann.build(c, "HNSW16", {"image": c.vectors(held)}, held)
    assert index.ntotal == len(c) - len(held)
    _, found = index.search(c.vectors(held), 10)
    assert not set(found.ravel().tolist()) & set(held.tolist())  # no query can find itself
    exact, _ = exact_top(np.delete(c.vectors(np.arange(len(c))), held, axis=0), c.vectors(held), 10)
    assert np.allclose(measured.exact, exact, atol=1e-5)
    ann.add_held(index, c, held)
    assert index.ntotal == len(c) and index.search(c.vectors(held[:5]), 1)[1].ravel().tolist() == held[:5].tolist()


# ---------------------------------------------------------------- near-duplicates on approximate indexes


@pytest.mark.parametrize("key", ["HNSW16", "IVF64,PQ8x8"])
def test_dedup_on_an_approximate_index_finds_the_exact_pairs_and_never_chains(key, tmp_path, capsys):
    rng = np.random.default_rng(2)
    base = clustered(12_000, 32, seed=3)
    copies = base[:300] + 0.08 * rng.standard_normal((300, 32)).astype(np.float32)  # near-duplicates of 300 items
    chain = [base[300]]
    for _ in range(5):  # each step near the last, the ends far apart: single linkage would make one group of 6
        step = chain[-1] + 0.35 * rng.standard_normal(32).astype(np.float32) / np.sqrt(32)
        chain.append(step / np.linalg.norm(step))
    vectors = np.concatenate([base, copies, np.array(chain[1:])])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_clip_retrieval(tmp_path / "emb", vectors, [6000, len(vectors) - 6000], dtype=np.float32)
    assert cli.main(["index", "--embeddings", str(tmp_path / "emb"), "--output-dir", str(tmp_path / "idx"), "--quiet",
                     "--index-key", key]) == 0  # fmt: skip
    capsys.readouterr()
    threshold = 0.95
    rc, out, err = run_cli(["dedup", "--index", tmp_path / "idx", "--method", "embedding", "--threshold", threshold,
                            "--output", tmp_path / "d.csv"], capsys)  # fmt: skip
    result = json.loads(out)
    assert rc == 0 and result["pair_recall"] == 1.0, (result, err)
    sims = vectors @ vectors.T
    exact_pairs = {(i, j) for i, j in zip(*np.nonzero(np.triu(sims >= threshold, 1)))}
    searcher = search.Searcher(tmp_path / "idx")
    found = dedup.embedding_pairs(searcher, threshold)
    assert {tuple(p) for p in found.ids.tolist()} == exact_pairs  # every candidate re-checked: none missed, none extra
    with open(tmp_path / "d.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[str, list[int]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(int(row["path"].split("/")[1].split(".")[0]))
    for members in groups.values():
        assert all(sims[members[0], m] >= threshold for m in members)  # every member within the threshold of the first
    assert len(rows) == sum(len(m) for m in groups.values()) == len({i for m in groups.values() for i in m})


def test_the_threshold_is_calibrated_on_both_sides():
    copies = np.random.default_rng(0).uniform(0.9, 1.0, 384)
    far = np.random.default_rng(1).uniform(-0.2, 0.6, 20_000)
    threshold, copy_side, separable = dedup._threshold(copies, far, 1000, 0.975)
    assert separable and 0.6 < threshold < copy_side  # between the two sides
    near = np.random.default_rng(1).uniform(0.5, 0.99, 20_000)  # distinct pairs as high as the copies
    threshold, copy_side, separable = dedup._threshold(copies, near, 1000, 0.975)
    assert not separable and threshold == copy_side
    with_copies = np.concatenate([far, np.full(10, 0.99)])  # the collection's own copies (1 pair in 4 images)
    threshold, copy_side, separable = dedup._threshold(copies, with_copies, 1000, 0.975)
    assert separable and threshold == copy_side


# ---------------------------------------------------------------- the page on a network


def test_serve_warns_when_the_page_is_open_to_a_network(approximate):
    assert web.is_loopback("127.0.0.1") and web.is_loopback("::1") and web.is_loopback("localhost")
    assert not web.is_loopback("0.0.0.0") and not web.is_loopback("192.168.1.4")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmcontrast.cli", "serve", "--index", str(approximate[1]), "--host",
                             "0.0.0.0", "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert "serving" in proc.stdout.readline()
        assert proc.stderr.readline().startswith("warning: --host 0.0.0.0 serves")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
