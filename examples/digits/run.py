"""Quickstart: CLIP from scratch on scikit-learn's bundled digits, end to end on the CPU.

    python examples/digits/run.py            # what `make quickstart` runs
    python examples/digits/run.py --steps 100 --workdir /tmp/digits   # shorter

1. Writes the 8×8 digits, upscaled to 32 px, as an image–caption folder (``KEY.png`` + ``KEY.txt``,
   captions such as "a photo of the number seven") and holds out 20% as class folders.
2. Converts the folder to webdataset shards with ``python -m data_tools.make_shards``.
3. Trains ``configs/clip_tiny_cpu.yaml`` with ``python -m mmcontrast.train``.
4. Zero-shot classifies the held-out digits with labels "zero" … "nine" (``mmcontrast eval zero-shot``)
   and prints the accuracy. Every step prints the command it runs, so you can repeat it by hand.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits_common import ROOT, digit_images, run  # noqa: E402

CAPTIONS = ["a photo of the number {}", "the digit {}", "a handwritten {}", "{}", "a picture of a {}", "a photo of a {}."]


def write_digits(out: Path, test_fraction: float = 0.2, seed: int = 0) -> tuple[int, int]:
    """Digits → ``out/train`` (image + caption files) and ``out/test/<word>/`` (class folders)."""
    rng = random.Random(seed)  # shuffles the split, then draws the captions
    counts = [0, 0]
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    for i, word, held_out, image in digit_images(rng, test_fraction):
        if held_out:
            folder = out / "test" / word
            folder.mkdir(exist_ok=True)
            image.save(folder / f"{i:04d}.png")
        else:
            image.save(out / "train" / f"{i:04d}.png")
            (out / "train" / f"{i:04d}.txt").write_text(rng.choice(CAPTIONS).format(word))
        counts[held_out] += 1
    return counts[0], counts[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "examples" / "digits"), help="where data, shards and the run go")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    data_dir, shards, run_dir = work / "data", work / "shards", work / "run"
    if not (data_dir / "train").is_dir():
        n_train, n_test = write_digits(data_dir)
        print(f"wrote {n_train} training images with captions and {n_test} held-out images to {data_dir}")
    py = sys.executable
    run([py, "-m", "data_tools.make_shards", str(data_dir / "train"), str(shards), "--shard-size", "500",
         "--resume"])  # fmt: skip
    run([
        py, "-m", "mmcontrast.train", "--config", "configs/clip_tiny_cpu.yaml", "--train-shards", str(shards),
        "--output-dir", str(run_dir), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        *(["--resume"] if (run_dir / "checkpoints" / "last").exists() else []),
    ])  # fmt: skip
    out = run([py, "-m", "mmcontrast.cli", "eval", "zero-shot", "--images", str(data_dir / "test"), "--checkpoint", str(run_dir)], capture=True)
    result = json.loads(out)
    print(json.dumps({k: v for k, v in result.items() if k != "per_class"}, indent=2))
    print(f"\nzero-shot top-1 on {result.get('n_images', '?')} held-out digits: {result['top1']:.1%} (chance: 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
