"""What the two digits examples share: the images, the split, and running a step as a shown command."""

from __future__ import annotations

import random
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_images(rng: random.Random, test_fraction: float = 0.2, size: int = 32) -> Iterator[tuple[int, str, bool, object]]:
    """scikit-learn's 1797 digits as ``(index, word, held_out, RGB PIL image of size px)``.

    The order is shuffled with ``rng`` (first thing drawn from it) and the first ``test_fraction`` of it
    is held out, so ``random.Random(0)`` gives both examples the same 1438 / 359 split.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.images)))
    rng.shuffle(order)
    n_test = int(len(order) * test_fraction)
    for rank, i in enumerate(order):
        pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB")
        yield i, WORDS[digits.target[i]], rank < n_test, image


def run(cmd: list[str], capture: bool = False) -> str:
    """Print ``cmd`` as a shell line, run it from the repository root, exit if it fails; its stdout when captured."""
    shown = " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT, check=False, text=True, stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        sys.exit(f"step failed with exit code {result.returncode}: {shown}")
    return result.stdout or ""
