"""How the model is held across processes: ``Holding`` (Accelerate's DDP, autocast, torch.compile) or
``ShardedHolding`` (FSDP2, ``mmcontrast.sharding``).

The loop asks its holding for the model to train, the bare model (no wrappers), the context that accumulates
gradients without synchronising them, the gradient norm after clipping, the checkpoint files beyond Accelerate's own
and the whole weights to export. Owns no loop, data or logging.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


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

    @staticmethod
    def grad_norm(accelerator, model, grad_clip: float) -> torch.Tensor:
        """The global gradient norm (0-dim, on the device), after clipping to ``grad_clip`` when it is positive."""
        if grad_clip > 0:
            return accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        accelerator.unscale_gradients()
        return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])

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
