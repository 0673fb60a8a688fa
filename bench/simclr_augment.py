"""SimCLR view cost: mmcontrast's two-stage transform vs torchvision's per-image PIL pipeline.

    python bench/simclr_augment.py [--sizes 32,96,224] [--batch 256] [--repeats 3]

Both make SimCLR's views (RandomResizedCrop, flip, colour jitter p=0.8, grayscale p=0.2, blur p=0.5
from 64 px, normalise) from the same decoded PIL images, on one thread, as one dataloader worker
would. The per-image pipeline is what lightly's ``SimCLRTransform`` and most SimCLR code run:
torchvision transforms on PIL images. Prints microseconds per view and the speed-up.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from mmcontrast.augment import MIN_SIZE_FOR_BLUR, simclr_transform

MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def torchvision_pipeline(size: int) -> T.Compose:
    steps = [
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if size >= MIN_SIZE_FOR_BLUR:
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(MEAN, STD)])


def images(size: int, n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    side = int(size * 1.25)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def per_view_us(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,96,224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'size':>5} {'torchvision per image':>22} {'mmcontrast two-stage':>21} {'speed-up':>9}   (µs per view, 1 thread)")
    for size in map(int, args.sizes.split(",")):
        pics = images(size, args.batch)
        reference = torchvision_pipeline(size)
        ours = simclr_transform(size, MEAN, STD)

        def run_reference(reference=reference, pics=pics):
            torch.stack([reference(p) for p in pics])

        def run_ours(ours=ours, pics=pics):
            crops, params = zip(*(ours.sample(p) for p in pics))
            ours.finish(torch.stack(crops), torch.stack(params))

        a = per_view_us(run_reference, args.batch, args.repeats)
        b = per_view_us(run_ours, args.batch, args.repeats)
        print(f"{size:>5} {a:>22.0f} {b:>21.0f} {a / b:>8.2f}×", flush=True)


if __name__ == "__main__":
    main()
