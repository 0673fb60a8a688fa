"""The loop's monitor: what the steps between two log records add up to, the record, and its verdicts.

``StepLog`` adds each step's loss and counts on the device (nothing waits for it), and at log steps folds them over
the processes, measures (batch monitors, health, validation, in-loop evaluation: ``diagnostics``, ``evaluate``) and
writes one record to ``metrics.jsonl``, the trackers and the progress bar. Whether the run is guessing or collapsed is
judged by ``diagnostics``' functions and said once on stderr (again if it lasts). Fed by ``train`` with a
``MonitorSetup``; owns no model, data or checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmcontrast.config import LogConfig
from mmcontrast.errors import TrainingError


@dataclass
class MonitorSetup:
    """What the monitor is told once, at start-up."""

    log: LogConfig
    warmup_steps: int  # records before it are not judged (a fresh model is at chance)
    max_nonfinite_steps: int  # skipped steps in a row after which the run stops
    total_steps: int
    metrics_path: Path
    trackers: bool  # Accelerate's trackers are on
    health_batch: Callable[[], dict]  # the fixed batch the health measurements use, drawn when first needed
    validate: Callable | None = None  # model -> val/* metrics
    everyone_measures: bool = False  # a sharded model's forward passes need every process
    measured_weights: Callable = field(default=contextlib.nullcontext)  # the context holding what is measured (the EMA's)


class StepLog:
    """What the steps between two log records add up to, and the record itself (metrics.jsonl, trackers, bar).

    Per step only device-side additions; ``fold`` (at log and checkpoint steps) reads them, sums them over the
    processes and adds them to the ``TrainState``.
    """

    def __init__(self, accelerator, task, setup: MonitorSetup, progress):
        from mmcontrast.diagnostics import Alarm

        self.accelerator, self.task, self.setup, self.cfg, self.progress = accelerator, task, setup, setup.log, progress
        self.chance_alarm, self.collapse_alarm = Alarm(setup.total_steps), Alarm(setup.total_steps)
        self.health_batch = None  # drawn at the first health step, not at start-up
        self.streak = torch.zeros((), dtype=torch.long, device=accelerator.device)  # skipped steps in a row
        self.reset()

    def reset(self) -> None:
        device = self.accelerator.device
        self.t0, self.data_time, self.steps, self.samples, self.skipped = time.perf_counter(), 0.0, 0, 0, 0
        self.loss = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.long, device=device)

    def count_skipped(self, n: int) -> None:
        self.skipped += n

    def add(self, loss: torch.Tensor, finite: torch.Tensor, data_seconds: float, micro: list[dict]) -> None:
        self.steps += 1
        self.samples += sum(len(b["__key__"]) for b in micro)
        self.data_time += data_seconds
        self.loss += loss.float()
        self.nonfinite += ~finite
        self.streak = (self.streak + 1) * ~finite

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.every == 0 or step == total_steps

    def _crossed(self, step: int, every: int) -> bool:
        """Whether a multiple of ``every`` fell since the previous log step (any cadence works with any log.every)."""
        previous = (step - 1) // self.cfg.every * self.cfg.every  # the last step that was a multiple of log.every
        return bool(every) and step // every != previous // every

    def fold(self, state) -> float:
        """Sum the window over the processes into ``state``; returns the window's mean loss. Raises
        ``TrainingError`` after ``train.max_nonfinite_steps`` skipped steps in a row."""
        acc = self.accelerator
        sums = torch.stack([self.loss / max(self.steps, 1), self.nonfinite.float(), torch.tensor(float(self.samples), device=acc.device),
                            torch.tensor(float(self.skipped), device=acc.device)])
        sums = acc.reduce(sums, "sum") if acc.num_processes > 1 else sums
        loss, nonfinite, samples, skipped = sums.tolist()
        state.nonfinite_steps += round(nonfinite / acc.num_processes)
        state.samples_seen += round(samples)
        state.skipped_samples += round(skipped)
        self.samples = self.skipped = 0
        self.nonfinite.zero_()
        if int(self.streak) >= self.setup.max_nonfinite_steps:
            raise TrainingError(
                f"the gradient was not finite for {int(self.streak)} steps in a row (step {state.step}); lower --lr, raise "
                "optim.warmup_steps, or use train.mixed_precision=bf16 instead of fp16"
            )
        return loss / acc.num_processes

    def write(self, state, feed, lr: float, model, embeddings: list[torch.Tensor], more: dict | None = None) -> dict:
        """Build the record for ``state.step`` (``embeddings``: this process's last step; ``more``: fields the loop adds,
        such as the CPU threads), write it, start a new window."""
        acc, elapsed = self.accelerator, max(time.perf_counter() - self.t0, 1e-9)
        steps, data_time = self.steps, self.data_time
        loss = self.fold(state)
        record = {
            "step": state.step, "epoch": feed.epoch + feed.fraction_of_epoch(), "loss": loss, "lr": lr,
            "samples_per_s": steps * len(embeddings[0]) * acc.num_processes / elapsed,
            "global_batch": len(embeddings[0]) * acc.num_processes, "samples_seen": state.samples_seen,
            "data_time_share": data_time / elapsed, "skipped_samples": state.skipped_samples,
            "nonfinite_steps": state.nonfinite_steps, **feed.source_shares(), **(more or {}),
        }  # fmt: skip
        if acc.device.type == "cuda":  # the allocator's own count: read on the host, no wait for the GPU
            record["gpu_memory_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        monitored = self._monitored(embeddings)
        metrics = self._measurements(state.step, model, monitored)  # every process takes part
        if acc.is_main_process:
            record.update(metrics)
            if len(monitored[0]) < record["global_batch"]:  # the monitors saw part of the global batch
                record["monitor_samples"] = len(monitored[0])
            record.update(self._judge(record))
        self._emit(record)
        self.reset()
        return record

    def _monitored(self, embeddings: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """What the batch monitors see: at most ``log.monitor_samples`` rows of each embedding, the first rows of every
        process's (pairs stay aligned; rank-major), gathered to the first process only (None on the others). The
        whole global batch on every process cost memory everywhere and a (32k, 32k) similarity on the first."""
        from mmcontrast.distributed import gather_to_first

        world = self.accelerator.num_processes
        rows = min(len(embeddings[0]), -(-self.cfg.monitor_samples // world))
        mine = [e[:rows].detach().contiguous() for e in embeddings]
        return mine if world == 1 else gather_to_first(mine)

    def _measurements(self, step: int, model, embeddings: list[torch.Tensor] | None) -> dict:
        """Batch monitors (where ``embeddings`` are: the first process), then health, validation, evaluation on every
        process: each does its part (``distributed.shared_work``), or, for a sharded model whose forward passes need
        every process, all of it. Health, validation and evaluation measure the weights ``measured_weights`` puts in
        (the moving average's)."""
        from mmcontrast.diagnostics import batch_health, batch_monitor
        from mmcontrast.distributed import local_only, shared_work
        from mmcontrast.models import evaluating

        metrics: dict = {}
        if embeddings is not None:
            metrics = self.task.monitor(embeddings) if self.task.monitor else batch_monitor(*embeddings, views=self.task.pairs_are_views)
        if embeddings is not None or self.setup.everyone_measures:
            metrics.update(self.task.scalar_metrics(model))
        due = [self._crossed(step, every) for every in (self.cfg.diagnostics_every, self.cfg.val_every, self.cfg.eval_every)]
        split = contextlib.nullcontext() if self.setup.everyone_measures else shared_work()
        with self.setup.measured_weights() if any(due) else contextlib.nullcontext(), split:
            if due[0]:
                self.health_batch = self.health_batch or self.setup.health_batch()
                health = batch_health(self.task.health_pair, model, self.health_batch, views=self.task.pairs_are_views)
                metrics.update({f"health/{k}": v for k, v in health.items()})
            if due[1]:
                with evaluating(model), local_only():
                    metrics.update(self.setup.validate(model))
            if due[2]:
                with evaluating(model):
                    metrics.update(self.task.evaluate(model))
        return metrics

    def _judge(self, record: dict) -> dict:
        """Is the run guessing, or collapsed? ``health/chance_*`` always (what guessing scores at this global batch);
        after warm-up (a fresh model is at chance) ``health/at_chance`` and, at health steps,
        ``health/dimensional_collapse``, each said on stderr when first true and again if it lasts past a quarter of
        the run."""
        from mmcontrast import diagnostics as dg

        step = record["step"]
        if "positive_accuracy" not in record:  # not a contrastive task: no candidates to find a positive among
            return {}
        chance = dg.chance_level(self.task.loss_name, record["global_batch"])
        if "monitor_samples" in record:  # positives were found among the monitored rows only
            chance = (chance[0], dg.chance_level(self.task.loss_name, record["monitor_samples"])[1])
        out = {"health/chance_loss": chance[0], "health/chance_positive_accuracy": chance[1]}
        if step <= self.setup.warmup_steps:
            return out
        out["health/at_chance"] = dg.at_chance(record["loss"], record["positive_accuracy"], chance, self.cfg.chance_tolerance)
        if self.chance_alarm.due(step, out["health/at_chance"]):
            line = dg.chance_warning(step, record["loss"], record["positive_accuracy"], chance, self.task.advice)
            self.progress.write(f"warning: {line}", file=sys.stderr)
        health = {k.removeprefix("health/"): v for k, v in record.items() if k.startswith("health/")}
        if "effective_rank_fraction" in health:  # a health step
            out["health/dimensional_collapse"] = dg.dimensionally_collapsed(health, self.cfg.min_rank_fraction)
            if health["effective_rank_fraction"] > 0:  # the rank below which it warns, for the plot's line
                scale = health["effective_rank"] / health["effective_rank_fraction"]
                out["health/collapse_rank"] = self.cfg.min_rank_fraction * scale
            lines = dg.collapse_warnings(health, self.cfg.min_rank_fraction, self.cfg.min_std_ratio)
            if self.collapse_alarm.due(step, bool(lines)):
                for line in lines:
                    self.progress.write(f"warning: {line} (step {step})", file=sys.stderr)
        return out

    def _emit(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with self.setup.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if self.setup.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
