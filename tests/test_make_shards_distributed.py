"""make_shards beyond one process: the manifest, --part runs, --engine ray, and resuming after a kill at any moment.

Every path must give the bytes of one plain local run: shards, per-shard stats, stats.json, sizes.json and
the manifest. The reference run uses the local pool with 2 workers.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from data_tools import make_shards
from data_tools.formats import MANIFEST_FILE
from data_tools.inputs import walk_files
from data_tools.output import CRASH_ENV
from data_tools.shuffle import seed_state, sort_key

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE = "5"


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """43 inputs in nested folders with names that sort differently by folder and by path, two of them bad,
    some larger than --max-image-size (re-encoded), the rest copied."""
    root = tmp_path_factory.mktemp("distributed") / "in"
    rng = random.Random(0)
    folders = ["a", "a-b", "a/z", "a.s", "b/c/d", ""]
    for i in range(41):
        sub = folders[i % len(folders)]
        side = rng.choice([12, 20, 28])
        buf = io.BytesIO()
        Image.new("RGB", (side, side + 3), (rng.randrange(256), i * 5, 90)).save(buf, format=rng.choice(["JPEG", "PNG"]))
        stem = f"{sub}/img{i}" if sub else f"img{i}"
        write(root / f"{stem}.jpg", buf.getvalue())  # PNG bytes in a .jpg name are stored as png: fine
        write(root / f"{stem}.txt", f"picture number {i}")
    write(root / "a/broken.jpg", b"\xff\xd8\xff not a jpeg")  # not_an_image: failed_to_resize
    write(root / "a/broken.txt", "broken")
    write(root / "a-b/empty.png", b"")  # zero_byte: failed_to_download
    return root


def args_for(folder: Path, out: Path, *extra: str) -> list[str]:
    return [str(folder), str(out), "--shard-size", SHARD_SIZE, "--max-image-size", "20", *extra]


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert make_shards.main(args_for(folder, out, "--workers", "2")) == 0
    return files_of(out)


def test_the_walk_lists_files_in_sorted_path_order_one_folder_at_a_time(folder):
    listed = [f"{rel}/{name}" if rel else name for rel, run, _ in walk_files(str(folder)) for name in run]
    everything = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert listed == everything
    assert listed.index("a-b/img1.jpg") < listed.index("a.s/img3.jpg") < listed.index("a/img0.jpg")


def test_reference_run_writes_a_manifest_and_img2dataset_style_shard_stats(reference):
    stats = json.loads(reference["stats.json"])
    assert (stats["seen"], stats["written"], stats["skipped"]) == (43, 41, 2)
    assert stats["skipped_reasons"] == {"not_an_image": 1, "zero_byte": 1}
    assert len(stats["shards"]) == 9 and set(reference) >= {"00008.tar", "00008_stats.json", MANIFEST_FILE}
    lines = gzip.decompress(reference[MANIFEST_FILE]).decode().splitlines()
    header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert header["rows"] == len(rows) == 43
    listing = sorted(r["relpath"] for r in rows)  # the walk's order; the manifest holds it in --seed 0's order
    state = seed_state(header["request"]["seed"])
    assert [r["relpath"] for r in rows] == sorted(listing, key=lambda p: sort_key(listing.index(p), state))
    shards = [json.loads(reference[f"{i:05d}_stats.json"]) for i in range(9)]
    assert [st["count"] for st in shards] == [5] * 8 + [3]
    assert [st["successes"] for st in shards] == [s["samples"] for s in stats["shards"]]
    assert sum(st["failed_to_download"] for st in shards) == 1 and sum(st["failed_to_resize"] for st in shards) == 1


def test_three_parts_then_resume_give_the_bytes_of_one_run(folder, reference, tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(3):
        assert make_shards.main(args_for(folder, out, "--part", f"{i}/3", "--workers", "1")) == 0
        written = sorted(int(p.name[:5]) for p in out.glob("*.tar"))
        assert all(s % 3 <= i for s in written) and not (out / "stats.json").exists()
    before = files_of(out)
    # a part asking for other settings is refused and changes nothing
    assert make_shards.main([str(folder), str(out), "--shard-size", "4", "--part", "0/3"]) == 2
    assert "made from other inputs or settings (shard_size 5 there, 4 here" in capsys.readouterr().err
    assert files_of(out) == before
    assert make_shards.main(args_for(folder, out, "--resume")) == 0
    assert files_of(out) == reference


def test_ray_gives_the_same_bytes_when_a_worker_dies_mid_shard(folder, reference, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    marker = tmp_path / "worker_killed"
    monkeypatch.setenv(CRASH_ENV, f"shard:4:{marker}")  # the first attempt at shard 4 exits half way
    out = tmp_path / "out"
    assert make_shards.main(args_for(folder, out, "--engine", "ray", "--workers", "2")) == 0
    assert marker.exists(), "the worker was not killed: the test proves nothing"
    assert not ray.is_initialized()
    assert files_of(out) == reference  # no *.tmp left, nothing missing, nothing different


def test_missing_ray_is_one_line_naming_the_extra(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    out = tmp_path / "out"
    assert make_shards.main(args_for(folder, out, "--engine", "ray")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'mmcontrast[ray]'" in err[0]
    assert not out.exists()


def test_an_unreachable_ray_address_is_one_line_at_once(folder, tmp_path, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    start = time.perf_counter()
    assert make_shards.main(args_for(folder, out, "--engine", "ray", "--ray-address", "127.0.0.1:1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ray-address 127.0.0.1:1: nothing answers there" in err[0]
    assert time.perf_counter() - start < 15 and not out.exists()


def _start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "data_tools.make_shards", *cmd], cwd=REPO, start_new_session=True,
        env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "point, workers",
    [("manifest:20", "1"), ("shard:3", "1"), ("shard:6", "2"), ("stats.json:0", "1"), ("sizes.json:0", "2")],
)
def test_a_run_killed_at_a_chosen_moment_resumes_to_the_same_bytes(folder, reference, tmp_path, point, workers):
    out, marker = tmp_path / "out", tmp_path / "killed"
    proc = _start(args_for(folder, out, "--workers", workers), {CRASH_ENV: f"{point}:{marker}"})
    _, err = proc.communicate(timeout=60)
    assert marker.exists() and proc.returncode != 0, err
    if point.startswith("shard") and workers == "2":  # a dead pool worker ends the run at once, saying what to do
        assert "run the same command with --resume" in err
    assert make_shards.main(args_for(folder, out, "--resume")) == 0
    assert files_of(out) == reference


def test_a_run_killed_at_random_moments_resumes_to_the_same_bytes(tmp_path):
    """Kills while listing, writing shards or the stats: wherever the moments fall, resuming gives the same bytes."""
    root = tmp_path / "in"
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, format="JPEG", quality=90)
    for i in range(300):
        write(root / f"d{i % 6}/{i:04d}.jpg", buf.getvalue())
        write(root / f"d{i % 6}/{i:04d}.txt", f"noise {i}")
    cmd = [str(root), "--shard-size", "10", "--max-image-size", "64", "--workers", "2"]
    start = time.perf_counter()
    reference = _start([cmd[0], str(tmp_path / "reference"), *cmd[1:]])
    assert reference.wait(timeout=60) == 0
    duration = time.perf_counter() - start
    rng, out, interrupted = random.Random(1), tmp_path / "out", 0
    for _ in range(3):  # kill, resume and kill again, ..., then resume to the end
        proc = _start([cmd[0], str(out), *cmd[1:], "--resume"])
        time.sleep(rng.uniform(0.1, 0.9) * duration)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the converter and its pool workers
        interrupted += proc.wait() == -signal.SIGKILL
    assert interrupted, "every run finished before it was killed: the test proves nothing"
    assert make_shards.main([cmd[0], str(out), *cmd[1:], "--resume"]) == 0
    assert files_of(out) == files_of(tmp_path / "reference")
