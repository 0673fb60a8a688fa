"""Folders of images and captions to webdataset shards: ``python -m data_tools.make_shards INPUT OUTPUT_DIR``.

Owns: the command line, and the order of a run: claim OUTPUT_DIR (refuse a folder that holds files unless
``--resume`` or ``--overwrite``; never touch files make_shards did not write), list INPUT once into the
manifest (``manifest``), write the shards that are missing on an engine (``engines``: the local pool or Ray;
``--part I/N`` writes only every N-th), and, when every shard is done, ``stats.json`` and ``sizes.json`` — or,
when no sample was written, exit 2 naming the main skip reason and what to do (``SKIP_ADVICE``).

The pieces: ``inputs`` finds the samples (four layouts), ``shuffle`` spreads them over the shards (a seeded
order), ``samples`` checks and encodes one input, ``output`` writes one shard and knows which files are ours.
Shard *i* is a pure function of manifest rows ``[i*S, (i+1)*S)`` and the settings, so every engine, worker
count, part split and resume writes the same bytes. Tars are written with ``tarfile`` in webdataset's layout
(what ``webdataset.TarWriter`` writes, with fixed header fields): importing webdataset would import torch,
seconds of start-up for a data-only tool.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import sys
import tempfile

from PIL import Image
from tqdm import tqdm

from data_tools.engines import WorkerDied, check_ray_address, ray_session, run_local, run_ray
from data_tools.formats import IMAGE_EXTENSIONS, MANIFEST_FILE, SIZES_FILE, STATS_FILE
from data_tools.inputs import DEFAULT_CLASS_TEMPLATE, LAYOUTS, ArgumentError, Listing
from data_tools.manifest import read_header, shard_rows, write_manifest
from data_tools.output import (
    MANIFEST_TEMPORARY,
    RUN_FILES,
    SHARD_FILE,
    ShardContext,
    completed_shard,
    remove,
    scan,
    summarise,
    write_json_atomic,
)
from data_tools.samples import Settings

DEFAULT_SHARD_SIZE = 1000
DEFAULT_LOCAL_WORKERS = min(4, os.cpu_count() or 1)
# What to do when no sample was written and this is the main skip reason (the message names it and its count).
SKIP_ADVICE = {
    "symlink_outside_input": "the images are symlinks to files outside INPUT; pass --follow-symlinks to read them",
    "missing_caption": "the images have no caption; put a .txt beside each image, pass --captions FILE, "
                       "or pass --layout images for image-only shards (--mode simclr)",
    "no_class_folder": "the images are not in class subfolders; sort them into subfolders named after their "
                       "class, or pass --layout images for image-only shards (--mode simclr)",
    "caption_not_utf8": "the caption files are not UTF-8; save them as UTF-8",
    "missing_file": "the --captions rows name files that are not in INPUT; filepath must be relative to INPUT",
    "path_outside_input": "the --captions rows name paths outside INPUT; filepath must be relative to INPUT",
    "zero_byte": "the image files are empty (0 bytes); copy them again",
    "corrupt_image": "the images are truncated or corrupt; copy them again",
    "not_an_image": f"the files are not images ({', '.join(IMAGE_EXTENSIONS)}) whatever their names say",
    "decompression_bomb": "the images have more pixels than --max-pixels; raise it",
    "unreadable_file": "the files cannot be read; check their permissions",
    "not_a_file": "the image names are not regular files",
}  # fmt: skip


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N (e.g. 0/3, 1/3, 2/3)")
    return int(match.group(1)), int(match.group(2))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m data_tools.make_shards",
        description="Convert a folder of images and captions into webdataset shards (00000.tar, ...).",
    )
    p.add_argument("input", metavar="INPUT", help="folder of images (sidecar .txt captions, --captions, class subfolders, "
                                                  "or image-only with --layout images)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="where 00000.tar ... and stats.json are written")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="inputs per shard (default %(default)s)")
    p.add_argument(
        "--max-image-size", type=int, default=None,
        help="resize so the longer side is at most this many pixels (never upscales; default: copy the original bytes)",
    )  # fmt: skip
    p.add_argument("--captions", default=None, help="CSV/TSV (filepath,caption columns) or JSONL with paths relative to INPUT")
    p.add_argument("--class-template", default=DEFAULT_CLASS_TEMPLATE, help="caption for class subfolders (default %(default)r)")
    p.add_argument("--classes", type=_class_list, default=None, metavar="A,B,...",
                   help="the class list in this order: label_index is a label's position in it (default: the labels "
                   "sorted as strings, so folders 1, 2, 10 are the classes '1', '10', '2'); stored in stats.json")
    p.add_argument(
        "--layout", default="auto", choices=LAYOUTS,
        help="INPUT's layout (default auto: sidecar if an image has a .txt, else classes); images: image-only shards",
    )  # fmt: skip
    p.add_argument("--follow-symlinks", action="store_true", help="read the files of symlinks that point outside INPUT "
                                                                  "(default: skip and count them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order that spreads the inputs over the shards "
                                                       "(default %(default)s)")
    p.add_argument(
        "--workers", type=int, default=None,
        help=f"processes that decode/encode (default {DEFAULT_LOCAL_WORKERS}; with --engine ray, the CPUs of a local cluster, default all)",
    )  # fmt: skip
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="finish what is missing in OUTPUT_DIR (same INPUT and settings)")
    again.add_argument("--overwrite", action="store_true", help="replace make_shards' earlier output in OUTPUT_DIR")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="local process pool (default) or Ray, one task per shard")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="Ray cluster to use (default: start a local one)")
    p.add_argument("--part", type=_part, default=None, metavar="I/N", help="write only the shards whose index is I mod N")
    p.add_argument("--manifest-only", action="store_true", help="list INPUT into OUTPUT_DIR/_manifest.jsonl.gz and stop")
    p.add_argument(
        "--max-pixels", type=int, default=Image.MAX_IMAGE_PIXELS,
        help="skip images with more pixels than this as decompression bombs (default %(default)s, pillow's limit)",
    )  # fmt: skip
    return p


def _class_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"give distinct class names separated by commas, e.g. cat,dog; got {text!r}")
    return names


def _check_arguments(args: argparse.Namespace) -> None:
    if not os.path.exists(args.input):
        raise ArgumentError(f"INPUT {args.input} does not exist")
    if not os.path.isdir(args.input):
        raise ArgumentError(f"INPUT {args.input} is not a folder")
    for name in ("shard_size", "workers", "max_pixels", "max_image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be at least 1")
    if args.seed < 0:
        raise ArgumentError("--seed must be 0 or more")
    if args.ray_address and args.engine != "ray":
        raise ArgumentError("--ray-address needs --engine ray")
    if args.part and args.overwrite:
        raise ArgumentError("--part cannot --overwrite: the parts share OUTPUT_DIR; clear it once before them "
                            "(--overwrite --manifest-only) and start every part on that")  # fmt: skip
    if args.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise ArgumentError("--engine ray needs Ray, which is not installed: pip install 'mmcontrast[ray]'")
    if args.ray_address:
        check_ray_address(args.ray_address)


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def _claim_output_dir(args: argparse.Namespace) -> None:
    """Refuse an OUTPUT_DIR that holds files (untouched) unless --resume, --overwrite or --part say what to
    do with them, and refuse files make_shards did not write in every case; clear our files for --overwrite."""
    path = args.output_dir
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if names and not (args.resume or args.overwrite or args.part):
        raise ArgumentError(
            f"OUTPUT_DIR {path} already holds {len(names)} files ({_some(names)}); "
            "pass --resume to finish what is missing, or --overwrite to replace it"
        )
    if names:
        ours, foreign = scan(path)
        if foreign:
            raise ArgumentError(
                f"OUTPUT_DIR {path} holds files make_shards did not write ({_some(foreign)}); --resume and "
                "--overwrite only touch make_shards' own output: choose an empty folder"
            )
        if args.overwrite:
            remove(path, ours)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ArgumentError(f"OUTPUT_DIR {path} is not writable ({e.strerror or e}); choose another folder") from e


# ---------------------------------------------------------------- a run


def _request(args: argparse.Namespace) -> dict:
    """What the command asks for that decides the output's bytes: a resume must ask for the same."""
    return {
        "input": os.path.realpath(args.input),
        "captions": os.path.realpath(args.captions) if args.captions else None,
        "layout": args.layout,
        "class_template": args.class_template,
        "classes": args.classes,
        "shard_size": args.shard_size,
        "max_image_size": args.max_image_size,
        "max_pixels": args.max_pixels,
        "follow_symlinks": args.follow_symlinks,
        "seed": args.seed,
    }


def _manifest_header(args: argparse.Namespace, request: dict) -> dict:
    """The header of OUTPUT_DIR's manifest: the one there (resume, parts), or a new listing of INPUT."""
    path = os.path.join(args.output_dir, MANIFEST_FILE)
    header = read_header(path) if args.resume or args.part else None
    if header is not None:
        theirs = header["request"]
        changed = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in request.items() if theirs.get(k) != v]
        if changed:
            raise ArgumentError(
                f"OUTPUT_DIR {args.output_dir} was made from other inputs or settings ({'; '.join(changed)}); "
                "repeat the original command, or replace it with --overwrite"
            )
        return header
    with tqdm(unit="file", desc="listing INPUT", disable=None) as bar:
        listing = Listing(args.input, args.layout, args.captions, args.class_template, on_folder=bar.update, classes=args.classes)
        return write_manifest(args.output_dir, request, listing, exclusive=args.part is not None)


def _run_settings(header: dict) -> dict:
    """Stored in every NNNNN_stats.json and in stats.json: a shard is kept by a resume only if they match."""
    request = header["request"]
    return {
        "layout": header["layout"],
        "class_template": request["class_template"] if header["layout"] == "classes" else None,
        "inputs": header["rows"],
        "fingerprint": header["fingerprint"],
        "shard_size": request["shard_size"],
        "max_image_size": request["max_image_size"],
        "max_pixels": request["max_pixels"],
        "follow_symlinks": request["follow_symlinks"],
        "seed": request["seed"],
    }


def _remove_stale(output_dir: str, n_shards: int, mine: set[int], done: set[int], whole_run: bool) -> None:
    """Delete leftovers of this run's shards that are not complete (a --part run: its own shards only); a
    whole run also deletes shards beyond the listing, stats.json, sizes.json and manifest temporaries."""
    stale = []
    for name in os.listdir(output_dir):
        match = SHARD_FILE.match(name)
        if match:
            shard, temporary = int(match.group(1)), bool(match.group(3))
            ours_to_redo = shard in mine or (whole_run and shard >= n_shards)
            if ours_to_redo and (temporary or shard not in done):
                stale.append(name)
        elif whole_run and name != MANIFEST_FILE and (name in RUN_FILES or MANIFEST_TEMPORARY.match(name)):
            stale.append(name)
    remove(output_dir, stale)


def _counts(shard_stats: dict) -> dict:
    """What stats.json needs of a shard's stats: kept for every shard, so no more (a million shards is fine)."""
    return {k: shard_stats[k] for k in ("name", "count", "successes", "skipped_reasons")}


def _write_missing_shards(args: argparse.Namespace, header: dict) -> dict[int, dict]:
    """Write this run's shards that are not complete yet; returns the stats of all of this run's shards."""
    out, run = args.output_dir, _run_settings(header)
    size = run["shard_size"]
    n_shards = max(1, -(-header["rows"] // size))
    mine = {s for s in range(n_shards) if args.part is None or s % args.part[1] == args.part[0]}
    stats = {s: _counts(st) for s in sorted(mine) if (st := completed_shard(out, s, run)) is not None}
    _remove_stale(out, n_shards, mine, set(stats), whole_run=args.part is None)
    image_only = header["layout"] == "images"
    settings = Settings(os.path.realpath(args.input), args.max_image_size, args.max_pixels, image_only, args.follow_symlinks)
    ctx = ShardContext(out, settings, run, header["classes"])
    jobs = ((s, lines) for s, lines in shard_rows(os.path.join(out, MANIFEST_FILE), size) if s in mine and s not in stats)
    if args.engine == "ray":
        finished = run_ray(jobs, ctx)
    else:
        finished = run_local(jobs, ctx, args.workers or DEFAULT_LOCAL_WORKERS)
    with tqdm(total=len(mine), initial=len(stats), unit="shard", desc="make_shards", disable=None) as bar:
        for shard_stats in finished:
            stats[int(shard_stats["name"].split(".")[0])] = _counts(shard_stats)
            bar.update(1)
    return stats


def run(args: argparse.Namespace) -> dict | None:
    """Convert as the command line asks; returns the stats.json dict (also written to OUTPUT_DIR), or None
    for ``--part`` and ``--manifest-only`` runs, which write no stats.json."""
    _check_arguments(args)
    created = not os.path.exists(args.output_dir)
    _claim_output_dir(args)
    uses_ray = args.engine == "ray" and not args.manifest_only
    with ray_session(args.ray_address, args.workers) if uses_ray else contextlib.nullcontext():
        return _convert(args, created)


def _convert(args: argparse.Namespace, created: bool) -> dict | None:
    try:
        header = _manifest_header(args, _request(args))
    except ArgumentError:
        if created and not os.listdir(args.output_dir):
            os.rmdir(args.output_dir)  # a listing that fails (no images, no captions) leaves no trace
        raise
    if args.manifest_only:
        return None
    shard_stats = _write_missing_shards(args, header)
    if args.part:
        return None
    stats = summarise([shard_stats[s] for s in sorted(shard_stats)], _run_settings(header))
    if not stats["written"]:
        _remove_empty_output(args.output_dir, created)
        raise ArgumentError(_nothing_written(stats))
    stats["layout"] = header["layout"]
    if header["classes"] is not None:
        stats["classes"] = header["classes"]
    write_json_atomic(os.path.join(args.output_dir, SIZES_FILE), {s["name"]: s["samples"] for s in stats["shards"]})
    write_json_atomic(os.path.join(args.output_dir, STATS_FILE), stats)
    return stats


def _remove_empty_output(output_dir: str, created: bool) -> None:
    """Shards without a sample are of no use, and a second run should not need --overwrite: remove ours."""
    remove(output_dir, scan(output_dir)[0])
    if created and not os.listdir(output_dir):
        os.rmdir(output_dir)


def _nothing_written(stats: dict) -> str:
    """One line: the main skip reason, its count, and what to do about it."""
    reasons = sorted(stats["skipped_reasons"].items(), key=lambda kv: (-kv[1], kv[0]))
    if not reasons:
        return "wrote no samples: INPUT listed no inputs; point it at a folder of images"
    (main, count), others = reasons[0], ", ".join(f"{k} {v}" for k, v in reasons[1:])
    advice = SKIP_ADVICE.get(main, "see the skip reasons in docs/data.md")
    return (f"wrote no samples: {count} of {stats['seen']} inputs were skipped as {main}"
            f"{f' (also {others})' if others else ''}; {advice}")  # fmt: skip


def _report(args: argparse.Namespace, stats: dict | None) -> str:
    if args.manifest_only:
        return f"listed INPUT into {os.path.join(args.output_dir, MANIFEST_FILE)}"
    if stats is None:
        i, n = args.part
        return (f"part {i}/{n} done in {args.output_dir}; when every part has finished, run the same command with "
                "--resume instead of --part: it writes what is missing and stats.json")  # fmt: skip
    reasons = ", ".join(f"{k} {v}" for k, v in stats["skipped_reasons"].items())
    image_only = "image-only (for --mode simclr) " if stats["layout"] == "images" else ""
    return (
        f"wrote {stats['written']} {image_only}samples in {len(stats['shards'])} shards to {args.output_dir}"
        f" (seen {stats['seen']}, skipped {stats['skipped']}{': ' + reasons if reasons else ''})"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        stats = run(args)
    except ArgumentError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"make_shards: error: {e}; run the same command with --resume to finish", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make_shards: interrupted; run the same command with --resume to finish", file=sys.stderr)
        return 130
    print(_report(args, stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
