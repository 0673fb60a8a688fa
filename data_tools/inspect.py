"""Check and summarise finished shards: ``python -m data_tools.inspect OUTPUT_DIR`` (alias ``data_tools.verify``).

Owns: counts (shards, samples, fields, labels), caption length statistics (or the verdict that the shards are
image-only: no sample has a caption, as ``make_shards --layout images`` writes them for ``--mode simclr``), an
image size histogram, and a full check that every shard opens and every sample decodes (image, UTF-8
caption when there is one, JSON), compared with
the per-shard counts in ``stats.json`` (or each shard's ``NNNNN_stats.json``) when present. A report with
problems ends with the line ``fix or re-create: 00003.tar, ...`` naming every shard that has one. Exit 0
when all is well, 1 when a problem was found, 2 for unusable arguments. Does not own writing shards
(``make_shards``) or reading them for training (``mmcontrast.data``).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import statistics
import sys
import tarfile
from collections import Counter

import braceexpand
from PIL import Image

from data_tools.formats import (
    IMAGE_FIELDS,
    TEXT_FIELD,
    local_folder_counts,
    shard_sample_count,
    shard_stats_path,
    split_member_name,
)

SIZE_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)  # upper bounds of the longer-side histogram
MAX_LISTED_PROBLEMS = 20


def find_shards(spec: str) -> list[str]:
    """A folder (its ``*.tar``), a brace pattern, a glob, or one tar file, as sorted paths."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    paths = []
    for pattern in braceexpand.braceexpand(spec):
        paths.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern] if os.path.isfile(pattern) else [])
    return paths


def _samples(path: str):
    """The samples of one shard: consecutive files with the same key, grouped as webdataset groups them.

    Reads the tar with ``tarfile``; importing webdataset would import torch, seconds of start-up.
    """
    sample = None
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            parts = split_member_name(member.name) if member.isreg() else None
            if parts is None:
                continue
            key, field = parts[0], parts[1].lower()
            if sample is not None and (key != sample["__key__"] or field in sample):
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key}
            sample[field] = tar.extractfile(member).read()
    if sample is not None:
        yield sample


def _check_sample(sample: dict, decode: bool, report: dict) -> str | None:
    """Add one sample to ``report``; returns a problem description or None."""
    fields = [k for k in sample if not k.startswith("__")]
    report["fields"].update(fields)
    image_field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if image_field is None:
        return f"no image field (has {', '.join(sorted(fields))})"
    try:
        img = Image.open(io.BytesIO(sample[image_field]))
        report["sizes"].append(max(img.size))
        if decode:
            img.load()
    except Exception as e:
        return f"{image_field} does not decode ({type(e).__name__}: {e})"
    if TEXT_FIELD in sample:
        report["captioned"] += 1
        try:
            caption = sample[TEXT_FIELD].decode("utf-8")
        except UnicodeDecodeError:
            return "txt is not UTF-8"
        report["caption_chars"].append(len(caption))
        report["caption_words"].append(len(caption.split()))
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return "json does not parse"
        if isinstance(meta, dict) and meta.get("label") is not None:
            report["labels"][str(meta["label"])] += 1
    return None


def _expected_counts(shards: list[str]) -> dict[str, int]:
    """Per-shard sample counts promised by make_shards' stats.json beside the shards, else by each shard's
    own ``NNNNN_stats.json`` (make_shards' or img2dataset's; a ``--part`` run writes no stats.json)."""
    expected = {}
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in shards}):
        expected.update({os.path.join(folder, name): n for name, n in local_folder_counts(folder).items()})
    for path in map(os.path.abspath, shards):
        if path not in expected and os.path.isfile(shard_stats_path(path) or ""):
            with open(shard_stats_path(path), encoding="utf-8") as f:
                count = shard_sample_count(f.read())
            if count is not None:
                expected[path] = count
    return expected


def inspect_shards(shards: list[str], decode: bool = True) -> dict:
    """Read every sample of ``shards``; returns the report (counts, statistics, problems)."""
    report = {
        "fields": Counter(), "sizes": [], "captioned": 0, "caption_chars": [], "caption_words": [], "labels": Counter(),
        "per_shard": {}, "problems": [], "bad_shards": [],
    }
    expected = _expected_counts(shards)
    for path in shards:
        count, problems = 0, len(report["problems"])
        try:
            for sample in _samples(path):
                count += 1
                problem = _check_sample(sample, decode, report)
                if problem:
                    report["problems"].append(f"{os.path.basename(path)}: {sample['__key__']}: {problem}")
        except Exception as e:  # a truncated or non-tar file
            report["problems"].append(f"{os.path.basename(path)}: unreadable after {count} samples ({type(e).__name__}: {e})")
        report["per_shard"][path] = count
        want = expected.get(os.path.abspath(path))
        if want is not None and want != count:
            report["problems"].append(f"{os.path.basename(path)}: has {count} samples, its stats say {want}")
        if len(report["problems"]) > problems:
            report["bad_shards"].append(os.path.basename(path))
    return report


def _describe(values: list[int]) -> str:
    if not values:
        return "none"
    return f"min {min(values)} / median {statistics.median(values):g} / mean {statistics.mean(values):.1f} / max {max(values)}"


def _histogram(sizes: list[int]) -> list[tuple[str, int]]:
    bounds = (0, *SIZE_BUCKETS, None)
    rows = []
    for lo, hi in zip(bounds, bounds[1:]):
        n = sum(1 for s in sizes if s >= lo and (hi is None or s < hi))
        rows.append((f"{lo}-{hi - 1}" if hi else f">={lo}", n))
    nonzero = [i for i, (_, n) in enumerate(rows) if n]
    return rows[nonzero[0] : nonzero[-1] + 1] if nonzero else []


def _captions(captioned: int, samples: int) -> str:
    if not samples:
        return "none"
    if not captioned:
        return "none: image-only shards (KEY.<image> + KEY.json), for --mode simclr; clip mode needs KEY.txt"
    return "every sample" if captioned == samples else f"{captioned} of {samples} samples (the others are image-only)"


def format_report(report: dict, source: str) -> str:
    samples = sum(report["per_shard"].values())
    lines = [
        f"shards        {len(report['per_shard'])}  ({source})",
        f"samples       {samples}",
        "fields        " + ", ".join(f"{k} {v}" for k, v in sorted(report["fields"].items())),
        f"captions      {_captions(report['captioned'], samples)}",
    ]
    if report["captioned"]:
        lines.append(f"caption chars {_describe(report['caption_chars'])}")
        lines.append(f"caption words {_describe(report['caption_words'])}")
    if report["labels"]:
        top = ", ".join(f"{k} {v}" for k, v in report["labels"].most_common(5))
        lines.append(f"labels        {len(report['labels'])} distinct; most common: {top}")
    lines.append("image sizes   (longer side in pixels)")
    peak = max((n for _, n in _histogram(report["sizes"])), default=1)
    for label, n in _histogram(report["sizes"]):
        lines.append(f"  {label:>11} {n:>8}  {'#' * round(40 * n / peak)}")
    problems = report["problems"]
    if not problems:
        lines.append("check         OK: every shard opens and every sample decodes")
    else:
        lines.append(f"check         {len(problems)} problems:")
        lines.extend(f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        lines.append(f"fix or re-create: {', '.join(report['bad_shards'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.inspect",
        description="Summarise shards and check that every shard opens and every sample decodes.",
    )
    parser.add_argument("shards", metavar="OUTPUT_DIR", help="a folder of .tar shards, a brace pattern, a glob, or a tar")
    parser.add_argument("--no-decode", action="store_true", help="read image headers only (faster, misses truncation)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    shards = find_shards(args.shards)
    if not shards:
        print(f"inspect: error: no .tar shards found at {args.shards}; pass a folder of shards or a pattern", file=sys.stderr)
        return 2
    report = inspect_shards(shards, decode=not args.no_decode)
    if args.json:
        samples = sum(report["per_shard"].values())
        summary = {
            "shards": len(shards), "samples": samples, "fields": dict(report["fields"]),
            "captioned": report["captioned"], "image_only": samples > 0 and not report["captioned"],
            "caption_chars": _describe(report["caption_chars"]), "image_sizes": dict(_histogram(report["sizes"])),
            "labels": len(report["labels"]), "problems": report["problems"], "fix_or_recreate": report["bad_shards"],
        }
        print(json.dumps(summary))
    else:
        print(format_report(report, args.shards))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
