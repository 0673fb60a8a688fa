"""Optimisers and learning-rate schedules for contrastive training.

Owns: parameter groups (no weight decay on biases, norm gains, embeddings' gains, ``logit_scale``
and ``logit_bias``, as CLIP does), AdamW, LARS (SimCLR's optimiser, with the same exclusions from
both weight decay and the trust ratio), and the warmup + cosine schedule. The schedule is a pure
function of the optimizer step, so resuming needs nothing but that step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """1-D tensors (biases, norm gains, logit scale/bias) and embeddings' gains get no weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf in ("logit_scale", "logit_bias", "positional_embedding", "class_embedding", "cls_token", "pos_embed")


def param_groups(model: nn.Module, weight_decay: float, lr_scale: dict | None = None,
                 kind_of: Callable[[str], str] | None = None) -> list[dict]:
    """Groups by weight decay (none for ``_no_decay`` tensors) and, with ``lr_scale``, by kind of parameter:
    ``kind_of(name)`` names it (``image``, ``text``, ``logit_scale``, ``head``: the task knows) and the group's
    ``lr_scale`` multiplies the scheduled learning rate (``set_lr``)."""
    lr_scale = lr_scale or {}
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = float(lr_scale.get(kind_of(name), 1.0)) if kind_of and lr_scale else 1.0
        groups.setdefault((_no_decay(name, param), scale), []).append(param)
    return [{"params": params, "weight_decay": 0.0 if excluded else weight_decay, "lars_exclude": excluded, "lr_scale": scale}
            for (excluded, scale), params in sorted(groups.items(), key=lambda item: (item[0][0], -item[0][1]))]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017) as used by SimCLR.

    SGD with momentum whose per-tensor step is scaled by ``trust · ‖w‖ / ‖g + wd·w‖``; groups with
    ``lars_exclude`` (biases, norms) take plain momentum SGD without decay or adaptation. Like torch's
    fused optimizers, a ``found_inf`` tensor attribute (non-zero: skip) skips the step on the device.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else (found_inf == 0)  # 0-dim bool on the device: no host sync
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                old = state.get("momentum_buffer")
                new = grad.detach().clone() if old is None else old * group["momentum"] + grad
                old = torch.zeros_like(p) if old is None else old
                if keep is not None:
                    new = torch.where(keep, new, old)
                state["momentum_buffer"] = new
                update = new if keep is None else new * keep
                p.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas: list, eps: float, momentum: float,
                    lr_scale: dict | None = None, kind_of: Callable[[str], str] | None = None):
    """AdamW (torch's fused kernel: fastest on GPUs, and it skips a step on the device when its ``found_inf``
    attribute is set) or LARS, with ``param_groups`` (``lr_scale``/``kind_of``: per-kind learning rates)."""
    groups = _one_kind_per_group(param_groups(model, weight_decay, lr_scale, kind_of))
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars_exclude")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)


def _one_kind_per_group(groups: list[dict]) -> list[dict]:
    """A sharded model (FSDP2) has sharded (DTensor) and whole parameters; a fused kernel takes one kind."""
    from mmcontrast.sharding import param_groups_by_kind

    if any(type(p).__name__ == "DTensor" for g in groups for p in g["params"]):
        return param_groups_by_kind(groups)
    return groups


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay that reaches ``min_ratio`` on the last step.

    ``step`` counts from 0, so the last of ``total_steps`` steps is ``total_steps - 1``: its update is made
    with the schedule's final value, and no part of the schedule is cut off.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Every group's lr = ``base_lr × factor × its lr_scale``; returns the unscaled ``base_lr × factor`` (logged)."""
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
