"""Two CPU processes (gloo) see the global batch: losses and gradients equal the single-process ones.

One spawn of two ranks computes every case and saves what it got; the tests compare that with the
same functions run in this (non-distributed) process on the concatenated batch. The convention
checked is the one in ``mmcontrast.distributed``: the mean over ranks of the returned loss is the
global loss, the gradient reaching a rank's features is world_size × the single-process gradient
of its slice, and scalar parameters (logit_scale, bias) average to the single-process gradient, so
DDP's averaging gives every parameter exactly the single-process gradient.
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mmcontrast.losses import CLIP_LOSS_MODES, clip_loss, nt_xent_loss, siglip_loss, supcon_loss

WORLD = 2
N_LOCAL = 5  # rows per rank; the chunked mode tiles them 2 at a time
DIM = 6
CHUNK = 2 * WORLD * N_LOCAL  # elements per tile: 2 rows of the global batch
TOL = {"rtol": 1e-7, "atol": 1e-10}  # float64
SPAWN_DEADLINE_S = 120


def global_inputs() -> dict[str, torch.Tensor]:
    """The global batch, identical in every process (seeded)."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * N_LOCAL

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "img": F.normalize(randn(n, DIM), dim=-1),
        "txt": F.normalize(randn(n, DIM), dim=-1),
        "scale": torch.tensor(1 / 0.07, dtype=torch.float64),
        "bias": torch.tensor(-3.0, dtype=torch.float64),
        "z1": randn(n, DIM),
        "z2": randn(n, DIM),
        # 2-D SupCon: classes that span both ranks, and two loners (7, 8) without a positive, both on
        # rank 0, so the ranks hold 3 and 5 anchors: a per-rank mean would weigh them wrongly
        "features": randn(n, DIM),
        "labels": torch.tensor([0, 1, 7, 8, 1, 0, 2, 1, 2, 0]),
        # (n, 2, d) SupCon: labels with three samples each, split across ranks
        "views": randn(n, 2, DIM),
        "view_labels": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3]),
        "x_image": randn(n, 7),  # inputs of the tiny DDP encoders
        # two views for the BatchNorm encoder, off-centre so the running-mean shift matters
        "bn_view1": randn(n, 2, 3, 3) * 2 + 5,
        "bn_view2": randn(n, 2, 3, 3) * 2 + 5,
        "x_text": randn(n, 4),
    }


def loss_cases() -> dict[str, tuple]:
    """name -> (loss function, names of its tensor inputs, names of the per-sample inputs)."""
    cases = {
        f"clip-{mode}": (
            lambda img, txt, scale, mode=mode: clip_loss(img, txt, scale, mode=mode, chunk_elements=CHUNK),
            ("img", "txt", "scale"),
        )
        for mode in CLIP_LOSS_MODES
    }
    cases["siglip"] = (siglip_loss, ("img", "txt", "scale", "bias"))
    cases["nt_xent"] = (lambda z1, z2: nt_xent_loss(z1, z2, temperature=0.2), ("z1", "z2"))
    cases["supcon-2d"] = (lambda features, labels: supcon_loss(features, labels, 0.2), ("features", "labels"))
    cases["supcon-views"] = (lambda views, view_labels: supcon_loss(views, view_labels, 0.2), ("views", "view_labels"))
    return cases


def run_case(name: str, inputs: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """Loss and gradients of one case on ``rows`` of the per-sample inputs (all rows when single)."""
    fn, names = loss_cases()[name]
    args = []
    for key in names:
        x = inputs[key].clone()
        if x.dim() > 0:
            x = x[rows]
        if x.is_floating_point():
            x.requires_grad_()
        args.append(x)
    loss = fn(*args)
    loss.backward()
    out = {"loss": loss.detach()}
    out.update({key: x.grad for key, x in zip(names, args) if x.grad is not None})
    return out


class TinyClip(nn.Module):
    """Linear image and text 'towers' and a learnable temperature: the smallest CLIP there is."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(7, DIM)
        self.text = nn.Linear(4, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_image: torch.Tensor, x_text: torch.Tensor):
        img = F.normalize(self.image(x_image), dim=-1)
        txt = F.normalize(self.text(x_text), dim=-1)
        return img, txt, self.logit_scale.exp()


def tiny_clip() -> TinyClip:
    torch.manual_seed(0)
    return TinyClip().double()


def train_step_grads(model: nn.Module, inputs: dict[str, torch.Tensor], rows: slice, mode: str):
    """One forward/backward of clip_loss; returns the loss and every parameter's gradient."""
    img, txt, scale = model(inputs["x_image"][rows], inputs["x_text"][rows])
    loss = clip_loss(img, txt, scale, mode=mode, chunk_elements=CHUNK)
    loss.backward()
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {"loss": loss.detach(), **{name: p.grad.clone() for name, p in module.named_parameters()}}


class TinyBnEncoder(nn.Module):
    """Conv–BN2d–ReLU–Linear–BN1d: a SimCLR-style encoder whose BatchNorms see both views together."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, DIM), nn.BatchNorm1d(DIM)
        )

    def forward(self, view1: torch.Tensor, view2: torch.Tensor):
        z = self.net(torch.cat([view1, view2]))
        return z[: view1.shape[0]], z[view1.shape[0] :]


def tiny_bn_encoder() -> TinyBnEncoder:
    torch.manual_seed(0)
    return TinyBnEncoder().double()


def bn_step(model: nn.Module, inputs: dict[str, torch.Tensor], rows: slice):
    """Two training steps' forward/backward of NT-Xent (gradients of the first, BN buffers after both)."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    z1, z2 = model(inputs["bn_view1"][rows], inputs["bn_view2"][rows])
    loss = nt_xent_loss(z1, z2, temperature=0.2)
    loss.backward()
    out = {"loss": loss.detach(), **{name: p.grad.clone() for name, p in module.named_parameters()}}
    with torch.no_grad():  # a second forward: running statistics move from non-zero values (the shift)
        model(inputs["bn_view1"][rows] * 0.5, inputs["bn_view2"][rows] - 1)
    out.update({name: b.clone() for name, b in module.named_buffers()})
    return out


def global_bn_step(inputs: dict[str, torch.Tensor], rows: slice) -> None:
    """A forward and backward through ``GlobalBatchNorm`` layers alone (no loss, whose gathers are another matter)."""
    from mmcontrast.distributed import convert_global_batchnorm

    z1, z2 = convert_global_batchnorm(tiny_bn_encoder())(inputs["bn_view1"][rows], inputs["bn_view2"][rows])
    (z1.sum() + z2.square().sum()).backward()


def host_reads(fn) -> int:
    """How many times ``fn()`` read a tensor's value on the host (on a GPU each read waits for the device)."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    reads = []

    def counting(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return saved[name](self, *args, **kwargs)

        return read

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        fn()
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
    return len(reads)


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        inputs = global_inputs()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        results = {name: run_case(name, inputs, rows) for name in loss_cases()}
        for mode in CLIP_LOSS_MODES:
            ddp = nn.parallel.DistributedDataParallel(tiny_clip())
            results[f"ddp-{mode}"] = train_step_grads(ddp, inputs, rows, mode)
        from mmcontrast.distributed import convert_global_batchnorm

        global_bn = nn.parallel.DistributedDataParallel(convert_global_batchnorm(tiny_bn_encoder()))
        results["bn-global"] = bn_step(global_bn, inputs, rows)
        results["bn-local"] = bn_step(nn.parallel.DistributedDataParallel(tiny_bn_encoder()), inputs, rows)
        results["bn-host-reads"] = host_reads(lambda: global_bn_step(inputs, rows))
        # The trainer's gathers (equal shapes guaranteed) read nothing on the host: no pipeline stall on GPUs.
        from mmcontrast.distributed import equal_shapes

        tolist = torch.Tensor.tolist
        torch.Tensor.tolist = lambda self: (_ for _ in ()).throw(AssertionError("host read in a trusted gather"))
        try:
            with equal_shapes():
                results["trusted"] = run_case("clip-plain", inputs, rows)
        finally:
            torch.Tensor.tolist = tolist
        # Uneven batches: every rank must get the same clear error, not a hang or garbage.
        uneven = inputs["img"][: N_LOCAL + rank]
        try:
            clip_loss(uneven, uneven, inputs["scale"])
            results["uneven"] = "no error"
        except ValueError as err:
            results["uneven"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of the two ranks computed (one spawn for the whole module)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    context = mp.start_processes(
        _rank_main, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two gloo ranks did not finish within {SPAWN_DEADLINE_S} s (a collective hung)")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(loss_cases()))
def test_two_ranks_match_one_process_on_the_concatenated_batch(ranks: list[dict], name: str) -> None:
    single = run_case(name, global_inputs(), slice(None))
    per_rank = [r[name] for r in ranks]
    torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), single["loss"], **TOL)
    for key, want in single.items():
        if key == "loss":
            continue
        if want.dim() == 0:  # logit_scale, bias: DDP averages them
            torch.testing.assert_close(torch.stack([r[key] for r in per_rank]).mean(), want, **TOL)
        else:  # per-sample features: world_size × the single-process gradient of this rank's slice
            for rank, got in enumerate(per_rank):
                rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
                torch.testing.assert_close(got[key], WORLD * want[rows], **TOL)


@pytest.mark.parametrize("mode", CLIP_LOSS_MODES)
def test_ddp_training_step_gives_single_process_parameter_gradients(ranks: list[dict], mode: str) -> None:
    single = train_step_grads(tiny_clip(), global_inputs(), slice(None), mode)
    per_rank = [r[f"ddp-{mode}"] for r in ranks]
    torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), single["loss"], **TOL)
    for key, want in single.items():
        if key != "loss":
            for got in per_rank:
                torch.testing.assert_close(got[key], want, **TOL)
    assert single["image.weight"].abs().sum() > 0


def test_gathers_inside_equal_shapes_give_the_same_loss_without_host_reads(ranks: list[dict]) -> None:
    for r in ranks:  # the rank computed it with tolist() raising
        torch.testing.assert_close(r["trusted"]["loss"], r["clip-plain"]["loss"], **TOL)
        torch.testing.assert_close(r["trusted"]["img"], r["clip-plain"]["img"], **TOL)


def test_uneven_batches_raise_the_same_clear_error_on_every_rank(ranks: list[dict]) -> None:
    messages = [r["uneven"] for r in ranks]
    assert messages[0] == messages[1]
    assert "same batch" in messages[0] and "[5, 6]" in messages[0] and "drop_last" in messages[0]


def test_global_batchnorm_on_two_ranks_is_batchnorm_on_the_concatenated_batch(ranks: list[dict]) -> None:
    single = bn_step(tiny_bn_encoder(), global_inputs(), slice(None))
    per_rank = [r["bn-global"] for r in ranks]
    torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), single["loss"], **TOL)
    for got in per_rank:
        assert got.keys() == single.keys()  # the same state-dict names as the plain model
        for key in single.keys() - {"loss"}:  # every parameter gradient, running mean/var, batch count
            torch.testing.assert_close(got[key], single[key], **TOL, msg=key)
    # what the conversion is for: per-process statistics give another loss and other gradients
    local = [r["bn-local"] for r in ranks]
    assert abs(torch.stack([r["loss"] for r in local]).mean() - single["loss"]) > 1e-3
    assert not torch.allclose(local[0]["net.1.running_mean"], single["net.1.running_mean"])


def test_global_batchnorm_is_plain_batchnorm_in_one_process_and_in_eval() -> None:
    from mmcontrast.distributed import GlobalBatchNorm, convert_global_batchnorm

    plain = tiny_bn_encoder()
    converted = convert_global_batchnorm(tiny_bn_encoder())
    assert sum(isinstance(m, GlobalBatchNorm) for m in converted.modules()) == 2
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    inputs = global_inputs()
    want, got = bn_step(plain, inputs, slice(None)), bn_step(converted, inputs, slice(None))
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=key)
    plain.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(inputs["bn_view1"], inputs["bn_view2"]), plain(inputs["bn_view1"], inputs["bn_view2"]))


def test_global_batchnorm_reads_nothing_on_the_host(ranks: list[dict]) -> None:
    """A training step's all-reduce BatchNorm on two processes waits for no device value: torch's SyncBatchNorm
    does, in every layer, which is why the trainer uses this one on CUDA too."""
    assert [r["bn-host-reads"] for r in ranks] == [0, 0]


def test_the_trainer_gives_cuda_processes_the_all_reduce_batchnorm(monkeypatch) -> None:
    """On CUDA with several processes the model's BatchNorms become ``GlobalBatchNorm``, not torch's SyncBatchNorm."""
    from types import SimpleNamespace

    import accelerate.utils

    from mmcontrast.config import load_config, set_value, validate
    from mmcontrast.distributed import GlobalBatchNorm
    from mmcontrast.train import _set_up_model

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "configs" / "simclr_tiny_cpu.yaml"))
    set_value(cfg, "train.output_dir", "unused")
    set_value(cfg, "data.train_shards", "unused")
    validate(cfg)
    monkeypatch.setattr(accelerate.utils, "set_seed", lambda seed, device_specific=False: torch.manual_seed(seed))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # the set-up turns them on for CUDA
    try:
        task, _, _ = _set_up_model(cfg, SimpleNamespace(num_processes=2, device=torch.device("cuda")))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert any(isinstance(m, GlobalBatchNorm) for m in task.model.modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in task.model.modules())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenetv3_small_050"])
def test_global_batchnorm_keeps_timms_fused_activations(name: str) -> None:
    """timm's BatchNormAct2d holds an activation (and dropout) inside the norm; the converted model computes what
    the original does, in training (one process) and in eval, and keeps its state-dict keys."""
    import copy

    import timm

    from mmcontrast.distributed import GlobalBatchNorm, convert_global_batchnorm

    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=0)
    converted = convert_global_batchnorm(copy.deepcopy(plain))
    assert any(isinstance(m, GlobalBatchNorm) for m in converted.modules())
    assert converted.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain(x))  # training: batch statistics, running ones updated
        plain.eval()
        converted.eval()
        torch.testing.assert_close(converted(x), plain(x))
