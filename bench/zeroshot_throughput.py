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
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmcontrast import evaluate as ev
from mmcontrast.models import create_clip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mmc-tiny:2000,ViT-B-32:256",
                        help="comma-separated MODEL:N_IMAGES (open_clip names or configs/models names)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=ev.DEFAULT_WORKERS, help="mmcontrast's decode processes")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side, alternating")
    parser.add_argument("--images", type=Path, help="reuse this folder of generated images")
    args = parser.parse_args()
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
