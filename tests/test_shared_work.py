"""Measurements shared between processes (issue 22, defect 7 and the scale items): each of 2 gloo ranks encodes its
part and the gathered result is the one-process result; a slow measurement no longer outlasts a short collective
timeout; the first process counts the shards alone; checkpoint files are hashed by every process, once each.

One spawn of two ranks computes the shared measurements and saves what it got; the tests compare that with the
same functions in this (single) process.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import write_colour_folders

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
SLOW_S = 0.1  # seconds per image of the slow encoder
TIMEOUT_S = 5.0  # the collective timeout of the slow-measurement runs: above half the slow work, below all of it


class MeanColour(nn.Module):
    """An image encoder with something to learn nothing from: the mean colour and its square, (b, 6)."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.delay = delay

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        time.sleep(self.delay * len(images))
        mean = images.mean(dim=(2, 3))
        return torch.cat([mean, mean**2], dim=1) * self.scale


def preprocess(image):
    import torchvision.transforms.functional as TF

    return TF.to_tensor(image)


def folders(root: Path) -> tuple[Path, Path]:
    return write_colour_folders(root / "train", 5, seed=2), write_colour_folders(root / "test", 3, seed=1)


def held_out_batches(part: slice | None = None) -> list[dict]:
    """Six batches of 4 samples, keys out of order; ``part``: a process's share of the samples."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 8, generator=g), torch.randn(24, 8, generator=g)
    keys = [f"{(7 * i) % 24:03d}" for i in range(24)]
    rows = range(24)[part] if part is not None else range(24)
    rows = list(rows)
    return [{"a": x[rows[i : i + 4]], "b": y[rows[i : i + 4]], "__key__": [keys[j] for j in rows[i : i + 4]]}
            for i in range(0, len(rows), 4)]


def identity_model(a, b):
    return a, b, torch.tensor(10.0)


def clip_loss(outputs, labels):
    from mmcontrast.losses import clip_loss as loss

    return loss(outputs[0], outputs[1], outputs[2])


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, a, b):
        return identity_model(a, b)


def measure(root: Path) -> dict:
    """Everything the ranks share, computed by whoever calls it (every rank inside shared_work, or one process)."""
    from mmcontrast.diagnostics import batch_health
    from mmcontrast.distributed import local_only, work_share
    from mmcontrast.evaluate import encode_images, knn_top1
    from mmcontrast.heldout import held_out_metrics

    train_dir, test_dir = root / "train", root / "test"
    encoder = MeanColour()
    paths = sorted(train_dir.rglob("*.png"))
    encoded = encode_images(encoder, preprocess, paths, batch_size=4, workers=0)
    knn = knn_top1(encoder, preprocess, train_dir, test_dir)
    batch = {"view1": torch.randn(10, 6, generator=torch.Generator().manual_seed(1)), "__key__": [str(i) for i in range(10)]}
    batch["view2"] = batch["view1"] + 0.1
    health = batch_health(lambda m, b: (b["view1"], b["view2"]), encoder, batch, views=True)
    with local_only():  # as the trainer calls it: the loss gathers nothing, the outputs are gathered instead
        val = held_out_metrics(Pair(), iter(held_out_batches(work_share(24))), lambda b: (b["a"], b["b"]), clip_loss, 8, ("a", "b"))
    return {"features": encoded.features, "ok": encoded.ok, "knn": knn, "health": health, "val": val}


def _rank_main(rank: int, init_file: str, root: str) -> None:
    from mmcontrast import checkpoint
    from mmcontrast.distributed import shared_work

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    out = {}
    with shared_work():
        out["shared"] = measure(Path(root))
        hashed = checkpoint.hash_share(Path(root) / "checkpoint", rank, WORLD)
        every: list = [None] * WORLD
        dist.all_gather_object(every, hashed)
        out["hashed"] = every
        start = time.perf_counter()
        from mmcontrast.evaluate import encode_images

        slow = encode_images(MeanColour(SLOW_S), preprocess, sorted((Path(root) / "slow").rglob("*.png")), batch_size=4, workers=0)
        dist.barrier()  # the collective that, with the work on one process, would time out
        out["slow_seconds"], out["slow_rows"] = time.perf_counter() - start, len(slow.features)
    from mmcontrast.train import StepLog

    log = SimpleNamespace(accelerator=SimpleNamespace(num_processes=WORLD), cfg=SimpleNamespace(monitor_samples=6))
    out["monitored"] = StepLog._monitored(log, [torch.full((10, 3), float(rank)), torch.full((10, 3), 10.0 + rank)])
    torch.save(out, Path(root) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("shared")
    folders(root)
    write_colour_folders(root / "slow", 15, seed=4)
    (root / "checkpoint" / "sharded").mkdir(parents=True)
    for i, size in enumerate([5000, 300, 7000, 1, 4000, 4000]):
        (root / "checkpoint" / ("sharded" if i % 2 else ".") / f"f{i}.bin").write_bytes(bytes([i]) * size)
    mp.start_processes(_rank_main, args=(str(root / "init"), str(root)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], root


def test_work_share_splits_n_items_into_ordered_parts(monkeypatch):
    from mmcontrast import distributed

    for n in (0, 1, 7, 8):
        parts = []
        for rank in range(3):
            monkeypatch.setattr(distributed, "sharing", lambda rank=rank: (rank, 3))
            parts.append(distributed.work_share(n))
        assert [i for p in parts for i in range(n)[p]] == list(range(n))
        assert max(len(range(n)[p]) for p in parts) - min(len(range(n)[p]) for p in parts) <= 1


def test_shared_measurements_equal_the_one_process_figures(ranks):
    got, root = ranks
    alone = measure(root)
    for rank in got:
        shared = rank["shared"]
        assert shared["ok"] == alone["ok"]
        torch.testing.assert_close(shared["features"], alone["features"])
        assert shared["knn"] == alone["knn"]
        assert shared["health"] == pytest.approx(alone["health"], rel=1e-5)
        assert shared["val"] == pytest.approx(alone["val"], rel=1e-6)
    assert alone["val"]["val/samples"] == 24


def test_a_slow_measurement_shared_finishes_inside_a_short_collective_timeout(ranks):
    """60 images at 0.1 s each are 6 s of work; alone, the first process would keep the other waiting in the barrier
    past the 5 s timeout (gloo raises); shared, each does 3 s."""
    got, _ = ranks
    assert all(rank["slow_rows"] == 60 for rank in got)  # 4 colours x 15 images: every feature on every process
    assert all(rank["slow_seconds"] < TIMEOUT_S for rank in got)


def test_checkpoint_files_are_hashed_once_each_by_the_processes_together(ranks):
    from mmcontrast import checkpoint

    got, root = ranks
    folder = root / "checkpoint"
    merged = {}
    for part in got[0]["hashed"]:
        assert part and not set(part) & set(merged)  # each process hashed some files, none twice
        merged.update(part)
    checkpoint.write_manifest(folder)
    assert merged == json.loads((folder / checkpoint.MANIFEST_FILE).read_text())["files"]
    sizes = [sum(e["size"] for e in part.values()) for part in got[0]["hashed"]]
    assert max(sizes) <= sum(sizes) / WORLD + 7000  # an even share, give or take the largest file


def test_share_by_size_balances_bytes():
    from mmcontrast.checkpoint import share_by_size

    sizes = {f"rank_{i}.distcp": 1000 for i in range(8)} | {"model.safetensors": 4000, "rng.pkl": 10}
    shares = share_by_size(sizes, 4)
    assert sorted(n for s in shares for n in s) == sorted(sizes)
    assert [sum(sizes[n] for n in s) for s in shares] == [4000, 3000, 3000, 2010]


def test_log_step_monitors_see_a_bounded_sample_gathered_to_the_first_process_only(ranks):
    """log.monitor_samples=6 over 2 processes of 10 rows: the first 3 rows of each, rank-major, pairs aligned; the
    other process receives nothing (every embedding used to reach every process)."""
    got, _ = ranks
    x, y = got[0]["monitored"]
    assert x[:, 0].tolist() == [0, 0, 0, 1, 1, 1] and y[:, 0].tolist() == [10, 10, 10, 11, 11, 11]
    assert got[1]["monitored"] is None


# ---------------------------------------------------------------- the trainer on 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rank(rank: int, argv: list[str], port: int, timeouts: str) -> None:
    """One process of a 2-process run of the trainer, its image encoding slowed down; the timeout its process group
    was formed with is written to ``timeouts``/RANK."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "true",
                       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    from mmcontrast import evaluate
    from mmcontrast.train import config_from_args, train

    plain = evaluate.encode_image_batch

    def slow(model, images, normalize=True):
        time.sleep(SLOW_S * len(images))
        return plain(model, images, normalize)

    def init_process_group(*args, **kwargs):
        (Path(timeouts) / str(rank)).write_text(str(kwargs.get("timeout")))
        return plain_init(*args, **kwargs)

    evaluate.encode_image_batch = slow
    plain_init, dist.init_process_group = dist.init_process_group, init_process_group
    train(config_from_args(argv))


def test_two_processes_count_remote_shards_once_and_share_a_slow_eval(tiny_shards, tiny_val_shards, shard_server, tmp_path):
    """Remote training and validation shards with per-shard stats only: each stats file is read once (by the first
    process), not once per process. In-loop zero-shot over 64 images at 0.1 s each (6.4 s) under train.dist_timeout_s=5: the run completes
    because each process encodes half; the process group was formed with that timeout. Validation (48 held-out
    pairs) and health are shared too. The log step's monitors see
    log.monitor_samples=8 of the 16 rows."""
    served = tmp_path / "served"
    shutil.copytree(tiny_shards, served)
    (served / "stats.json").unlink()
    for tar in tiny_val_shards.glob("*.tar"):  # served beside them as val00000.tar + val00000_stats.json
        shutil.copy(tar, served / f"val{tar.name}")
        shutil.copy(tar.with_name(f"{tar.stem}_stats.json"), served / f"val{tar.stem}_stats.json")
    server = shard_server(served)
    val_shards = sorted(p.stem for p in served.glob("val*.tar"))
    assert len(val_shards) == 1  # one URL names it
    eval_dir = write_colour_folders(tmp_path / "eval", 16, seed=3)
    argv = ["--config", str(ROOT / "configs" / "clip_tiny_cpu.yaml"), "--train-shards", server.url + "/{00000..00003}.tar",
            "--output-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8", "--workers", "0", "--log-every", "2",
            "--val-shards", f"{server.url}/{val_shards[0]}.tar", "--set", "log.val_every=2", "--set", "log.diagnostics_every=2", "--set", "log.eval_every=2", "--set", f"log.eval_images={eval_dir}",
            "--set", f"train.dist_timeout_s={TIMEOUT_S}", "--set", "data.shuffle_buffer=0", "--set", "log.monitor_samples=8"]  # fmt: skip
    mp.start_processes(_train_rank, args=(argv, _free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    assert [(tmp_path / str(r)).read_text() for r in range(WORLD)] == [str(datetime.timedelta(seconds=TIMEOUT_S))] * WORLD
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2] and 0 <= rows[0]["eval/zeroshot_top1"] <= 1
    assert rows[0]["val/samples"] == 48 and "health/alignment" in rows[0]  # validation and health shared too
    assert rows[0]["global_batch"] == 16 and rows[0]["monitor_samples"] == 8 and 0 <= rows[0]["positive_accuracy"] <= 1
    assert rows[0]["health/chance_positive_accuracy"] == pytest.approx(1 / 8)  # chance among the 8 it was looked for in
    stats = {name: n for name, n in server.bytes_served.items() if name.endswith("_stats.json")}
    assert sorted(stats) == [f"0000{i}_stats.json" for i in range(4)] + [f"{name}_stats.json" for name in val_shards]
    assert all(n == (served / name).stat().st_size for name, n in stats.items())  # once each, not once per process
