"""Throughput of search: images/s of `mmcontrast index`, queries/s of `mmcontrast search` and of the faiss indices.

1. index: generated JPEGs (64-128 px) indexed by ``cli.main(["index", ...])`` as a user runs it (decode workers,
   ``--precision auto``); images/s is what the command reports (embedding only: loading the model and building the
   faiss index are outside it), wall is the whole command.
2. search: queries answered by ``search.Searcher`` on that index, after one untimed query: text queries (the text
   tower plus the index) and similar-image queries (an indexed image's stored vector: the index alone).
3. the index alone, at a size where the choice matters: synthetic unit vectors with 32 effective dimensions (as
   embeddings have few), the exact ``Flat`` index against the approximate one ``choose_index_key`` picks for that
   size, its parameter tuned as ``index`` tunes it, queries one at a time, recall@10 against exact.

Models are random-init (throughput does not depend on the weights); nothing is downloaded.

    python bench/search_throughput.py                                  # mmc-tiny, 2,000 images; 100,000 vectors
    python bench/search_throughput.py --model ViT-B-32 --images 256 --vectors 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmcontrast import ann, cli, search
from mmcontrast.models import create_clip, save_clip_run_files

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zeroshot_throughput import write_images  # noqa: E402  the same synthetic JPEGs (in class subfolders; index recurses)

TEXTS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow", "white") for s in ("circle", "square", "car", "dog")]




def queries_per_s(ask, queries: list, min_seconds: float = 2.0) -> float:
    ask(queries[0])  # untimed: loads the encoders on first use
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or done < len(queries):
        ask(queries[done % len(queries)])
        done += 1
    return done / (time.perf_counter() - start)


def bench_collection(model: str, n_images: int, root: Path) -> list[tuple[str, str, str]]:
    bundle = create_clip(model)
    save_clip_run_files(bundle.model.eval(), bundle.model_cfg, root / "run", bundle.tokenizer)
    write_images(root / "images", n_images)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the index's JSON: this script prints one table
        rc = cli.main(["index", "--images", str(root / "images"), "--checkpoint", str(root / "run"), "--output-dir",
                       str(root / "index"), "--quiet"])  # fmt: skip
    wall = time.perf_counter() - start
    assert rc == 0
    infos = json.loads((root / "index" / search.INFOS_FILE).read_text())
    searcher = search.Searcher(root / "index")
    threads = torch.get_num_threads()
    text = queries_per_s(lambda q: searcher.search_text(q, 10), TEXTS)
    torch.set_num_threads(1)  # one query at a time: on shared cores, spinning intra-op threads cost more than they give
    text_one_thread = queries_per_s(lambda q: searcher.search_text(q, 10), TEXTS)
    torch.set_num_threads(threads)
    similar = queries_per_s(lambda i: searcher.search_similar(i, 10), list(range(min(100, len(searcher)))))
    return [(f"index {n_images} images ({model}, --precision {infos['precision']})", "images/s", f"{infos['items_per_s']:.0f}"),
            ("  whole command (model load, faiss build)", "s", f"{wall:.1f}"),
            (f"search --text, k=10 ({infos['index_key']}), {threads} torch threads", "queries/s", f"{text:.0f}"),
            (f"search --text, k=10 ({infos['index_key']}), 1 torch thread", "queries/s", f"{text_one_thread:.0f}"),
            ("search similar image, k=10", "queries/s", f"{similar:.0f}")]


def bench_vectors(n: int, dim: int, root: Path, n_queries: int = 200) -> list[tuple[str, str, str]]:
    from mmcontrast.collection import Collection

    rng = np.random.default_rng(0)
    # embeddings have few effective dimensions: a 32-d latent mapped into ``dim`` plus a little noise (uniform random
    # unit vectors, with none, are the worst case of every approximate index)
    latent = rng.standard_normal((n, 32)).astype(np.float32)
    vectors = latent @ rng.standard_normal((32, dim)).astype(np.float32) + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(n, n_queries, replace=False)] + 0.05 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    (root / "vectors" / "img_emb").mkdir(parents=True)
    np.save(root / "vectors" / "img_emb" / "img_emb_0.npy", vectors)
    collection = Collection(root / "vectors")
    rows = []
    for name in ("Flat", ann.choose_index_key(n, dim)):
        out = root / name.replace(",", "_")
        out.mkdir()
        start = time.perf_counter()
        infos = search.index_collection(collection, out, name)  # as `index` builds, tunes and measures it
        built = time.perf_counter() - start
        index = ann.read(str(out / search.FAISS_FILE), name, infos["index_param"])
        start = time.perf_counter()
        for q in queries:
            ann.search(index, q[None], 10, infos["rerank"], collection.vectors)
        qps = n_queries / (time.perf_counter() - start)
        rows.append((f"{n} x {dim} vectors, {name} {infos['index_param']}".rstrip(), "queries/s",
                     f"{qps:.0f} (held-out recall@10 {infos['recall@10']:.3f}, built in {built:.0f} s)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mmc-tiny")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--vectors", type=int, default=100_000, help="size of the index-only comparison (0: skip)")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_collection(args.model, args.images, Path(tmp))
        if args.vectors:
            rows += bench_vectors(args.vectors, args.dim, Path(tmp) / "ann")
    width = max(len(r[0]) for r in rows)
    print(f"command: python bench/search_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"{'what':<{width}}  {'unit':<9}  value")
    for what, unit, value in rows:
        print(f"{what:<{width}}  {unit:<9}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
