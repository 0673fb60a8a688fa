"""Images/s of the `mmcontrast zero-shot` code path, end to end, against a plain open_clip loop.

Both sides classify the same generated JPEGs (64–128 px) with the same model, batch size and label
embeddings; model loading is outside the timings. Runs alternate (plain, mmcontrast, plain, …) after
one untimed warm-up of each, and the table shows the median of the timed runs.

* plain: sorted file list, then per batch ``PIL.Image.open`` + open_clip's preprocess in this process,
  ``encode_image`` under ``torch.no_grad``, cosine logits, softmax;
* mmcontrast: ``discover_images`` + ``zero_shot_classify`` — what the CLI runs between loading the
  model and printing (decode and preprocess in DataLoader worker processes, ``torch.inference_mode``),
  once in fp32 and once with the CLI's default ``--precision auto`` (bf16 encoders where the hardware
  runs bf16 fast: GPUs, CPUs with AVX512-BF16 or AMX; fp32 elsewhere).

Models are random-init (throughput does not depend on the weights); nothing is downloaded.

    python bench/zeroshot_throughput.py                       # mmc-tiny on 2,000 images, ViT-B-32 on 256
    python bench/zeroshot_throughput.py --models mmc-tiny:2000 --repeats 3
    python bench/zeroshot_throughput.py --whole-process 4800 --repeats 5

``--whole-process N``: the whole commands instead, start-up included, each a fresh process — ``mmcontrast zero-shot
--precision fp32 --output preds.csv`` against ``bench/plain_open_clip_zero_shot.py`` (the script one writes with
open_clip alone) on N generated JPEGs, with a random-init mmc-tiny run dir; alternating after one untimed run of each,
the median of ``--repeats`` and every run's seconds printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmcontrast import evaluate as ev
from mmcontrast.models import create_clip, save_clip_run_files
from mmcontrast.threads import DecodeBalance
from mmcontrast.zeroshot import ZeroShotClassifier

LABELS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple"]


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs of random size 64–128 px: noise plus a few coloured shapes, in 10 subfolders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(s) for s in rng.integers(64, 129, size=2))
        image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            draw.ellipse((x0, y0, x0 + w // 3, y0 + h // 3), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        sub = folder / LABELS[i % len(LABELS)]
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"{i:05d}.jpg", quality=90)


def plain_open_clip(model, preprocess, class_embeddings, scale, folder: Path, n: int, batch_size: int) -> int:
    """The loop one writes with open_clip alone."""
    paths = sorted(folder.rglob("*.jpg"))[:n]
    done = 0
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]])
            features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
            probs = (scale * features @ class_embeddings.T).softmax(dim=-1)
            done += len(probs)
    return done


def mmcontrast_zero_shot(classifier, preprocess, folder: Path, n: int, batch_size: int, workers: int) -> int:
    paths = ev.discover_images(folder)[:n]
    threads = torch.get_num_threads()
    balance = DecodeBalance(torch.device("cpu"), workers)  # what `mmcontrast zero-shot` does on the CPU
    try:
        encoded, probs = ev.zero_shot_classify(classifier, preprocess, paths, batch_size=batch_size, workers=workers,
                                               on_batch=balance.update)
    finally:
        torch.set_num_threads(threads)
    return len(probs)


def classifier_in(name: str, precision: str):
    """((model, preprocess, classifier) with the encoders in ``precision``, the precision resolved); same weights each time."""
    torch.manual_seed(0)
    bundle = create_clip(name)
    model = bundle.model.eval()
    resolved = ev.encoders_in_precision(model, precision)
    return (model, bundle.preprocess_val, ZeroShotClassifier(model, bundle.tokenizer, LABELS)), resolved


def images_per_s(fn, *args) -> float:
    start = time.perf_counter()
    n = fn(*args)
    return n / (time.perf_counter() - start)


def whole_process(folder: Path, count: int, repeats: int) -> None:
    """Seconds of the whole ``mmcontrast zero-shot`` command against the plain open_clip script, fresh processes."""
    images = folder / f"images_{count}"
    if len(list(images.rglob("*.jpg"))) < count:
        print(f"writing {count} JPEGs to {images} …", file=sys.stderr)
        write_images(images, count)
    run = folder / "mmc-tiny-run"
    if not (run / "model.safetensors").is_file():
        torch.manual_seed(0)
        bundle = create_clip("mmc-tiny")
        save_clip_run_files(bundle.model, bundle.model_cfg, run, bundle.tokenizer)
    labels = ",".join(LABELS)
    commands = {
        "plain open_clip": [sys.executable, str(Path(__file__).with_name("plain_open_clip_zero_shot.py")), str(run),
                            str(images), labels, str(folder / "plain.csv")],
        "mmcontrast zero-shot": [sys.executable, "-m", "mmcontrast.cli", "zero-shot", "--images", str(images), "--labels", labels,
                                 "--checkpoint", str(run), "--precision", "fp32", "--quiet", "--output", str(folder / "ours.csv")],
    }
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MMCONTRAST_CPU_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(repeats + 1):  # round 0: untimed (page cache, .pyc files)
        for name, cmd in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if round_:
                seconds[name].append(time.perf_counter() - start)
        if round_:
            print(", ".join(f"{name} {times[-1]:.2f} s" for name, times in seconds.items()), file=sys.stderr)
    plain, ours = (statistics.median(seconds[name]) for name in commands)
    print(f"\n{len(os.sched_getaffinity(0))} CPUs (load average {os.getloadavg()[0]:.1f}), {count} JPEGs of 64–128 px, "
          f"mmc-tiny (random init), fp32, whole process; median of {repeats} alternating runs\n")
    print("| command | seconds (median) | every run | against the plain loop |")
    print("|---|---:|---|---:|")
    for name, times in seconds.items():
        print(f"| {name} | {statistics.median(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} | "
              f"{statistics.median(times) / plain:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mmc-tiny:2000,ViT-B-32:256",
                        help="comma-separated MODEL:N_IMAGES (open_clip names or configs/models names)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=ev.DEFAULT_WORKERS, help="mmcontrast's decode processes")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side, alternating")
    parser.add_argument("--images", type=Path, help="reuse this folder of generated images")
    parser.add_argument("--whole-process", type=int, metavar="N",
                        help="time the whole zero-shot command against the plain open_clip script on N images instead")
    args = parser.parse_args()
    if args.whole_process:
        whole_process(args.images or Path(tempfile.mkdtemp(prefix="zeroshot-bench-")), args.whole_process, args.repeats)
        return
    models = [(name, int(count)) for name, count in (spec.rsplit(":", 1) for spec in args.models.split(","))]

    folder = args.images or Path(tempfile.mkdtemp(prefix="zeroshot-bench-"))
    needed = max(count for _, count in models)
    if len(list(folder.rglob("*.jpg"))) < needed:
        print(f"writing {needed} JPEGs to {folder} …", file=sys.stderr)
        write_images(folder, needed)

    rows = []
    for name, count in models:
        bundles = {precision: classifier_in(name, precision) for precision in ("fp32", "auto")}
        (model, preprocess, classifier), resolved = bundles["fp32"][0], bundles["auto"][1]
        plain_args = (model, preprocess, classifier.class_embeddings, classifier.logit_scale, folder, count, args.batch_size)
        ours_args = {p: (b[0][2], preprocess, folder, count, args.batch_size, args.workers) for p, b in bundles.items()}
        warm = min(count, 2 * args.batch_size)  # untimed: page cache, allocator, worker start-up paths
        plain_open_clip(*plain_args[:-2], warm, args.batch_size)
        for ours in ours_args.values():
            mmcontrast_zero_shot(*ours[:3], warm, args.batch_size, args.workers)
        rates: dict[str, list[float]] = {"plain": [], "fp32": [], "auto": []}
        for _ in range(args.repeats):
            rates["plain"].append(images_per_s(plain_open_clip, *plain_args))
            for precision, ours in ours_args.items():
                rates[precision].append(images_per_s(mmcontrast_zero_shot, *ours))
            print(f"{name}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()), file=sys.stderr)
        rows.append((name, count, resolved, *(statistics.median(rates[k]) for k in ("plain", "fp32", "auto"))))

    print(f"\n{len(os.sched_getaffinity(0))} CPUs (load average {os.getloadavg()[0]:.1f}), torch threads "
          f"{torch.get_num_threads()}, decode workers {args.workers}, batch {args.batch_size}, "
          f"median of {args.repeats} alternating runs, device cpu\n")
    print("| model | images | plain open_clip fp32 (img/s) | mmcontrast fp32 | mmcontrast --precision auto | speed-up (auto) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, count, resolved, plain_rate, fp32_rate, auto_rate in rows:
        print(f"| {name} | {count} | {plain_rate:.1f} | {fp32_rate:.1f} ({fp32_rate / plain_rate:.2f}×) | "
              f"{auto_rate:.1f} ({resolved}) | {auto_rate / plain_rate:.2f}× |")


if __name__ == "__main__":
    main()
