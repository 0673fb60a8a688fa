"""Shards as a data set: which files, what fields they carry, how many samples, which class names.

Owns: turning a shard spec into a list of paths or URLs (``expand_shards``), reading a shard's samples as
dicts of bytes (``read_samples``: the one place that reaches into webdataset's tar iterators), checking
that shards carry the fields a run needs (``check_fields``), counting samples (``shard_sample_counts``)
and the class names string labels index into (``class_names``). Used by training, evaluation and
diagnostics alike. Does not own streaming batches (``mmcontrast.data``) or the shard format's names
(``data_tools.formats``).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import itertools
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator

import braceexpand
import webdataset as wds

from data_tools.formats import (
    IMAGE_FIELDS,
    STATS_FILE,
    TEXT_FIELD,
    local_folder_counts,
    shard_sample_count,
    shard_stats_path,
    split_member_name,
)
from mmcontrast.errors import UsageError

PEEK_SAMPLES = 16  # how many samples check_fields looks at
PEEK_SHARDS = 3
READ_BUFFER = 1 << 20
REMOTE = re.compile(r"^(\w+://|pipe:)")


def is_remote(url: str) -> bool:
    return bool(REMOTE.match(url))


# ---------------------------------------------------------------- shard lists


def _check_braces(spec: str) -> None:
    depth = 0
    for ch in spec:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            break
    if depth != 0:
        raise UsageError(f"malformed shard pattern {spec!r}: unbalanced braces; write it like 'DIR/{{00000..00007}}.tar'")


def _list_file(spec: str) -> list[str]:
    """The lines of a list file, relative paths made relative to the file."""
    base = os.path.dirname(spec)
    with open(spec, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return [ln if is_remote(ln) else os.path.join(base, ln) for ln in lines]


def expand_shards(spec: str | os.PathLike | list) -> list[str]:
    """Shard paths from a brace pattern (``"dir/{00000..00007}.tar"``), a directory (its ``*.tar``, sorted),
    a glob (``"dir/*.tar"``), a list file (``.txt``, one path or pattern per line, relative to the file),
    or a list of any of these. URLs (``http://``, ``s3://``, ``pipe:``) are passed on unchecked.

    Raises ``UsageError`` when the pattern is malformed or names shards that do not exist.

    >>> expand_shards("shards/{00000..00001}.tar")
    ['shards/00000.tar', 'shards/00001.tar']
    """
    if isinstance(spec, (list, tuple)):
        paths = [p for s in spec for p in expand_shards(s)]
        if not paths:
            raise UsageError("the list of shards is empty; pass at least one shard, folder or pattern")
        return paths
    spec = os.fspath(spec).strip()
    hint = "pass a brace pattern like 'DIR/{00000..00007}.tar', a folder of .tar files, a glob or a list file"
    if not spec:
        raise UsageError(f"the shard pattern is empty; {hint}")
    _check_braces(spec)
    if is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    if os.path.isdir(spec):
        tars = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not tars:
            raise UsageError(f"folder {spec} has no .tar shards; make them with `python -m data_tools.make_shards`")
        return tars
    if spec.endswith(".txt") and os.path.isfile(spec):
        return expand_shards(_list_file(spec))
    paths = []
    for pattern in braceexpand.braceexpand(spec):
        paths.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths:
        raise UsageError(f"no shards match {spec!r}; {hint}")
    if missing:
        raise UsageError(
            f"{len(missing)} of {len(paths)} shards of {spec!r} do not exist (first: {missing[0]}); "
            f"check the folder and the pattern's range, or {hint}"
        )
    return paths


# ---------------------------------------------------------------- reading samples (the webdataset seam)


def read_samples(urls: Iterable[str], handler: Callable[[Exception], bool] = wds.handlers.reraise_exception) -> Iterator[dict]:
    """The samples of the shards ``urls`` as dicts of bytes (``__key__``, ``__url__``, one entry per field).

    webdataset's ``tarfile_samples`` pipeline (its openers handle paths, ``http(s)://``, ``pipe:``), with
    each shard opened with a 1 MiB read buffer instead of 8 KiB (a tenth less time per sample).
    """
    streams = wds.tariterators.url_opener(({"url": u} for u in urls), handler=handler, bufsize=READ_BUFFER)
    files = wds.tariterators.tar_file_expander(streams, handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


def has_fields(fields: Iterable[str], need_image: bool, need_text: bool) -> bool:
    """Whether a sample with ``fields`` carries an image (when needed) and a caption (when needed)."""
    fields = set(fields)
    return (not need_image or bool(fields & set(IMAGE_FIELDS))) and (not need_text or TEXT_FIELD in fields)


def check_fields(shards: list[str], need_text: bool, need_image: bool = True) -> None:
    """Check that the first samples of the first shards carry the fields a run needs.

    Needs an image field (jpg/jpeg/png/webp) when ``need_image`` and a caption (txt) when ``need_text``,
    together in at least one sample. Raises ``UsageError`` naming the fields it found otherwise.
    """
    need = (["an image (jpg, jpeg, png or webp)"] if need_image else []) + (["a caption (txt)"] if need_text else [])
    found: collections.Counter = collections.Counter()
    looked = 0
    for shard in shards[:PEEK_SHARDS]:
        try:
            for sample in itertools.islice(read_samples([shard]), PEEK_SAMPLES):
                fields = {k for k in sample if not k.startswith("__")}
                found.update(fields)
                looked += 1
                if has_fields(fields, need_image, need_text):
                    return
        except Exception as e:  # not a tar, truncated, unreadable
            raise UsageError(f"shard {shard} cannot be read as a tar file ({type(e).__name__}: {e})") from e
        if looked >= PEEK_SAMPLES:
            break
    fields = ", ".join(f"{k} ({v}x)" for k, v in sorted(found.items())) or "none"
    fix = (
        " Image-text (clip) runs need KEY.txt captions beside the images: make the shards with captions, "
        "or train image-only with --mode simclr." if need_text and set(found) & set(IMAGE_FIELDS) else
        " Make shards with `python -m data_tools.make_shards`."
    )
    raise UsageError(
        f"no sample in the first {looked} samples of {shards[0]} has {' and '.join(need)}; fields found: {fields}.{fix}"
    )


# ---------------------------------------------------------------- counting


def _img2dataset_count(shard: str) -> int | None:
    """``successes`` from the per-shard ``NNNNN_stats.json`` beside ``NNNNN.tar``."""
    stats = shard_stats_path(shard)
    if stats is None or not os.path.isfile(stats):
        return None
    with contextlib.suppress(OSError):
        with open(stats, encoding="utf-8") as f:
            return shard_sample_count(f.read())
    return None


def _scan_count(shard: str) -> int:
    """Samples with an image field, from the tar headers alone (seeks over the data, decodes nothing)."""
    keys = set()
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            parts = split_member_name(member.name) if member.isreg() else None
            if parts and parts[1].lower() in IMAGE_FIELDS:
                keys.add(parts[0])
    return len(keys)


def shard_sample_counts(shards: list[str]) -> list[int]:
    """Samples per shard: make_shards' ``stats.json``, else img2dataset's ``NNNNN_stats.json``, else a scan."""
    folders: dict[str, dict[str, int]] = {}
    counts = []
    for shard in shards:
        folder = os.path.dirname(os.path.abspath(shard))
        if folder not in folders:
            folders[folder] = local_folder_counts(folder)
        n = folders[folder].get(os.path.basename(shard))
        if n is None:
            n = _img2dataset_count(shard)
        if n is None:
            if is_remote(shard):
                raise UsageError(f"cannot count the samples of remote shard {shard}; give the count in the config")
            n = _scan_count(shard)
        counts.append(n)
    return counts


def count_samples(shards: list[str]) -> int:
    """Total samples in ``shards`` (see ``shard_sample_counts`` for where the counts come from)."""
    return sum(shard_sample_counts(shards))


# ---------------------------------------------------------------- labels


def sample_label(sample: dict) -> tuple[int | None, str | None]:
    """(integer label, None) or (None, string label) from a sample's json; (None, None) when it has none."""
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    index, label = meta.get("label_index"), meta.get("label")
    if isinstance(index, int) and not isinstance(index, bool):
        return index, None
    if isinstance(label, int) and not isinstance(label, bool):
        return label, None
    return None, label if isinstance(label, str) else None


def class_names(shards: list[str]) -> list[str] | None:
    """The class names string labels are indexed into, sorted; None when labels are integers already.

    From make_shards' stats.json (``classes``) when present, else by reading every sample's json.
    Raises ``UsageError`` when the first sample has no label.
    """
    first = next(iter(read_samples([shards[0]])), {})
    index, label = sample_label(first)
    if index is None and label is None:
        raise UsageError(
            f"labels were asked for but the first sample of {shards[0]} has no json 'label' or 'label_index'; "
            "make the shards from class folders or a captions file with a label column"
        )
    if index is not None:
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(os.path.join(os.path.dirname(os.path.abspath(shards[0])), STATS_FILE), encoding="utf-8") as f:
            classes = json.load(f).get("classes")
        if classes:
            return list(classes)
    names = {label for shard in shards for sample in read_samples([shard]) if (label := sample_label(sample)[1])}
    return sorted(names)
