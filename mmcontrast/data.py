"""Streaming webdataset pipelines for training: shard lists, field checks, sample counts and the loader.

Owns: turning a shard spec into paths (``expand_shards``), checking that shards carry the fields a run
needs (``check_fields``), counting samples (``count_samples``), and ``make_loader``: a torch DataLoader
whose workers read their share of the shards, shuffle deterministically, skip the batches a resumed run
already consumed, decode, transform, tokenize and batch, and skip (and count) corrupt samples.
Does not own: augmentations (``augment.py``), the model's preprocess and tokenizer (passed in), writing
shards (``data_tools.make_shards``).

Reading order. Shards are shuffled with ``(seed, epoch)`` — the same permutation on every rank — then
split by rank and, within a rank, by DataLoader worker (``order[rank::world_size][worker::workers]``).
When there are fewer shards than readers, readers share shards and keep every n-th sample instead, so a
plain epoch never duplicates or drops a sample (up to each worker's partial last batch). Each worker's
samples pass a shuffle buffer seeded with ``(seed, epoch, rank, worker)``, and each sample's random
augmentation is seeded with ``(seed, epoch, shard file name, sample key)``: a sample gets the same views
whatever the number of processes, workers or the batch size, so a run on 2 processes sees exactly the
pixels a 1-process run sees. The stream is a pure function of those, independent of ``batch_size`` —
which is what exact resume (``skip_batches``) and gradient caching rely on. ``resampled=True`` instead
draws shards with replacement, forever; a sample can then recur, so its augmentation seed is
``(seed, epoch, rank, worker, position)``.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mmcontrast.errors import UsageError

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
TEXT_FIELD = "txt"
STATS_FILE = "stats.json"  # written by data_tools.make_shards: {"shards": [{"name", "samples"}], "classes"?}
PEEK_SAMPLES = 16  # how many samples check_fields looks at
PEEK_SHARDS = 3
READ_BUFFER = 1 << 20
_REMOTE = re.compile(r"^(\w+://|pipe:)")
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_WARNED: set[str] = set()  # kinds of skipped samples already logged in this process


# ---------------------------------------------------------------- shard lists, fields, counts


def _check_braces(spec: str) -> None:
    depth = 0
    for ch in spec:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            break
    if depth != 0:
        raise UsageError(f"malformed shard pattern {spec!r}: unbalanced braces; write it like 'DIR/{{00000..00007}}.tar'")


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
    if _REMOTE.match(spec):
        return list(braceexpand.braceexpand(spec))
    if os.path.isdir(spec):
        tars = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not tars:
            raise UsageError(f"folder {spec} has no .tar shards; make them with `python -m data_tools.make_shards`")
        return tars
    if spec.endswith(".txt") and os.path.isfile(spec):
        base = os.path.dirname(spec)
        with open(spec, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        return expand_shards([ln if _REMOTE.match(ln) else os.path.join(base, ln) for ln in lines])
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


def _read_samples(urls: Iterable[str], handler: Callable[[Exception], bool] = wds.handlers.reraise_exception) -> Iterator[dict]:
    """The samples of the shards ``urls`` as dicts of bytes: webdataset's ``tarfile_samples``, opening each
    shard with a 1 MiB read buffer instead of 8 KiB (a tenth less time per sample)."""
    streams = wds.tariterators.url_opener(({"url": u} for u in urls), handler=handler, bufsize=READ_BUFFER)
    files = wds.tariterators.tar_file_expander(streams, handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


def _tar_samples(url: str) -> Iterator[dict]:
    return _read_samples([url])


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
            for sample in itertools.islice(_tar_samples(shard), PEEK_SAMPLES):
                fields = {k for k in sample if not k.startswith("__")}
                found.update(fields)
                looked += 1
                if (not need_image or fields & set(IMAGE_FIELDS)) and (not need_text or TEXT_FIELD in fields):
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


def _stats_counts(folder: str, cache: dict) -> dict[str, int]:
    """{shard name: samples} from make_shards' stats.json in ``folder`` (empty when absent)."""
    if folder not in cache:
        cache[folder] = {}
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            with open(os.path.join(folder, STATS_FILE), encoding="utf-8") as f:
                cache[folder] = {s["name"]: int(s["samples"]) for s in json.load(f)["shards"]}
    return cache[folder]


def _img2dataset_count(shard: str) -> int | None:
    """``successes`` from img2dataset's per-shard ``NNNNN_stats.json`` beside ``NNNNN.tar``."""
    stats = shard[: -len(".tar")] + "_stats.json" if shard.endswith(".tar") else None
    if stats is None or not os.path.isfile(stats):
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(stats, encoding="utf-8") as f:
            return int(json.load(f)["successes"])
    return None


def _scan_count(shard: str) -> int:
    """Samples with an image field, from the tar headers alone (seeks over the data, decodes nothing)."""
    keys = set()
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            match = _KEY_AND_FIELD.match(member.name) if member.isreg() else None
            if match and match.group(2).lower() in IMAGE_FIELDS:
                keys.add(match.group(1))
    return len(keys)


def shard_sample_counts(shards: list[str]) -> list[int]:
    """Samples per shard: make_shards' ``stats.json``, else img2dataset's ``NNNNN_stats.json``, else a scan."""
    cache: dict = {}
    counts = []
    for shard in shards:
        n = _stats_counts(os.path.dirname(os.path.abspath(shard)), cache).get(os.path.basename(shard))
        if n is None:
            n = _img2dataset_count(shard)
        if n is None:
            if _REMOTE.match(shard):
                raise UsageError(f"cannot count the samples of remote shard {shard}; give the count in the config")
            n = _scan_count(shard)
        counts.append(n)
    return counts


def count_samples(shards: list[str]) -> int:
    """Total samples in ``shards`` (see ``shard_sample_counts`` for where the counts come from)."""
    return sum(shard_sample_counts(shards))


def _sample_label(sample: dict) -> tuple[int | None, str | None]:
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
    first = next(iter(_tar_samples(shards[0])), {})
    index, label = _sample_label(first)
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
    names = {label for shard in shards for sample in _tar_samples(shard) if (label := _sample_label(sample)[1])}
    return sorted(names)


# ---------------------------------------------------------------- splitting and resume arithmetic


def _rng(*parts) -> random.Random:
    """A generator seeded from ``parts`` (string seeding is hashed with SHA-512: stable across processes)."""
    return random.Random("/".join(map(str, parts)))


def _sample_seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def assign_shards(
    shards: list, rank: int, world_size: int, worker: int, workers: int
) -> tuple[list, int, int]:
    """This reader's share: ``(shards to read, stride, offset)``, keep sample i when i % stride == offset.

    Shards are split by rank, then by worker; a level with fewer shards than readers splits samples
    instead, so every sample goes to exactly one (rank, worker).
    """
    mine, stride, offset = list(shards), 1, 0
    for index, count in ((rank, world_size), (worker, workers)):
        if len(mine) >= count:
            mine = mine[index::count]
        else:
            offset, stride = offset + stride * index, stride * count
    return mine, stride, offset


def resume_position(skip_batches: int, batches_per_worker: list[int | None]) -> tuple[list[int], int]:
    """Where a loader stands after yielding ``skip_batches`` batches: (batches each worker yielded, the
    worker that yields the next batch).

    DataLoader takes batches from its workers round robin and passes over workers that have run out;
    ``None`` means a worker that never runs out (resampled mode, or counts unknown).
    """
    n = [math.inf if b is None else b for b in batches_per_worker]

    def total(rounds: int) -> float:
        return sum(min(b, rounds) for b in n)

    lo, hi = 0, skip_batches  # complete rounds: the largest r with total(r) <= skip_batches
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= skip_batches else (lo, mid - 1)
    rounds, rest = lo, int(skip_batches - total(lo))
    active = [w for w in range(len(n)) if n[w] > rounds]  # workers still yielding in the next round
    taken = [int(min(n[w], rounds)) + (w in active[:rest]) for w in range(len(n))]
    return taken, active[rest] if rest < len(active) else 0


# ---------------------------------------------------------------- decoding one sample


def _warn_once(kind: str, detail: str) -> None:
    if kind not in _WARNED:
        _WARNED.add(kind)
        log.warning("skipping samples with %s (first: %s); further ones are only counted in 'skipped'", kind, detail)


def _on_read_error(exn: Exception) -> bool:
    _warn_once("unreadable_shard", repr(exn)[:300])
    return True  # go on with the next shard


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids pillow's palette-transparency warning
    image.load()  # the full decode: corrupt or truncated data fails here
    return image if image.mode == "RGB" else image.convert("RGB")


@contextlib.contextmanager
def _seeded(seed: int, restore: bool):
    """Seed python, numpy and torch RNGs (augmentations use all three); restore them after if asked."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding (ms per call)
    try:
        yield
    finally:
        if saved:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class ShardStream(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: read its shards, shuffle, skip, decode, batch.

    Built by ``make_loader``; picklable (plain attributes), so it works with any worker start method.
    """

    def __init__(self, shards: list[str], *, image_transform: Callable, tokenizer: Callable | None, views: int,
                 batch_size: int, seed: int, epoch: int, skip_batches: int, rank: int, world_size: int,
                 resampled: bool, shuffle: bool, shuffle_buffer: int, with_labels: bool,
                 class_to_index: dict[str, int] | None, shard_counts: list[int] | None, drop_last: bool,
                 decode_size: int | None):
        super().__init__()
        self.shards, self.image_transform, self.tokenizer, self.views = shards, image_transform, tokenizer, views
        self.batch_size, self.seed, self.epoch, self.skip_batches = batch_size, seed, epoch, skip_batches
        self.rank, self.world_size, self.resampled, self.shuffle = rank, world_size, resampled, shuffle
        self.shuffle_buffer, self.with_labels, self.class_to_index = shuffle_buffer, with_labels, class_to_index
        self.shard_counts, self.drop_last, self.decode_size = shard_counts, drop_last, decode_size
        # a transform with sample() and finish() (augment.SimclrTransform) runs in two stages
        self.two_stage = callable(getattr(image_transform, "sample", None)) and callable(getattr(image_transform, "finish", None))

    # -- which samples, in which order

    def _urls(self, worker: int, workers: int) -> tuple[Iterable[str], int, int]:
        if self.resampled:
            rng = _rng("resampled", self.seed, self.epoch, self.rank, worker)
            return (rng.choice(self.shards) for _ in itertools.count()), 1, 0
        order = list(self.shards)
        if self.shuffle:
            _rng("shards", self.seed, self.epoch).shuffle(order)  # identical on every rank and worker
        return assign_shards(order, self.rank, self.world_size, worker, workers)

    def _batches_per_worker(self, workers: int) -> list[int | None]:
        if self.resampled or self.shard_counts is None:
            return [None] * workers
        order = list(range(len(self.shards)))
        if self.shuffle:
            _rng("shards", self.seed, self.epoch).shuffle(order)
        result = []
        for w in range(workers):
            mine, stride, offset = assign_shards(order, self.rank, self.world_size, w, workers)
            total = sum(self.shard_counts[i] for i in mine)
            samples = max(0, -(-(total - offset) // stride))
            result.append(samples // self.batch_size if self.drop_last else -(-samples // self.batch_size))
        return result

    def _usable(self, samples: Iterable[dict], dropped: collections.Counter) -> Iterator[dict]:
        for sample in samples:
            has_image = any(f in sample for f in IMAGE_FIELDS)
            if has_image and (self.tokenizer is None or TEXT_FIELD in sample):
                yield sample
            else:
                dropped["missing_field"] += 1
                _warn_once("missing_field", f"{sample.get('__key__')} has {sorted(k for k in sample if not k.startswith('__'))}")

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        taken, first = resume_position(self.skip_batches, self._batches_per_worker(workers))
        # DataLoader always starts its round robin at process 0; rotating which share each process reads
        # makes a resumed loader continue with the worker whose batch came next in the un-skipped one.
        worker = (worker + first) % workers
        urls, stride, offset = self._urls(worker, workers)
        samples = _read_samples(urls, handler=_on_read_error)
        if stride > 1:
            samples = itertools.islice(samples, offset, None, stride)
        dropped: collections.Counter = collections.Counter()
        samples = self._usable(samples, dropped)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = _rng("samples", self.seed, self.epoch, self.rank, worker)
            samples = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        samples = iter(samples)
        start = taken[worker] * self.batch_size
        collections.deque(itertools.islice(samples, start), maxlen=0)  # skip without decoding
        dropped.clear()  # drops inside the skipped part were reported by the run that consumed it
        yield from self._batches(samples, start, worker, dropped, in_worker=info is not None)

    # -- decoding and batching

    def _decode(self, sample: dict, seed: int, in_worker: bool) -> dict | str:
        """The decoded, transformed sample, or the kind of problem that makes us skip it."""
        field = next(f for f in IMAGE_FIELDS if f in sample)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(sample[field]))
                if self.decode_size and image.format == "JPEG":
                    # decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= decode_size
                    image.draft("RGB", (self.decode_size, self.decode_size))
                image = _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return "decompression_bomb"
        except Exception:
            return "corrupt_image"
        out = {"key": sample["__key__"]}
        if self.tokenizer is not None:
            try:
                out["caption"] = sample[TEXT_FIELD].decode("utf-8").strip()
            except UnicodeDecodeError:
                return "caption_not_utf8"
            if not out["caption"]:
                return "empty_caption"
        if self.with_labels:
            label = self._label(sample)
            if label is None:
                return "missing_label"
            out["label"] = label
        with _seeded(seed, restore=not in_worker):
            if self.two_stage:  # per image here, the rest per batch in _collate (augment.SimclrTransform)
                out["views"] = [self.image_transform.sample(image) for _ in range(self.views)]
            else:
                out["views"] = [self.image_transform(image) for _ in range(self.views)]
        return out

    def _label(self, sample: dict) -> int | None:
        index, name = _sample_label(sample)
        return index if index is not None else (self.class_to_index or {}).get(name)

    def _batches(self, samples: Iterator[dict], position: int, worker: int, dropped: collections.Counter,
                 in_worker: bool) -> Iterator[dict]:
        batch = []
        for sample in samples:
            if self.resampled:  # a sample can recur: seed by its place in this reader's stream
                seed = _sample_seed(self.seed, self.epoch, self.rank, worker, position)
            else:  # by identity: the same views on any number of processes and workers
                seed = _sample_seed(self.seed, self.epoch, os.path.basename(str(sample.get("__url__", ""))), sample.get("__key__"))
            position += 1
            item = self._decode(sample, seed, in_worker)
            if isinstance(item, str):
                dropped[item] += 1
                _warn_once(item, f"{sample.get('__key__')} in {sample.get('__url__')}")
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._collate(batch, dropped)
                batch = []
        if batch and not self.drop_last:
            yield self._collate(batch, dropped)

    def _collate(self, batch: list[dict], dropped: collections.Counter) -> dict:
        out = {"__key__": [b["key"] for b in batch], "skipped": sum(dropped.values())}
        dropped.clear()
        stacked = []
        for v in range(self.views):
            if self.two_stage:
                crops, params = zip(*(b["views"][v] for b in batch))
                stacked.append(self.image_transform.finish(torch.stack(crops), torch.stack(params)))
            else:
                stacked.append(torch.stack([b["views"][v] for b in batch]))  # (B, 3, H, W)
        if self.views == 1:
            out["image"] = stacked[0]
        else:
            out.update({f"view{v + 1}": x for v, x in enumerate(stacked)})
        if self.tokenizer is not None:
            out["text"] = self.tokenizer([b["caption"] for b in batch])  # (B, L) token ids
        if self.with_labels:
            out["label"] = torch.tensor([b["label"] for b in batch], dtype=torch.long)  # (B,)
        return out


def make_loader(
    shards: list[str],
    *,
    image_transform: Callable,
    tokenizer: Callable | None = None,
    views: int = 1,
    batch_size: int,
    workers: int,
    seed: int,
    epoch: int = 0,
    skip_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
    resampled: bool = False,
    shuffle_buffer: int = 1000,
    with_labels: bool = False,
    shuffle: bool = True,
    drop_last: bool = True,
    decode_size: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``shards`` yielding dict batches of exactly ``batch_size`` samples.

    Args:
        shards: shard paths (``expand_shards`` output; a pattern string is expanded).
        image_transform: ``PIL.Image (RGB) -> Tensor (3, H, W)``; random transforms are seeded per sample.
            One with ``sample(image) -> (uint8 crop, params)`` and ``finish(crops, params) -> batch`` methods
            (``augment.SimclrTransform``) runs per image, then per batch in the worker's collate.
        tokenizer: ``list[str] -> LongTensor (n, L)`` (open_clip's tokenizer); None for image-only runs.
        views: transformed copies per image: 1 gives ``"image"``, 2 gives ``"view1"``/``"view2"`` (SimCLR).
        batch_size: samples per batch (per process); each worker drops its partial last batch.
        workers: DataLoader worker processes (0 = read in this process).
        seed, epoch: the order is a deterministic function of (seed, epoch, rank, worker).
        skip_batches: batches of this epoch this rank already consumed (resume); they are skipped
            before decoding and the rest equals the tail of the un-skipped loader.
        rank, world_size: this process among the training processes.
        resampled: draw shards with replacement, forever (step-based training).
        shuffle_buffer: samples in each worker's shuffle buffer (0 or 1: no sample shuffling).
        with_labels: add ``"label"`` (B,) long from each sample's json: ``label_index``, an integer
            ``label``, or a string ``label`` mapped to its index among the sorted class names.
        shuffle: False reads shards and samples in order (evaluation).
        drop_last: False also yields each worker's partial last batch.
        decode_size: decode JPEGs at reduced scale (pillow's draft mode), keeping both sides at least this
            many pixels: several times faster for images much larger than the model's input. None decodes
            at full size. Use at least the model's image size (more for crops of a small part of the image).

    Batches: ``{"image" | "view1", "view2": (B, 3, H, W) float, "text": (B, L) long (with a tokenizer),
    "label": (B,) long (with_labels), "__key__": list[str], "skipped": int}`` where ``skipped`` counts the
    corrupt samples this worker skipped since its previous batch (sum it over batches).
    """
    if isinstance(shards, (str, os.PathLike)):
        shards = expand_shards(shards)
    if not shards:
        raise UsageError("no shards to read; pass --train-shards with a brace pattern, a folder or a glob")
    if batch_size < 1 or views < 1 or workers < 0 or skip_batches < 0:
        raise UsageError(f"need batch_size >= 1, views >= 1, workers >= 0, skip_batches >= 0 (got "
                         f"{batch_size}, {views}, {workers}, {skip_batches})")
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is not in 0..{world_size - 1}")
    class_to_index = None
    if with_labels:
        names = class_names(list(shards))
        class_to_index = {name: i for i, name in enumerate(names)} if names else None
    counts = shard_sample_counts(list(shards)) if skip_batches and not resampled else None
    dataset = ShardStream(
        list(shards), image_transform=image_transform, tokenizer=tokenizer, views=views, batch_size=batch_size,
        seed=seed, epoch=epoch, skip_batches=skip_batches, rank=rank, world_size=world_size, resampled=resampled,
        shuffle=shuffle, shuffle_buffer=shuffle_buffer, with_labels=with_labels, class_to_index=class_to_index,
        shard_counts=counts, drop_last=drop_last, decode_size=decode_size,
    )
    # DataLoader draws its workers' base seed from this generator; without one it would take a number
    # from the trainer's global RNG every epoch. (Our samples are seeded explicitly, see _sample_seed.)
    generator = torch.Generator().manual_seed(_sample_seed("loader", seed, epoch, rank))
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False, generator=generator
    )
