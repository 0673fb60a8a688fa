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
    p.add_argument("--output-dir", required=True, metavar="INDEX", help="folder for the embeddings, metadata and faiss index")
    model_arguments(p)
    p.add_argument("--index-key", default="auto", metavar="auto|FAISS_KEY",
                   help=f"auto: exact (Flat) under {ann.EXACT_BELOW} images, else the approximate index autofaiss "
                   "would choose for the size (HNSW, IVF, OPQ+IVF+PQ); or any faiss index_factory string (HNSW32, IVF64,Flat)")
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

    options = loader_options(args)
    ann.check_index_key(args.index_key)
    plan = search.make_plan(args.images, args.shards, args.checkpoint, args.pretrained, args.precision, args.part_size)
    n_processes = launch.requested_cpu_processes()
    if int(os.environ.get("RANK", "0")) == 0:
        search.check_folder(args.output_dir, plan, args.resume, args.overwrite)  # a mistake is one line, not one per process
    if n_processes > 1:  # accelerate launch --cpu --num_processes N started only us: torchrun starts the N
        launch.exec_torchrun(n_processes, "mmcontrast.cli", sys.argv[1:])
    processes = search.join_processes(args.device)
    args.device = processes.device
    infos = search.build_index(plan, args.output_dir, processes, lambda: load_for_eval(args, options), options,
                               resume=args.resume, overwrite=args.overwrite, index_key=args.index_key,
                               recall_target=args.recall_target, progress=options["progress"])
    return 0 if infos is None else emit_json({"index": args.output_dir, **infos}, None)


def _search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="INDEX", help="a folder made by `mmcontrast index`")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find the images that match this text (CLIP checkpoints)")
    query.add_argument("--image", metavar="FILE", help="find the images most like this one")
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


def _dedup_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast.dedup import CALIBRATION_RECALL

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", metavar="INDEX", help="a folder made by `mmcontrast index`")
    source.add_argument("--images", metavar="DIR", help="a folder of images (embedded with --checkpoint, not kept)")
    model_arguments(p)
    next(a for a in p._actions if a.dest == "checkpoint").required = False  # only --images needs one
    p.add_argument("--threshold", default="auto", metavar="auto|T",
                   help="cosine at or above which two images are near-duplicates; auto (default): the cosine that "
                   f"{100 * CALIBRATION_RECALL:g}%% of resized, recompressed and cropped copies of indexed images reach with their "
                   "original under this checkpoint (README 'Search' has its measured precision and recall)")
    p.add_argument("--output", required=True, metavar="dups.csv", help="group,path,score rows; each group's first row is the one to keep")
    p.add_argument("--html", metavar="report.html", help="also a self-contained page of the groups with their images")


def _dedup_searcher(args: argparse.Namespace, tmp: str):
    """The Searcher of --index, or of an exact index of --images built in ``tmp``."""
    from mmcontrast import search
    from mmcontrast.evaluate import resolve_device

    if args.index is not None:
        return search.Searcher(args.index, device=str(resolve_device(args.device)))
    if not args.checkpoint:
        raise UsageError("--images needs --checkpoint to embed them (or give --index of an index made by `mmcontrast index`)")
    require_dir(args.images, "--images")
    options = loader_options(args)
    plan = search.make_plan(args.images, None, args.checkpoint, args.pretrained, args.precision)
    processes = search.join_processes(args.device)
    search.build_index(plan, tmp, processes, lambda: load_for_eval(args, options), options, progress=options["progress"])
    return search.Searcher(tmp, device=processes.device)


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
    if not args.output.lower().endswith(".csv"):
        raise UsageError(f"--output {args.output}: use a .csv file name")
    from mmcontrast import dedup, web

    with tempfile.TemporaryDirectory(prefix="mmcontrast-dedup-") as tmp:
        searcher = _dedup_searcher(args, tmp)
        calibration = dedup.calibrate_threshold(searcher) if threshold is None else None
        threshold = calibration["threshold"] if calibration else threshold
        groups = dedup.find_duplicates(searcher, threshold)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["group", "path", "score"])
            writer.writeheader()
            writer.writerows(dedup.duplicate_rows(searcher, groups))
        if args.html:
            Path(args.html).parent.mkdir(parents=True, exist_ok=True)
            Path(args.html).write_text(web.dedup_report(searcher, groups, threshold), encoding="utf-8")
        result = {"groups": len(groups), "duplicates": sum(len(g.ids) - 1 for g in groups), "images": len(searcher),
                  "threshold": threshold, **({"calibration": calibration} if calibration else {}), "output": str(out),
                  "html": args.html}
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
    searcher.model  # noqa: B018 (load the encoders now, not on the first query)
    server = web.make_server(searcher, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {len(searcher)} images of {args.index} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
