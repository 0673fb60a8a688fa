"""Precision and recall of `mmcontrast dedup` against planted near-duplicates, over a range of thresholds.

A third of the originals get one copy each, resized, recompressed or cropped in turn (``dedup.plant_copy``); the
collection is indexed (exact), ``dedup.find_duplicates`` groups it at each threshold, and pairs are scored with
``dedup.pair_precision_recall`` (a found pair is right when both are the same original or its copy).

Without ``--checkpoint`` the encoder is the copy detector of tests/test_search.py: ``configs/copy_detector_cpu.yaml``,
mmc-tiny's image tower trained by the trainer for 80 steps with NT-Xent to match two copies of each of 256 generated
pictures (``data.augment.preset=copies``: the SSCD recipe, Pizzi et al. 2022, in miniature), measured on three other collections of 150 pictures (``--seeds``). The first row of each
is the threshold ``dedup`` calibrates by default (``--threshold auto``: ``dedup.calibrate_threshold``). With ``--checkpoint C`` (and ``--images DIR`` of distinct
images) it measures your own model on your own images: the threshold that suits a checkpoint depends on it.

    python bench/dedup_threshold.py
    python bench/dedup_threshold.py --checkpoint runs/x --images photos/ --thresholds 0.85,0.9,0.95
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

from mmcontrast import cli, dedup, search

ROOT = Path(__file__).resolve().parents[1]


def picture(rng: np.random.Generator, size: int = 64):
    """A distinct picture: a random 6 x 6 grid of colours, smoothly interpolated (tests/test_search.py uses it too)."""
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def train_copy_detector(out: Path, steps: int = 80) -> Path:
    """The trainer on ``configs/copy_detector_cpu.yaml`` over 256 generated pictures (image-only shards): an image-only
    run dir (tests/test_search.py trains the same one)."""
    import subprocess

    from data_tools import make_shards

    rng = np.random.default_rng(1)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    for i in range(256):
        picture(rng).save(out / "pictures" / f"{i:03d}.png")
    if make_shards.main([str(out / "pictures"), str(out / "shards"), "--layout", "images", "--workers", "1"]) != 0:
        raise SystemExit("could not write the copy detector's shards")
    subprocess.run([sys.executable, "-m", "mmcontrast.train", "--config", str(ROOT / "configs" / "copy_detector_cpu.yaml"),
                    "--train-shards", str(out / "shards"), "--output-dir", str(out / "run"), "--steps", str(steps), "--seed", "0"],
                   check=True)
    return out / "run"


def plant_collection(folder: Path, originals: list, seed: int = 0) -> dict[str, str]:
    """Originals (JPEG q95) plus a copy of every third; returns ``{path: path of its original}``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, image in enumerate(originals):
        original = str(folder / f"{i:05d}.jpg")
        image.convert("RGB").save(original, quality=95)
        truth[original] = original
        if i % 3 == 0:
            kind = dedup.COPY_KINDS[(i // 3) % 3]
            path = str(folder / f"{i:05d}_{kind}.jpg")
            dedup.plant_copy(image, kind, rng).convert("RGB").save(path, quality=95 if kind != "recompressed" else 75)
            truth[path] = original
    return truth


def measure(checkpoint: str, originals: list, root: Path, thresholds: list[float], seed: int) -> list[tuple]:
    """``(threshold, {"precision", "recall", ...})`` rows, the calibrated threshold (auto) first."""
    truth = plant_collection(root / "collection", originals, seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the index's JSON: this script prints one table
        assert cli.main(["index", "--images", str(root / "collection"), "--checkpoint", checkpoint, "--output-dir",
                         str(root / "index"), "--index-key", "Flat", "--quiet"]) == 0  # fmt: skip
    searcher = search.Searcher(root / "index")
    auto = dedup.calibrate_threshold(searcher)["threshold"]
    rows = []
    for threshold in [auto, *thresholds]:
        groups = dedup.find_duplicates(searcher, threshold)
        paths = [[searcher.item(i)["path"] for i in g.ids] for g in groups]
        rows.append((f"auto = {threshold:.4f}" if not rows else f"{threshold}", dedup.pair_precision_recall(paths, truth)))
    return rows


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from mmcontrast.evaluate import discover_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: train the tests' tiny copy detector")
    parser.add_argument("--images", help="distinct images to plant copies among (default: 150 generated pictures)")
    parser.add_argument("--thresholds", default="0.8,0.85,0.9,0.95")
    parser.add_argument("--seeds", default="0,1,2", help="collections (generated pictures and copies) to measure on")
    args = parser.parse_args(argv)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(train_copy_detector(Path(tmp) / "detector"))
        for seed in (int(x) for x in args.seeds.split(",")):
            if args.images:
                originals = [Image.open(p).convert("RGB") for p in discover_images(args.images)]
            else:
                rng = np.random.default_rng(100 + seed)
                originals = [picture(rng) for _ in range(150)]
            rows = measure(checkpoint, originals, Path(tmp) / f"seed{seed}", [float(t) for t in args.thresholds.split(",")], seed)
            table += [(seed, *row) for row in rows]
    print(f"command: python bench/dedup_threshold.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print("collection  threshold        precision  recall  pairs found / planted")
    for seed, threshold, m in table:
        print(f"{seed:>10}  {threshold:<15}  {m['precision']:>9.3f}  {m['recall']:>6.3f}  {m['pairs_found']} / {m['pairs_true']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
