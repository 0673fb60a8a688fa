"""An exponential moving average of the weights (``train.ema_decay``), kept on the device beside the model.

Owns the averaged copy of the trainable parameters and BatchNorm running statistics, its update after every
optimizer step, putting it into the model for a while (measurements, the export) and its files in a checkpoint.
Does not own when any of this happens (the loop, ``mmcontrast.train``) or the checkpoint directory's layout.

After optimizer step ``n`` (counted from 0) the average moves ``1 - d`` of the way to the weights, with
``d = min(ema_decay, (1 + n) / (10 + n))`` when ``train.ema_warmup`` is on (TensorFlow's ``num_updates`` rule,
timm's ``ModelEma``): early on the average forgets the random or pretrained start quickly instead of dragging it
along for ``1 / (1 - ema_decay)`` steps. ``d`` reaches 0.9 at step 80, 0.99 at step 890, 0.999 at step 8990.

The update reads nothing on the host: the decay is a function of the step number, and a step the trainer
skipped (a non-finite gradient, flagged on the device) moves the average by 0. Under FSDP2 every process
averages its own shard of each parameter, in place, as timm's ``ModelEmaV3`` averages whole tensors; the
0-dim parameters FSDP leaves whole (``logit_scale``) are averaged whole on every process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mmcontrast.errors import UsageError

EMA_FILE = "ema.safetensors"  # the average of a model held whole (written by the first process)
EMA_SHARD_FILE = "ema_{:05d}.safetensors"  # one per process of a sharded model (FSDP2): its shards
RAW_WEIGHTS_FILE = "model_raw.safetensors"  # an EMA run's export: the trained weights beside the averaged ones


def decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay of the update after optimizer step ``step`` (from 0); see the module docstring."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) tensor, sharing its storage; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def averaged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the average covers, by name: the trainable parameters and the BatchNorm running statistics (frozen
    parameters never change, and other buffers such as a causal mask of -inf are not weights)."""
    out = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for name in ("running_mean", "running_var"):
                out[f"{prefix}.{name}" if prefix else name] = getattr(module, name)
    return out


def _reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root's gathered parameters after a forward pass for the backward pass; after the
    measurement forward passes on the average they hold the average: free them, so the next training step
    gathers the trained weights again."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class WeightEma:
    """The moving average of ``model``'s weights (the bare model: no DDP or compile wrapper; sharded or not).

    Build it after the model sits on its device (and is sharded); ``update`` after every optimizer step;
    ``swapped_in`` to measure or export the average; ``save``/``load`` with the checkpoint.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model, self.decay, self.warmup = model, decay, warmup
        tensors = averaged_tensors(model)
        self.names = list(tensors)
        self.targets = [tensors[n] for n in self.names]  # the model's own tensors (sharded parameters stay DTensors)
        self.sharded = any(hasattr(t, "to_local") for t in self.targets)
        with torch.no_grad():
            self.average = [_local(t).detach().clone() for t in self.targets]

    @torch.no_grad()
    def update(self, step: int, taken: torch.Tensor | None = None) -> None:
        """Move the average towards the weights after optimizer step ``step``; ``taken`` (a 0-dim bool on the
        device, False: the step was skipped) scales the move, so nothing is read on the host."""
        weight = 1.0 - decay_at(step, self.decay, self.warmup)
        current = [_local(t).detach() for t in self.targets]
        moves = torch._foreach_sub(current, self.average)  # average += weight * (current - average)
        torch._foreach_mul_(moves, weight if taken is None else taken.float() * weight)
        torch._foreach_add_(self.average, moves)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside the block the model holds the average; after it, its own weights again, bit for bit."""
        if self.sharded:
            _reshard(self.model)
        with torch.no_grad():
            own = [_local(t).detach().clone() for t in self.targets]
            torch._foreach_copy_([_local(t) for t in self.targets], self.average)
        try:
            yield self.model
        finally:
            if self.sharded:
                _reshard(self.model)
            with torch.no_grad():
                torch._foreach_copy_([_local(t) for t in self.targets], own)

    def _file(self, folder: Path, process_index: int) -> Path:
        return folder / (EMA_SHARD_FILE.format(process_index) if self.sharded else EMA_FILE)

    def save(self, folder: Path, process_index: int) -> None:
        """Write the average into a checkpoint ``folder``: each process its shards (sharded), else the first process."""
        from safetensors.torch import save_file

        if self.sharded or process_index == 0:
            state = {n: a.detach().cpu().contiguous() for n, a in zip(self.names, self.average)}
            save_file(state, str(self._file(folder, process_index)))

    def load(self, folder: Path, process_index: int) -> None:
        """Read ``save``'s file back (a resume on the same processes). UsageError when the checkpoint has none."""
        from safetensors.torch import load_file

        path = self._file(folder, process_index)
        if not path.is_file():
            raise UsageError(f"--resume: {folder} holds no moving average ({path.name}): it was made with "
                             "train.ema_decay=0; resume with train.ema_decay=0 or start a new --output-dir")
        state = load_file(str(path))
        missing = next((n for n in self.names if n not in state), None)
        if missing is not None:
            raise UsageError(f"--resume: {path} has no average of {missing}; the checkpoint was made with other "
                             "trainable weights (model.lock_*); resume with the same model settings")
        with torch.no_grad():
            for average, name in zip(self.average, self.names):
                average.copy_(state[name])


# ---------------------------------------------------------------- the glue to the loop


def checkpoint_files(ema: WeightEma | None, accelerator, save: bool) -> Callable[[Path], None] | None:
    """What a checkpoint saves (``save``) or loads beyond Accelerate's own: each process's average, or None without one."""
    if ema is None:
        return None
    method = ema.save if save else ema.load
    return lambda folder: method(folder, accelerator.process_index)


def export(accelerator, task, holding, model, unwrapped, output_dir: Path, ema: WeightEma | None) -> None:
    """The run's model files (every task's ``export``) (``task.export``); with a moving average, its weights are ``model.safetensors`` and the
    trained ones ``model_raw.safetensors``. A sharded model's weights are gathered on the first process (every
    process takes part)."""
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
