"""Cross-process gathers that carry gradients, for contrastive losses over the global batch.

Owns: ``all_gather_with_grad`` (an autograd Function around ``all_gather_into_tensor``, whose
backward is a sum reduce-scatter) and small helpers for rank and world size. Does not own process
start-up: Accelerate (or the caller) initialises ``torch.distributed``.

Gradient convention (the one open_clip and ``torch.distributed.nn`` use): when every rank computes
the same global loss L, the gradient that reaches a rank's local features is ``world_size * dL/dx``;
DDP's (and Accelerate's) averaging of parameter gradients divides that factor back out, so the
parameters receive exactly the single-process gradient of L.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's (n, ...) tensor into (world * n, ...); backward sums and scatters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
        return out


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather ``x`` (n, ...) from every process into (world * n, ...), rank-major, with gradients.

    Every process must pass the same n (the trainer drops partial batches). Identity when not
    distributed.
    """
    if not is_distributed():
        return x
    return _AllGather.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather without autograd (labels, metrics)."""
    if not is_distributed():
        return x
    x = x.contiguous()
    out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x)
    return out
