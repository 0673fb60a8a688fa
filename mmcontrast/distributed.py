"""Cross-process gathers that carry gradients, for contrastive losses over the global batch.

Owns: ``all_gather_with_grad`` (an autograd Function around a single-tensor all-gather, whose
backward is a sum reduce-scatter) and small helpers for rank and world size. Does not own process
start-up: Accelerate (or the caller) initialises ``torch.distributed``.

Every process must pass tensors of the same shape. A mismatch (an uneven last batch) would make the
collective hang or return garbage, so each gather first exchanges the shapes (two integers, one
tiny collective) and raises the same ``ValueError`` on every rank instead.

Gradient convention (the one open_clip and ``torch.distributed.nn`` use): when every rank computes
the same global loss L, the gradient that reaches a rank's local features is ``world_size * dL/dx``;
DDP's (and Accelerate's) averaging of parameter gradients divides that factor back out, so the
parameters receive exactly the single-process gradient of L.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch renamed the single-tensor collectives (the old names warn); older releases have only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
        _all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM)
        return out


def _check_same_shape(x: torch.Tensor) -> None:
    """Raise the same ValueError on every rank unless all ranks hold x of the same size."""
    mine = torch.tensor([x.shape[0], x.numel()], dtype=torch.int64, device=x.device)
    every = mine.new_empty(world_size() * 2)
    _all_gather_single(every, mine)
    sizes = every.view(-1, 2).tolist()  # [[n, numel] per rank]
    if any(s != sizes[0] for s in sizes):
        raise ValueError(
            f"gathering across processes needs the same batch on every process, got batch sizes "
            f"{[s[0] for s in sizes]} (element counts {[s[1] for s in sizes]}); drop the last "
            "partial batch (drop_last=True) so every process sees the same batch size"
        )


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather ``x`` (n, ...) from every process into (world * n, ...), rank-major, with gradients.

    Every process must pass the same shape (the trainer drops partial batches); otherwise every
    rank raises ``ValueError``. Identity when not distributed. The gradient reaching ``x`` is the
    sum over ranks of each rank's gradient w.r.t. its copy (see the module docstring).
    """
    if not is_distributed():
        return x
    _check_same_shape(x)
    return _AllGather.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather without autograd (labels, metrics); same shape rule as ``all_gather_with_grad``."""
    if not is_distributed():
        return x
    _check_same_shape(x)
    x = x.contiguous()
    out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x)
    return out
