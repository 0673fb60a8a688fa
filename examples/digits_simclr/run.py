"""SimCLR on scikit-learn's bundled digits, end to end on the CPU, against two baselines.

    python examples/digits_simclr/run.py                    # the measured table in docs/simclr.md
    python examples/digits_simclr/run.py --steps 100 --workdir /tmp/digits_simclr   # shorter

1. Writes the 8×8 digits, upscaled to 32 px, as class folders ``data/train/<word>/`` and
   ``data/test/<word>/`` (the same 80/20 split as the CLIP quickstart in ``examples/digits``).
2. Converts ``data/train`` to webdataset shards with ``python -m data_tools.make_shards`` (the
   captions it writes are ignored in simclr mode).
3. Trains SimCLR (``configs/simclr_tiny_cpu.yaml``) with ``python -m mmcontrast.train``: no labels.
4. Linear probe (``mmcontrast eval linear-probe``: logistic regression, C chosen on a held-out
   part of the training split) on (a) the SimCLR encoder, (b) the same architecture randomly
   initialised, (c) the raw 32 px pixels; prints one table. Every step prints the command it runs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits_common import ROOT, digit_images, run  # noqa: E402

CONFIG = "configs/simclr_tiny_cpu.yaml"
# On top of the config, chosen on a validation part of the training split (docs/simclr.md): digits are
# not mirror-symmetric, and crops under 60% of a digit lose what tells a 1 from a 7.
RECIPE = ["--set", "data.augment.hflip=0", "--set", "data.augment.crop_scale=[0.6,1.0]"]
STEPS = 600


def write_digits(out: Path, test_fraction: float = 0.2, seed: int = 0) -> tuple[int, int]:
    """Digits → ``out/train/<word>/NNNN.png`` and ``out/test/<word>/NNNN.png`` (RGB, 32 px)."""
    counts = [0, 0]
    for i, word, held_out, image in digit_images(random.Random(seed), test_fraction):
        folder = out / ("test" if held_out else "train") / word
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
        counts[held_out] += 1
    return counts[0], counts[1]


def save_random_encoder(run_dir: Path, out: Path, seed: int = 0) -> int:
    """The trained run's architecture (its ``model_config.json``), randomly initialised, saved as a loadable run
    dir ``out``; returns its feature dimension."""
    import torch

    from mmcontrast.models import IMAGE_ENCODER_KEY, MODEL_CONFIG_FILE, ImageEncoder, save_image_encoder_files

    spec = json.loads((run_dir / MODEL_CONFIG_FILE).read_text())[IMAGE_ENCODER_KEY]
    torch.manual_seed(seed)
    encoder = ImageEncoder(spec)
    save_image_encoder_files(encoder, out)
    return encoder.output_dim


def pixel_probe(data_dir: Path, seed: int = 0) -> dict:
    """The same logistic-regression probe on raw pixels (grayscale, L2-normalised like the encoders' features)."""
    import numpy as np
    from PIL import Image

    from mmcontrast import evaluate

    def pixels(split: str) -> tuple[np.ndarray, list[str]]:
        paths, names = evaluate.class_folders(data_dir / split)
        x = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32).ravel() for p in paths])
        return x / np.linalg.norm(x, axis=1, keepdims=True), names

    (train_x, train_names), (test_x, test_names) = pixels("train"), pixels("test")
    classes = sorted(set(train_names))
    train_y = np.array([classes.index(n) for n in train_names])
    test_y = np.array([classes.index(n) for n in test_names])
    result = evaluate.linear_probe(train_x, train_y, test_x, test_y, classes, seed=seed)
    return {**result, "dim": train_x.shape[1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "examples" / "digits_simclr"), help="where data, shards and runs go")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"SimCLR optimizer steps (default {STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    data_dir, shards, run_dir = work / "data", work / "shards", work / "run"
    if not (data_dir / "train").is_dir():
        n_train, n_test = write_digits(data_dir)
        print(f"wrote {n_train} training and {n_test} held-out digits as class folders under {data_dir}")
    py = sys.executable
    run([py, "-m", "data_tools.make_shards", str(data_dir / "train"), str(shards), "--class-template", "a photo of a {}.",
         "--shard-size", "500", "--resume"])  # a second run finds the shards done
    run([
        py, "-m", "mmcontrast.train", "--config", CONFIG, "--train-shards", str(shards), "--output-dir", str(run_dir),
        "--steps", str(args.steps), "--seed", str(args.seed), *RECIPE,
        *(["--resume"] if (run_dir / "checkpoints" / "last").exists() else []),
    ])  # fmt: skip
    random_dir = run_dir / "random_init"
    dim = save_random_encoder(run_dir, random_dir, args.seed)
    print(f"\nsaved the same architecture, randomly initialised (seed {args.seed}), to {random_dir}")

    rows = []
    for name, checkpoint in ((f"SimCLR, {args.steps} steps", run_dir), ("random init, same architecture", random_dir)):
        out = run([py, "-m", "mmcontrast.cli", "eval", "linear-probe", "--train", str(data_dir / "train"),
                   "--test", str(data_dir / "test"), "--checkpoint", str(checkpoint), "--seed", str(args.seed), "--quiet"],
                  capture=True)  # fmt: skip
        result = json.loads(out)
        rows.append((name, dim, result["top1"], result["C"], result["n_test"]))
    print("\n$ (in-process) the same probe on raw pixels")
    pixels = pixel_probe(data_dir, args.seed)
    rows.append(("raw pixels (32x32 grey)", pixels["dim"], pixels["top1"], pixels["C"], rows[0][4]))

    print(f"\nlinear probe (logistic regression, C chosen on 20% of train) on {rows[0][4]} held-out digits")
    print(f"{'features':<32} {'dim':>5} {'top-1':>7} {'C':>7}")
    for name, d, top1, c, _ in rows:
        print(f"{name:<32} {d:>5} {top1:>7.1%} {c:>7g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
