"""The training loop: ``accelerate launch -m mmcontrast.train``, ``torchrun -m mmcontrast.train`` or ``python -m``.

Owns the loop from config to run dir, read top to bottom in ``train``: set-up (run dir, Accelerate,
seeds, the mode's ``Task``, optimizer, the ``Feed`` of data), then per optimizer step the next group of
K micro-batches, their gradients (``gradcache.step_gradients``), the optimizer step (``train_step``; with
``train.ema_decay`` also the moving average of the weights, ``mmcontrast.ema``, which measurements and the
export then use), a log record every ``log.every`` steps (``StepLog``) and a checkpoint every
``log.checkpoint_every``; at the end the export. The learning rate of every kind and depth of parameter
(``optim.lr_scale``, ``optim.layer_decay``) is printed once at start-up (``--print-lr-groups``: only that). Devices, processes and mixed precision are Accelerate's; what differs between
modes is the ``Task`` (``mmcontrast.tasks``); checkpoints are ``mmcontrast.checkpoint``; epochs and data
positions are ``mmcontrast.feed``.

No step waits for the device. The loss, the count of skipped steps and everything else a log record
reports are added up on the device and read only at log steps; a step whose gradient is not finite is
skipped on the device (fused AdamW's ``found_inf``, the same flag on every process because the gradient
norm is taken after DDP has averaged the gradients) and its BatchNorm statistics are put back; the
gathers of the loss skip their shape check (``distributed.equal_shapes``: every process takes full
batches). A skipped step still counts as a step: the schedule moves on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmcontrast.config import (
    CONFIG_FILE,
    METRICS_FILE,
    MODES,
    Config,
    LogConfig,
    apply_overrides,
    dump_yaml,
    in_steps,
    load_config,
    set_value,
    validate,
)
from mmcontrast.ema import WeightEma
from mmcontrast.errors import TrainingError, UsageError, run_user_command
from mmcontrast.threads import TrainingThreads

# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmcontrast.train",
        description="Train CLIP (image-text) or SimCLR (image-only) from webdataset shards. "
        "Run with `accelerate launch [--cpu --num_processes N] -m mmcontrast.train ...` or `python -m mmcontrast.train ...`.",
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--train-shards", help='brace pattern "DIR/{00000..00007}.tar", a directory, a glob, a list file or URLs '
                   '(http(s)://, s3://, gs://, pipe:CMD); "A::B" mixes sources')
    p.add_argument("--val-shards", help="held-out image-caption shards: val loss and retrieval R@K every log.val_every steps")
    p.add_argument("--output-dir", help="run directory (config, metrics, checkpoints, final weights)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--epochs", type=int, help="passes over the shards (instead of --steps)")
    p.add_argument("--batch-size", type=int, help="samples per process per micro-batch")
    p.add_argument("--accum-steps", type=int, help="micro-batches per optimizer step, one loss over all of them")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last")
    p.add_argument("--log-every", type=int, help="log every N steps")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps")
    p.add_argument("--workers", type=int, help="dataloader workers per process")
    p.add_argument("--mode", choices=MODES, help="clip (image-text), simclr (image only) or classify (mmcontrast finetune's)")
    p.add_argument("--model", help="open_clip model name or model-config JSON (simclr also: timm:NAME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE", help="any other config field")
    p.add_argument("--print-lr-groups", action="store_true",
                   help="print the peak learning rate of every kind and depth of parameter (optim.lr_scale, optim.layer_decay) and exit")
    return p


_FLAG_TO_FIELD = {
    "train_shards": "data.train_shards",
    "val_shards": "data.val_shards",
    "output_dir": "train.output_dir",
    "steps": "train.steps",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "accum_steps": "train.accum_steps",
    "lr": "optim.lr",
    "seed": "train.seed",
    "log_every": "log.every",
    "checkpoint_every": "log.checkpoint_every",
    "workers": "data.workers",
    "mode": "mode",
    "model": "model.name",
}


def config_from_args(argv: Sequence[str] | None = None) -> Config:
    """YAML → flags → ``--set`` overrides → validation."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config)
    for flag, key in _FLAG_TO_FIELD.items():
        value = getattr(args, flag)
        if value is not None:
            set_value(cfg, key, value)
    if args.steps is not None:
        cfg.train.epochs = None
    if args.epochs is not None:
        cfg.train.steps = None
    if args.resume:
        cfg.train.resume = True
    apply_overrides(cfg, args.overrides)
    if args.print_lr_groups:  # nothing is read or written: what only a run needs may be left out
        cfg.train.output_dir, cfg.data.train_shards = cfg.train.output_dir or "-", cfg.data.train_shards or "-"
        if cfg.train.steps is None and cfg.train.epochs is None:
            cfg.train.steps = 1
    validate(cfg)
    return cfg


def _run(argv: list[str]) -> int:
    from mmcontrast import launch

    cfg = config_from_args(argv)
    if build_parser().parse_args(argv).print_lr_groups:
        print_lr_groups(cfg)
        return 0
    n_cpu_processes = launch.requested_cpu_processes()
    if n_cpu_processes > 1:  # accelerate launch --cpu --num_processes N started only us: torchrun starts the N
        from mmcontrast.shards import check_fields, expand_sources
        from mmcontrast.tasks import needs_captions

        shards = [s for source in expand_sources(cfg.data.train_shards) for s in source]
        check_fields(shards, need_text=needs_captions(cfg.mode))  # a mistake is one line here, not N tracebacks
        launch.exec_torchrun(n_cpu_processes, "mmcontrast.train", argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launch.watch_parent()
        launch.use_gloo_without_cuda()
    if launch.take_over_fsdp_request():  # `accelerate launch --use_fsdp`: our FSDP2 path, which runs on any device
        cfg.train.fsdp = True
        validate(cfg)
    train(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    is_main = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    return run_user_command(lambda: _run(argv), report=is_main)  # every rank meets the same mistake; one line is enough


# ---------------------------------------------------------------- set-up


def _prepare_output_dir(output_dir: str, resume: bool) -> Path:
    from mmcontrast.checkpoint import has_checkpoint

    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --output-dir {path}: {err.strerror}") from None
    if not resume and has_checkpoint(path):
        raise UsageError(f"{path} already holds a run; pass --resume to continue it or choose another --output-dir")
    return path


def _usable_trackers(names: list) -> list:
    """The configured trackers minus TensorBoard when it is not installed (it is the default)."""
    from accelerate.utils import is_tensorboard_available

    return [n for n in names if n != "tensorboard" or is_tensorboard_available()]


def _flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _make_accelerator(mixed_precision: str, trackers: list, output_dir: Path, compile_model: bool, dist_timeout_s: float = 1800.0):
    """Accelerate with the run's precision and trackers; ``compile_model`` compiles the model with torch.compile
    (inductor), as ``accelerate launch --dynamo_backend inductor`` does for runs started without it. The process
    group it forms (under any launcher: accelerate launch, torchrun, srun) lets a process wait ``dist_timeout_s`` in a
    collective before the job fails."""
    import datetime

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    return Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=dist_timeout_s))],
        mixed_precision=None if mixed_precision == "no" else mixed_precision,  # None: `accelerate launch --mixed_precision`
        dynamo_backend="inductor" if compile_model else None,  # None: Accelerate's own (launch --dynamo_backend)
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


@dataclass
class TrainState:
    """Where the run stands; saved with every checkpoint (``train_state.json``)."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0  # samples in the batches all processes consumed
    skipped_samples: int = 0  # samples the loaders of all processes skipped (corrupt, incomplete, lost to damage)
    nonfinite_steps: int = 0  # steps skipped because the gradient was not finite
    cpu_threads: int | None = None  # compute threads per process the run chose on the CPU (threads.TrainingThreads)
    data: list = field(default_factory=list)  # each process's position in the epoch (data.LoaderPosition)
    identity: dict = field(default_factory=dict)  # what a resume must not change (config.RESUME_IDENTITY, processes, shards)


def run_identity(cfg: Config, processes: int, sources) -> dict:
    """``config.identity`` plus what only the launch knows: the number of processes and the shards (file names,
    sources and sample counts: a position in the data means these samples)."""
    import hashlib

    from mmcontrast.config import identity

    listing = "\n".join(f"{os.path.basename(s)} {i} {n}" for s, i, n in zip(sources.shards, sources.source_of, sources.counts))
    digest = hashlib.sha1(listing.encode()).hexdigest()[:12]
    return {**identity(cfg), "processes": processes, "data.shards": f"{len(sources.shards)} shards ({digest})"}


def _refuse_changed_identity(now: dict) -> Callable[[dict], None]:
    def check(saved_state: dict) -> None:
        from mmcontrast.config import resume_conflict

        conflict = resume_conflict(saved_state.get("identity", {}), now)
        if conflict is not None:
            field_name, saved, current = conflict
            raise UsageError(
                f"--resume: {field_name} is {current!r} but the checkpoint was made with {saved!r}; resume with the "
                "same value (only things like the learning rate, log cadence and --steps may change) or use a new --output-dir"
            )

    return check


# ---------------------------------------------------------------- one optimizer step (nothing here waits for the device)


def _grad_norm(accelerator, model, grad_clip: float) -> torch.Tensor:
    """The global gradient norm (0-dim, on the device), after clipping to ``grad_clip`` when it is positive."""
    if grad_clip > 0:
        return accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    accelerator.unscale_gradients()
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def train_step(accelerator, task, model, optimizer, micro: list[dict], grad_clip: float,
               holding: Holding | None = None, ema: WeightEma | None = None, step: int = 0) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Gradients of one step over ``micro``, then the optimizer step unless the gradient is not finite, then the
    moving average of the weights (``ema``, after optimizer step ``step``) when there is one.

    Returns the detached loss, this process's embeddings (for the log) and whether the step was taken
    (a 0-dim bool on the device). A skipped step leaves no trace: the optimizer does nothing (fused AdamW
    and LARS read ``found_inf``), the BatchNorm statistics its forward passes moved are put back and the
    average does not move.
    """
    from mmcontrast.gradcache import bn_buffers, step_gradients

    holding = holding or Holding(accelerator)
    optimizer.zero_grad(set_to_none=True)
    bn_before = [(b, b.clone()) for b in bn_buffers(model)]
    loss, embeddings = step_gradients(accelerator, task, model, micro, no_sync=holding.no_sync)
    finite = torch.isfinite(holding.grad_norm(accelerator, model, grad_clip))  # the same on every process: after the average
    getattr(optimizer, "optimizer", optimizer).found_inf = (~finite).float()
    optimizer.step()
    for buffer, before in bn_before:
        buffer.copy_(torch.where(finite, buffer, before))
    task.clamp(holding.bare(model))
    if ema is not None:
        ema.update(step, finite)
    return loss, embeddings, finite


# ---------------------------------------------------------------- logging


class StepLog:
    """What the steps between two log records add up to, and the record itself (metrics.jsonl, trackers, bar).

    Per step only device-side additions; ``fold`` (at log and checkpoint steps) reads them, sums them over the
    processes and adds them to the ``TrainState``.
    """

    def __init__(self, accelerator, task, log_cfg: LogConfig, warmup_steps: int, max_nonfinite_steps: int,
                 metrics_path: Path, trackers: bool, health_batch: Callable[[], dict], validate: Callable | None, progress,
                 everyone_measures: bool = False, total_steps: int = 0, measured_weights: Callable = contextlib.nullcontext):
        from mmcontrast.diagnostics import Alarm

        self.accelerator, self.task, self.cfg, self.warmup_steps = accelerator, task, log_cfg, warmup_steps
        self.chance_alarm, self.collapse_alarm = Alarm(total_steps), Alarm(total_steps)
        self.max_nonfinite_steps, self.metrics_path, self.trackers = max_nonfinite_steps, metrics_path, trackers
        self.make_health_batch, self.health_batch = health_batch, None  # drawn at the first health step, not at start-up
        self.validate, self.progress = validate, progress
        self.everyone_measures = everyone_measures  # a sharded model's forward passes need every process
        self.measured_weights = measured_weights  # the context in which the model holds what is measured (the EMA's)
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

    def fold(self, state: TrainState) -> float:
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
        if int(self.streak) >= self.max_nonfinite_steps:
            raise TrainingError(
                f"the gradient was not finite for {int(self.streak)} steps in a row (step {state.step}); lower --lr, raise "
                "optim.warmup_steps, or use train.mixed_precision=bf16 instead of fp16"
            )
        return loss / acc.num_processes

    def write(self, state: TrainState, feed, lr: float, model, embeddings: list[torch.Tensor], more: dict | None = None) -> dict:
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
        if embeddings is not None or self.everyone_measures:
            metrics.update(self.task.scalar_metrics(model))
        due = [self._crossed(step, every) for every in (self.cfg.diagnostics_every, self.cfg.val_every, self.cfg.eval_every)]
        split = contextlib.nullcontext() if self.everyone_measures else shared_work()
        with self.measured_weights() if any(due) else contextlib.nullcontext(), split:
            if due[0]:
                self.health_batch = self.health_batch or self.make_health_batch()
                health = batch_health(self.task.health_pair, model, self.health_batch, views=self.task.pairs_are_views)
                metrics.update({f"health/{k}": v for k, v in health.items()})
            if due[1]:
                with evaluating(model), local_only():
                    metrics.update(self.validate(model))
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
        if step <= self.warmup_steps:
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
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


# ---------------------------------------------------------------- how the model is held across processes


class Holding:
    """The model held by Accelerate: DDP across processes, autocast, torch.compile, its checkpoint files."""

    everyone_measures = False  # health, eval and validation run on the first process only

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def prepare(self, model: nn.Module, optimizer) -> tuple:
        """(model to train, optimizer, the bare model: no DDP, no compile wrapper)."""
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, optimizer, self.bare(model)

    def bare(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def no_sync(self, model: nn.Module):
        """Backward passes inside accumulate gradients without synchronising them (gradient caching's)."""
        return self.accelerator.no_sync(model)

    grad_norm = staticmethod(_grad_norm)

    def save_more(self, model, optimizer) -> Callable[[Path], None] | None:
        return None  # Accelerate's save_state holds all

    def load_more(self, model, optimizer) -> Callable[[Path], None] | None:
        return None

    def full_weights(self, model) -> dict | None:
        return None  # the model's own state dict


class ShardedHolding(Holding):
    """The model sharded with FSDP2 (``mmcontrast.sharding``): Accelerate keeps the devices, processes and RNG."""

    everyone_measures = True

    def prepare(self, model: nn.Module, optimizer) -> tuple:
        return model, optimizer, model

    def bare(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, model: nn.Module):
        from mmcontrast.sharding import gradient_sync

        return gradient_sync(model, enabled=False)

    @staticmethod
    def grad_norm(accelerator, model, grad_clip: float) -> torch.Tensor:
        from mmcontrast import sharding

        sharding.reduce_unsharded_gradients(model)
        return sharding.clip_grad_norm_(model, grad_clip)

    def save_more(self, model, optimizer) -> Callable[[Path], None]:
        from mmcontrast import sharding
        from mmcontrast.models import WEIGHTS_FILE

        def save(folder: Path) -> None:
            sharding.save_sharded(model, optimizer, folder)
            weights = sharding.full_state_dict(model)  # whole weights too: `mmcontrast` commands load a run mid-training
            if self.accelerator.is_main_process:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / WEIGHTS_FILE))

        return save

    def load_more(self, model, optimizer) -> Callable[[Path], None]:
        from mmcontrast import sharding

        return lambda folder: sharding.load_sharded(model, optimizer, folder)

    def full_weights(self, model) -> dict:
        from mmcontrast import sharding

        return sharding.full_state_dict(model)


# ---------------------------------------------------------------- the loop


def _use_gpu_fast_paths(model: nn.Module) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions, and channels-last memory for convolutional towers
    (timm ResNets: cuDNN's fast kernels want it; the feed sends images channels-last on CUDA)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1:  # more than a ViT's patch embedding
        model.to(memory_format=torch.channels_last)


def _set_up_processes(cfg: Config, output_dir: Path) -> tuple:
    """The data's sources (checked), trackers and Accelerate: ``(sources, trackers, accelerator)``. The shards are
    listed, counted and checked by the first process and the result sent to the others: one request per remote
    shard's stats file, not one per shard and process (64 processes x 40k shards would be 2.5M)."""
    from mmcontrast.feed import Sources, find_sources
    from mmcontrast.launch import check_world
    from mmcontrast.shards import check_fields
    from mmcontrast.tasks import needs_captions

    trackers = _usable_trackers(list(cfg.log.trackers))
    accelerator = _make_accelerator(cfg.train.mixed_precision, trackers, output_dir, cfg.train.compile, cfg.train.dist_timeout_s)
    check_world(accelerator)

    def counted() -> Sources:
        found = find_sources(cfg.data.train_shards, cfg.data.upsampling_factors, cfg.data.read_timeout)
        check_fields(found.shards, need_text=needs_captions(cfg.mode))
        return found

    sources = _on_first_process(accelerator, counted)
    # the launcher's switches (--mixed_precision, --dynamo_backend) apply where the config left them off
    cfg.train.mixed_precision = str(accelerator.mixed_precision)
    cfg.train.compile = cfg.train.compile or str(accelerator.state.dynamo_plugin.backend) != "NO"
    validate(cfg)
    return sources, trackers, accelerator


def _on_first_process(accelerator, make: Callable[[], object]):
    """``make()``'s result, computed by the first process and broadcast; a ``UsageError`` it raises is raised on
    every process (the others would otherwise wait for a result that never comes)."""
    if accelerator.num_processes == 1:
        return make()
    from accelerate.utils import broadcast_object_list

    result: tuple = (None, None)
    if accelerator.is_main_process:
        try:
            result = (make(), None)
        except UsageError as err:
            result = (None, str(err))
    value, error = broadcast_object_list([result])[0]
    if error is not None:
        raise UsageError(error)
    return value


def _set_up_model(cfg: Config, accelerator) -> tuple:
    """The task's model (the same initial weights on every process), how it is held, its optimizer:
    ``(task, optimizer, holding)``."""
    from accelerate.utils import set_seed

    from mmcontrast.optim import build_optimizer
    from mmcontrast.tasks import build_task

    set_seed(cfg.train.seed)
    task = build_task(cfg)
    task.param_depth = _depth_of(task, cfg.optim.layer_decay)
    set_seed(cfg.train.seed, device_specific=True)  # from here on, dropout and drop-path draw differently on every process
    if accelerator.num_processes > 1 and cfg.model.sync_batchnorm:  # per-process statistics let positives find each other
        from mmcontrast.distributed import convert_global_batchnorm

        task.model = convert_global_batchnorm(task.model)
    if accelerator.device.type == "cuda":
        _use_gpu_fast_paths(task.model)
    holding = Holding(accelerator)
    if cfg.train.fsdp and accelerator.num_processes > 1:  # before the optimizer: it must hold the sharded parameters
        from mmcontrast.sharding import shard

        task.model, holding = shard(task.model, accelerator.device, cfg.train.mixed_precision), ShardedHolding(accelerator)
    o = cfg.optim
    optimizer = build_optimizer(task.model, o.name, o.lr, o.weight_decay, o.betas, o.eps, o.momentum, o.lr_scale, task.param_kind,
                                o.layer_decay, task.param_depth)
    return task, optimizer, holding


def _depth_of(task, layer_decay: float) -> Callable[[str], int] | None:
    """Parameter name -> depth below its tower's top (``models.layer_depths``), when ``optim.layer_decay`` is on;
    read off the model before it is sharded."""
    if layer_decay == 1.0:
        return None
    from mmcontrast.models import layer_depths

    return layer_depths(task.model, task.param_kind).__getitem__


def _print_lr_groups(task, optimizer, base_lr: float, file=sys.stderr) -> None:
    """The peak learning rate of every kind and depth of parameter, read from the optimizer."""
    from mmcontrast.optim import format_lr_table, lr_table, set_lr

    set_lr(optimizer, base_lr, 1.0)
    print(format_lr_table(lr_table(task.model, optimizer, task.param_kind, task.param_depth)), file=file, flush=True)


def print_lr_groups(cfg: Config) -> None:
    """``--print-lr-groups``: build the model and optimizer as the run would and print their learning rates on
    stdout; nothing is read or written."""
    from mmcontrast.optim import build_optimizer
    from mmcontrast.tasks import build_task

    task = build_task(cfg)
    task.param_depth = _depth_of(task, cfg.optim.layer_decay)
    o = cfg.optim
    optimizer = build_optimizer(task.model, o.name, o.lr, o.weight_decay, o.betas, o.eps, o.momentum, o.lr_scale, task.param_kind, o.layer_decay, task.param_depth)
    _print_lr_groups(task, optimizer, o.lr, file=sys.stdout)


def _chained(*steps: Callable[[Path], None] | None) -> Callable[[Path], None] | None:
    """One ``save_more``/``load_more`` callable doing each of ``steps`` (None: nothing) in turn."""
    steps = tuple(s for s in steps if s is not None)
    if not steps:
        return None

    def run(folder: Path) -> None:
        for step in steps:
            step(folder)

    return run


def _ema_files(ema: WeightEma | None, accelerator, save: bool) -> Callable[[Path], None] | None:
    if ema is None:
        return None
    method = ema.save if save else ema.load
    return lambda folder: method(folder, accelerator.process_index)


def _start(accelerator, task, unwrapped, output_dir: Path, cfg: Config, identity: dict,
           load_more: Callable[[Path], None] | None) -> TrainState:
    """Resume from ``checkpoints/last`` (or start at step 0) and write the run's config files."""
    from mmcontrast.checkpoint import load_checkpoint, truncate_metrics

    state = TrainState(identity=identity)
    if cfg.train.resume:
        check = _refuse_changed_identity(identity)
        state = TrainState(**load_checkpoint(accelerator, output_dir, check=check, load_more=load_more))
        state.identity = identity
    if accelerator.is_main_process:
        # one continuous record: what a killed run logged after its checkpoint (or before its first one) goes
        truncate_metrics(output_dir / METRICS_FILE, state.step)
        dump_yaml(cfg, output_dir / CONFIG_FILE)
        task.export(unwrapped, output_dir, False)  # configs first: the run dir loads mid-run
    return state


def _validation(cfg: Config, task, global_batch: int, accelerator) -> Callable | None:
    """``model -> val/* metrics`` on ``data.val_shards`` (checked now, at start-up, by the first process, which
    counts their samples once for all when several readers split them), or None without them. Inside
    ``distributed.shared_work`` each process reads and encodes its part of the samples (split by sample)."""
    if not cfg.data.val_shards:
        return None
    from mmcontrast.data import make_loader
    from mmcontrast.distributed import sharing
    from mmcontrast.evaluate import held_out_metrics
    from mmcontrast.shards import check_fields, expand_shards, shard_sample_counts

    shards = expand_shards(cfg.data.val_shards)
    several_readers = accelerator.num_processes * max(cfg.data.workers, 1) > 1  # one reader needs no split by sample

    def counted() -> list | None:  # once, not per validation nor per process (64 processes, one object store)
        check_fields(shards, need_text=task.tokenizer is not None)
        return shard_sample_counts(shards, cfg.data.read_timeout) if several_readers else None

    counts = _on_first_process(accelerator, counted)

    def validate(model) -> dict:
        part, parts = sharing()
        loader = make_loader(shards, image_transform=task.health_transform, tokenizer=task.tokenizer, views=task.views,
                             batch_size=min(global_batch, 256), workers=cfg.data.workers, seed=cfg.train.seed, counts=counts,
                             rank=part, world_size=parts,
                             shuffle=False, drop_last=False, with_labels=task.with_labels, classes=task.classes,
                             read_timeout=cfg.data.read_timeout)
        return held_out_metrics(model, iter(loader), task.inputs, task.loss, global_batch, task.pair_names, task.n_embeddings)

    return validate


@dataclass
class _Run:
    """What the loop works with, built once by ``train``."""

    cfg: Config
    output_dir: Path
    accelerator: object
    task: object
    holding: Holding
    model: nn.Module
    optimizer: object
    unwrapped: nn.Module
    state: TrainState
    feed: object
    log: StepLog
    total_steps: int
    threads: TrainingThreads
    ema: WeightEma | None = None

    def checkpoint(self) -> None:
        """Save with every process's data position (gathered) and the counters folded in."""
        from accelerate.utils import gather_object

        from mmcontrast.checkpoint import save_checkpoint

        acc, state = self.accelerator, self.state
        self.log.fold(state)
        state.epoch = self.feed.epoch
        state.data = gather_object([self.feed.position()]) if acc.num_processes > 1 else [self.feed.position()]
        save_more = _chained(self.holding.save_more(self.model, self.optimizer), _ema_files(self.ema, acc, save=True))
        save_checkpoint(acc, self.model, self.output_dir, asdict(state), self.cfg.log.keep_checkpoints, save_more=save_more)


def _loop(run: _Run) -> None:
    """Step until the schedule ends (or the last epoch's data does): gradients, log records, checkpoints."""
    from mmcontrast.distributed import equal_shapes
    from mmcontrast.optim import lr_factor, set_lr

    cfg, state, log = run.cfg, run.state, run.log
    groups = run.feed.groups(cfg.train.epochs, log.count_skipped)
    run.model.train()
    with equal_shapes():  # every process takes full batches of the same size
        while state.step < run.total_steps and (group := next(groups, None)) is not None:
            micro, data_seconds = group
            factor = lr_factor(state.step, cfg.optim.warmup_steps, run.total_steps, cfg.optim.min_lr_ratio)
            lr = set_lr(run.optimizer, cfg.optim.lr, factor)
            run.threads.before_step(state.step)
            started = time.perf_counter()
            loss, embeddings, finite = train_step(run.accelerator, run.task, run.model, run.optimizer, micro,
                                                  cfg.optim.grad_clip, run.holding, run.ema, state.step)
            _keep_thread_choice(run, data_seconds + time.perf_counter() - started)
            state.step += 1
            log.add(loss, finite, data_seconds, micro)
            log.progress.update(1)
            if log.due(state.step, run.total_steps):
                log.write(state, run.feed, lr, run.unwrapped, embeddings, {**run.threads.record(), **_damage(run.feed)})
            if state.step % cfg.log.checkpoint_every == 0 and state.step < run.total_steps:
                run.checkpoint()
        log.progress.close()
        run.checkpoint()


def _damage(feed) -> dict:
    """``damaged_shards`` for every record while the data has shards that were found cut short."""
    return {"damaged_shards": feed.sources.damaged} if feed.sources.damaged else {}


def _keep_thread_choice(run: _Run, seconds: float) -> None:
    """Tell the CPU thread trial how long the step took; when it chooses, say so and keep the choice in the state."""
    line = run.threads.after_step(run.state.step, seconds)
    if line is not None:
        run.state.cpu_threads = run.threads.chosen
        if run.accelerator.is_main_process:
            run.log.progress.write(line, file=sys.stderr)


def _export(accelerator, task, holding: Holding, model, unwrapped, output_dir: Path, ema: WeightEma | None) -> None:
    """The run's model files (``task.export``); with a moving average, its weights are ``model.safetensors`` and the
    trained ones ``model_raw.safetensors``. A sharded model's weights are gathered on the first process (every
    process takes part)."""
    from mmcontrast.ema import RAW_WEIGHTS_FILE
    from mmcontrast.models import WEIGHTS_FILE

    weights = holding.full_weights(model)
    if accelerator.is_main_process:
        task.export(unwrapped, output_dir, True, state_dict=weights)
    if ema is None:
        return
    if accelerator.is_main_process:  # every task writes its own layout: the raw export, renamed
        os.replace(output_dir / WEIGHTS_FILE, output_dir / RAW_WEIGHTS_FILE)
    with ema.swapped_in():  # written inside: the gathered weights may share storage with the model's (whole tensors)
        weights = holding.full_weights(model)
        if accelerator.is_main_process:
            task.export(unwrapped, output_dir, True, state_dict=weights)


def _cpu_threads(accelerator, workers: int, state: TrainState, total_steps: int) -> TrainingThreads:
    """The run's compute threads (``threads.TrainingThreads``), set now and said in one line."""
    def agree(values: list[float]) -> list[float]:  # the mean of every process's medians: one choice for all
        if accelerator.num_processes == 1:
            return values
        return accelerator.reduce(torch.tensor(values, device=accelerator.device), "mean").tolist()

    threads = TrainingThreads.plan(accelerator.device.type == "cpu", accelerator.num_processes, workers, state.step,
                                   total_steps, state.cpu_threads, agree)
    threads.start()
    if accelerator.is_main_process:
        print(threads.describe(accelerator.num_processes, workers), file=sys.stderr, flush=True)
    return threads


@contextlib.contextmanager
def _reported_on_every_rank(accelerator):
    """After set-up a process can fail alone (its shards, its checkpoint file): say so from every process, with
    its rank (before it, every process meets the same mistake, and the first one reports it)."""
    try:
        yield
    except (UsageError, TrainingError) as err:
        if not accelerator.is_main_process:
            print(f"error: process {accelerator.process_index}: {err}", file=sys.stderr)
        raise


def train(cfg: Config) -> Path:
    """Run training as configured; returns the run dir. Raises UsageError for user mistakes."""
    output_dir = _prepare_output_dir(cfg.train.output_dir, cfg.train.resume)
    sources, trackers, accelerator = _set_up_processes(cfg, output_dir)
    task, optimizer, holding = _set_up_model(cfg, accelerator)
    with _reported_on_every_rank(accelerator):
        return _train(cfg, output_dir, sources, trackers, accelerator, task, optimizer, holding)


def _train(cfg: Config, output_dir: Path, sources, trackers: list, accelerator, task, optimizer, holding: Holding) -> Path:
    from tqdm import tqdm

    from mmcontrast.config import to_dict
    from mmcontrast.diagnostics import fixed_batch
    from mmcontrast.feed import Feed, epoch_samples, steps_per_epoch

    world, rank, batch, accum = accelerator.num_processes, accelerator.process_index, cfg.train.batch_size, cfg.train.accum_steps
    if task.classes is not None:  # a class list of its own: the shards' classes must be in it
        from mmcontrast.shards import check_classes

        _on_first_process(accelerator, lambda: check_classes(sources.shards, task.classes))
    per_epoch = steps_per_epoch(epoch_samples(sources, cfg.data.num_samples), batch * world * accum, cfg.train.epochs)
    total_steps = cfg.train.steps or cfg.train.epochs * per_epoch
    written, cfg = cfg, in_steps(cfg, per_epoch)  # config.yaml keeps the cadence as given (epochs stay epochs)
    validate = _validation(cfg, task, batch * world * accum, accelerator)
    model, optimizer, unwrapped = holding.prepare(task.model, optimizer)
    if accelerator.is_main_process:
        _print_lr_groups(task, optimizer, cfg.optim.lr)
    ema = WeightEma(unwrapped, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None
    state = _start(accelerator, task, unwrapped, output_dir, written, run_identity(cfg, world, sources),
                   _chained(holding.load_more(model, optimizer), _ema_files(ema, accelerator, save=False)))
    if trackers:
        accelerator.init_trackers("mmcontrast", config=_flat_config(to_dict(cfg)))
    loader_args = {"image_transform": task.train_transform, "tokenizer": task.tokenizer, "views": task.views, "batch_size": batch,
                   "workers": cfg.data.workers, "seed": cfg.train.seed, "rank": rank, "world_size": world, "with_labels": task.with_labels,
                   "classes": task.classes}
    feed = Feed(sources, cfg.data, per_epoch, accum, loader_args, accelerator.device, state.epoch, (state.data or [None] * world)[rank])

    def health_batch() -> dict:
        return fixed_batch(sources.shards, task.health_transform, task.tokenizer, task.views, cfg.log.diagnostics_samples,
                           cfg.train.seed + 1, cfg.data.shuffle_buffer)

    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train", unit="step")
    log = StepLog(accelerator, task, cfg.log, cfg.optim.warmup_steps, cfg.train.max_nonfinite_steps, output_dir / METRICS_FILE,
                  bool(trackers), health_batch, validate, progress, holding.everyone_measures, total_steps,
                  ema.swapped_in if ema else contextlib.nullcontext)
    threads = _cpu_threads(accelerator, cfg.data.workers, state, total_steps)
    _loop(_Run(cfg, output_dir, accelerator, task, holding, model, optimizer, unwrapped, state, feed, log, total_steps, threads, ema))
    _export(accelerator, task, holding, model, unwrapped, output_dir, ema)
    accelerator.wait_for_everyone()  # before end_training, which destroys the process group (accelerate >= 0.34)
    if trackers:
        accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    sys.exit(main())
