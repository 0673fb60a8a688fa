"""Cross-process gathers that carry gradients, for contrastive losses over the global batch.

Owns: ``all_gather_with_grad`` (an autograd Function around a single-tensor all-gather, whose
backward is a sum reduce-scatter), ``GlobalBatchNorm`` (BatchNorm statistics over the global batch,
on any device) and small helpers for rank and world size. Does not own process start-up: Accelerate
(or the caller) initialises ``torch.distributed``.

Every process must pass tensors of the same shape. A mismatch (an uneven last batch) would make the
collective hang or return garbage, so each gather first exchanges the shapes (two integers, one
tiny collective) and raises the same ``ValueError`` on every rank instead. That check waits for the
device (its result decides on the host), so a caller that guarantees equal shapes — the trainer, whose
every process takes full batches only — turns it off inside ``equal_shapes()``.

Gradient convention (the one open_clip and ``torch.distributed.nn`` use): when every rank computes
the same global loss L, the gradient that reaches a rank's local features is ``world_size * dL/dx``;
DDP's (and Accelerate's) averaging of parameter gradients divides that factor back out, so the
parameters receive exactly the single-process gradient of L.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from mmcontrast.errors import UsageError

# torch renamed the single-tensor collectives (the old names warn); older releases have only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


_LOCAL_ONLY = contextvars.ContextVar("mmcontrast_local_only", default=False)


@contextlib.contextmanager
def local_only():
    """Inside this block the losses see this process's tensors alone (no gather): what one process computes
    by itself, such as the trainer's validation on the first process, while the others are elsewhere."""
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def is_distributed() -> bool:
    return not _LOCAL_ONLY.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


_EQUAL_SHAPES = contextvars.ContextVar("mmcontrast_equal_shapes", default=False)


@contextlib.contextmanager
def equal_shapes():
    """Inside this block the caller guarantees that every process gathers tensors of the same shape: the
    per-gather shape check (a host-device synchronisation) is skipped."""
    token = _EQUAL_SHAPES.set(True)
    try:
        yield
    finally:
        _EQUAL_SHAPES.reset(token)


def _check_same_shape(x: torch.Tensor) -> None:
    """Raise the same ValueError on every rank unless all ranks hold x of the same size."""
    if _EQUAL_SHAPES.get():
        return
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


# ---------------------------------------------------------------- measurements shared between processes


_SHARED_WORK = contextvars.ContextVar("mmcontrast_shared_work", default=False)


@contextlib.contextmanager
def shared_work():
    """Inside this block every process runs the same measurement (validation, in-loop evaluation, health) and each
    does only its part (``work_share``), the parts gathered with ``gather_parts``: a measurement on the first
    process alone would leave the others waiting in their next collective, past its timeout on a large folder.
    Outside it, or without a process group, a process does all of the work (the CLI's evaluations, and FSDP,
    whose sharded forward passes need every process on the same batches)."""
    token = _SHARED_WORK.set(True)
    try:
        yield
    finally:
        _SHARED_WORK.reset(token)


def sharing() -> tuple[int, int]:
    """``(this process's part, parts)`` of shared work: ``(rank, world size)`` inside ``shared_work``, else ``(0, 1)``."""
    if _SHARED_WORK.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def work_share(n: int) -> slice:
    """This process's contiguous part of ``n`` items (the first parts one longer when ``n`` does not divide):
    concatenated in rank order, the parts are the items in their order."""
    part, parts = sharing()
    size, extra = divmod(n, parts)
    start = part * size + min(part, extra)
    return slice(start, start + size + (part < extra))


def gather_parts(obj) -> list:
    """Every process's ``obj`` in rank order (tensors on the CPU); ``[obj]`` outside shared work."""
    _, parts = sharing()
    if parts == 1:
        return [obj]
    every: list = [None] * parts
    dist.all_gather_object(every, obj)
    return every


def gather_to_first(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Each of ``tensors`` (the same shapes on every process) concatenated over the processes, rank-major, on the
    first process; None on the others, which send theirs and keep nothing."""
    first = dist.get_rank() == 0
    out = []
    for x in tensors:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())] if first else None
        dist.gather(x.contiguous(), parts, dst=0)
        out.append(torch.cat(parts) if first else None)
    return out if first else None


def first_of_shared_work() -> bool:
    """Whether this process writes what a shared measurement decides (the first one; any process outside it)."""
    return sharing()[0] == 0


# ---------------------------------------------------------------- global BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over ranks; the backward sums the gradients the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, across every process.

    SimCLR's "global BN" (Chen et al., 2020, section 2.2): with per-process statistics the two views
    of an image, which sit on the same process, share a mean and variance the other negatives do not,
    and the model can use that to find its positive instead of learning features. Here each process
    sums ``x - shift`` and ``(x - shift)²`` per channel (``shift`` = the running mean, the same on
    every rank, which keeps the one-pass variance accurate), one differentiable all-reduce of 2C+1
    numbers makes them global, and the gradient flows back through that sum to every process.
    ``torch.nn.SyncBatchNorm`` does the same with fused kernels but only for GPU tensors, and reads a
    count on the host in every layer (a wait for the GPU per BatchNorm); this module reads nothing on the
    host, so the trainer uses it on every device. Outside training, or with one process, this is exactly
    ``nn.BatchNorm{1,2,3}d``.

    A converted timm ``BatchNormAct2d`` keeps its ``drop`` and ``act`` children, applied after the norm as
    timm does: EfficientNet, MobileNet and RegNet fuse their activations into their norms.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._normalize(x)
        for name in ("drop", "act"):  # timm's BatchNormAct2d: dropout, then the activation
            if name in self._modules:
                y = self._modules[name](y)
        return y

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        shape = (1, c) + (1,) * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least
        shift = self.running_mean.detach().to(xf.dtype) if self.running_mean is not None else xf.new_zeros(c)
        d = xf - shift.view(shape)
        count = xf.new_full((1,), float(x.numel() // c))
        totals = _AllReduceSum.apply(torch.cat([d.sum(dims), (d * d).sum(dims), count]))
        n = totals[-1].detach()
        mean_d = totals[:c] / n
        var = (totals[c : 2 * c] / n - mean_d * mean_d).clamp_min(0)  # biased, as BatchNorm normalises
        y = (d - mean_d.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.to(xf.dtype).view(shape) + self.bias.to(xf.dtype).view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_((mean_d.detach() + shift).to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm in ``module`` as a ``GlobalBatchNorm`` (global-batch statistics, on any device).
    Parameters, buffers, state-dict keys and timm's fused ``act``/``drop`` are kept, so the model computes
    what it did (in one process, or in eval) and checkpoints and exported weights are those of the plain
    model. Returns the (possibly new) root module."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():  # timm's act and drop among them
        out.add_module(name, convert_global_batchnorm(child))
    return out


def on_first_process(accelerator, make: Callable[[], object]):
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
