"""FSDP2: the model's parameters, gradients and optimizer state sharded across processes (``train.fsdp``).

Owns the one code path that runs on NCCL and gloo alike — torch's own ``fully_shard``. (Accelerate's FSDP
plugin needs CUDA, and with ``--cpu`` falls back to DDP.) It covers:

* ``shard``: every repeated block (transformer layers, ResNet blocks, timm stages and the blocks inside them,
  innermost first), then the whole model, each with a mixed-precision policy from ``train.mixed_precision``
  (compute in bf16, reduce in float32); BatchNorm layers in float32 (their running statistics are float32
  buffers, which no policy casts); the methods measurements call outside ``forward`` (``encode_image``,
  ``encode_text``, on the model or on a tower such as SimCLR's encoder) take FSDP's forward hooks too;
* the scalars (``logit_scale``, ``logit_bias``): FSDP2 cannot shard 0-dim parameters, so they stay
  whole on every process, and ``reduce_unsharded_gradients`` averages their gradients as DDP would;
* ``clip_grad_norm_`` over sharded and whole parameters together;
* ``param_groups_by_kind``: sharded and whole parameters are never mixed in one group of the fused optimizer;
* ``gradient_sync``: gradient caching's no-sync: one reduce-scatter per optimizer step;
* sharded checkpoints (``torch.distributed.checkpoint``: each process writes its shard, and a resume on
  the same number of processes reads it back);
* ``full_state_dict``: the unsharded weights for the export, gathered to the first process on the CPU.

Does not own when any of this happens (the loop) or the checkpoint directory's layout (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SHARDED_STATE_DIR = "sharded"  # the model and optimizer shards inside a checkpoint directory
_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def _post_order(module: nn.Module):
    """``module``'s submodules, each after all of its own (``nn.Module.modules()`` is pre-order)."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: each child of a ``ModuleList`` (open_clip and HuggingFace
    transformer layers), and of an ``nn.Sequential`` whose children are all of one class (timm blocks, ResNet
    stages), when it holds parameters. Every block comes after the blocks inside it (timm's stages of blocks):
    ``fully_shard`` must wrap a module's sharded children before the module."""
    found = []
    for module in _post_order(model):
        children = list(module.children())
        repeated = isinstance(module, nn.ModuleList) or (
            isinstance(module, nn.Sequential) and len(children) > 1 and len({type(c) for c in children}) == 1)
        if repeated:
            found += [c for c in children if any(True for _ in c.parameters()) and not _is_batchnorm(c)]
    return found


FORWARD_METHODS = ("encode_image", "encode_text")  # what health, in-loop evaluation and validation call


def towers(model: nn.Module) -> list[nn.Module]:
    """Submodules other than the root with a ``FORWARD_METHODS`` method (SimCLR's image encoder): sharded as
    their own unit, so that calling the method gathers their parameters."""
    return [m for m in _post_order(model) if m is not model and any(hasattr(m, name) for name in FORWARD_METHODS)]


def scalar_parameters(model: nn.Module) -> set[nn.Parameter]:
    """0-dim parameters (``logit_scale``, ``logit_bias``): FSDP2 leaves them whole on every process."""
    return {p for p in model.parameters() if p.dim() == 0}


def _contiguous_parameters(model: nn.Module) -> None:
    """``fully_shard`` refuses parameters in another memory format (channels-last convolution weights on
    CUDA). Sharding loses it anyway — the gathered parameters are contiguous — and convolutions still run
    channels-last, because their inputs are."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()


def shard(model: nn.Module, device: torch.device, mixed_precision: str) -> nn.Module:
    """``fully_shard`` ``model``'s BatchNorms, blocks and towers, then the model, across all processes; returns
    the (same) model.

    BatchNorm layers keep float32 parameters, and take their inputs as they come (bf16 under ``bf16``): their
    running statistics are float32 buffers, and ``batch_norm`` wants its weight and statistics in one dtype.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=_PRECISION[mixed_precision], reduce_dtype=torch.float32)
    float32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    model.to(device)
    _contiguous_parameters(model)
    for norm in [m for m in model.modules() if _is_batchnorm(m) and any(True for _ in m.parameters())]:
        fully_shard(norm, mesh=mesh, mp_policy=float32)
    units = blocks(model)
    units += [t for t in towers(model) if t not in units]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalar_parameters(model))
    for module in (model, *towers(model)):
        for name in FORWARD_METHODS:
            if hasattr(module, name):
                register_fsdp_forward_method(module, name)
    return model


def param_groups_by_kind(groups: list[dict]) -> list[dict]:
    """Each optimizer group split into its sharded (DTensor) and whole parameters: one fused kernel per kind."""
    DTensor = _dtensor()
    out = []
    for group in groups:
        for kind in (True, False):
            params = [p for p in group["params"] if isinstance(p, DTensor) == kind]
            if params:
                out.append({**group, "params": params})
    return out


def reduce_unsharded_gradients(model: nn.Module) -> None:
    """Average the gradients of the parameters left whole across processes, as DDP does for every parameter."""
    for p in scalar_parameters(model):
        if p.grad is not None:
            dist.all_reduce(p.grad)  # a sum (gloo has no average)
            p.grad.div_(dist.get_world_size())


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm over sharded and whole parameters (a plain 0-dim tensor, on the device), after
    scaling the gradients to at most ``max_norm`` when it is positive. No host synchronisation."""
    DTensor = _dtensor()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    squares = [torch.nn.utils.get_total_norm(sharded).full_tensor() ** 2] if sharded else []
    squares += [torch.nn.utils.get_total_norm(whole) ** 2] if whole else []
    norm = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
    return norm


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Within the block, backward passes of a sharded model accumulate without reduce-scattering (unless ``enabled``)."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shard of the model and optimizer state into ``folder/sharded`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / SHARDED_STATE_DIR))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read ``save_sharded``'s files back into the sharded model and optimizer (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder / SHARDED_STATE_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on the first process, on the CPU, in the model's own key layout (collective; the
    other processes get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
