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
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from mmcontrast.checkpoint import TrainState, refuse_changed_identity, run_identity
from mmcontrast.config import (
    CONFIG_FILE,
    METRICS_FILE,
    MODES,
    Config,
    apply_overrides,
    dump_yaml,
    in_steps,
    load_config,
    set_value,
    validate,
)
from mmcontrast.distributed import on_first_process
from mmcontrast.ema import WeightEma, export
from mmcontrast.ema import checkpoint_files as ema_files
from mmcontrast.errors import TrainingError, UsageError, run_user_command
from mmcontrast.holding import Holding, ShardedHolding
from mmcontrast.launch import flat_config, make_accelerator, usable_trackers
from mmcontrast.monitor import MonitorSetup, StepLog
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


# ---------------------------------------------------------------- one optimizer step (nothing here waits for the device)


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

    trackers = usable_trackers(list(cfg.log.trackers))
    accelerator = make_accelerator(cfg.train.mixed_precision, trackers, output_dir, cfg.train.compile, cfg.train.dist_timeout_s)
    check_world(accelerator)

    def counted() -> Sources:
        found = find_sources(cfg.data.train_shards, cfg.data.upsampling_factors, cfg.data.read_timeout)
        check_fields(found.shards, need_text=needs_captions(cfg.mode))
        return found

    sources = on_first_process(accelerator, counted)
    # the launcher's switches (--mixed_precision, --dynamo_backend) apply where the config left them off
    cfg.train.mixed_precision = str(accelerator.mixed_precision)
    cfg.train.compile = cfg.train.compile or str(accelerator.state.dynamo_plugin.backend) != "NO"
    validate(cfg)
    return sources, trackers, accelerator


def _set_up_model(cfg: Config, accelerator) -> tuple:
    """The task's model (the same initial weights on every process), how it is held, its optimizer:
    ``(task, optimizer, holding)``."""
    from accelerate.utils import set_seed

    from mmcontrast.optim import depths_for, optimizer_for
    from mmcontrast.tasks import build_task

    set_seed(cfg.train.seed)
    task = build_task(cfg)
    task.param_depth = depths_for(task, cfg.optim.layer_decay)
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
    return task, optimizer_for(task, cfg.optim), holding


def _print_lr_groups(task, optimizer, base_lr: float, file=None) -> None:
    """The peak learning rate of every kind and depth of parameter, read from the optimizer (on ``file``, else the
    stderr of the moment: a default bound at import would keep whatever stream was stderr then)."""
    from mmcontrast.optim import format_lr_table, lr_table, set_lr

    set_lr(optimizer, base_lr, 1.0)
    print(format_lr_table(lr_table(task.model, optimizer, task.param_kind, task.param_depth)), file=file or sys.stderr, flush=True)


def print_lr_groups(cfg: Config) -> None:
    """``--print-lr-groups``: build the model and optimizer as the run would and print their learning rates on
    stdout; nothing is read or written."""
    from mmcontrast.optim import depths_for, optimizer_for
    from mmcontrast.tasks import build_task

    task = build_task(cfg)
    task.param_depth = depths_for(task, cfg.optim.layer_decay)
    _print_lr_groups(task, optimizer_for(task, cfg.optim), cfg.optim.lr, file=sys.stdout)


def _chained(*steps: Callable[[Path], None] | None) -> Callable[[Path], None] | None:
    """One ``save_more``/``load_more`` callable doing each of ``steps`` (None: nothing) in turn."""
    steps = tuple(s for s in steps if s is not None)
    if not steps:
        return None

    def run(folder: Path) -> None:
        for step in steps:
            step(folder)

    return run


def _start(accelerator, task, unwrapped, output_dir: Path, cfg: Config, identity: dict,
           load_more: Callable[[Path], None] | None) -> TrainState:
    """Resume from ``checkpoints/last`` (or start at step 0) and write the run's config files."""
    from mmcontrast.checkpoint import load_checkpoint, truncate_metrics

    state = TrainState(identity=identity)
    if cfg.train.resume:
        check = refuse_changed_identity(identity)
        state = TrainState(**load_checkpoint(accelerator, output_dir, check=check, load_more=load_more))
        state.identity = identity
    if accelerator.is_main_process:
        # one continuous record: what a killed run logged after its checkpoint (or before its first one) goes
        truncate_metrics(output_dir / METRICS_FILE, state.step)
        dump_yaml(cfg, output_dir / CONFIG_FILE)
        task.export(unwrapped, output_dir, False)  # configs first: the run dir loads mid-run
    return state


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
        save_more = _chained(self.holding.save_more(self.model, self.optimizer), ema_files(self.ema, acc, save=True))
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
    from mmcontrast.heldout import validation

    world, rank, batch, accum = accelerator.num_processes, accelerator.process_index, cfg.train.batch_size, cfg.train.accum_steps
    if task.classes is not None:  # a class list of its own: the shards' classes must be in it
        from mmcontrast.shards import check_classes

        on_first_process(accelerator, lambda: check_classes(sources.shards, task.classes))
    per_epoch = steps_per_epoch(epoch_samples(sources, cfg.data.num_samples), batch * world * accum, cfg.train.epochs)
    total_steps = cfg.train.steps or cfg.train.epochs * per_epoch
    written, cfg = cfg, in_steps(cfg, per_epoch)  # config.yaml keeps the cadence as given (epochs stay epochs)
    validate = validation(cfg, task, batch * world * accum, accelerator)
    model, optimizer, unwrapped = holding.prepare(task.model, optimizer)
    if accelerator.is_main_process:
        _print_lr_groups(task, optimizer, cfg.optim.lr)
    ema = WeightEma(unwrapped, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None
    state = _start(accelerator, task, unwrapped, output_dir, written, run_identity(cfg, world, sources),
                   _chained(holding.load_more(model, optimizer), ema_files(ema, accelerator, save=False)))
    if trackers:
        accelerator.init_trackers("mmcontrast", config=flat_config(to_dict(cfg)))
    loader_args = {"image_transform": task.train_transform, "tokenizer": task.tokenizer, "views": task.views, "batch_size": batch,
                   "workers": cfg.data.workers, "seed": cfg.train.seed, "rank": rank, "world_size": world, "with_labels": task.with_labels,
                   "classes": task.classes}
    feed = Feed(sources, cfg.data, per_epoch, accum, loader_args, accelerator.device, state.epoch, (state.data or [None] * world)[rank])

    def health_batch() -> dict:
        return fixed_batch(sources.shards, task.health_transform, task.tokenizer, task.views, cfg.log.diagnostics_samples,
                           cfg.train.seed + 1, cfg.data.shuffle_buffer)

    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train", unit="step")
    setup = MonitorSetup(cfg.log, cfg.optim.warmup_steps, cfg.train.max_nonfinite_steps, total_steps, output_dir / METRICS_FILE,
                         bool(trackers), health_batch, validate, holding.everyone_measures,
                         ema.swapped_in if ema else contextlib.nullcontext)
    log = StepLog(accelerator, task, setup, progress)
    threads = _cpu_threads(accelerator, cfg.data.workers, state, total_steps)
    _loop(_Run(cfg, output_dir, accelerator, task, holding, model, optimizer, unwrapped, state, feed, log, total_steps, threads, ema))
    export(accelerator, task, holding, model, unwrapped, output_dir, ema)
    accelerator.wait_for_everyone()  # before end_training, which destroys the process group (accelerate >= 0.34)
    if trackers:
        accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    sys.exit(main())
