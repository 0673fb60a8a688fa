"""Shards as a data set: which files, what fields they carry, how many samples, which class names.

Owns: turning a shard spec into a list of paths or URLs (``expand_shards``, ``"A::B"`` for several
sources), opening a shard as a byte stream wherever it lives (``open_shard``: local files, seeking straight
to a sample; ``http(s)://`` with a read timeout; ``s3://`` and ``gs://`` through the cloud CLIs; ``pipe:``
commands), reading a shard's samples as dicts of bytes (``read_samples``: the one place that reaches into
webdataset's tar iterators), checking that shards carry the fields a run needs (``check_fields``),
counting samples (``shard_sample_counts``: the stats files beside the shards, read through the same
scheme, else the tar headers) and the class names string labels index into (``class_names``). Used by
training, evaluation and diagnostics alike. Does not own streaming batches (``mmcontrast.data``) or the
shard format's names (``data_tools.formats``).

Remote schemes. ``http(s)://`` is read with the standard library, so a stalled connection times out
(``read_timeout`` seconds without data) instead of hanging; ``s3://URL`` runs ``aws s3 cp URL -`` and
``gs://URL`` ``gcloud storage cat URL`` (the clouds' own CLIs, with their credentials); ``pipe:CMD`` runs
CMD and reads its output. The stats files of a remote shard are found the same way: the shard's file name
in the URL (or, for ``pipe:``, in the command) is replaced by ``stats.json`` or ``NNNNN_stats.json``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import glob
import http.client
import io
import itertools
import json
import logging
import os
import re
import select
import shlex
import subprocess
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator

import braceexpand
import webdataset as wds

from data_tools.formats import (
    IMAGE_FIELDS,
    SHARD_STATS_SUFFIX,
    STATS_FILE,
    TEXT_FIELD,
    folder_sample_counts,
    shard_sample_count,
    split_member_name,
)
from mmcontrast.errors import UsageError

log = logging.getLogger(__name__)

PEEK_SAMPLES = 16  # how many samples check_fields looks at
PEEK_SHARDS = 3
READ_BUFFER = 1 << 20
READ_TIMEOUT = 60.0  # seconds without a byte from a remote shard before the read fails (and is retried)
COUNT_THREADS = 16  # per-shard stats files fetched at once (one request each)
SOURCE_SEPARATOR = "::"  # "A::B": several data sources, mixed by data.upsampling_factors
REMOTE = re.compile(r"^(\w+://|pipe:)")
CLOUD_COMMANDS = {"s3": "aws s3 cp {url} -", "gs": "gcloud storage cat {url}"}
_WARNED: set[str] = set()  # damaged shards already reported by this process
# What reading a shard can raise when the shard, not our code, is at fault: a damaged tar, a dropped or
# stalled connection, a failed command, a truncated stream (webdataset passes these on as they are).
READ_FAILURES = (OSError, EOFError, ValueError, tarfile.TarError, http.client.HTTPException)


def is_remote(url: str) -> bool:
    return bool(REMOTE.match(url))


def warn_once(key: str, message: str, *args) -> None:
    """Log a warning the first time ``key`` is seen in this process (damaged shards, skipped samples)."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


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


def expand_sources(spec: str | os.PathLike | list) -> list[list[str]]:
    """The shards of each data source of ``"A::B::C"`` (each part anything ``expand_shards`` takes)."""
    if isinstance(spec, (list, tuple)) or SOURCE_SEPARATOR not in os.fspath(spec):
        return [expand_shards(spec)]
    return [expand_shards(part) for part in os.fspath(spec).split(SOURCE_SEPARATOR)]


# ---------------------------------------------------------------- opening shards wherever they live


def _command(url: str) -> list[str] | None:
    """The command whose output is the shard: ``pipe:CMD``, or a cloud CLI for ``s3://`` and ``gs://``."""
    if url.startswith("pipe:"):
        return ["/bin/sh", "-c", url[len("pipe:"):]]
    scheme = url.split("://", 1)[0]
    return shlex.split(CLOUD_COMMANDS[scheme].format(url=shlex.quote(url))) if scheme in CLOUD_COMMANDS else None


class _CommandStream(io.RawIOBase):
    """The standard output of a command as a readable stream; closing it stops the command.

    A read that gets no byte for ``timeout`` seconds stops the command and raises ``TimeoutError`` (a stalled
    ``aws s3 cp`` is retried like a stalled HTTP read), and a command that fails raises ``OSError``: neither
    may look like a shorter shard.
    """

    def __init__(self, argv: list[str], timeout: float):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        self.timeout = timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            self.close()
            raise TimeoutError(f"the command for this shard sent nothing for {self.timeout:g} s")
        data = os.read(fd, len(buffer))
        buffer[: len(data)] = data
        if not data and self.proc.wait(timeout=self.timeout) != 0:
            raise OSError(f"the command for this shard exited with status {self.proc.returncode}")
        return len(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        super().close()


class _HttpStream(io.RawIOBase):
    """An HTTP response body that raises when the connection ends before ``Content-Length`` bytes arrived
    (``http.client`` returns a quiet end of file then, which a tar reader takes for a shorter shard)."""

    def __init__(self, response):
        self.response = response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.response.readinto(buffer)
        if n == 0 and len(buffer) and self.response.length:
            raise ConnectionError(f"the connection ended {self.response.length} bytes before the end of the shard")
        return n

    def close(self) -> None:
        self.response.close()
        super().close()


def _open_raw(url: str, timeout: float) -> io.BufferedReader:
    command = _command(url)
    if command is not None:
        return io.BufferedReader(_CommandStream(command, timeout), READ_BUFFER)
    if is_remote(url):
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"cannot read {url}: use a path, http(s)://, s3://, gs:// or pipe:COMMAND")
        return io.BufferedReader(_HttpStream(urllib.request.urlopen(url, timeout=timeout)), READ_BUFFER)
    return open(url, "rb", buffering=READ_BUFFER)


def _local_sample_offset(path: str, n: int) -> int | None:
    """Byte offset of the first tar header of the ``n``-th sample with an image, from the headers alone; None past the end.

    Members sharing a key are consecutive (webdataset's grouping); a group counts when one of them is an image.
    """
    found, group, group_offset, counted = -1, None, 0, False
    with tarfile.open(path, "r:") as tar:
        for member in tar:  # random access: the data between headers is seeked over, not read
            parts = split_member_name(member.name) if member.isreg() else None
            if parts is None:
                continue
            if parts[0] != group:
                group, group_offset, counted = parts[0], member.offset, False
            if not counted and parts[1].lower() in IMAGE_FIELDS:
                counted, found = True, found + 1
                if found == n:
                    return group_offset
    return None


def open_shard(url: str, skip: int = 0, timeout: float = READ_TIMEOUT) -> tuple[io.BufferedReader | None, int]:
    """``(byte stream of the shard, samples still to skip)``, positioned at its ``skip``-th sample with an image.

    A local shard is positioned by seeking (its tar headers are read, its data not), and the stream is None
    when it has no such sample; a remote one is streamed from the start and the caller drops the samples
    still to skip.
    """
    if skip and not is_remote(url):
        with contextlib.suppress(tarfile.TarError, OSError):
            offset = _local_sample_offset(url, skip)
            if offset is None:
                return None, 0
            stream = _open_raw(url, timeout)
            stream.seek(offset)
            return stream, 0
    return _open_raw(url, timeout), skip


def read_small_file(url: str | None, timeout: float = READ_TIMEOUT) -> bytes | None:
    """The content of a small file (a stats file) at a path or URL, None when it is not there (or ``url`` is None)."""
    if url is None:
        return None
    try:
        with _open_raw(url, timeout) as f:
            return f.read()
    except (OSError, urllib.error.URLError, ValueError):
        return None


_TAR_IN_COMMAND = re.compile(r"""[^\s'"]+\.tar\b""")


def sibling(shard: str, name: str) -> str | None:
    """The file ``name`` next to ``shard``: the shard's file name replaced in its path, URL or ``pipe:`` command
    (the last ``….tar`` in the command). None when the name cannot be found (a command naming no ``.tar``)."""
    base = _shard_name(shard)
    if base is None:
        return None
    head, _, tail = shard.rpartition(base)
    return head + name + tail


# ---------------------------------------------------------------- reading samples (the webdataset seam)


def stream_samples(url: str, stream: io.BufferedReader, handler: Callable[[Exception], bool] = wds.handlers.reraise_exception
                   ) -> Iterator[dict]:
    """The samples in the tar ``stream`` of shard ``url`` as dicts of bytes (``__key__``, ``__url__``, one per field).

    webdataset's tar expansion and grouping by key (``tarfile_samples`` without its opener: ``open_shard``
    opens, with a 1 MiB buffer, timeouts and seeking).
    """
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


def read_samples(urls: Iterable[str], handler: Callable[[Exception], bool] = wds.handlers.reraise_exception) -> Iterator[dict]:
    """The samples of the shards ``urls``, one after the other (see ``stream_samples``)."""
    for url in urls:
        try:
            stream, _ = open_shard(url)
        except Exception as err:
            if handler(err):
                continue
            raise
        with stream:  # never None: nothing is skipped
            yield from stream_samples(url, stream, handler)


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
    unreadable: list[str] = []
    readable = 0
    for shard in shards:  # damaged shards among the first ones are reported and passed over
        if readable >= PEEK_SHARDS or looked >= PEEK_SAMPLES or len(unreadable) >= PEEK_SHARDS:
            break
        try:
            for sample in itertools.islice(read_samples([shard]), PEEK_SAMPLES):
                fields = {k for k in sample if not k.startswith("__")}
                found.update(fields)
                looked += 1
                if has_fields(fields, need_image, need_text):
                    return
            readable += 1
        except READ_FAILURES as e:  # not a tar, truncated, unreadable
            unreadable.append(f"shard {shard} cannot be read as a tar file ({type(e).__name__}: {str(e)[:200]})")
            warn_once(f"unreadable:{shard}", "%s; it is passed over (data_tools.inspect lists the shards to re-create)",
                      unreadable[-1])
    if unreadable and not looked:
        raise UsageError(unreadable[0])
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


def _tar_ends_whole(shard: str) -> bool:
    """Whether a local tar ends with tar's end-of-archive marker (two zero blocks), as every writer leaves it; a copy
    cut short does not."""
    with open(shard, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 2 * tarfile.BLOCKSIZE:
            return False
        f.seek(-2 * tarfile.BLOCKSIZE, os.SEEK_END)
        return not any(f.read())


def _scan_count(shard: str) -> tuple[int, str | None]:
    """(samples with an image field, damage) from the tar headers alone (seeks over the data, decodes nothing).

    The damage says how a shard is broken: cut short (as an interrupted copy leaves it: it ends inside a member, or
    without tar's end-of-archive marker; the whole samples before the cut are counted, the one it cuts is not, and
    whatever followed is lost), or unreadable from some header on. None for a whole shard."""
    keys, cut, error = set(), set(), None
    size = os.path.getsize(shard)
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                parts = split_member_name(member.name) if member.isreg() else None
                if member.offset_data + member.size > size:  # its data runs past the end of the file
                    cut.add(parts[0] if parts else member.name)
                elif parts and parts[1].lower() in IMAGE_FIELDS:
                    keys.add(parts[0])
    except (tarfile.TarError, OSError, EOFError) as err:
        error = err
    whole = len(keys - cut)
    damage = None
    if cut or not _tar_ends_whole(shard):
        damage = (f"ends inside a member after {whole} whole samples; what followed it is lost" if cut or error
                  else f"ends without tar's end-of-archive marker after {whole} samples (cut short?)")
    elif error is not None:
        damage = f"unreadable after {whole} samples ({error})"
    if damage:
        warn_once(f"unreadable:{shard}", "shard %s is damaged: %s; training on the whole samples before it "
                  "(python -m data_tools.inspect lists the shards to re-create)", shard, damage)
    return whole, damage


def shard_sample_counts(shards: list[str], timeout: float = READ_TIMEOUT, damaged: list[str] | None = None) -> list[int | None]:
    """Samples per shard: make_shards' ``stats.json``, else the shard's ``NNNNN_stats.json`` (make_shards' and
    img2dataset's), both found beside it through its own scheme; else, for a local shard, its tar headers.
    ``None`` for a remote shard without stats (give ``data.num_samples`` for ``--epochs`` then). A local shard
    counted from its headers that turns out cut short is warned about and, given a ``damaged`` list, named in it
    (``"NAME: how"``).
    """
    folder_counts: dict[str, dict[str, int]] = {}
    counts: list[int | None] = []
    for shard in shards:
        stats_url = sibling(shard, STATS_FILE)
        if stats_url not in folder_counts:
            text = read_small_file(stats_url, timeout)
            folder_counts[stats_url] = folder_sample_counts(text) if text else {}
        counts.append(folder_counts[stats_url].get(_shard_name(shard)))
    missing = [i for i, n in enumerate(counts) if n is None]

    def per_shard_stats(i: int) -> bytes | None:
        stats_name = _shard_stats_name(shards[i])
        return read_small_file(sibling(shards[i], stats_name), timeout) if stats_name else None

    with concurrent.futures.ThreadPoolExecutor(COUNT_THREADS) as pool:  # one request per shard: many at once
        texts = pool.map(per_shard_stats, missing)
        for i, text in zip(missing, texts):
            counts[i] = shard_sample_count(text) if text else None
    for i, shard in enumerate(shards):
        if counts[i] is None and not is_remote(shard):
            counts[i], damage = _scan_count(shard)
            if damage and damaged is not None:
                damaged.append(f"{os.path.basename(shard)}: {damage}")
    return counts


def _shard_name(shard: str) -> str | None:
    """``00012.tar`` of a path, a URL, or the last ``….tar`` of a ``pipe:`` command; None when there is none."""
    if shard.startswith("pipe:"):
        found = _TAR_IN_COMMAND.findall(shard)
        return os.path.basename(found[-1]) if found else None
    return os.path.basename(shard.split("?", 1)[0])


def _shard_stats_name(shard: str) -> str | None:
    """``00012_stats.json`` for ``…/00012.tar`` (make_shards' and img2dataset's per-shard stats)."""
    name = _shard_name(shard)
    return name[: -len(".tar")] + SHARD_STATS_SUFFIX if name and name.endswith(".tar") else None


def count_samples(shards: list[str], timeout: float = READ_TIMEOUT) -> int:
    """Total samples in ``shards`` (see ``shard_sample_counts``); UsageError when a remote shard has no count."""
    counts = shard_sample_counts(shards, timeout)
    unknown = [s for s, n in zip(shards, counts) if n is None]
    if unknown:
        raise UsageError(
            f"{len(unknown)} remote shards have no stats file beside them (first: {unknown[0]}), so their sample count "
            "is unknown; give it with --set data.num_samples=N, or train with --steps"
        )
    return sum(counts)


# ---------------------------------------------------------------- labels


def sample_label(sample: dict) -> tuple[int | None, str | None]:
    """(index, name) of a sample's label from its json: the index is ``label_index`` (or an integer ``label``), the name
    a string ``label``; either may be None (both: no label). An index means a position in the class list of the shards
    it came with (stats.json's ``classes``); a run with a class list of its own maps the name."""
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    index, label = meta.get("label_index"), meta.get("label")
    if not isinstance(index, int) or isinstance(index, bool):
        index = label if isinstance(label, int) and not isinstance(label, bool) else None
    return index, label if isinstance(label, str) else None


def shard_classes(shards: list[str]) -> list[str]:
    """Every class name the shards' labels use: make_shards' stats.json ``classes``, else the names in every sample's
    json (integer labels without names are shown as numbers)."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        classes = json.loads(read_small_file(sibling(shards[0], STATS_FILE)) or b"{}").get("classes")
        if classes:
            return [str(c) for c in classes]
    names = set()
    for shard in shards:
        for sample in read_samples([shard]):
            index, name = sample_label(sample)
            if name is not None or index is not None:
                names.add(name if name is not None else str(index))
    return sorted(names)


def check_classes(shards: list[str], classes: list[str]) -> None:
    """A ``UsageError`` naming both lists when the shards hold a class that ``classes`` (a run's list) lacks."""
    found = shard_classes(shards)
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise UsageError(f"the shards hold the class(es) {', '.join(unknown)}, which the run's class list lacks; the "
                         f"shards' classes: {', '.join(found)}; the run's: {', '.join(classes)}")


def class_names(shards: list[str]) -> list[str] | None:
    """The class names string labels are indexed into, sorted; None when labels are integers already.

    From make_shards' stats.json (``classes``) when present, else by reading every sample's json.
    Raises ``UsageError`` when the first sample has no label.
    """
    first = next(iter(read_samples([shards[0]], handler=wds.handlers.warn_and_continue)), {})
    index, label = sample_label(first)
    if index is None and label is None:
        raise UsageError(
            f"labels were asked for but the first sample of {shards[0]} has no json 'label' or 'label_index'; "
            "make the shards from class folders or a captions file with a label column"
        )
    if index is not None:  # indices into the shards' own class list: read as they are
        return None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        classes = json.loads(read_small_file(sibling(shards[0], STATS_FILE)) or b"{}").get("classes")
        if classes:
            return list(classes)
    names = {label for shard in shards for sample in read_samples([shard]) if (label := sample_label(sample)[1])}
    return sorted(names)
