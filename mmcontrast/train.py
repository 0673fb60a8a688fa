"""The training loop: ``accelerate launch -m mmcontrast.train`` (or ``python -m mmcontrast.train``).

Owns the loop from config to run dir: building the model for the mode (``clip``: an open_clip
image–text model with a learnable temperature; ``simclr``: an image encoder plus a projection
head), one optimizer step over K micro-batches (``--accum-steps``, exact gradient caching), logging,
atomic checkpoints, resume, and the final export. Devices, processes and mixed precision are
Accelerate's; the losses and their cross-process gather are ``mmcontrast.losses``; the data is
``mmcontrast.data``.

One optimizer step, K = ``accum_steps`` micro-batches per process:

* K = 1: forward, loss over the global batch (gathered across processes), backward.
* K > 1 (gradient caching, Gao et al. 2021): (1) embed every micro-batch without autograd and keep
  the RNG state its forward used; (2) the loss over all K·n embeddings at once (with the gather)
  and its gradient with respect to each embedding and to ``logit_scale``/``logit_bias``; (3)
  re-embed each micro-batch with autograd under the same RNG state and backpropagate its slice of
  that gradient. DDP synchronises gradients on the last micro-batch only. BatchNorm buffers are
  restored after pass (1), so running statistics are updated once per micro-batch, in pass (3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmcontrast.config import (
    CONFIG_FILE,
    METRICS_FILE,
    TRAIN_STATE_FILE,
    Config,
    apply_overrides,
    dump_yaml,
    load_config,
    set_value,
    validate,
)
from mmcontrast.errors import TrainingError, UsageError

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


def main(argv: Sequence[str] | None = None) -> int:
    from mmcontrast.launch import requested_cpu_processes, spawn_workers

    argv = list(sys.argv[1:] if argv is None else argv)
    is_main = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    try:
        cfg = config_from_args(argv)
        n_cpu_processes = requested_cpu_processes()
        if n_cpu_processes > 1:  # accelerate launch --cpu --num_processes N started only us
            from mmcontrast import data

            data.check_fields(data.expand_shards(cfg.data.train_shards), need_text=cfg.mode == "clip")
            return spawn_workers(n_cpu_processes, "mmcontrast.train", argv)
        train(cfg)
        return 0
    except (UsageError, TrainingError) as err:
        if is_main:  # every rank meets the same mistake; one line is enough
            print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- what the modes train


class SimclrModel(nn.Module):
    """Image encoder + SimCLR projection head (Linear–BN–ReLU–Linear); only the encoder is exported."""

    def __init__(self, encoder: nn.Module, hidden_dim: int, out_dim: int, batchnorm: bool = True):
        super().__init__()
        self.encoder = encoder
        dim = encoder.output_dim
        self.head = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=not batchnorm),
            nn.BatchNorm1d(hidden_dim) if batchnorm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = view1.shape[0]
        z = self.head(self.encoder.encode_image(torch.cat([view1, view2])))  # (2n, out_dim), both views share BN stats
        return z[:n], z[n:]


@dataclass
class Task:
    """What differs between the modes: the model, how a batch is fed to it, and the loss."""

    mode: str
    model: nn.Module
    image_transform: object
    tokenizer: object
    loss_name: str
    clip_mode: str = "plain"
    temperature: float = 0.1
    export: object = None  # callable(unwrapped_model, out_dir, weights: bool)
    eval_transform: object = None  # deterministic preprocess for in-loop evaluation and diagnostics

    def inputs(self, batch: dict) -> tuple:
        return (batch["image"], batch["text"]) if self.mode == "clip" else (batch["view1"], batch["view2"])

    def n_embeddings(self) -> int:
        return 2  # (image, text) or (view1, view2); further outputs are scalars (logit scale and bias)

    def loss(self, outputs: Sequence[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        from mmcontrast import losses

        a, b = outputs[0].float(), outputs[1].float()
        if self.mode == "clip":
            if self.loss_name == "siglip":
                return losses.siglip_loss(a, b, outputs[2].float(), outputs[3].float())
            return losses.clip_loss(a, b, outputs[2].float(), mode=self.clip_mode)
        if self.loss_name == "supcon":
            return losses.supcon_loss(torch.stack([a, b], dim=1), labels, temperature=self.temperature)
        return losses.nt_xent_loss(a, b, temperature=self.temperature)


def build_task(cfg: Config) -> Task:
    from mmcontrast import models

    loss_name = cfg.loss.name if cfg.loss.name != "auto" else ("clip" if cfg.mode == "clip" else "nt_xent")
    if cfg.mode == "clip":
        if cfg.model.name.startswith("timm:"):
            raise UsageError("timm:NAME is an image-only encoder; in clip mode give an open_clip model name or JSON")
        extra = {"init_logit_scale": math.log(1 / cfg.loss.init_temperature)}
        if loss_name == "siglip":
            extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}  # SigLIP's initialisation
        bundle = models.create_clip(cfg.model.name, cfg.model.pretrained, model_kwargs=extra)
        models.lock_towers(
            bundle.model, cfg.model.lock_image, cfg.model.lock_image_unlocked_groups, cfg.model.lock_text, cfg.model.lock_text_unlocked_layers
        )
        if cfg.model.grad_checkpointing:
            bundle.model.set_grad_checkpointing(True)

        def export(model: nn.Module, out_dir: Path, weights: bool) -> None:
            models.save_clip_run_files(model, bundle.model_cfg, out_dir, bundle.tokenizer, weights=weights)

        transform = bundle.preprocess_train if cfg.data.clip_augment else bundle.preprocess_val
        return Task(
            "clip", bundle.model, transform, bundle.tokenizer, loss_name, cfg.loss.clip_mode, export=export,
            eval_transform=bundle.preprocess_val,
        )

    from mmcontrast.augment import simclr_transform

    spec = models.image_encoder_spec(cfg.model.name, cfg.model.timm_kwargs, cfg.model.cifar_stem, cfg.data.augment.image_size)
    encoder = models.ImageEncoder(spec)
    if cfg.model.pretrained:
        models.load_image_encoder_weights(encoder, cfg.model.pretrained)
    if cfg.model.grad_checkpointing and hasattr(encoder.backbone, "set_grad_checkpointing"):
        encoder.backbone.set_grad_checkpointing(True)
    model = SimclrModel(encoder, cfg.model.proj_hidden_dim, cfg.model.proj_dim, batchnorm=cfg.model.proj_batchnorm)
    aug = cfg.data.augment
    transform = simclr_transform(
        aug.image_size or spec["image_size"], spec["mean"], spec["std"], aug.crop_scale, aug.hflip,
        aug.color_jitter, aug.color_jitter_p, aug.grayscale_p, aug.blur_p,
    )

    def export(model: nn.Module, out_dir: Path, weights: bool) -> None:
        models.save_image_encoder_files(model.encoder, out_dir, weights=weights)

    return Task(
        "simclr", model, transform, None, loss_name, temperature=cfg.loss.temperature, export=export,
        eval_transform=models.image_eval_transform(spec),
    )


# ---------------------------------------------------------------- one optimizer step


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        buf
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]


@contextlib.contextmanager
def _frozen_bn_statistics(model: nn.Module):
    """Restore BatchNorm running statistics after a no-grad embedding pass (pass 1 of caching)."""
    buffers = _bn_buffers(model)
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        for b, s in zip(buffers, saved):
            b.copy_(s)


def _rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def _capture_rng() -> tuple:
    cuda = [torch.cuda.get_rng_state(d) for d in _rng_devices()]
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(state: tuple):
    """Run a block under a saved RNG state, leaving the global RNG stream as it was."""
    devices = _rng_devices()
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        for d, s in zip(devices, state[1]):
            torch.cuda.set_rng_state(s, d)
        yield


def _concat_labels(micro: Sequence[dict]) -> torch.Tensor | None:
    if "label" not in micro[0]:
        return None
    return torch.cat([m["label"] for m in micro])


def step_gradients(accelerator, task: Task, model: nn.Module, micro: Sequence[dict]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward for one optimizer step over K micro-batches.

    Returns the detached loss and this process's two embedding tensors (K·n, d) for monitoring.

    K = 1 is the ordinary path. K > 1 computes exactly the gradient of one loss over all K
    micro-batches (every sample a negative for every other), at the activation memory of one.
    """
    k = len(micro)
    if k == 1:
        outputs = model(*task.inputs(micro[0]))
        loss = task.loss(outputs, _concat_labels(micro))
        accelerator.backward(loss)
        return loss.detach(), [o.detach() for o in outputs[: task.n_embeddings()]]

    # (1) embed without autograd; remember each micro-batch's RNG state for the replay in (3)
    cached, rng_states = [], []
    with torch.no_grad(), _frozen_bn_statistics(model):
        for batch in micro:
            rng_states.append(_capture_rng())
            cached.append([o.detach() for o in model(*task.inputs(batch))])
    n_emb = task.n_embeddings()
    leaves = [torch.cat([c[i] for c in cached]).float().requires_grad_() for i in range(n_emb)]
    scalars = [o.float().requires_grad_() for o in cached[0][n_emb:]]  # logit scale (and bias)

    # (2) one loss over the whole step's embeddings, and its gradient w.r.t. each of them
    loss = task.loss([*leaves, *scalars], _concat_labels(micro))
    grads = torch.autograd.grad(loss, leaves + scalars, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves + scalars)]
    emb_grads = [g.split([c[0].shape[0] for c in cached]) for g in grads[:n_emb]]
    scalar_grads = grads[n_emb:]

    # (3) re-embed with autograd and push each slice of the cached gradient through the encoder
    for j, batch in enumerate(micro):
        last = j == k - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync, _replayed_rng(rng_states[j]):
            outputs = model(*task.inputs(batch))
            surrogate = sum((outputs[i].float() * emb_grads[i][j]).sum() for i in range(n_emb))
            # scalars enter the loss once: their gradient rides on the last micro-batch; the others
            # multiply by zero so that every parameter takes part in every DDP backward
            for out, g in zip(outputs[n_emb:], scalar_grads):
                surrogate = surrogate + (out.float() * (g if last else torch.zeros_like(g))).sum()
            accelerator.backward(surrogate)
    return loss.detach(), [leaf.detach() for leaf in leaves]


# ---------------------------------------------------------------- checkpoints


def _checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def save_checkpoint(accelerator, task: Task, model: nn.Module, output_dir: Path, state: dict, keep: int) -> None:
    """Write checkpoints/step_NNNNNN atomically (temp dir + rename), point ``last`` at it, prune old ones."""
    unwrapped = accelerator.unwrap_model(model)
    if not all(torch.isfinite(p).all() for p in unwrapped.parameters()):
        raise TrainingError(f"refusing to checkpoint non-finite weights at step {state['step']}; lower the learning rate")
    root = _checkpoint_dir(output_dir)
    name = f"step_{state['step']:06d}"
    tmp = root / f".tmp_{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=2))
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        link = root / ".last.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(name)
        os.replace(link, root / "last")  # atomic switch of `last`
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, output_dir: Path) -> dict:
    last = _checkpoint_dir(output_dir) / "last"
    if not (last / TRAIN_STATE_FILE).is_file():
        raise UsageError(f"--resume: no checkpoint at {last}; train without --resume to start this run")
    accelerator.load_state(str(last))
    return json.loads((last / TRAIN_STATE_FILE).read_text())


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint so the file stays one continuous run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


# ---------------------------------------------------------------- monitoring


def diagnostics_batch(shards: list[str], task: Task, cfg: Config) -> dict:
    """A fixed batch for representation health, drawn once with its own seed and deterministic preprocessing."""
    from mmcontrast import data

    size = min(cfg.log.diagnostics_samples, data.count_samples(shards))
    loader = data.make_loader(
        shards, image_transform=task.eval_transform if task.mode == "clip" else task.image_transform,
        tokenizer=task.tokenizer, views=1 if task.mode == "clip" else 2, batch_size=size, workers=0,
        seed=cfg.train.seed + 1, shuffle_buffer=cfg.data.shuffle_buffer,
    )
    batch = next(iter(loader), None)
    if batch is None:
        raise UsageError(f"log.diagnostics_samples={size} is more than one pass over the shards yields; lower it")
    return batch


@torch.no_grad()
def representation_health(task: Task, model: nn.Module, batch: dict, cfg: Config, step: int, progress) -> dict:
    """Alignment, uniformity, effective rank, std (mmcontrast.diagnostics) on the fixed batch, prefixed ``health/``."""
    from mmcontrast.diagnostics import collapse_warnings, health

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if task.mode == "clip":
        x = model.encode_image(batch["image"].to(device), normalize=True)
        y = model.encode_text(batch["text"].to(device), normalize=True)
    else:  # the exported backbone's features, not the projection head's
        x = model.encoder.encode_image(batch["view1"].to(device))
        y = model.encoder.encode_image(batch["view2"].to(device))
    model.train(was_training)
    metrics = health(x, y, views=task.mode == "simclr")
    if step > cfg.optim.warmup_steps:  # a freshly initialised tower can look collapsed; judge after warmup
        for line in collapse_warnings(metrics, cfg.log.min_rank_fraction, cfg.log.min_std_ratio):
            progress.write(f"warning: {line} (step {step})", file=sys.stderr)
    return {f"health/{k}": v for k, v in metrics.items()}


@torch.no_grad()
def periodic_eval(task: Task, model: nn.Module, cfg: Config) -> dict:
    """Zero-shot top-1 (clip) or kNN top-1 (simclr) on labelled class folders."""
    from mmcontrast import evaluate

    was_training = model.training
    model.eval()
    try:
        if task.mode == "clip":
            from mmcontrast.zeroshot import ZeroShotClassifier

            paths, names = evaluate.class_folders(cfg.log.eval_images)
            classes = sorted(set(names))
            classifier = ZeroShotClassifier(model, task.tokenizer, [evaluate.prompt_name(c) for c in classes])
            encoded, probs = evaluate.zero_shot_classify(classifier, task.eval_transform, paths, workers=0)
            targets = [classes.index(names[i]) for i in encoded.ok]
            result = evaluate.classification_metrics(probs, targets, classes)
            return {"eval/zeroshot_top1": result["top1"], "eval/zeroshot_top5": result["top5"]}
        train, test, classes = evaluate.encode_class_folders(
            model.encoder, task.eval_transform, cfg.log.eval_train_images, cfg.log.eval_images, workers=0
        )
        scores = evaluate.knn_scores(train.features, train.labels, test.features, len(classes))
        return {"eval/knn_top1": float((scores.argmax(dim=1) == test.labels).float().mean())}
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- the loop


def _all_ranks_have_data(accelerator, have: bool) -> bool:
    """Ranks stop together when any runs out (uneven shard splits), so no gather ever waits forever."""
    if accelerator.num_processes == 1:
        return have
    import torch.distributed as dist

    flag = torch.tensor([1 if have else 0], device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _all_ranks_finite(accelerator, loss: torch.Tensor) -> bool:
    ok = torch.isfinite(loss).all().reshape(1).to(accelerator.device, torch.float32)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


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


def train(cfg: Config) -> Path:
    """Run training as configured; returns the run dir. Raises UsageError for user mistakes."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm import tqdm

    from mmcontrast import data
    from mmcontrast.config import to_dict
    from mmcontrast.diagnostics import batch_monitor
    from mmcontrast.optim import build_optimizer, lr_factor, set_lr

    output_dir = Path(cfg.train.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --output-dir {output_dir}: {err.strerror}") from None
    if not cfg.train.resume and (_checkpoint_dir(output_dir) / "last").exists():
        raise UsageError(f"{output_dir} already holds a run; pass --resume to continue it or choose another --output-dir")

    shards = data.expand_shards(cfg.data.train_shards)
    data.check_fields(shards, need_text=cfg.mode == "clip")
    trackers = _usable_trackers(list(cfg.log.trackers))
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(cfg.train.seed)
    if accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # decoding workers need cores too: compute threads spinning on them slow both down
        cores = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
        torch.set_num_threads(max(1, cores - cfg.data.workers))
    task = build_task(cfg)
    with_labels = task.loss_name == "supcon"

    world = accelerator.num_processes
    if world > 1 and cfg.model.sync_batchnorm:  # per-process statistics would let positives find each other
        from mmcontrast.distributed import convert_global_batchnorm

        task.model = convert_global_batchnorm(task.model, accelerator.device.type)
    batch, accum = cfg.train.batch_size, cfg.train.accum_steps
    global_batch = batch * world * accum
    samples_per_epoch = data.count_samples(shards)
    steps_per_epoch = samples_per_epoch // global_batch
    if cfg.train.epochs is not None:
        if steps_per_epoch == 0:
            raise UsageError(
                f"the shards hold {samples_per_epoch} samples, fewer than one global batch of {global_batch}; "
                "lower --batch-size or --accum-steps"
            )
        total_steps = cfg.train.epochs * steps_per_epoch
    else:
        total_steps = cfg.train.steps

    optimizer = build_optimizer(
        task.model, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps, cfg.optim.momentum
    )
    model, optimizer = accelerator.prepare(task.model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    state = {"step": 0, "epoch": 0, "micro_batches_in_epoch": 0, "samples_seen": 0, "skipped_samples": 0, "nonfinite_steps": 0}
    metrics_path = output_dir / METRICS_FILE
    if cfg.train.resume:
        state.update(load_checkpoint(accelerator, output_dir))
        if accelerator.is_main_process:
            _truncate_metrics(metrics_path, state["step"])
    if accelerator.is_main_process:
        dump_yaml(cfg, output_dir / CONFIG_FILE)
        task.export(unwrapped, output_dir, weights=False)  # configs first: the run dir loads mid-run
    if trackers:
        accelerator.init_trackers("mmcontrast", config=_flat_config(to_dict(cfg)))

    def loader_for(epoch: int, skip: int):
        return iter(
            data.make_loader(
                shards, image_transform=task.image_transform, tokenizer=task.tokenizer, views=1 if cfg.mode == "clip" else 2,
                batch_size=batch, workers=cfg.data.workers, seed=cfg.train.seed, epoch=epoch, skip_batches=skip,
                rank=accelerator.process_index, world_size=world, resampled=cfg.data.resampled,
                shuffle_buffer=cfg.data.shuffle_buffer, with_labels=with_labels,
            )
        )

    def next_micro_batches(it):
        micro = []
        for _ in range(accum):
            b = next(it, None)
            if b is None:
                break
            micro.append(b)
        return micro if _all_ranks_have_data(accelerator, len(micro) == accum) else None

    max_scale = math.log(cfg.loss.max_logit_scale)
    fixed_batch = None
    if cfg.log.diagnostics_every and accelerator.is_main_process:
        fixed_batch = diagnostics_batch(shards, task, cfg)
    progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_main_process, desc="train", unit="step")
    it = loader_for(state["epoch"], state["micro_batches_in_epoch"])
    window = {"t0": time.perf_counter(), "data_time": 0.0, "steps": 0, "loss": 0.0}
    model.train()
    while state["step"] < total_steps:
        t_data = time.perf_counter()
        micro = next_micro_batches(it)
        if micro is None:  # end of an epoch on some rank: every rank moves on together
            state["epoch"] += 1
            state["micro_batches_in_epoch"] = 0
            if cfg.train.epochs is not None and state["epoch"] >= cfg.train.epochs:
                break
            it = loader_for(state["epoch"], 0)
            continue
        micro = [{k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro]
        window["data_time"] += time.perf_counter() - t_data
        state["micro_batches_in_epoch"] += accum
        state["skipped_samples"] += sum(int(b.get("skipped", 0)) for b in micro)

        lr = set_lr(optimizer, cfg.optim.lr, lr_factor(state["step"], cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio))
        optimizer.zero_grad(set_to_none=True)
        loss, embeddings = step_gradients(accelerator, task, model, micro)
        if not _all_ranks_finite(accelerator, loss):
            optimizer.zero_grad(set_to_none=True)
            state["nonfinite_steps"] += 1
            if state["nonfinite_steps"] >= cfg.train.max_nonfinite_steps:
                raise TrainingError(
                    f"loss was not finite for {state['nonfinite_steps']} steps in a row (step {state['step']}); "
                    "lower --lr, raise optim.warmup_steps, or use train.mixed_precision=bf16 instead of fp16"
                )
            continue
        state["nonfinite_steps"] = 0
        if cfg.optim.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        if hasattr(unwrapped, "logit_scale"):
            with torch.no_grad():
                unwrapped.logit_scale.clamp_(0, max_scale)
        state["step"] += 1
        state["samples_seen"] += global_batch
        window["steps"] += 1
        window["loss"] += float(loss)
        progress.update(1)

        if state["step"] % cfg.log.every == 0 or state["step"] == total_steps:
            elapsed = time.perf_counter() - window["t0"]
            mean_loss = accelerator.reduce(torch.tensor(window["loss"] / window["steps"], device=accelerator.device), "mean")
            record = {
                "step": state["step"],
                "epoch": state["epoch"] + state["micro_batches_in_epoch"] * batch * world / max(1, samples_per_epoch),
                "loss": float(mean_loss),
                "lr": lr,
                "samples_per_s": window["steps"] * global_batch / max(elapsed, 1e-9),
                "global_batch": global_batch,
                "data_time_share": window["data_time"] / max(elapsed, 1e-9),
                "skipped_samples": state["skipped_samples"],
            }
            # over the global batch, the candidates the loss saw (rank-major, so pairs stay aligned)
            embeddings = [accelerator.gather(e.contiguous()) for e in embeddings] if world > 1 else embeddings
            if accelerator.is_main_process:
                record.update(batch_monitor(*embeddings, views=cfg.mode == "simclr"))
            if hasattr(unwrapped, "logit_scale"):
                record["temperature"] = float(1.0 / unwrapped.logit_scale.detach().exp())
            if getattr(unwrapped, "logit_bias", None) is not None:
                record["logit_bias"] = float(unwrapped.logit_bias.detach())
            if cfg.log.diagnostics_every and state["step"] % cfg.log.diagnostics_every == 0 and accelerator.is_main_process:
                record.update(representation_health(task, unwrapped, fixed_batch, cfg, state["step"], progress))
            if cfg.log.eval_every and state["step"] % cfg.log.eval_every == 0 and accelerator.is_main_process:
                record.update(periodic_eval(task, unwrapped, cfg))
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state["step"])
            window = {"t0": time.perf_counter(), "data_time": 0.0, "steps": 0, "loss": 0.0}
        if state["step"] % cfg.log.checkpoint_every == 0 and state["step"] < total_steps:
            save_checkpoint(accelerator, task, model, output_dir, state, cfg.log.keep_checkpoints)

    progress.close()
    save_checkpoint(accelerator, task, model, output_dir, state, cfg.log.keep_checkpoints)
    if accelerator.is_main_process:
        task.export(unwrapped, output_dir, weights=True)
    if trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return output_dir


if __name__ == "__main__":
    sys.exit(main())
