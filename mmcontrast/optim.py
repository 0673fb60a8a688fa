"""Optimisers and learning-rate schedules for contrastive training.

Owns: parameter groups (no weight decay on biases, norm gains, embeddings' gains, ``logit_scale``
and ``logit_bias``, as CLIP does; learning-rate multipliers per kind of parameter and per layer, and the
table of what each gets), AdamW, LARS (SimCLR's optimiser, with the same exclusions from
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
                 kind_of: Callable[[str], str] | None = None, layer_decay: float = 1.0,
                 depth_of: Callable[[str], int] | None = None) -> list[dict]:
    """Groups by weight decay (none for ``_no_decay`` tensors) and by learning-rate multiplier, the group's
    ``lr_scale`` (``set_lr`` multiplies the scheduled learning rate by it): ``lr_scale[kind_of(name)]`` per kind of
    parameter (``image``, ``text``, ``logit_scale``, ``head``: the task knows) times ``layer_decay ** depth_of(name)``,
    the depth below the top of its tower (``models.layer_depths``). Tensors with equal multipliers share a group."""
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((_no_decay(name, param), lr_multiplier(name, lr_scale, kind_of, layer_decay, depth_of)), []).append(param)
    return [{"params": params, "weight_decay": 0.0 if excluded else weight_decay, "lars_exclude": excluded, "lr_scale": scale}
            for (excluded, scale), params in sorted(groups.items(), key=lambda item: (item[0][0], -item[0][1]))]


def lr_multiplier(name: str, lr_scale: dict | None, kind_of: Callable[[str], str] | None, layer_decay: float = 1.0,
                  depth_of: Callable[[str], int] | None = None) -> float:
    """What parameter ``name``'s learning rate is multiplied by: its kind's ``lr_scale`` times ``layer_decay`` to
    the power of its depth (see ``param_groups``)."""
    scale = float(lr_scale.get(kind_of(name), 1.0)) if kind_of and lr_scale else 1.0
    if layer_decay != 1.0 and depth_of is not None:
        scale *= layer_decay ** depth_of(name)
    return scale


def lr_table(model: nn.Module, optimizer: torch.optim.Optimizer, kind_of: Callable[[str], str],
             depth_of: Callable[[str], int] | None = None) -> list[dict]:
    """What the optimizer gives each kind and depth of parameter: rows ``{kind, depth, tensors, params, lr,
    weight_decay}`` (``lr``: the group's current ``lr``; after ``set_lr(optimizer, lr, 1.0)`` the peak),
    read from the optimizer's groups, top of each tower first."""
    group_of = {id(p): g for g in getattr(optimizer, "optimizer", optimizer).param_groups for p in g["params"]}
    rows: dict[tuple[str, int], dict] = {}
    for name, param in model.named_parameters():
        group = group_of.get(id(param))
        if group is None:  # frozen (a locked tower)
            continue
        kind, depth = kind_of(name), depth_of(name) if depth_of else 0
        row = rows.setdefault((kind, depth), {"kind": kind, "depth": depth, "tensors": 0, "params": 0, "lr": set(), "weight_decay": set()})
        row["tensors"] += 1
        row["params"] += param.numel()
        row["lr"].add(group["lr"])
        row["weight_decay"].add(group["weight_decay"])
    for row in rows.values():
        row["lr"] = row["lr"].pop() if len(row["lr"]) == 1 else sorted(row["lr"])
        row["weight_decay"] = sorted(row["weight_decay"])
    return [rows[key] for key in sorted(rows)]


def format_lr_table(rows: list[dict]) -> str:
    """``lr_table``'s rows as aligned text, one line per kind and depth."""
    lines = [f"{'kind':<12} {'depth':>5} {'tensors':>7} {'params':>11} {'peak lr':>10}  weight decay"]
    for r in rows:
        lr = r["lr"] if isinstance(r["lr"], list) else [r["lr"]]
        lines.append(f"{r['kind']:<12} {r['depth']:>5} {r['tensors']:>7} {r['params']:>11,} {'/'.join(f'{x:.3g}' for x in lr):>10}  "
                     + "/".join(f"{w:g}" for w in r["weight_decay"]))
    return "\n".join(lines)


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


def depths_for(task, layer_decay: float) -> Callable[[str], int] | None:
    """Parameter name -> depth below its tower's top (``models.layer_depths``) when ``optim.layer_decay`` is on, else
    None; read off the model before it is sharded."""
    if layer_decay == 1.0:
        return None
    from mmcontrast.models import layer_depths

    return layer_depths(task.model, task.param_kind).__getitem__


def optimizer_for(task, o) -> torch.optim.Optimizer:
    """The optimizer the run's config (``o``: ``config.OptimConfig``) asks for over ``task.model``, with the task's
    kinds of parameter and their depths (``task.param_depth``, from ``depths_for``)."""
    return build_optimizer(task.model, o.name, o.lr, o.weight_decay, o.betas, o.eps, o.momentum, o.lr_scale, task.param_kind,
                           o.layer_decay, task.param_depth)


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas: list, eps: float, momentum: float,
                    lr_scale: dict | None = None, kind_of: Callable[[str], str] | None = None, layer_decay: float = 1.0,
                    depth_of: Callable[[str], int] | None = None):
    """AdamW (torch's fused kernel: fastest on GPUs, and it skips a step on the device when its ``found_inf``
    attribute is set) or LARS, with ``param_groups`` (``lr_scale``/``kind_of``: per-kind learning rates;
    ``layer_decay``/``depth_of``: layer-wise ones)."""
    groups = _one_kind_per_group(param_groups(model, weight_decay, lr_scale, kind_of, layer_decay, depth_of))
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
