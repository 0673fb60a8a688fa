"""Streaming training batches from shards: who reads what, in which order, and where a resumed run goes on.

Owns ``make_loader``: a torch DataLoader whose workers read their share of the shards, shuffle, decode,
transform, tokenize and batch, skip (and count) what cannot be used, and tag every batch with the
position its reader reached, so a resumed run continues exactly there. Does not own shard lists, opening
and counting (``mmcontrast.shards``), augmentations (``augment.py``), the model's preprocess and
tokenizer (passed in), or writing shards (``data_tools.make_shards``).

Who reads what (``ReadPlan``). An epoch's shards are shuffled with ``(seed, epoch)``, the same on every
rank. When every shard's sample count is known, the epoch is one stream of S samples in that order:
rank r starts at ``r·S/world`` and each of its DataLoader workers at its own place after that, so the
split is by sample, not by shard, and uneven shard counts cost nothing. With ``batches`` given (the
trainer gives ``steps_per_epoch × accum_steps``), every rank yields exactly that many batches, worker w
exactly its round-robin share of them; a reader that met corrupt samples reads on past its share (a
few samples of the next reader's part) rather than come up short. Without counts, readers take whole
shards (``order[rank::world][worker::workers]``, or every n-th sample of shared shards when there are
fewer shards than readers) and go round them again until they have their batches. ``resampled`` draws
shards with replacement (weighted, for ``"A::B"`` sources mixed by ``data.upsampling_factors``).

Order within a reader. Samples are shuffled in windows: ``shuffle_buffer`` consecutive samples are read,
permuted with a generator seeded by ``(seed, epoch, rank, worker, window)`` and handed out. A reader's
position is the window's start (shard segment, offset in it), the window's number and how many of its
samples were handed out; resuming re-reads one window from its start — at most one shard's worth plus
the window — instead of everything since the epoch began. A local shard is entered by seeking to the
sample (its tar headers are read, its data not); a remote one is streamed and the samples before it dropped.

Augmentation seeds. Each sample's random transform is seeded by ``(seed, epoch, shard file name, key)``,
so a sample gets the same views whatever the number of processes, workers or the batch size (2
processes × 16 see exactly the pixels of 1 × 32); in resampled mode, where a sample can recur, by its
place in its reader's stream.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from data_tools.formats import IMAGE_FIELDS, TEXT_FIELD, ImageDecodeError, decode_image
from mmcontrast.errors import UsageError
from mmcontrast.shards import (
    READ_FAILURES,
    READ_TIMEOUT,
    class_names,
    expand_shards,
    has_fields,
    is_remote,
    open_shard,
    sample_label,
    shard_sample_counts,
    stream_samples,
    warn_once,
)

READ_RETRIES = 3  # attempts after the first to read on in a remote shard that failed mid-read
RETRY_DELAY = 1.0  # seconds before the first retry; doubled for each further one


def _rng(*parts) -> random.Random:
    """A generator seeded from ``parts`` (string seeding is hashed with SHA-512: stable across processes)."""
    return random.Random("/".join(map(str, parts)))


def _sample_seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


# ---------------------------------------------------------------- the plan: which samples each reader takes


@dataclass(frozen=True)
class Segment:
    """A run of samples (those with an image) of one shard that one reader takes."""

    url: str
    start: int = 0  # index of the first sample taken
    stop: int | None = None  # one past the last sample; None: to the shard's end
    stride: int = 1  # take every stride-th sample from start on (readers sharing a shard)
    source: int = 0  # which of the "A::B" sources the shard belongs to
    spare: bool = False  # past the reader's own share: read only to replace samples it had to skip; what is
    # skipped here is another reader's to count

    def length(self) -> int | None:
        return None if self.stop is None else max(0, -(-(self.stop - self.start) // self.stride))


def assign_shards(shards: list, rank: int, world_size: int, worker: int, workers: int) -> tuple[list, int, int]:
    """A reader's whole shards when counts are unknown: ``(shards, stride, offset)``, take sample i when
    i % stride == offset. Split by rank, then by worker; a level with fewer shards than readers splits
    samples instead, so every sample goes to exactly one (rank, worker)."""
    mine, stride, offset = list(shards), 1, 0
    for index, count in ((rank, world_size), (worker, workers)):
        if len(mine) >= count:
            mine = mine[index::count]
        else:
            offset, stride = offset + stride * index, stride * count
    return mine, stride, offset


@dataclass(frozen=True)
class ReadPlan:
    """Which samples every reader of an epoch takes, and how many batches each yields (see the module docstring)."""

    shards: tuple[str, ...]
    counts: tuple[int, ...] | None  # samples per shard; None when not all are known
    sources: tuple[int, ...]  # source index of each shard
    weights: tuple[float, ...] | None  # resampled: draw weight of each shard
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int
    batch_size: int
    batches: int | None  # this rank's batches this epoch; None: until the data runs out (resampled: forever)
    resampled: bool = False
    shuffle: bool = True
    repeat: bool = False  # go round the shards again and again (an endless epoch: unknown size, --steps)

    def worker_batches(self, worker: int) -> int | None:
        """Worker ``worker``'s share of the rank's batches (DataLoader takes them round robin)."""
        if self.batches is None:
            return None
        return self.batches // self.workers + (worker < self.batches % self.workers)

    def _order(self) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            _rng("shards", self.seed, self.epoch).shuffle(order)  # identical on every rank and worker
        return order

    def segments(self, worker: int) -> Iterator[Segment]:
        """The reader's segments in order (endless when it must go round again or draws with replacement)."""
        if self.resampled:
            return self._draws(worker)
        if self.counts is None:
            return self._whole_shards(worker)
        return self._sample_range(worker)

    def _segment(self, i: int, **kw) -> Segment:
        return Segment(self.shards[i], source=self.sources[i], **kw)

    def _draws(self, worker: int) -> Iterator[Segment]:
        rng = _rng("resampled", self.seed, self.epoch, self.rank, worker)
        population = range(len(self.shards))
        while True:
            yield self._segment(rng.choices(population, weights=self.weights)[0])

    def _whole_shards(self, worker: int) -> Iterator[Segment]:
        mine, stride, offset = assign_shards(self._order(), self.rank, self.world_size, worker, self.workers)
        for cycle in itertools.count() if self.batches is not None or self.repeat else range(1):  # round again until done
            yield from (self._segment(i, start=offset, stride=stride, spare=cycle > 0 and not self.repeat) for i in mine)

    def _sample_range(self, worker: int) -> Iterator[Segment]:
        """From the reader's first sample in the epoch stream on, to the end of its share; with a batch count
        set, on past it (cyclically, as spare) until its batches are in."""
        order, total = self._order(), sum(self.counts)
        rank_start, rank_end = self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size
        if self.batches is not None:
            start = rank_start + self.batch_size * sum(self.worker_batches(w) for w in range(worker))
            share_end, bounded = start + self.batch_size * self.worker_batches(worker), False
        else:
            size = rank_end - rank_start
            start, share_end = rank_start + size * worker // self.workers, rank_start + size * (worker + 1) // self.workers
            bounded = True
        position = 0  # where shard i starts in the (repeated) epoch stream
        for i in itertools.cycle(order) if not bounded else order:
            lo, hi = max(start, position), min(position + self.counts[i], share_end if bounded else position + self.counts[i])
            for a, b, spare in ((lo, min(hi, share_end), False), (max(lo, share_end), hi, True)):
                if a < b:
                    yield self._segment(i, start=a - position, stop=b - position, spare=spare)
            position += self.counts[i]
            if bounded and position >= share_end:
                return


# ---------------------------------------------------------------- positions (what the trainer checkpoints)


@dataclass
class ReaderPosition:
    """Where one reader stands: the start of its current window, the window's number, what of it was handed out."""

    segment: int = 0  # index into the reader's segments of the window's first sample
    offset: int = 0  # samples of that segment before the window's first sample
    window: int = 0
    cursor: int = 0  # samples of the (permuted) window handed out or skipped
    size: int = 0  # samples in the window (0: not started; a window never reaches past what the reader needs)
    batches: int = 0  # batches the reader yielded this epoch


@dataclass
class LoaderPosition:
    """Where a rank's loader stands in an epoch: what the trainer consumed (JSON-able, checkpointed)."""

    batches: int = 0  # batches consumed this epoch
    next_worker: int = 0  # the worker whose batch comes next
    readers: dict[int, ReaderPosition] = field(default_factory=dict)  # by worker, after the last consumed batch

    def advance(self, batch: dict, workers: int) -> None:
        """Account for one consumed batch (it carries its reader's position)."""
        worker = batch["__worker__"]
        if batch["__position__"] is not None:  # None: a partial last batch (drop_last=False), nothing to resume
            self.readers[worker] = ReaderPosition(**batch["__position__"])
        self.next_worker = (worker + 1) % workers
        self.batches += 1

    def to_dict(self) -> dict:
        return {"batches": self.batches, "next_worker": self.next_worker,
                "readers": {str(w): vars(p) for w, p in self.readers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> LoaderPosition:
        readers = {int(w): ReaderPosition(**p) for w, p in d.get("readers", {}).items()}
        return cls(d.get("batches", 0), d.get("next_worker", 0), readers)


# ---------------------------------------------------------------- reading: samples of segments, with retries


class _SegmentReader:
    """The samples with an image of a reader's segments, from a position on; counts what was lost to damage.

    ``replayed`` samples are the start of a window a resumed run reads again: what they dropped was counted
    by the run that read them first. ``give_up_after`` segments in a row without a sample (every shard
    unreachable, say) end the reading rather than go round the shards forever.
    """

    def __init__(self, timeout: float, retries: int, give_up_after: int, replayed: int = 0):
        self.timeout, self.retries, self.give_up_after, self.replayed = timeout, retries, give_up_after, replayed
        self.lost = 0  # samples a damaged or unreachable shard did not deliver (counted as skipped)
        self.dropped: collections.Counter = collections.Counter()  # samples without an image

    def samples(self, segments: Iterator[Segment], segment: int, offset: int) -> Iterator[tuple[dict, int, int]]:
        """``(sample, segment, offset after it)`` from ``segments[segment]``'s ``offset``-th sample on."""
        empty = 0  # segments in a row that gave nothing
        for g, seg in enumerate(itertools.islice(segments, segment, None), start=segment):
            for o, sample in enumerate(self._segment_samples(seg, offset), start=offset + 1):
                sample["__source__"], sample["__spare__"] = seg.source, seg.spare
                empty = -1
                self.replayed = max(0, self.replayed - 1)
                yield sample, g, o
            offset, empty = 0, empty + 1
            if empty >= self.give_up_after:
                return

    def _count_drop(self, reason: str) -> None:
        if not self.replayed:
            self.dropped[reason] += 1

    def _segment_samples(self, seg: Segment, offset: int) -> Iterator[dict]:
        taken, attempt, length, failure = offset, 0, seg.length(), None
        while length is None or taken < length:
            try:
                for sample in self._read(seg, seg.start + taken * seg.stride):
                    yield sample
                    taken += 1
                    if taken == length:
                        return
                break  # the shard ended
            except READ_FAILURES as err:  # retry a remote shard, then give up on it
                failure = f"{type(err).__name__}: {err.args[0] if err.args else err}"
                if not is_remote(seg.url) or attempt >= self.retries:
                    break
                time.sleep(RETRY_DELAY * 2**attempt)
                attempt += 1
        if seg.spare or (length is None and failure is None) or self.replayed:
            return  # a spare sample is its owner's to count, a replayed one was; an unknown length ended normally
        if length is not None:
            self.lost += length - taken
        warn_once(f"short:{seg.url}", "shard %s gave %d%s samples (%s, after %d attempts); the rest are skipped and counted",
                  seg.url, taken - offset, f" of its {length - offset}" if length is not None else "",
                  failure or "it ended early: damaged or cut short", attempt + 1)

    def _read(self, seg: Segment, first: int) -> Iterator[dict]:
        """Samples with an image of ``seg.url`` from index ``first`` on, every ``seg.stride``-th."""
        stream, skip = open_shard(seg.url, first, self.timeout)
        if stream is None:  # the shard has no sample `first`
            return
        with stream:
            index = first - skip
            for sample in stream_samples(seg.url, stream):
                if not any(f in sample for f in IMAGE_FIELDS):  # not a sample of the counts: no index
                    if index >= first:
                        self._count_drop("missing_image")
                    continue
                if index >= first and (index - first) % seg.stride == 0:
                    yield sample
                index += 1


# ---------------------------------------------------------------- decoding one sample


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


@dataclass
class Decoder:
    """Turns a sample's bytes into model inputs: image views, caption, label. Picklable (worker processes)."""

    image_transform: Callable
    tokenizer: Callable | None
    views: int
    with_labels: bool
    class_to_index: dict[str, int] | None
    decode_size: int | None

    @functools.cached_property
    def two_stage(self) -> bool:  # a transform with sample() and finish() (augment.SimclrTransform) runs in two stages
        return callable(getattr(self.image_transform, "sample", None)) and callable(getattr(self.image_transform, "finish", None))

    def decode(self, sample: dict, seed: int, in_worker: bool) -> dict | str:
        """The decoded, transformed sample, or the kind of problem that makes us skip it."""
        if self.tokenizer is not None and not has_fields(sample, need_image=True, need_text=True):
            return "missing_caption"
        try:
            image = decode_image(sample[next(f for f in IMAGE_FIELDS if f in sample)], draft_size=self.decode_size)
        except ImageDecodeError as err:
            return err.reason
        out = {"key": sample["__key__"], "source": sample.get("__source__", 0)}
        if self.tokenizer is not None:
            try:
                out["caption"] = sample[TEXT_FIELD].decode("utf-8").strip()
            except UnicodeDecodeError:
                return "caption_not_utf8"
            if not out["caption"]:
                return "empty_caption"
        if self.with_labels:
            index, name = sample_label(sample)
            if self.class_to_index is not None and name is not None:  # a class list decides: the name's place in it
                out["label"] = self.class_to_index.get(name)
            else:
                out["label"] = index
            if out["label"] is None:
                return "missing_label" if index is None and name is None else "unknown_label"
        with _seeded(seed, restore=not in_worker):
            make = self.image_transform.sample if self.two_stage else self.image_transform
            out["views"] = [make(image) for _ in range(self.views)]
        return out

    def collate(self, batch: list[dict]) -> dict:
        out: dict = {"__key__": [b["key"] for b in batch], "__sources__": [b["source"] for b in batch]}
        stacked = []
        for v in range(self.views):
            if self.two_stage:
                crops, params = zip(*(b["views"][v] for b in batch))
                stacked.append(self.image_transform.finish(torch.stack(crops), torch.stack(params)))
            else:
                stacked.append(torch.stack([b["views"][v] for b in batch]))  # (B, 3, H, W)
        out.update({"image": stacked[0]} if self.views == 1 else {f"view{v + 1}": x for v, x in enumerate(stacked)})
        if self.tokenizer is not None:
            out["text"] = self.tokenizer([b["caption"] for b in batch])  # (B, L) token ids
        if self.with_labels:
            out["label"] = torch.tensor([b["label"] for b in batch], dtype=torch.long)  # (B,)
        return out


# ---------------------------------------------------------------- what each worker runs


class ShardStream(torch.utils.data.IterableDataset):
    """Each DataLoader worker's reading: its segments, in windows, decoded and batched, each batch tagged with
    ``__worker__`` and ``__position__`` (the reader's position after it). Built by ``make_loader``; picklable."""

    def __init__(self, plan: ReadPlan, decoder: Decoder, *, shuffle_buffer: int, drop_last: bool,
                 position: LoaderPosition | None, read_timeout: float, read_retries: int):
        super().__init__()
        self.plan, self.decoder, self.window_size = plan, decoder, max(1, shuffle_buffer if plan.shuffle else 1)
        self.drop_last, self.position = drop_last, position or LoaderPosition()
        self.read_timeout, self.read_retries = read_timeout, read_retries

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        # DataLoader starts its round robin at its worker 0: on resume, that is the reader whose batch came next
        worker = ((info.id if info else 0) + self.position.next_worker) % self.plan.workers
        start = self.position.readers.get(worker, ReaderPosition())
        target = self.plan.worker_batches(worker)
        if target is not None and start.batches >= target:
            return
        yield from self._batches(worker, start, target, in_worker=info is not None)

    def _window_size(self, target: int | None, done: int, partial: int) -> int:
        """The next window: the shuffle window, but never more samples than the reader still needs, so that it
        does not read into the next reader's part (it does, a little, only to replace samples it had to skip)."""
        if target is None:
            return self.window_size
        return min(self.window_size, (target - done) * self.plan.batch_size - partial)

    def _permuted(self, window: list, worker: int, number: int) -> list[dict]:
        order = list(range(len(window)))
        if self.window_size > 1:
            _rng("window", self.plan.seed, self.plan.epoch, self.plan.rank, worker, number).shuffle(order)
        return [window[i][0] for i in order]

    def _seed(self, sample: dict, worker: int, window: int, index: int) -> int:
        if self.plan.resampled:  # a sample can recur: seed by its place in this reader's stream
            return _sample_seed(self.plan.seed, self.plan.epoch, self.plan.rank, worker, window, index)
        return _sample_seed(self.plan.seed, self.plan.epoch, os.path.basename(str(sample.get("__url__", ""))), sample.get("__key__"))

    def _decoded(self, window: list[dict], cursor: int, worker: int, number: int, in_worker: bool,
                 skipped: collections.Counter) -> Iterator[tuple[int, dict]]:
        """``(index in the window, decoded sample)`` from ``cursor`` on; what cannot be used is counted in ``skipped``."""
        for i in range(cursor, len(window)):
            item = self.decoder.decode(window[i], self._seed(window[i], worker, number, i), in_worker)
            if isinstance(item, str):
                skipped[item] += not window[i]["__spare__"]  # a spare sample is its owner's to count
                warn_once(f"skip:{item}", "skipping samples with %s (first: %s in %s); further ones are only counted "
                          "in 'skipped'", item, window[i].get("__key__"), window[i].get("__url__"))
                continue
            yield i, item

    def _batches(self, worker: int, start: ReaderPosition, target: int | None, in_worker: bool) -> Iterator[dict]:
        # a reader that went round every shard (and twice as many draws, resampled) without a sample gives up
        give_up_after = 2 * len(self.plan.shards) + 8
        reader = _SegmentReader(self.read_timeout, self.read_retries, give_up_after, replayed=start.cursor and start.size)
        samples = reader.samples(self.plan.segments(worker), start.segment, start.offset)
        begin, number, cursor, size = (start.segment, start.offset), start.window, start.cursor, start.size
        skipped: collections.Counter = collections.Counter()
        batch, done = [], start.batches
        while size := size or self._window_size(target, done, len(batch)):
            raw = list(itertools.islice(samples, size))  # (sample, segment, offset after it)
            if not raw:
                break
            window, end = self._permuted(raw, worker, number), raw[-1][1:]
            for i, item in self._decoded(window, cursor, worker, number, in_worker, skipped):
                batch.append(item)
                if len(batch) < self.plan.batch_size:
                    continue
                done += 1
                finished = i + 1 == len(window)  # resume at the next window rather than re-read this one
                position = ReaderPosition(*end, number + 1, 0, 0, done) if finished else ReaderPosition(*begin, number, i + 1, size, done)
                yield self._collate(batch, worker, position, skipped, reader)
                batch = []
                if done == target:
                    return
            begin, number, cursor, size = end, number + 1, 0, 0
        if batch and not self.drop_last:
            yield self._collate(batch, worker, None, skipped, reader)

    def _collate(self, batch: list[dict], worker: int, position: ReaderPosition | None, skipped: collections.Counter,
                 reader: _SegmentReader) -> dict:
        out = self.decoder.collate(batch)
        out["skipped"] = sum(skipped.values()) + reader.lost + sum(reader.dropped.values())
        skipped.clear()
        reader.dropped.clear()
        reader.lost = 0
        out["__worker__"], out["__position__"] = worker, vars(position) if position else None
        return out


def _check_loader_arguments(shards: list[str], batch_size: int, views: int, workers: int, rank: int, world_size: int) -> None:
    if not shards:
        raise UsageError("no shards to read; pass --train-shards with a brace pattern, a folder or a glob")
    if batch_size < 1 or views < 1 or workers < 0:
        raise UsageError(f"need batch_size >= 1, views >= 1, workers >= 0 (got {batch_size}, {views}, {workers})")
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is not in 0..{world_size - 1}")


def _known_counts(counts: list[int | None] | str | None, shards: list[str], several_readers: bool,
                  timeout: float) -> tuple[int, ...] | None:
    """Every shard's count, or None when one is unknown; ``"auto"`` counts them when several readers share them."""
    if counts == "auto":
        counts = shard_sample_counts(shards, timeout) if several_readers else None
    return tuple(counts) if counts is not None and None not in counts else None


def make_loader(
    shards: list[str], *, image_transform: Callable, tokenizer: Callable | None = None, views: int = 1, batch_size: int,
    workers: int, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1, resampled: bool = False,
    shuffle_buffer: int = 1000, with_labels: bool = False, classes: list[str] | None = None, shuffle: bool = True,
    drop_last: bool = True, decode_size: int | None = None, counts: list[int | None] | str | None = "auto",
    batches: int | None = None, position: LoaderPosition | None = None, sources: list[int] | None = None,
    weights: list[float] | None = None, pin_memory: bool = False, read_timeout: float = READ_TIMEOUT,
    read_retries: int = READ_RETRIES, repeat: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``shards`` yielding dict batches of ``batch_size`` samples (see ``drop_last``).

    Args:
        shards: shard paths or URLs (``shards.expand_shards``'s; a pattern string is expanded).
        image_transform: ``PIL.Image (RGB) -> Tensor (3, H, W)``; random transforms are seeded per sample.
            One with ``sample(image) -> (uint8 crop, params)`` and ``finish(crops, params) -> batch`` methods
            (``augment.SimclrTransform``) runs per image, then per batch in the worker's collate.
        tokenizer: ``list[str] -> LongTensor (n, L)`` (open_clip's tokenizer); None for image-only runs.
        views: transformed copies per image: 1 gives ``"image"``, 2 gives ``"view1"``/``"view2"`` (SimCLR).
        batch_size, workers, seed, epoch, rank, world_size: samples per batch (per process); DataLoader worker
            processes (0: this process); the order is a function of the last four (module docstring).
        resampled: draw shards with replacement, forever (or for ``batches``), with ``weights`` per shard.
        shuffle_buffer, shuffle: the shuffle window in samples (0 or 1: read in order); False: no shuffling.
        with_labels: add ``"label"`` (B,) long from each sample's json: with ``classes`` (a run's class list), the
            string ``label``'s place in it; else ``label_index``, an integer ``label``, or a string ``label`` mapped to
            its index among the shards' class names (stats.json's, else sorted).
        drop_last: False also yields each reader's partial last batch (evaluation).
        decode_size: decode JPEGs at reduced scale (pillow's draft mode), both sides at least this many pixels;
            at least the model's image size (more for crops of a small part of the image).
        counts: samples per shard (``shards.shard_sample_counts``), None when unknown, or ``"auto"``: counted
            here when several readers share the shards. With counts the split is by sample.
        batches: this rank's batches for the epoch (every rank the same number); None: until the data ends.
        position: where a resumed run continues (``LoaderPosition`` of the batches it consumed).
        sources: the source index of each shard (``"A::B"``), reported per sample in ``"__sources__"``.
        pin_memory, read_timeout, read_retries, repeat: page-locked batches (CUDA); seconds a remote read may stall;
            retries of a shard that failed mid-read (its rest is then skipped, counted); repeat: an endless epoch.

    Batches: ``{"image" | "view1", "view2": (B, 3, H, W) float, "text": (B, L) long (with a tokenizer),
    "label": (B,) long (with_labels), "__key__": list[str], "__sources__": list[int], "skipped": int,
    "__worker__": int, "__position__": dict}``; ``skipped`` counts what this reader skipped since its previous
    batch (corrupt or incomplete samples, samples a damaged shard lost); pass the batches consumed to
    ``LoaderPosition.advance`` to know where to resume.
    """
    shards = expand_shards(shards) if isinstance(shards, (str, os.PathLike)) else list(shards)
    _check_loader_arguments(shards, batch_size, views, workers, rank, world_size)
    counts = _known_counts(counts, shards, several_readers=not resampled and world_size * max(workers, 1) > 1,
                           timeout=read_timeout)
    names = list(classes) if classes is not None else class_names(shards) if with_labels else None
    plan = ReadPlan(tuple(shards), counts, tuple(sources or [0] * len(shards)), tuple(weights) if weights else None, seed, epoch,
                    rank, world_size, max(workers, 1), batch_size, batches, resampled, shuffle, repeat)
    decoder = Decoder(image_transform, tokenizer, views, with_labels, {n: i for i, n in enumerate(names)} if names else None,
                      decode_size)
    dataset = ShardStream(plan, decoder, shuffle_buffer=shuffle_buffer, drop_last=drop_last, position=position,
                          read_timeout=read_timeout, read_retries=read_retries)
    # DataLoader draws its workers' base seed from this generator; without one it would take a number
    # from the trainer's global RNG every epoch. (Our samples are seeded explicitly, see _sample_seed.)
    generator = torch.Generator().manual_seed(_sample_seed("loader", seed, epoch, rank))
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                       persistent_workers=False, generator=generator, pin_memory=pin_memory)
