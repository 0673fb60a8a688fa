"""Streaming webdataset pipelines for training: ``make_loader`` and the arithmetic of who reads what.

Owns: a torch DataLoader whose workers read their share of the shards, shuffle deterministically, skip
the batches a resumed run already consumed, decode, transform, tokenize and batch, and skip (and count)
corrupt samples. Does not own: shard lists, field checks and counts (``mmcontrast.shards``),
augmentations (``augment.py``), the model's preprocess and tokenizer (passed in), writing shards
(``data_tools.make_shards``).

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
import hashlib
import itertools
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds

from data_tools.formats import IMAGE_FIELDS, TEXT_FIELD, ImageDecodeError, decode_image
from mmcontrast.errors import UsageError
from mmcontrast.shards import (
    class_names,
    expand_shards,
    has_fields,
    read_samples,
    sample_label,
    shard_sample_counts,
)

log = logging.getLogger(__name__)

_WARNED: set[str] = set()  # kinds of skipped samples already logged in this process


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
            if has_fields(sample, need_image=True, need_text=self.tokenizer is not None):
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
        samples = read_samples(urls, handler=_on_read_error)
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
            image = decode_image(sample[field], draft_size=self.decode_size)
        except ImageDecodeError as err:
            return err.reason
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
        index, name = sample_label(sample)
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
