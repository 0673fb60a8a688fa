"""``mmcontrast index | search | dedup | serve``: a collection indexed, queried, deduplicated and served
(``mmcontrast.search``, ``ann``, ``dedup``, ``web``)."""

from __future__ import annotations

import argparse
import sys

from mmcontrast.cli.common import (
    emit_json,
    load_for_eval,
    loader_options,
    model_arguments,
    require_dir,
    subcommand,
)
from mmcontrast.errors import UsageError


def _index_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast import ann, search

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of images, searched recursively")
    source.add_argument("--shards", metavar="PATTERN", help="webdataset shards (brace pattern, directory, glob, list file); "
                        "captions are kept and embedded too")
    source.add_argument("--embeddings", metavar="DIR", help="embeddings computed elsewhere, in clip-retrieval's layout "
                        "(DIR/img_emb/*.npy, DIR/metadata/*.parquet): indexed where they are, no checkpoint needed")
    p.add_argument("--output-dir", required=True, metavar="INDEX", help="folder for the embeddings, metadata and faiss index")
    model_arguments(p)
    next(a for a in p._actions if a.dest == "checkpoint").required = False  # --embeddings needs none
    p.add_argument("--index-key", default="auto", metavar="auto|FAISS_KEY",
                   help=f"auto: exact (Flat) under {ann.EXACT_BELOW} images, else the approximate index that fits "
                   "--max-index-memory (HNSW, IVF, IVF+PQ with exact re-ranking); or any faiss index_factory string")
    p.add_argument("--max-index-memory", metavar="SIZE",
                   help="memory the faiss index may take, e.g. 4G or 512M; picks the index (default: a quarter of the "
                   "float32 vectors, between 256M and 4G)")
    p.add_argument("--part", metavar="I/N", help="embed only part I of N of the collection into a shared --output-dir "
                   "(one machine of N; no faiss index); then run the same command without --part, with --resume")
    p.add_argument("--recall-target", type=float, default=ann.RECALL_TARGET, metavar="R",
                   help=f"an approximate index searches with the cheapest setting reaching this recall@10 (default {ann.RECALL_TARGET})")
    p.add_argument("--part-size", type=int, default=search.DEFAULT_PART_SIZE, metavar="N",
                   help=f"images per part, the unit of resuming and of sharing work between processes (default {search.DEFAULT_PART_SIZE}; "
                   "shards: one part each)")
    p.add_argument("--resume", action="store_true", help="finish an index that was stopped: finished parts are kept, not embedded again")
    p.add_argument("--overwrite", action="store_true", help="replace the index in --output-dir")


@subcommand("index", "embed a folder of images or shards into a searchable faiss index (runs under accelerate launch too)",
            _index_arguments)
def _index(args: argparse.Namespace) -> int:
    if args.images is not None:
        require_dir(args.images, "--images")
    if not 0 < args.recall_target <= 1:
        raise UsageError("--recall-target must be in (0, 1]")
    import os

    from mmcontrast import ann, launch, search

    ann.check_index_key(args.index_key)
    max_memory = None if args.max_index_memory is None else ann.parse_memory(args.max_index_memory)
    if args.embeddings is not None:
        return _index_embeddings(args, max_memory)
    if args.checkpoint is None:
        raise UsageError("--images and --shards are embedded with --checkpoint C; give one (or index --embeddings DIR)")
    _refuse_unrecorded_options(args)
    slice_ = _part(args.part)
    options = loader_options(args)
    plan = search.make_plan(args.images, args.shards, args.checkpoint, args.pretrained, args.precision, args.part_size)
    n_processes = launch.requested_cpu_processes()
    if int(os.environ.get("RANK", "0")) == 0:
        from pathlib import Path

        resume = args.resume or (slice_ is not None and (Path(args.output_dir) / search.PLAN_FILE).is_file())
        search.check_folder(args.output_dir, plan, resume, args.overwrite)  # a mistake is one line, not one per process
    if n_processes > 1:  # accelerate launch --cpu --num_processes N started only us: torchrun starts the N
        launch.exec_torchrun(n_processes, "mmcontrast.cli", sys.argv[1:])
    processes = search.join_processes(args.device)
    args.device = processes.device
    infos = search.build_index(plan, args.output_dir, processes, lambda: load_for_eval(args, options), options,
                               resume=args.resume, overwrite=args.overwrite, index_key=args.index_key,
                               recall_target=args.recall_target, max_memory=max_memory, progress=options["progress"],
                               slice_=slice_)
    if slice_ is not None and processes.rank == 0:
        print(f"part {args.part} embedded into {args.output_dir}; when every part is done, run the same command "
              "without --part and with --resume to build the index", file=sys.stderr)
    return 0 if infos is None else emit_json({"index": args.output_dir, **infos}, None)


def _refuse_unrecorded_options(args: argparse.Namespace, then: str = "") -> None:
    """``--pool`` and ``--image-size`` are not in an index's record, from which queries are embedded later: refused."""
    if args.pool is not None or args.image_size is not None:
        raise UsageError("--pool and --image-size are not recorded in an index: embed with `mmcontrast embed --pool ... "
                         f"--image-size ...` and index the vectors with `mmcontrast index --embeddings DIR`{then}")


def _part(text: str | None) -> tuple[int, int] | None:
    """``--part I/N`` as ``(I, N)``, 0 <= I < N."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--part {text!r}: give I/N, e.g. 0/4 for the first of four machines") from None
    if not 0 <= i < n:
        raise UsageError(f"--part {text}: I must be in 0..N-1")
    return i, n


def _index_embeddings(args: argparse.Namespace, max_memory: int | None) -> int:
    """``index --embeddings DIR``: no checkpoint, no embedding; the faiss index over the folder's parts."""
    from mmcontrast import search

    if args.checkpoint is not None or args.part is not None or args.resume:
        raise UsageError("--embeddings indexes vectors as they are: --checkpoint, --part and --resume do not apply")
    require_dir(args.embeddings, "--embeddings")
    infos = search.index_embeddings(args.embeddings, args.output_dir, args.index_key, args.recall_target, max_memory,
                                    overwrite=args.overwrite, progress=not args.quiet)
    return emit_json({"index": args.output_dir, **infos}, None)


def _search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="INDEX", help="a folder made by `mmcontrast index`")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find the images that match this text (CLIP checkpoints)")
    query.add_argument("--image", metavar="FILE", help="find the images most like this one")
    query.add_argument("--vectors", metavar="Q.npy", help="a batch of query vectors, one per row (the index's dimension; "
                       "L2-normalised here): {\"queries\": [{\"results\": [...]}, ...]} in row order to --output R.json")
    p.add_argument("--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--output", metavar="results.json|results.html",
                   help="also write the results: JSON, or an HTML contact sheet with the images inside it")
    p.add_argument("--device", help="cpu, cuda or cuda:N for the query's encoder (default: cuda when available)")


def _print_results(result: dict) -> None:
    rows = [(str(i + 1), f"{r['score']:.4f}", str(r.get("path") or r.get("key")), r.get("caption") or "")
            for i, r in enumerate(result["results"])]
    width = min(max((len(r[2]) for r in rows), default=4), 80)
    item = "path" if any("path" in r for r in result["results"]) or not rows else "key"
    print(f"{'rank':>4}  {'score':>6}  {item:<{width}}  caption")
    for rank, score, name, caption in rows:
        print(f"{rank:>4}  {score:>6}  {name:<{width}}  {caption}".rstrip())


@subcommand("search", "the images of an index nearest to a text or an image (a table; JSON or an HTML contact sheet)",
            _search_arguments)
def _search(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.k < 1:
        raise UsageError(f"--k must be at least 1, not {args.k}")
    if args.output and Path(args.output).suffix.lower() not in (".json", ".html", ".htm"):
        raise UsageError(f"--output {args.output}: use a .json or .html file name")
    if args.text is not None and not args.text.strip():
        raise UsageError("--text is empty; give some words to search for")
    if args.image is not None and not Path(args.image).is_file():
        raise UsageError(f"--image {args.image}: no such file")
    if args.vectors is not None:
        return _search_vectors(args)
    from mmcontrast.evaluate import resolve_device
    from mmcontrast.search import Searcher

    searcher = Searcher(args.index, device=str(resolve_device(args.device)))
    result = searcher.search_text(args.text, args.k) if args.text is not None else searcher.search_image(args.image, args.k)
    _print_results(result)
    if args.output:
        import json

        from mmcontrast import web

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        is_json = out.suffix.lower() == ".json"
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n" if is_json else web.contact_sheet(searcher, result),
                       encoding="utf-8")
        print(f"\nresults: {out}")
    return 0


def _search_vectors(args: argparse.Namespace) -> int:
    """``search --vectors Q.npy``: every row a query, answered in one batch; torch is never imported."""
    import json
    import time
    from pathlib import Path

    import numpy as np

    from mmcontrast.search import Searcher

    if not args.output or Path(args.output).suffix.lower() != ".json":
        raise UsageError("--vectors writes its results as JSON: give --output R.json")
    if not Path(args.vectors).is_file():
        raise UsageError(f"--vectors {args.vectors}: no such file")
    try:
        queries = np.load(args.vectors, allow_pickle=False)
    except ValueError as err:
        raise UsageError(f"--vectors {args.vectors} is not a .npy array of numbers ({str(err).splitlines()[0][:100]})") from None
    searcher = Searcher(args.index)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != searcher.dim or queries.dtype.kind not in "fiu":
        raise UsageError(f"--vectors {args.vectors} is {queries.dtype} of shape {queries.shape}; this index takes "
                         f"(n, {searcher.dim}) floats")
    start = time.perf_counter()
    answers = searcher.search_batch(queries, args.k)
    elapsed = time.perf_counter() - start
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"queries": [{"results": r} for r in answers]}, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({"queries": len(answers), "k": args.k, "search_s": round(elapsed, 3),
                      "queries_per_s": round(len(answers) / max(elapsed, 1e-9), 1), "output": str(out)}))
    return 0


def _dedup_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast.dedup import CALIBRATION_RECALL, METHODS, PHASH_DISTANCE

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", metavar="INDEX", help="a folder made by `mmcontrast index`")
    source.add_argument("--images", metavar="DIR", help="a folder of images (embedded with --checkpoint, not kept)")
    model_arguments(p)
    next(a for a in p._actions if a.dest == "checkpoint").required = False  # only --images needs one
    p.add_argument("--method", choices=METHODS, default="both",
                   help="embedding: pairs at cosine >= --threshold; phash: pairs whose perceptual hashes differ in at most "
                   "--phash-distance bits (whatever the checkpoint learned); both (default): either, the embedding side "
                   "only when its calibration shows it separates copies from distinct images")
    p.add_argument("--threshold", default="auto", metavar="auto|T",
                   help="cosine at or above which two images are near-duplicates; auto (default): calibrated on both sides, "
                   f"between the cosine {100 * CALIBRATION_RECALL:g}%% of planted copies of indexed images reach with their "
                   "original and the cosine random distinct pairs of the collection stay under")
    p.add_argument("--phash-distance", type=int, default=PHASH_DISTANCE, metavar="BITS",
                   help=f"pHash bits (of 64) two copies may differ in (default {PHASH_DISTANCE})")
    p.add_argument("--output", required=True, metavar="dups.csv", help="group,path,score rows; each group's first row is the one to keep")
    p.add_argument("--html", metavar="report.html", help="also a self-contained page of the groups with their images")


def _dedup_searcher(args: argparse.Namespace, tmp: str):
    """The Searcher of --index, or of an exact index of --images built in ``tmp``."""
    from mmcontrast import search

    if args.index is not None:
        device = args.device
        if args.threshold == "auto" and args.method != "phash":  # planted copies are embedded: the encoder's device
            from mmcontrast.evaluate import resolve_device

            device = str(resolve_device(args.device))
        return search.Searcher(args.index, device=device or "cpu")
    if not args.checkpoint:
        raise UsageError("--images needs --checkpoint to embed them (or give --index of an index made by `mmcontrast index`)")
    _refuse_unrecorded_options(args, ", then dedup --index")
    require_dir(args.images, "--images")
    options = loader_options(args)
    plan = search.make_plan(args.images, None, args.checkpoint, args.pretrained, args.precision)
    processes = search.join_processes(args.device)
    search.build_index(plan, tmp, processes, lambda: load_for_eval(args, options), options, progress=options["progress"])
    return search.Searcher(tmp, device=processes.device)


def _embedding_side(args: argparse.Namespace, searcher, threshold: float | None) -> tuple[float | None, dict | None]:
    """``(threshold, calibration)`` of the embedding side; threshold None when ``both`` drops it (cannot separate)."""
    from mmcontrast import dedup

    if threshold is not None:
        return threshold, None
    if not searcher.infos.get("checkpoint"):
        raise UsageError("this index has no checkpoint to calibrate a threshold with: give --threshold T, or --method phash")
    calibration = dedup.calibrate_threshold(searcher)
    if calibration["separable"]:
        return calibration["threshold"], calibration
    print(f"warning: this checkpoint scores distinct images as high as copies (at the cosine {calibration['threshold']} "
          f"that keeps {100 * calibration['copy_recall']:.0f}% of planted copies, {calibration['expected_false_pairs']:.0f} "
          "distinct pairs would pass); " + ("using pHash alone" if args.method == "both" else
                                            "its groups will be mostly false: use --method phash or both"), file=sys.stderr)
    return (None if args.method == "both" else calibration["threshold"]), calibration


def _dedup_pairs(args: argparse.Namespace, searcher, threshold: float | None) -> tuple[object, dict]:
    """The pairs the chosen methods find, and what to report of them."""
    from mmcontrast import dedup

    report: dict = {"method": args.method}
    found = []
    if args.method != "embedding":
        try:
            found.append(dedup.phash_pairs(searcher, args.phash_distance))
            report.update(phash_distance=args.phash_distance, phash_pairs=len(found[-1].ids))
        except UsageError:
            if args.method == "phash":
                raise
            print("note: the indexed images cannot be read for pHash; using the embedding side alone", file=sys.stderr)
    if args.method != "phash":
        threshold, calibration = _embedding_side(args, searcher, threshold)
        report.update(threshold=threshold, **({"calibration": calibration} if calibration else {}))
        if threshold is not None:
            found.append(dedup.embedding_pairs(searcher, threshold))
            report["embedding_pairs"] = len(found[-1].ids)
            if not searcher.infos.get("exact"):  # approximate: say how many of the exact pairs it found
                report.update(dedup.pair_recall(searcher, found[-1], threshold, n_items=1000))
    pairs = dedup.Pairs.merge([(p.ids, p.scores) for p in found])
    return pairs, report


@subcommand("dedup", "groups of near-duplicate images (resized, recompressed, cropped copies) to a CSV", _dedup_arguments)
def _dedup(args: argparse.Namespace) -> int:
    import csv
    import tempfile
    from pathlib import Path

    try:
        threshold = None if args.threshold == "auto" else float(args.threshold)
    except ValueError:
        raise UsageError(f"--threshold must be auto or a cosine similarity, not {args.threshold!r}") from None
    if threshold is not None and not 0 < threshold <= 1:
        raise UsageError(f"--threshold must be a cosine similarity in (0, 1], not {threshold}")
    if not 0 <= args.phash_distance < 64:
        raise UsageError(f"--phash-distance must be between 0 and 63 bits, not {args.phash_distance}")
    if not args.output.lower().endswith(".csv"):
        raise UsageError(f"--output {args.output}: use a .csv file name")
    from mmcontrast import dedup, web

    with tempfile.TemporaryDirectory(prefix="mmcontrast-dedup-") as tmp:
        searcher = _dedup_searcher(args, tmp)
        pairs, report = _dedup_pairs(args, searcher, threshold)
        groups = dedup.group_pairs(searcher, pairs)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["group", "path", "score"])
            writer.writeheader()
            writer.writerows(dedup.duplicate_rows(searcher, groups))
        if args.html:
            Path(args.html).parent.mkdir(parents=True, exist_ok=True)
            Path(args.html).write_text(web.dedup_report(searcher, groups, report.get("threshold")), encoding="utf-8")
        result = {"groups": len(groups), "duplicates": sum(len(g.ids) - 1 for g in groups), "images": len(searcher),
                  **report, "output": str(out), "html": args.html}
    return emit_json(result, None)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast.web import DEFAULT_HOST, DEFAULT_PORT

    p.add_argument("--index", required=True, metavar="INDEX", help="a folder made by `mmcontrast index`")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--device", help="cpu, cuda or cuda:N for the queries' encoder (default: cuda when available)")


@subcommand("serve", "a web page to search an index: GET /?q=TEXT, GET /api/search?q=TEXT&k=K", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    from mmcontrast import web
    from mmcontrast.evaluate import resolve_device
    from mmcontrast.search import Searcher

    searcher = Searcher(args.index, device=str(resolve_device(args.device)))
    if searcher.infos.get("checkpoint"):
        searcher.model  # noqa: B018 (load the encoders now, not on the first query)
    server = web.make_server(searcher, args.host, args.port)
    host, port = server.server_address[:2]
    if not web.is_loopback(args.host):
        print(f"warning: --host {args.host} serves the {len(searcher)} indexed images to every machine that can reach this "
              "one, with no password; use the default 127.0.0.1 (and an SSH tunnel) unless that is meant", file=sys.stderr)
    print(f"serving {len(searcher)} images of {args.index} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
