"""CPU threads: the trainer's default split against every fixed split of the cores, for the shipped CPU configs.

    python bench/cpu_threads.py --imagenet weights/efficientnet_lite0.safetensors [--steps 60] [--cases a,b,...]

Cases (each a product command on real images where the recipe is for real images):

* ``clip_tiny``: ``configs/clip_tiny_cpu.yaml`` on 32 px captioned shapes (bench/train_throughput.py's data);
* ``simclr_small``: ``configs/simclr_small_cpu.yaml`` on ELPV's solar cells (300 px PNGs, ``examples/real_data.py elpv``);
* ``simclr_imagenet``: ``configs/simclr_imagenet_cpu.yaml`` (EfficientNet-Lite0 from ImageNet, 160 px) on the same cells;
* ``finetune``: ``mmcontrast finetune`` of ImageNet EfficientNet-Lite0 on 50 labelled cells per class (a draw), another
  draw as ``--val`` (8 epochs of 3 steps: one run, no cross-validation);
* ``decode_heavy``: ``simclr_small`` on the cells upscaled to 1,600 px JPEGs, decoded and resized on the fly: the
  data worker needs its core.

Each runs with the default (no ``OMP_NUM_THREADS``: the trainer chooses, ``mmcontrast.threads``) and with
``OMP_NUM_THREADS=k`` for every k from 1 to the cores, alternating (each split first in turn, after the case's data
has been read once so that no run pays for a cold page cache), ``--rounds`` times. Samples/s is the median
of the records after step ``--steps / 2`` (past the default's trial), as the run logged it, then the median over the
rounds; the whole command's time is beside it. Prints one table, and the default's samples/s as a fraction of the
best fixed split's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MMCONTRAST_CPU_THREADS")}
ENV.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
CASES = ("clip_tiny", "simclr_small", "simclr_imagenet", "finetune", "decode_heavy")
HEAVY_SIDE = 1600  # px of the decode-heavy case's JPEGs


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shards(folder: Path, out: Path, *extra: str) -> Path:
    if not (out / "stats.json").is_file():
        subprocess.run([sys.executable, "-m", "data_tools.make_shards", str(folder), str(out), "--shard-size", "500",
                        "--overwrite", *extra], cwd=ROOT, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return out


def prepare(work: Path) -> dict[str, Path]:
    """The data of every case under ``work`` (kept between runs)."""
    elpv = work / "elpv"
    if not (elpv / "pool").is_dir():
        _module(ROOT / "examples" / "real_data.py", "real_data").write_elpv(elpv)
    shapes = work / "shapes" / "shards"
    if not (shapes / "stats.json").is_file():
        shutil.rmtree(work / "shapes", ignore_errors=True)
        shapes = _module(ROOT / "bench" / "train_throughput.py", "train_throughput").make_data(work / "shapes", 4096)
    heavy = work / "heavy"
    if not heavy.is_dir():
        from PIL import Image

        heavy.mkdir(parents=True)
        for path in sorted((elpv / "unlabelled").iterdir())[:600]:
            with Image.open(path) as image:
                image.convert("RGB").resize((HEAVY_SIDE, HEAVY_SIDE), Image.BICUBIC).save(heavy / f"{path.stem}.jpg", quality=92)
    return {"shapes": shapes, "elpv": elpv, "cells": _shards(elpv / "unlabelled", work / "cells", "--layout", "images"),
            "heavy": _shards(heavy, work / "heavy_shards", "--layout", "images")}


def command(case: str, data: dict[str, Path], out: Path, steps: int, imagenet: str | None) -> list[str]:
    train = [sys.executable, "-m", "mmcontrast.train", "--output-dir", str(out), "--steps", str(steps), "--log-every", "5",
             "--checkpoint-every", str(10 * steps), "--set", "log.diagnostics_every=0"]
    if case == "clip_tiny":
        return [*train, "--config", "configs/clip_tiny_cpu.yaml", "--train-shards", str(data["shapes"])]
    if case in ("simclr_small", "decode_heavy"):
        return [*train, "--config", "configs/simclr_small_cpu.yaml", "--train-shards", str(data["cells" if case == "simclr_small" else "heavy"])]
    if imagenet is None:
        raise SystemExit(f"{case} needs --imagenet FILE (examples/imagenet_weights/convert_efficientnet_lite0.py writes it)")
    if case == "simclr_imagenet":
        return [*train, "--config", "configs/simclr_imagenet_cpu.yaml", "--train-shards", str(data["cells"]),
                "--set", f"model.pretrained={imagenet}"]
    return [sys.executable, "-m", "mmcontrast.cli", "finetune", "--train", str(data["elpv"] / "shots50_s0"), "--val",
            str(data["elpv"] / "shots50_s1"), "--checkpoint", "timm:efficientnet_lite0", "--pretrained", imagenet, "--epochs",
            "8", "--output-dir", str(out), "--set", "log.every=3"]


def warm_up(cmd: list[str]) -> None:
    """Read the case's data once, so that no split pays for a cold page cache (the first run of a case did: 0.72x)."""
    for flag in ("--train-shards", "--train"):
        if flag in cmd:
            for path in Path(cmd[cmd.index(flag) + 1]).rglob("*"):
                if path.is_file():
                    path.read_bytes()


def measure(cmd: list[str], out: Path, threads: int | None, after_step: int) -> dict:
    """samples/s after ``after_step`` (median of the records), the threads the run ended with, the command's seconds."""
    env = dict(ENV, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in rows if r["step"] > after_step] or rows[-1:]
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in late), "threads": late[-1].get("cpu_threads"),
            "seconds": seconds, "data_time_share": statistics.median(r["data_time_share"] for r in late)}


def _median_run(rows: list[dict]) -> dict:
    """The round with the median samples/s (its threads and time with it), and every round's samples/s."""
    ranked = sorted(rows, key=lambda r: r["samples_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds": [r["samples_per_s"] for r in rows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run, at least three trials (51: threads.RUN_PER_TRIAL; the finetune case runs 24)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of every split (the median is reported)")
    p.add_argument("--imagenet", metavar="FILE", help="timm-layout EfficientNet-Lite0 weights (simclr_imagenet, finetune)")
    p.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "cpu_threads"))
    p.add_argument("--output", metavar="FILE.json")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    work = Path(args.workdir)
    data = prepare(work)
    cores = len(os.sched_getaffinity(0))
    results: dict[str, dict] = {}
    for case in cases:
        runs: dict[str, list[dict]] = {}
        splits = [None, *range(1, cores + 1)]
        warm_up(command(case, data, work / "run", args.steps, args.imagenet))
        for r in range(args.rounds):
            for threads in splits[r % len(splits):] + splits[:r % len(splits)]:  # each split in turn goes first
                cmd = command(case, data, work / "run", args.steps, args.imagenet)
                runs.setdefault("default" if threads is None else str(threads), []).append(
                    measure(cmd, work / "run", threads, args.steps // 2))
                print(case, threads or "default", runs["default" if threads is None else str(threads)][-1], file=sys.stderr)
        results[case] = {split: _median_run(rows) for split, rows in runs.items()}
    print(f"\n{cores} cores, 1 process, the configs' data workers; samples/s after step {args.steps // 2} (median of the "
          f"records, median of {args.rounds} round(s)); whole command in seconds\n")
    fixed = [str(k) for k in range(1, cores + 1)]
    print("| case | default: threads kept | default samples/s | " + " | ".join(f"{k} thread{'s' * (k != '1')}" for k in fixed)
          + " | default / best fixed |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in fixed) + " | ---: |")
    for case, row in results.items():
        best = max(row[k]["samples_per_s"] for k in fixed)
        d = row["default"]
        cells = [f"{row[k]['samples_per_s']:.1f} ({row[k]['seconds']:.0f} s)" for k in fixed]
        row["default_over_best"] = d["samples_per_s"] / best
        print(f"| {case} | {d['threads']} | {d['samples_per_s']:.1f} ({d['seconds']:.0f} s) | " + " | ".join(cells)
              + f" | {d['samples_per_s'] / best:.2f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
