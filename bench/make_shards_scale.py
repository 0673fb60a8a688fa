"""make_shards at scale: images/s of the local pool and of Ray, against img2dataset on the same files.

    python bench/make_shards_scale.py [--images 2000] [--size 512x384] [--workers 2] [--repeats 2]
                                      [--img2dataset-python /tmp/i2d-venv/bin/python] [--listing 200000] [--out DIR]

Makes photo-like JPEGs with sidecar captions (``data_throughput.make_images``), then converts them end to end
(the command's wall-clock time, start-up and listing included) in two modes: JPEG copy (every image still
decoded, to check it) and re-encode at ``--max-image-size 256``. Rows: ``make_shards`` on the local pool,
``make_shards --engine ray`` on a local Ray cluster of ``--workers`` CPUs (also shown without the cluster's
start-up, measured on its own), and img2dataset on the same files through ``file://`` URLs with
``--processes_count`` = ``--workers``: ``--resize_mode no --skip_reencode True`` for the copy (decode, keep
the bytes) and ``--resize_mode keep_ratio_largest --image_size 256 --resize_only_if_bigger True`` for the
resize (longer side 256, as ours). img2dataset pins ``webdataset<0.3``, so it runs from its own venv:

    python3 -m venv /tmp/i2d-venv && /tmp/i2d-venv/bin/pip install img2dataset

Its rows are left out, with a note, when that Python is absent. A last line gives the listing rate: files/s
and peak memory of ``--manifest-only`` over ``--listing`` empty files. Every configuration runs ``--repeats``
times, interleaved, and the best is kept: other processes on a shared machine only ever slow a run down.
Prints one markdown table; the per-core rate is images/s divided by the processes used.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from data_throughput import make_images  # noqa: E402

MODES = {"JPEG copy": [], "re-encode, longer side 256": ["--max-image-size", "256"]}
I2D_MODES = {
    "JPEG copy": ["--resize_mode", "no", "--skip_reencode", "True"],
    "re-encode, longer side 256": ["--resize_mode", "keep_ratio_largest", "--image_size", "256", "--resize_only_if_bigger", "True"],
}
SHARD_SIZE = 100


def timed(cmd: list[str], env: dict | None = None, fresh: Path | None = None) -> float:
    """Wall-clock seconds of ``cmd``, which must succeed; ``fresh`` is removed first (each run starts empty)."""
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def make_shards_cmd(src: Path, out: Path, workers: int, engine: str, mode: str) -> list[str]:
    return [sys.executable, "-m", "data_tools.make_shards", str(src), str(out), "--shard-size", str(SHARD_SIZE),
            "--workers", str(workers), "--engine", engine, *MODES[mode]]  # fmt: skip


def img2dataset_cmd(python: str, urls: Path, out: Path, workers: int, mode: str) -> list[str]:
    return [
        str(Path(python).parent / "img2dataset"), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
        "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
        "--processes_count", str(workers), "--thread_count", "16", "--number_sample_per_shard", str(SHARD_SIZE),
        "--distributor", "multiprocessing", "--enable_wandb", "False",
        *I2D_MODES[mode],
    ]  # fmt: skip


def write_url_list(src: Path, path: Path) -> int:
    """img2dataset's input: one file:// URL and caption per image."""
    images = sorted(src.rglob("*.jpg"))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for image in images:
            writer.writerow([image.resolve().as_uri(), image.with_suffix(".txt").read_text()])
    return len(images)


def ray_start_up(workers: int) -> float:
    """Seconds to start and stop a local Ray cluster: the part of a Ray run that does not grow with the images."""
    code = f"import ray; ray.init(num_cpus={workers}, include_dashboard=False, logging_level='ERROR'); ray.shutdown()"
    return timed([sys.executable, "-c", code])


def listing_rate(work: Path, files: int) -> tuple[float, float]:
    """(files/s, peak MiB) of ``--manifest-only`` over ``files`` empty images and captions, 1000 per folder:
    the walk and the manifest alone, what a 100M-file INPUT costs before any image is read."""
    src = work / "listing"
    if not src.exists():
        for i in range(0, files, 2):
            folder = src / f"{i // 1000:05d}"
            if i % 1000 == 0:
                folder.mkdir(parents=True)
            (folder / f"{i:09d}.jpg").touch()
            (folder / f"{i:09d}.txt").touch()
    code = (
        "import resource, sys; from data_tools import make_shards; "
        f"rc = make_shards.main([{str(src)!r}, {str(work / 'listing_out')!r}, '--manifest-only']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    shutil.rmtree(work / "listing_out", ignore_errors=True)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return files / (time.perf_counter() - start), int(out.split()[-1]) / 1024


def measure_conversions(args: argparse.Namespace, work: Path) -> tuple[dict, float | None]:
    """Best wall-clock seconds of every (tool, mode), and Ray's start-up seconds (None without Ray)."""
    have_ray = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode == 0
    have_i2d = (Path(args.img2dataset_python).parent / "img2dataset").exists()
    src, urls = work / "images", work / "urls.csv"
    if not src.exists():
        make_images(src, args.images, tuple(int(x) for x in args.size.split("x")))
    write_url_list(src, urls)
    configs = {}
    for mode in MODES:
        configs[("make_shards, local pool", mode)] = (make_shards_cmd(src, work / "local", args.workers, "local", mode), work / "local")
        if have_ray:
            configs[("make_shards --engine ray", mode)] = (make_shards_cmd(src, work / "ray", args.workers, "ray", mode), work / "ray")
        if have_i2d:
            cmd = img2dataset_cmd(args.img2dataset_python, urls, work / "i2d", args.workers, mode)
            configs[("img2dataset, file:// URLs", mode)] = (cmd, work / "i2d")
    best = dict.fromkeys(configs, float("inf"))
    for _ in range(args.repeats):
        for name, (cmd, out) in configs.items():
            best[name] = min(best[name], timed(cmd, {"NO_ALBUMENTATIONS_UPDATE": "1"}, fresh=out))
    if not have_ray:
        print("(Ray rows left out: Ray is not installed here; pip install 'mmcontrast[ray]')")
    if not have_i2d:
        print(f"(img2dataset rows left out: no img2dataset beside {args.img2dataset_python}; see the docstring to install it)")
    return best, min(ray_start_up(args.workers) for _ in range(args.repeats)) if have_ray else None


def print_table(args: argparse.Namespace, best: dict, start_up: float | None) -> None:
    print(f"\n{args.images} JPEGs {args.size} with captions, {args.workers} processes, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; wall-clock of the whole command, best of {args.repeats}\n")  # fmt: skip
    print("| tool | mode | seconds | images/s | images/s per core |")
    print("|---|---|---:|---:|---:|")
    for (tool, mode), seconds in best.items():
        rate = args.images / seconds
        print(f"| {tool} | {mode} | {seconds:.1f} | {rate:.0f} | {rate / args.workers:.0f} |")
        if tool.endswith("ray"):
            rate = args.images / (seconds - start_up)
            print(f"| ... without Ray's start-up ({start_up:.1f} s) | {mode} | {seconds - start_up:.1f} | {rate:.0f} | {rate / args.workers:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to convert (0: only the listing line)")
    parser.add_argument("--size", default="512x384", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--workers", type=int, default=2, help="processes for every tool (default: the 2 cores here)")
    parser.add_argument("--repeats", type=int, default=2, help="run every configuration this often, keep the best")
    parser.add_argument("--img2dataset-python", default="/tmp/i2d-venv/bin/python", help="python of a venv with img2dataset")
    parser.add_argument("--listing", type=int, default=200_000, help="empty files for the listing line (0: none)")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        if args.images:
            print_table(args, *measure_conversions(args, work))
        if args.listing:
            rate, peak = listing_rate(work, args.listing)
            print(f"\nlisting {args.listing:,} files (1000 per folder) into the manifest: {rate:,.0f} files/s, peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
