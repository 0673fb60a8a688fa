"""One optimizer step's forward and backward over K micro-batches, with one loss over all of them.

Owns ``step_gradients``: K = 1 is the ordinary forward, loss, backward. K > 1 (``--accum-steps``) is
gradient caching (Gao et al., 2021), which computes exactly the gradient of one loss over all K·n
samples of every process (every sample a negative for every other) at the activation memory of one
micro-batch:

1. embed every micro-batch without autograd and keep the RNG state its forward used;
2. the loss over all K·n embeddings at once (with the cross-process gather) and its gradient with
   respect to each embedding and to ``logit_scale``/``logit_bias``;
3. re-embed each micro-batch with autograd under the same RNG state (dropout, patch dropout and
   drop-path replay identically) and backpropagate its slice of that gradient.

DDP synchronises gradients on the last micro-batch only. BatchNorm buffers are restored after pass 1,
so running statistics are updated once per micro-batch, in pass 3. Does not own the optimizer step, the
learning rate or the loss itself (a ``Task``'s ``loss``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mmcontrast.tasks import Task


def bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Running statistics of the BatchNorm layers in training mode (what a forward pass changes)."""
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
    buffers = bn_buffers(model)
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


def step_gradients(accelerator, task: Task, model: nn.Module, micro: Sequence[dict],
                   no_sync: Callable | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward for one optimizer step over the micro-batches ``micro`` (K = len(micro)).

    ``accelerator`` needs ``backward(loss)``; ``no_sync(model)`` (default: Accelerate's, for DDP) is the context
    in which backward passes accumulate without synchronising. Returns the detached loss and this process's
    ``task.n_embeddings`` embedding tensors ``(K·n, d)``, for monitoring.
    """
    if len(micro) == 1:
        outputs = model(*task.inputs(micro[0]))
        loss = task.loss(outputs, _concat_labels(micro))
        accelerator.backward(loss)
        return loss.detach(), [o.detach() for o in outputs[: task.n_embeddings]]
    return _cached_step(accelerator, task, model, micro, no_sync or accelerator.no_sync)


def _cached_step(accelerator, task: Task, model: nn.Module, micro: Sequence[dict],
                 no_sync: Callable) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # (1) embed without autograd; remember each micro-batch's RNG state for the replay in (3)
    cached, rng_states = [], []
    with torch.no_grad(), _frozen_bn_statistics(model):
        for batch in micro:
            rng_states.append(_capture_rng())
            cached.append([o.detach() for o in model(*task.inputs(batch))])
    n_emb = task.n_embeddings
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
        last = j == len(micro) - 1
        sync = contextlib.nullcontext() if last else no_sync(model)
        with sync, _replayed_rng(rng_states[j]):
            outputs = model(*task.inputs(batch))
            surrogate = sum((outputs[i].float() * emb_grads[i][j]).sum() for i in range(n_emb))
            # scalars enter the loss once: their gradient rides on the last micro-batch; the others
            # multiply by zero so that every parameter takes part in every DDP backward
            for out, g in zip(outputs[n_emb:], scalar_grads):
                surrogate = surrogate + (out.float() * (g if last else torch.zeros_like(g))).sum()
            accelerator.backward(surrogate)
    return loss.detach(), [leaf.detach() for leaf in leaves]
