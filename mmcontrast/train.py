"""The training loop: ``accelerate launch -m mmcontrast.train`` (or ``python -m mmcontrast.train``).

Owns the loop from config to run dir, read top to bottom in ``train``: set-up (run dir, Accelerate,
seeds, the mode's ``Task``, optimizer), then per optimizer step the next group of K micro-batches
(``micro_batch_groups``: epoch rollover and the check that every process still has data), their
gradients (``gradcache.step_gradients``), the optimizer step (skipped when the loss is not finite),
a log record every ``log.every`` steps (``StepLog``) and a checkpoint every ``log.checkpoint_every``;
at the end the export. Devices, processes and mixed precision are Accelerate's; what differs between
modes is the ``Task`` (``mmcontrast.tasks``); checkpoints are ``mmcontrast.checkpoint``; the data is
``mmcontrast.data``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mmcontrast.config import (
    CONFIG_FILE,
    METRICS_FILE,
    Config,
    LogConfig,
    apply_overrides,
    dump_yaml,
    load_config,
    set_value,
    validate,
)
from mmcontrast.errors import TrainingError, UsageError, run_user_command

# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmcontrast.train",
        description="Train CLIP (image-text) or SimCLR (image-only) from webdataset shards. "
        "Run with `accelerate launch [--cpu --num_processes N] -m mmcontrast.train ...` or `python -m mmcontrast.train ...`.",
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--train-shards", help='brace pattern "DIR/{00000..00007}.tar", a directory, a glob or a list file')
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
    p.add_argument("--mode", choices=("clip", "simclr"))
    p.add_argument("--model", help="open_clip model name or model-config JSON (simclr also: timm:NAME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE", help="any other config field")
    return p


_FLAG_TO_FIELD = {
    "train_shards": "data.train_shards",
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
    validate(cfg)
    return cfg


def _run(argv: list[str]) -> int:
    from mmcontrast.launch import requested_cpu_processes, spawn_workers

    cfg = config_from_args(argv)
    n_cpu_processes = requested_cpu_processes()
    if n_cpu_processes > 1:  # accelerate launch --cpu --num_processes N started only us
        from mmcontrast.shards import check_fields, expand_shards
        from mmcontrast.tasks import needs_captions

        check_fields(expand_shards(cfg.data.train_shards), need_text=needs_captions(cfg.mode))
        return spawn_workers(n_cpu_processes, "mmcontrast.train", argv)
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


def _make_accelerator(mixed_precision: str, trackers: list, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def _share_cpu_cores(accelerator, workers: int) -> None:
    """On the CPU, leave the data workers their cores: compute threads spinning on them slow both down."""
    if accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
        torch.set_num_threads(max(1, cores - workers))


@dataclass
class Schedule:
    """How long the run is, in optimizer steps, and how many samples one step consumes."""

    total_steps: int
    micro_batch_samples: int  # batch_size × processes
    global_batch: int  # batch_size × processes × accum_steps
    samples_per_epoch: int


def plan_schedule(samples_per_epoch: int, micro_batch_samples: int, accum: int, epochs: int | None, steps: int | None) -> Schedule:
    global_batch = micro_batch_samples * accum
    if epochs is None:
        return Schedule(steps, micro_batch_samples, global_batch, samples_per_epoch)
    steps_per_epoch = samples_per_epoch // global_batch
    if steps_per_epoch == 0:
        raise UsageError(
            f"the shards hold {samples_per_epoch} samples, fewer than one global batch of {global_batch}; "
            "lower --batch-size or --accum-steps"
        )
    return Schedule(epochs * steps_per_epoch, micro_batch_samples, global_batch, samples_per_epoch)


@dataclass
class TrainState:
    """Where the run stands; saved with every checkpoint (``train_state.json``)."""

    step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0  # this process's batches consumed in the current epoch
    samples_seen: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0  # in a row
    identity: dict = field(default_factory=dict)  # what a resume must not change (config.RESUME_IDENTITY, processes, shards)


def run_identity(cfg: Config, processes: int, shards: list[str]) -> dict:
    """``config.identity`` plus what only the launch knows: the number of processes and the shard list."""
    import hashlib

    from mmcontrast.config import identity

    names = "\n".join(os.path.basename(s) for s in shards)
    digest = hashlib.sha1(names.encode()).hexdigest()[:12]
    return {**identity(cfg), "processes": processes, "data.shards": f"{len(shards)} shards ({digest})"}


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


# ---------------------------------------------------------------- the data, one step's worth at a time


def _all_ranks_have_data(accelerator, have: bool) -> bool:
    """Ranks stop together when any runs out (uneven shard splits), so no gather ever waits forever."""
    if accelerator.num_processes == 1:
        return have
    import torch.distributed as dist

    flag = torch.tensor([1 if have else 0], device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def micro_batch_groups(loader_for: Callable[[int, int], Iterator[dict]], state: TrainState, accum: int,
                       epochs: int | None, accelerator) -> Iterator[tuple[list[dict], float]]:
    """Yield ``(K micro-batches on the device, seconds spent waiting for them)`` for each optimizer step.

    ``loader_for(epoch, skip_batches)`` gives an epoch's batches; when any process runs out, every
    process moves to the next epoch together, and after ``epochs`` epochs (if given) the groups end.
    Advances ``state``'s epoch, position and skipped-sample count.
    """
    it = loader_for(state.epoch, state.micro_batches_in_epoch)
    while True:
        start = time.perf_counter()
        micro = [b for b in (next(it, None) for _ in range(accum)) if b is not None]
        if not _all_ranks_have_data(accelerator, len(micro) == accum):
            state.epoch += 1
            state.micro_batches_in_epoch = 0
            if epochs is not None and state.epoch >= epochs:
                return
            it = loader_for(state.epoch, 0)
            continue
        state.micro_batches_in_epoch += accum
        state.skipped_samples += sum(int(b.get("skipped", 0)) for b in micro)
        device = accelerator.device
        micro = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro]
        yield micro, time.perf_counter() - start


# ---------------------------------------------------------------- the optimizer step


def _all_ranks_finite(accelerator, loss: torch.Tensor) -> bool:
    ok = torch.isfinite(loss).all().reshape(1).to(accelerator.device, torch.float32)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def optimizer_step(accelerator, model, optimizer, loss: torch.Tensor, grad_clip: float, state: TrainState,
                   max_nonfinite_steps: int, bn_before: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Clip and step, or skip the step when the loss was not finite on some process; returns whether it stepped.

    A skipped step leaves no trace: its gradients are dropped and the BatchNorm statistics its forward
    passes moved are put back (``bn_before``: pairs of buffer and its value before the step). Raises
    ``TrainingError`` after ``max_nonfinite_steps`` skipped steps in a row.
    """
    if not _all_ranks_finite(accelerator, loss):
        optimizer.zero_grad(set_to_none=True)
        for buffer, before in bn_before:
            buffer.copy_(before)
        state.nonfinite_steps += 1
        if state.nonfinite_steps >= max_nonfinite_steps:
            raise TrainingError(
                f"loss was not finite for {state.nonfinite_steps} steps in a row (step {state.step}); "
                "lower --lr, raise optim.warmup_steps, or use train.mixed_precision=bf16 instead of fp16"
            )
        return False
    state.nonfinite_steps = 0
    if grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return True


# ---------------------------------------------------------------- logging


class StepLog:
    """Accumulates the steps between two log records and writes one record (metrics.jsonl, trackers, bar)."""

    def __init__(self, accelerator, task, log_cfg: LogConfig, warmup_steps: int, metrics_path: Path, trackers: bool,
                 health_batch: dict | None, progress):
        self.accelerator, self.task, self.cfg, self.warmup_steps = accelerator, task, log_cfg, warmup_steps
        self.metrics_path, self.trackers, self.health_batch, self.progress = metrics_path, trackers, health_batch, progress
        self.reset()

    def reset(self) -> None:
        self.t0, self.data_time, self.steps, self.loss = time.perf_counter(), 0.0, 0, 0.0

    def add(self, loss: torch.Tensor, data_seconds: float) -> None:
        self.steps += 1
        self.loss += float(loss)
        self.data_time += data_seconds

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.every == 0 or step == total_steps

    def write(self, state: TrainState, schedule: Schedule, lr: float, model, embeddings: list[torch.Tensor]) -> dict:
        """Build the record for ``state.step`` (``embeddings``: this process's last step), write it, start a new window."""
        acc, world = self.accelerator, self.accelerator.num_processes
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        mean_loss = acc.reduce(torch.tensor(self.loss / self.steps, device=acc.device), "mean")
        record = {
            "step": state.step,
            "epoch": state.epoch + state.micro_batches_in_epoch * schedule.micro_batch_samples / max(1, schedule.samples_per_epoch),
            "loss": float(mean_loss),
            "lr": lr,
            "samples_per_s": self.steps * schedule.global_batch / elapsed,
            "global_batch": schedule.global_batch,
            "data_time_share": self.data_time / elapsed,
            "skipped_samples": state.skipped_samples,
        }
        # over the global batch, the candidates the loss saw (rank-major, so pairs stay aligned)
        embeddings = [acc.gather(e.contiguous()) for e in embeddings] if world > 1 else embeddings
        if acc.is_main_process:
            record.update(self._main_process_metrics(state.step, model, embeddings))
        self._emit(record)
        self.reset()
        return record

    def _main_process_metrics(self, step: int, model, embeddings: list[torch.Tensor]) -> dict:
        from mmcontrast.diagnostics import batch_health, batch_monitor, collapse_warnings

        metrics = batch_monitor(*embeddings, views=self.task.pairs_are_views)
        metrics.update(self.task.scalar_metrics(model))
        if self.cfg.diagnostics_every and step % self.cfg.diagnostics_every == 0:
            health = batch_health(self.task.health_pair, model, self.health_batch, views=self.task.pairs_are_views)
            if step > self.warmup_steps:  # a freshly initialised tower can look collapsed; judge after warmup
                for line in collapse_warnings(health, self.cfg.min_rank_fraction, self.cfg.min_std_ratio):
                    self.progress.write(f"warning: {line} (step {step})", file=sys.stderr)
            metrics.update({f"health/{k}": v for k, v in health.items()})
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            from mmcontrast.models import evaluating

            with evaluating(model):
                metrics.update(self.task.evaluate(model))
        return metrics

    def _emit(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


# ---------------------------------------------------------------- the loop


def _set_up(cfg: Config, output_dir: Path):
    """Accelerate, seeds, the task (model for the mode), the optimizer: everything before the first step."""
    from accelerate.utils import set_seed

    from mmcontrast.optim import build_optimizer
    from mmcontrast.shards import check_fields, expand_shards
    from mmcontrast.tasks import build_task, needs_captions

    shards = expand_shards(cfg.data.train_shards)
    check_fields(shards, need_text=needs_captions(cfg.mode))
    trackers = _usable_trackers(list(cfg.log.trackers))
    accelerator = _make_accelerator(cfg.train.mixed_precision, trackers, output_dir)
    set_seed(cfg.train.seed)
    _share_cpu_cores(accelerator, cfg.data.workers)
    task = build_task(cfg)
    if accelerator.num_processes > 1 and cfg.model.sync_batchnorm:  # per-process statistics let positives find each other
        from mmcontrast.distributed import convert_global_batchnorm

        task.model = convert_global_batchnorm(task.model, accelerator.device.type)
    o = cfg.optim
    optimizer = build_optimizer(task.model, o.name, o.lr, o.weight_decay, o.betas, o.eps, o.momentum)
    return shards, trackers, accelerator, task, optimizer


def _start(accelerator, task, unwrapped, output_dir: Path, cfg: Config, identity: dict) -> TrainState:
    """Resume from ``checkpoints/last`` (or start at step 0) and write the run's config files."""
    from mmcontrast.checkpoint import load_checkpoint, truncate_metrics

    state = TrainState(identity=identity)
    if cfg.train.resume:
        state = TrainState(**load_checkpoint(accelerator, output_dir, check=_refuse_changed_identity(identity)))
        if accelerator.is_main_process:
            truncate_metrics(output_dir / METRICS_FILE, state.step)
    if accelerator.is_main_process:
        dump_yaml(cfg, output_dir / CONFIG_FILE)
        task.export(unwrapped, output_dir, False)  # configs first: the run dir loads mid-run
    return state


def train(cfg: Config) -> Path:
    """Run training as configured; returns the run dir. Raises UsageError for user mistakes."""
    from tqdm import tqdm

    from mmcontrast.checkpoint import save_checkpoint
    from mmcontrast.config import to_dict
    from mmcontrast.data import make_loader
    from mmcontrast.diagnostics import fixed_batch
    from mmcontrast.gradcache import bn_buffers, step_gradients
    from mmcontrast.optim import lr_factor, set_lr
    from mmcontrast.shards import count_samples

    output_dir = _prepare_output_dir(cfg.train.output_dir, cfg.train.resume)
    shards, trackers, accelerator, task, optimizer = _set_up(cfg, output_dir)
    world, batch, accum = accelerator.num_processes, cfg.train.batch_size, cfg.train.accum_steps
    schedule = plan_schedule(count_samples(shards), batch * world, accum, cfg.train.epochs, cfg.train.steps)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    state = _start(accelerator, task, unwrapped, output_dir, cfg, run_identity(cfg, world, shards))
    if trackers:
        accelerator.init_trackers("mmcontrast", config=_flat_config(to_dict(cfg)))

    def loader_for(epoch: int, skip: int) -> Iterator[dict]:
        return iter(make_loader(
            shards, image_transform=task.train_transform, tokenizer=task.tokenizer, views=task.views, batch_size=batch,
            workers=cfg.data.workers, seed=cfg.train.seed, epoch=epoch, skip_batches=skip, rank=accelerator.process_index,
            world_size=world, resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer, with_labels=task.with_labels,
        ))  # fmt: skip

    health_batch = None
    if cfg.log.diagnostics_every and accelerator.is_main_process:
        health_batch = fixed_batch(shards, task.health_transform, task.tokenizer, task.views, cfg.log.diagnostics_samples,
                                   cfg.train.seed + 1, cfg.data.shuffle_buffer)
    progress = tqdm(total=schedule.total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train", unit="step")
    log = StepLog(accelerator, task, cfg.log, cfg.optim.warmup_steps, output_dir / METRICS_FILE, bool(trackers), health_batch, progress)
    model.train()
    groups = micro_batch_groups(loader_for, state, accum, cfg.train.epochs, accelerator)
    while state.step < schedule.total_steps:
        micro, data_seconds = next(groups, (None, 0.0))
        if micro is None:  # the last epoch ended
            break
        lr = set_lr(optimizer, cfg.optim.lr, lr_factor(state.step, cfg.optim.warmup_steps, schedule.total_steps, cfg.optim.min_lr_ratio))
        optimizer.zero_grad(set_to_none=True)
        bn_before = [(b, b.clone()) for b in bn_buffers(model)]
        loss, embeddings = step_gradients(accelerator, task, model, micro)
        if not optimizer_step(accelerator, model, optimizer, loss, cfg.optim.grad_clip, state, cfg.train.max_nonfinite_steps,
                              bn_before):
            continue
        task.clamp(unwrapped)
        state.step += 1
        state.samples_seen += schedule.global_batch
        log.add(loss, data_seconds)
        progress.update(1)
        if log.due(state.step, schedule.total_steps):
            log.write(state, schedule, lr, unwrapped, embeddings)
        if state.step % cfg.log.checkpoint_every == 0 and state.step < schedule.total_steps:
            save_checkpoint(accelerator, model, output_dir, asdict(state), cfg.log.keep_checkpoints)
    progress.close()
    save_checkpoint(accelerator, model, output_dir, asdict(state), cfg.log.keep_checkpoints)
    if accelerator.is_main_process:
        task.export(unwrapped, output_dir, True)
    if trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return output_dir


if __name__ == "__main__":
    sys.exit(main())
