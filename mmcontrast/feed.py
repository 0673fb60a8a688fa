"""What the training loop is fed: groups of K micro-batches, epoch after epoch, from where a resumed run stood.

Owns the data side of a run: the data set's size (every shard's sample count from the stats files beside
the shards, or ``data.num_samples``), the epoch's length in optimizer steps — the same on every process,
``samples // global_batch``, so that at most one global batch of an epoch is left over and the learning
rate schedule ends on the last step — one loader per epoch (``data.make_loader``: every process takes
exactly ``steps_per_epoch × accum_steps`` batches, however unevenly the shards split), the ``"A::B"``
sources and their mixing weights, and each process's position in its epoch (``LoaderPosition``, saved
with every checkpoint). Nothing here waits on other processes: because every process takes the same
number of batches, no step needs to ask whether the others still have data.

Does not own reading and decoding (``data.py``), shard lists and counts (``shards.py``) or the loop.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mmcontrast.config import DataConfig
from mmcontrast.data import LoaderPosition, make_loader
from mmcontrast.errors import TrainingError, UsageError
from mmcontrast.shards import expand_sources, shard_sample_counts


@dataclass
class Sources:
    """The shards of a run, each tagged with its source (``"A::B"``), their counts and draw weights."""

    shards: list[str]
    source_of: list[int]
    counts: list[int | None]
    weights: list[float] | None  # resampled: per shard, its source's upsampling factor (open_clip's convention)
    damaged: list[str] = field(default_factory=list)  # "NAME: how" of shards found cut short while counting

    @property
    def n_sources(self) -> int:
        return max(self.source_of) + 1


def find_sources(spec: str, factors: list | None, timeout: float) -> Sources:
    """Expand ``spec`` (``"A::B"``), count every shard, and weigh shards by their source's factor."""
    per_source = expand_sources(spec)
    if factors is not None and len(factors) != len(per_source):
        raise UsageError(f"data.upsampling_factors has {len(factors)} values for {len(per_source)} sources in "
                         "--train-shards; give one per source, e.g. [1, 2] for \"A::B\"")
    shards = [s for source in per_source for s in source]
    source_of = [i for i, source in enumerate(per_source) for _ in source]
    weights = [float(factors[i]) for i in source_of] if factors is not None else None
    damaged: list[str] = []
    counts = shard_sample_counts(shards, timeout, damaged)
    return Sources(shards, source_of, counts, weights, damaged)


def epoch_samples(sources: Sources, num_samples: int | None) -> int | None:
    """Samples in one epoch: ``data.num_samples`` when given, else the counts' sum (None when one is unknown)."""
    if num_samples is not None:
        return num_samples
    return None if None in sources.counts else sum(sources.counts)


def steps_per_epoch(samples: int | None, global_batch: int, epochs: int | None) -> int | None:
    """Optimizer steps in an epoch (None: the epoch is endless, for ``--steps`` runs of unknown size)."""
    if samples is None:
        if epochs is not None:
            raise UsageError("--epochs needs the number of samples, and remote shards without stats files beside them "
                             "do not say it: give it with --set data.num_samples=N, or train with --steps")
        return None
    steps = samples // global_batch
    if steps == 0:
        raise UsageError(f"the shards hold {samples} samples, fewer than one global batch of {global_batch}; "
                         "lower --batch-size or --accum-steps")
    return steps


class Feed:
    """Micro-batch groups for one process, epoch after epoch; ``position()`` says where it stands.

    ``loader_args`` are ``data.make_loader``'s arguments that stay the same for the whole run (transform,
    tokenizer, views, batch size, workers, seed, rank, world size, ...).
    """

    def __init__(self, sources: Sources, data_cfg: DataConfig, steps: int | None, accum: int, loader_args: dict,
                 device: torch.device, epoch: int = 0, position: dict | None = None):
        self.sources, self.cfg, self.steps, self.accum = sources, data_cfg, steps, accum
        self.loader_args, self.device = loader_args, device
        self.epoch = epoch
        self.loader_position = LoaderPosition.from_dict(position) if position else LoaderPosition()
        self.source_counts: collections.Counter = collections.Counter()  # samples per source since the last log

    def position(self) -> dict:
        """This process's place in the current epoch (JSON), for the checkpoint."""
        return self.loader_position.to_dict()

    def _batches_per_epoch(self) -> int | None:
        return None if self.steps is None else self.steps * self.accum

    def _loader(self) -> Iterator[dict]:
        cfg, sources = self.cfg, self.sources
        # by sample when every count is known (data.num_samples gives the epoch's length, not the shards'): else None
        counts = None if cfg.num_samples is not None or None in sources.counts else sources.counts
        return iter(make_loader(
            sources.shards, **self.loader_args, epoch=self.epoch, batches=self._batches_per_epoch(),
            position=self.loader_position, counts=counts, sources=sources.source_of, weights=sources.weights,
            resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, read_timeout=cfg.read_timeout,
            read_retries=cfg.read_retries, pin_memory=self.device.type == "cuda", repeat=self.steps is None,
        ))  # fmt: skip

    def fraction_of_epoch(self) -> float:
        """How far into the current epoch this process is (0 for an endless epoch)."""
        per_epoch = self._batches_per_epoch()
        return self.loader_position.batches / per_epoch if per_epoch else 0.0

    def groups(self, epochs: int | None, skipped: Callable[[int], None]) -> Iterator[tuple[list[dict], float]]:
        """Yield ``(K micro-batches on the device, seconds spent waiting for them)`` for each optimizer step.

        Ends after ``epochs`` epochs (never when None). ``skipped(n)`` is told of samples the loader skipped.
        """
        while epochs is None or self.epoch < epochs:
            yielded = 0
            for group in self._epoch_groups(skipped):
                yielded += 1
                yield group
            self._end_epoch(yielded)

    def _epoch_groups(self, skipped: Callable[[int], None]) -> Iterator[tuple[list[dict], float]]:
        workers = max(1, self.loader_args["workers"])
        it = self._loader()
        while True:
            start = time.perf_counter()
            micro = [b for b in (next(it, None) for _ in range(self.accum)) if b is not None]
            if len(micro) < self.accum:
                return
            for batch in micro:
                self.loader_position.advance(batch, workers)
                self.source_counts.update(batch["__sources__"])
                skipped(int(batch["skipped"]))
            yield [self._to_device(b) for b in micro], time.perf_counter() - start

    def _end_epoch(self, yielded: int) -> None:
        per_epoch = self._batches_per_epoch()
        if (per_epoch is None and not yielded) or (per_epoch is not None and self.loader_position.batches < per_epoch):
            raise TrainingError(
                f"this process ran out of data after {self.loader_position.batches} of its {per_epoch} batches of epoch "
                f"{self.epoch}: most of the shards could not be read (see the warnings above; python -m data_tools.inspect "
                "lists the ones to re-create)"
            )
        self.epoch += 1
        self.loader_position = LoaderPosition()

    def _to_device(self, batch: dict) -> dict:
        """Tensors to the device, from pinned memory on CUDA; images channels-last there (cuDNN's fast layout)."""
        def move(v):
            if not torch.is_tensor(v):
                return v
            if v.dim() == 4 and self.device.type == "cuda":
                return v.to(self.device, non_blocking=True, memory_format=torch.channels_last)
            return v.to(self.device, non_blocking=True)

        return {k: move(v) for k, v in batch.items()}

    def source_shares(self) -> dict[str, int]:
        """Samples taken from each source since the last call (``data/source{i}_samples``), when there are several."""
        if self.sources.n_sources < 2:
            return {}
        shares = {f"data/source{i}_samples": self.source_counts.get(i, 0) for i in range(self.sources.n_sources)}
        self.source_counts.clear()
        return shares
