"""Gradient caching (``--accum-steps``) gives the gradient of one loss over all micro-batches."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import PatchDropout

from mmcontrast import models
from mmcontrast.gradcache import step_gradients
from mmcontrast.models import SimclrModel
from mmcontrast.tasks import Task, clip_task, simclr_task


class _SingleProcess:
    """The slice of Accelerate's API that step_gradients uses, for one process without scaling."""

    num_processes = 1

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        import contextlib

        return contextlib.nullcontext()


def _clip_task(dropout: float) -> Task:
    bundle = models.create_clip("mmc-tiny")
    model = bundle.model.double()
    if dropout:
        model.visual.patch_dropout = PatchDropout(dropout)
    return clip_task(model, bundle.tokenizer, loss_name="clip", clip_mode="plain")


def _simclr_task(dropout: float, loss_name: str = "nt_xent") -> Task:
    encoder = models.ImageEncoder(models.image_encoder_spec("mmc-tiny", {}, False))
    if dropout:
        encoder.backbone.patch_dropout = PatchDropout(dropout)
    model = SimclrModel(encoder, 32, 16, batchnorm=False).double()
    return simclr_task(model, loss_name=loss_name, temperature=0.2)


def _batches(mode: str, n: int, k: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    if mode == "clip":
        full = {"image": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), "text": torch.randint(1, 400, (n, 16), generator=g)}
    else:
        full = {
            "view1": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
            "view2": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
            "label": torch.randint(0, 5, (n,), generator=g),
        }
    return [{key: v[i * (n // k) : (i + 1) * (n // k)] for key, v in full.items()} for i in range(k)]


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _reference_grads(task: Task, micro: list[dict], seed: int) -> tuple[torch.Tensor, dict]:
    """Plain autograd through every micro-batch's forward (the memory gradient caching saves)."""
    task.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    outs = [task.model(*task.inputs(b)) for b in micro]
    n_emb = task.n_embeddings
    merged = [torch.cat([o[i] for o in outs]) for i in range(n_emb)] + list(outs[0][n_emb:])
    labels = torch.cat([b["label"] for b in micro]) if "label" in micro[0] else None
    loss = task.loss(merged, labels)
    loss.backward()
    return loss.detach(), _grads(task.model)


def _cached_grads(task: Task, micro: list[dict], seed: int) -> tuple[torch.Tensor, dict]:
    task.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, _ = step_gradients(_SingleProcess(), task, task.model, micro)
    return loss, _grads(task.model)


def _assert_same(ref: dict, got: dict, tol: float = 1e-6) -> None:
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=tol, atol=tol, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("mode", ["clip", "simclr"])
def test_k4_equals_one_big_batch_without_randomness(mode):
    torch.manual_seed(0)
    task = _clip_task(0.0) if mode == "clip" else _simclr_task(0.0)
    task.model.train()
    micro = _batches(mode, 64, 4)
    big = [{k: torch.cat([m[k] for m in micro]) for k in micro[0]}]
    loss_big, ref = _cached_grads(task, big, seed=1)  # K=1: the ordinary path on batch 64
    loss_k4, got = _cached_grads(task, micro, seed=1)
    torch.testing.assert_close(loss_k4, loss_big, rtol=1e-10, atol=1e-10)
    _assert_same(ref, got)
    if mode == "clip":
        assert "logit_scale" in got and got["logit_scale"].abs() > 0


@pytest.mark.parametrize("mode,loss_name", [("clip", "clip"), ("simclr", "nt_xent"), ("simclr", "supcon")])
def test_k4_replays_dropout_exactly(mode, loss_name):
    torch.manual_seed(0)
    task = _clip_task(0.5) if mode == "clip" else _simclr_task(0.5, loss_name)
    task.model.train()
    micro = _batches(mode, 64, 4)
    loss_ref, ref = _reference_grads(task, micro, seed=3)
    loss_got, got = _cached_grads(task, micro, seed=3)
    torch.testing.assert_close(loss_got, loss_ref, rtol=1e-10, atol=1e-10)
    _assert_same(ref, got)
    # the test has teeth: another dropout draw gives other gradients
    _, other = _reference_grads(task, micro, seed=4)
    name = next(n for n in ref if n.endswith("conv1.weight"))
    assert not torch.allclose(other[name], ref[name], atol=1e-6)


def test_batchnorm_running_stats_updated_once_per_micro_batch():
    torch.manual_seed(0)
    encoder = models.ImageEncoder(models.image_encoder_spec("mmc-tiny", {}, False))
    task = simclr_task(SimclrModel(encoder, 32, 16, batchnorm=True).double(), loss_name="nt_xent", temperature=0.2)
    task.model.train()
    micro = _batches("simclr", 32, 4)
    bn = task.model.head[1]
    step_gradients(_SingleProcess(), task, task.model, micro)
    assert int(bn.num_batches_tracked) == 4  # pass 3 only; pass 1 left the statistics untouched


@pytest.mark.parametrize("mode", ["clip", "simclr"])
def test_k4_with_ema_on_steps_and_averages_as_one_big_batch(mode):
    """train.ema_decay with gradient caching: three optimizer steps over 4 micro-batches each leave the weights and
    their moving average that three steps over the concatenated batches do."""
    from accelerate import Accelerator

    from mmcontrast.ema import WeightEma
    from mmcontrast.optim import build_optimizer
    from mmcontrast.train import train_step

    accelerator, ends = Accelerator(cpu=True), []
    for k in (1, 4):
        torch.manual_seed(0)
        task = _clip_task(0.0) if mode == "clip" else _simclr_task(0.0)
        task.model.train()
        optimizer = build_optimizer(task.model, "adamw", 1e-3, 0.1, [0.9, 0.98], 1e-6, 0.9)
        ema = WeightEma(task.model, decay=0.5, warmup=False)
        for step in range(3):
            micro = _batches(mode, 32, 4, seed=step)
            micro = micro if k == 4 else [{key: torch.cat([m[key] for m in micro]) for key in micro[0]}]
            train_step(accelerator, task, task.model, optimizer, micro, grad_clip=1.0, ema=ema, step=step)
        ends.append((dict(zip(ema.names, ema.average)), dict(task.model.named_parameters())))
    (average_big, weights_big), (average_k4, weights_k4) = ends
    _assert_same({n: p.detach() for n, p in weights_big.items()}, {n: p.detach() for n, p in weights_k4.items()})
    _assert_same(average_big, average_k4)
    name = next(n for n in average_big if n.endswith("conv1.weight"))
    assert not torch.allclose(average_k4[name], weights_k4[name])  # the average is not the weights


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    task = _clip_task(0.0)
    ddp = DDP(task.model)

    class _DDPAccelerator(_SingleProcess):
        num_processes = world

        def no_sync(self, model):
            return model.no_sync()

    micro = _batches("clip", 64, 8)[rank * 4 : (rank + 1) * 4]  # this rank's half: 4 micro-batches of 8
    torch.manual_seed(1)
    loss, _ = step_gradients(_DDPAccelerator(), task, ddp, micro)
    torch.save({"loss": loss, "grads": _grads(task.model)}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_with_k4_equal_one_process_on_the_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    task = _clip_task(0.0)
    task.model.train()
    big = [{k: torch.cat([m[k] for m in _batches("clip", 64, 8)]) for k in ("image", "text")}]
    loss, ref = _cached_grads(task, big, seed=1)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss, rtol=1e-10, atol=1e-10)
        _assert_same(ref, got["grads"])  # DDP's average of the ranks' gradients is the full-batch gradient
