"""Training throughput and peak memory: ``mmcontrast.train`` against ``open_clip_train.main``.

    python bench/train_throughput.py [--steps 60] [--batch-size 64] [--workers 1] [--rounds 2] [--model mmc-tiny]

The same tiny model (configs/models), the same shards, global batch, steps, optimiser (AdamW, warmup +
cosine) on the CPU, measured alternately. Samples/s is the steady-state rate each trainer logs (its first
logging window, which holds start-up, is dropped); peak RSS is the whole process tree's, data-loader
workers included, sampled every 50 ms; the data-time share is the part of a step spent waiting for the
next batches (mmcontrast logs it). Besides one process on local files: the same shards served by an HTTP
server on 127.0.0.1 (what object storage looks like to the loader), and 2 processes (``accelerate launch
--cpu --num_processes 2``, half the batch each). Prints one table.

open_clip_train runs through a small wrapper (this file, ``--open-clip-worker``) that registers our
model JSONs with ``open_clip.add_model_config`` and sets webdataset's end-of-shard marker off
(``tar_file_expander(eof_value=None)``): open_clip_train pins webdataset ≤ 0.2.86, and with 1.x its
sample grouping crashes on that marker. It cannot run several processes on the CPU (it passes
``device_ids=[cpu]`` to DDP), so the comparison is single-process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def make_data(folder: Path, n: int) -> Path:
    """n coloured-shape images (32 px) with captions → shards of 512."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
    images = folder / "images"
    images.mkdir(parents=True)
    for i in range(n):
        colour = rng.choice(list(colours))
        img = Image.new("RGB", (32, 32), (128, 128, 128))
        r = rng.randint(6, 12)
        cx, cy = rng.randint(r, 32 - r), rng.randint(r, 32 - r)
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colours[colour])
        img.save(images / f"{i:05d}.jpg", quality=95)
        (images / f"{i:05d}.txt").write_text(f"a {colour} circle")
    shards = folder / "shards"
    subprocess.run([sys.executable, "-m", "data_tools.make_shards", str(images), str(shards), "--shard-size", "512", "--overwrite"],
                   check=True, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return shards


def run_measured(cmd: list[str], check: bool = True, env: dict | None = None) -> tuple[float, str]:
    """Run cmd; return (peak RSS of its process tree in MiB, combined output). A failure exits, unless ``check`` is
    False: then the RSS is negative (bench/train_gpu.py probes what fits)."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                    peak[0] = max(peak[0], rss)
                except psutil.Error:
                    pass
                time.sleep(0.05)
        except psutil.Error:
            pass

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out = proc.communicate()[0]
    watcher.join()
    if proc.returncode != 0 and not check:
        return -1.0, out
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed:\n{out[-3000:]}")
    return peak[0] / 2**20, out


def ours(shards: str, work: Path, args, processes: int = 1) -> tuple[float, float, float]:
    """(samples/s, peak RSS MiB, data-time share) of mmcontrast.train on ``processes`` CPU processes."""
    out = work / f"ours_{time.time_ns()}"
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_processes", str(processes), "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if processes > 1 else [sys.executable]  # fmt: skip
    cmd = [
        *launcher, "-m", "mmcontrast.train", "--config", "configs/clip_tiny_cpu.yaml", "--train-shards", shards,
        "--output-dir", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size // processes),
        "--workers", str(args.workers), "--model", args.model, "--log-every", "10", "--checkpoint-every", str(10 * args.steps),
        "--set", "log.diagnostics_every=0",
    ]  # fmt: skip
    rss, _ = run_measured(cmd)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return statistics.median(r["samples_per_s"] for r in rows), rss, statistics.median(r["data_time_share"] for r in rows)


def serve_over_http(folder: Path) -> tuple[str, object]:
    """``folder`` served on 127.0.0.1 (an ephemeral port) from a thread: (base URL, server to shut down)."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def open_clip(shards: Path, work: Path, args) -> tuple[float, float]:
    n_shards = len(list(shards.glob("*.tar")))
    cmd = [
        sys.executable, __file__, "--open-clip-worker",
        "--train-data", f"{shards}/{{00000..{n_shards - 1:05d}}}.tar", "--dataset-type", "webdataset",
        "--train-num-samples", str(args.steps * args.batch_size), "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--model", args.model, "--epochs", "1", "--lr", "1e-3", "--wd", "0.1",
        "--warmup", "20", "--precision", "fp32", "--logs", str(work), "--name", f"oc_{time.time_ns()}",
        "--log-every-n-steps", "10", "--save-frequency", "0", "--report-to", "", "--seed", "0",
    ]  # fmt: skip
    rss, out = run_measured(cmd)
    rates = [float(m) for m in re.findall(r"([0-9.]+)/s/gpu", out)]
    if len(rates) < 2:
        raise SystemExit(f"open_clip_train logged no throughput:\n{out[-3000:]}")
    return statistics.median(rates[1:]), rss


def open_clip_worker(argv: list[str]) -> None:
    import functools

    import open_clip
    from open_clip_train import data as oc_data
    from open_clip_train.main import main
    from webdataset.tariterators import tar_file_expander

    open_clip.add_model_config(ROOT / "configs" / "models")
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    main(argv)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--open-clip-worker":
        open_clip_worker(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="mmc-tiny")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = make_data(work / "data", max(2048, args.steps * args.batch_size))
        n = len(list(shards.glob("*.tar")))
        url, server = serve_over_http(shards)
        try:
            runs = {
                "mmcontrast, local files": lambda: ours(str(shards), work, args),
                "mmcontrast, HTTP": lambda: ours(f"{url}/{{00000..{n - 1:05d}}}.tar", work, args),
                "mmcontrast, 2 processes": lambda: ours(str(shards), work, args, processes=2),
                "open_clip_train": lambda: (*open_clip(shards, work, args), float("nan")),
            }
            results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    results[name].append(run())
        finally:
            server.shutdown()
    print(f"\nmodel {args.model}, global batch {args.batch_size}, {args.steps} steps, {args.workers} worker(s) per process, "
          f"CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), {args.rounds} alternating rounds (median)\n")
    print("| trainer | samples/s | peak RSS MiB | data-time share |")
    print("| --- | ---: | ---: | ---: |")
    summary = {}
    for name, rows in results.items():
        summary[name] = tuple(statistics.median(r[i] for r in rows) for i in range(3))
        rate, rss, share = summary[name]
        print(f"| {name} | {rate:.1f} | {rss:.0f} | {'' if share != share else f'{100 * share:.0f}%'} |")
    (r1, m1, _), (r2, m2, _) = summary["mmcontrast, local files"], summary["open_clip_train"]
    print(f"\nours / open_clip_train: {r1 / r2:.2f}x samples/s, {m1 / m2:.2f}x memory; "
          f"HTTP / local files: {summary['mmcontrast, HTTP'][0] / r1:.2f}x")


if __name__ == "__main__":
    main()
