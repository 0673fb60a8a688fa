"""Search at scale, as a user runs it: synthetic clustered vectors in clip-retrieval's layout -> ``index --embeddings``
-> ``search --vectors`` -> ``dedup`` -> ``serve``, each command a process of its own, measured from outside.

The collection: ``--n`` unit vectors of ``--dim`` float32 around 1,000 centres (a fixed seed), in parts of
``--part-rows`` written the way clip-retrieval writes them (``img_emb/img_emb_{i}.npy``, pandas parquet with an
``image_path`` column); 0.1 % of the rows are near-duplicates of another row (cosine about 0.98). The queries:
``--queries`` more vectors from the same distribution, never indexed. Recall@10 is against this script's own exact
search (numpy, a part at a time); peak RSS is each command's own high-water mark (VmHWM), start-up included.

    python bench/search_scale.py                      # 2,000,000 x 256 (about 2 GB on disk, in --workdir)
    python bench/search_scale.py --n 500000 --keep    # smaller; keep the folder
    python bench/search_scale.py --n 1000000 --max-index-memory 1G

autofaiss (what clip-retrieval builds with) is not run beside it: it pins numpy<2 and pandas<3, and cannot be
installed next to this project.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

CENTRES = 1000
NOISE = 0.9  # per dimension, relative to the centres' unit-variance components: clusters overlap, as real ones do
DUP_RATE = 0.001


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_collection(folder: Path, n: int, dim: int, part_rows: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Write the collection; return the held-out queries and the number of planted near-duplicate pairs."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    planted = 0
    for i, start in enumerate(range(0, n, part_rows)):
        rows = min(part_rows, n - start)
        x = centres[rng.integers(0, CENTRES, rows)] + NOISE * rng.standard_normal((rows, dim), dtype=np.float32)
        dups = rng.choice(rows, int(rows * DUP_RATE) * 2, replace=False).reshape(-1, 2)  # row b a copy of row a
        x = _unit(x)
        x[dups[:, 1]] = _unit(x[dups[:, 0]] + 0.2 / np.sqrt(dim) * rng.standard_normal((len(dups), dim), dtype=np.float32))
        planted += len(dups)
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", x)
        pd.DataFrame({"image_path": [f"images/{start + j:09d}.jpg" for j in range(rows)]}).to_parquet(
            folder / "metadata" / f"metadata_{i}.parquet")
    queries = centres[rng.integers(0, CENTRES, n_queries)] + NOISE * rng.standard_normal((n_queries, dim), dtype=np.float32)
    return _unit(queries), planted


def exact_top(folder: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """``(q, k)`` exact cosines, best first, a part at a time."""
    best = np.full((len(queries), k), -np.inf, np.float32)
    for path in sorted((folder / "img_emb").glob("*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1])):
        scores = queries @ np.load(path, mmap_mode="r").T
        best = -np.sort(-np.concatenate([best, scores], axis=1), axis=1)[:, :k]
    return best


def _watch_peak(pid: int, peak: list[int]) -> None:
    """Keep ``peak[0]`` at the process's VmHWM (its own high-water mark since exec; ``wait4``'s ru_maxrss would carry
    this script's own peak into a child started with vfork)."""
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        hwm = [line for line in status.splitlines() if line.startswith("VmHWM:")]
        if not hwm:  # a zombie: it has exited
            return
        peak[0] = max(peak[0], int(hwm[0].split()[1]))
        time.sleep(0.05)


def run(command: list[str]) -> tuple[float, float, str]:
    """``(seconds, peak RSS in MiB, stdout)`` of one command, run to its end."""
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    peak = [0]
    watcher = threading.Thread(target=_watch_peak, args=(proc.pid, peak), daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{err[-2000:]}")
    return time.perf_counter() - start, peak[0] / 1024, out


def serve_start(index: Path) -> float:
    """Seconds from starting ``serve`` to its first answer (``/api/search?similar=0``: no model to load)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mmcontrast.cli", "serve", "--index", str(index), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = proc.stdout.readline().split("http://127.0.0.1:")[1].split("/")[0]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/api/search?similar=0&k=10", timeout=60) as response:
            json.loads(response.read())
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--part-rows", type=int, default=250_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--max-index-memory", help="passed to index (default: index's own)")
    parser.add_argument("--threshold", type=float, default=0.95, help="dedup's cosine threshold")
    parser.add_argument("--workdir", help="where the collection and index go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folder")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="search-scale-"))
    cli = [sys.executable, "-m", "mmcontrast.cli"]
    try:
        start = time.perf_counter()
        queries, planted = make_collection(work / "emb", args.n, args.dim, args.part_rows, args.queries)
        np.save(work / "queries.npy", queries)
        made = time.perf_counter() - start
        budget = ["--max-index-memory", args.max_index_memory] if args.max_index_memory else []
        build_s, build_rss, out = run([*cli, "index", "--embeddings", str(work / "emb"), "--output-dir", str(work / "idx"),
                                       "--quiet", *budget])  # fmt: skip
        infos = json.loads(out)
        search_s, search_rss, searched = run([*cli, "search", "--index", str(work / "idx"), "--vectors", str(work / "queries.npy"),
                                         "--k", "10", "--output", str(work / "r.json")])  # fmt: skip
        answers = json.loads((work / "r.json").read_text())["queries"]
        got = np.array([[r["score"] for r in a["results"]] for a in answers])
        exact = exact_top(work / "emb", queries, 10)
        recall = float(np.mean(got >= exact[:, -1:] - 1e-5))
        dedup_s, dedup_rss, out = run([*cli, "dedup", "--index", str(work / "idx"), "--method", "embedding", "--threshold",
                                       str(args.threshold), "--output", str(work / "d.csv")])  # fmt: skip
        dedup = json.loads(out)
        serve_s = serve_start(work / "idx")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    command = f"python bench/search_scale.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()
    print(f"command: {command}   (collection written in {made:.0f} s{', kept in ' + str(work) if args.keep else ''})")
    print(f"{args.n:,} x {args.dim} float32; index {infos['index_key']} ({infos['index_param'] or 'exact'}, "
          f"re-rank x{infos['rerank']}), {infos['index_bytes'] / 2**20:.0f} MiB on disk, "
          f"held-out recall@10 at build {infos['recall@10']}")
    print("step                                   wall s   peak RSS MiB   result")
    print(f"index --embeddings                     {build_s:>6.1f}   {build_rss:>12.0f}   faiss part {infos['faiss_build_s']} s")
    print(f"search --vectors ({args.queries} queries, k=10)    {search_s:>6.1f}   {search_rss:>12.0f}   "
          f"recall@10 {recall:.3f} vs exact; {json.loads(searched)['queries_per_s']} queries/s inside the command")
    print(f"dedup --threshold {args.threshold}                 {dedup_s:>6.1f}   {dedup_rss:>12.0f}   "
          f"{dedup['embedding_pairs']} pairs ({planted} planted), pair recall {dedup.get('pair_recall')} on a sample")
    print(f"serve: first answer after              {serve_s:>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
