"""How ``finetune`` should choose between its frozen candidates, measured without the test set: seeded draws of N
labelled images per class from ``DATA/pool``, each candidate fitted on the draw and scored on the rest of the pool.

    python bench/choice_rule.py data/elpv --weights weights/efficientnet_lite0.safetensors [--draws 10] [--shots 50]

The frozen probe and the patch classifier are fitted as ``finetune --epochs 0 --image-size N --pool max`` fits them
(``probe.fit_probe``, ``patches.fit``), cross-validated on the draw's folds (``fold_indices``, ``--folds``) and scored
with ``finetune.fold_scores``; the choice is made by ``finetune.choose`` (lowest held-out log-loss, the shipped rule)
and, beside it, by the highest CV top-1 (the earlier rule). Every draw's candidates, fitted on all of the draw, are
then scored on the pool images outside it: the table gives what each rule would have exported, against always
exporting one candidate. Draw seeds start at 100 so that none is one of ``examples/real_data.py``'s
``shots50_s{0,1,2}``. The pool's features and regions are encoded once (float32 encoder, 2 cores: ~3 min for
ELPV's 1,969 cells at 300 px) and kept in ``--workdir``. Writes ``WORKDIR/choice_rule.json`` and prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ("always the probe", "CV top-1 chooses", "CV log-loss chooses (finetune)", "always the patch classifier")


def encode_pool(pool: Path, weights: str, image_size: int, pool_mode: str, cache: Path):
    """(labels (n,), pooled (n, d), regions (n, regions, C) float16) of every image of ``pool``'s class folders."""
    from mmcontrast import patches
    from mmcontrast.classifier import ImageClassifier
    from mmcontrast.labelled import labelled_images, starting_encoder
    from mmcontrast.models import image_eval_transform

    if cache.is_file():
        saved = torch.load(cache)
        return saved["labels"].numpy(), saved["pooled"].numpy(), saved["regions"]
    classes, labelled = labelled_images(str(pool), None)
    spec, state = starting_encoder("timm:efficientnet_lite0", weights, image_size, pool_mode)
    encoder = ImageClassifier(spec, classes).encoder
    encoder.load_state_dict(state)
    pooled, regions, ok, errors = patches.encode(encoder.eval(), image_eval_transform(spec), labelled.paths, progress="pool")
    if errors:
        sys.exit(f"error: {len(errors)} pool images could not be read")
    labels = labelled.labels[ok]
    torch.save({"labels": torch.from_numpy(labels), "pooled": torch.from_numpy(pooled), "regions": regions}, cache)
    return labels, pooled, regions


def one_draw(seed: int, shots: int, folds: int, labels: np.ndarray, pooled: np.ndarray, regions: torch.Tensor) -> dict:
    """Both candidates' CV estimates on one draw, both rules' choices, and each candidate's scores on the rest."""
    from mmcontrast import finetune, patches
    from mmcontrast.labelled import fold_indices
    from mmcontrast.probe import fit_probe

    rng = np.random.default_rng(seed)
    n_classes = int(labels.max()) + 1
    draw = np.concatenate([rng.choice(np.flatnonzero(labels == k), shots, replace=False) for k in range(n_classes)])
    rest = np.setdiff1d(np.arange(len(labels)), draw)
    y = labels[draw]
    data = patches.PatchSet(pooled[draw], y, patches.Regions(regions[draw]), n_classes)
    per_fold = {"probe": [], "patches": []}
    for held in fold_indices(y, folds, 0):
        kept = np.setdiff1d(np.arange(len(y)), held)
        probe = fit_probe(data.features[kept], y[kept], 0)
        per_fold["probe"].append(finetune.fold_scores(probe.scores(data.features[held], n_classes), y[held]))
        per_fold["patches"].append(finetune.fold_scores(patches.score_rows(patches.fit(data, kept, 0), data, held), y[held]))
    estimates = {c: finetune.summarise(v) for c, v in per_fold.items()} | {"finetuned": None}
    by_loss, _ = finetune.choose(estimates)
    by_top1 = "patches" if estimates["patches"]["top1"] > estimates["probe"]["top1"] else "probe"  # a tie kept the probe
    probe = fit_probe(data.features, y, 0)
    on_rest = {"probe": finetune.fold_scores(probe.scores(pooled[rest], n_classes), labels[rest]),
               "patches": finetune.fold_scores(patches.score_images(patches.fit(data, np.arange(len(y)), 0), data,
                                                                    pooled[rest], regions[rest]), labels[rest])}
    return {"seed": seed, "cv": {c: {k: e[k] for k in ("top1", "loss")} for c, e in estimates.items() if e},
            "rest": on_rest, "chosen": dict(zip(RULES, ("probe", by_top1, by_loss, "patches")))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="an examples/real_data.py protocol folder (its pool/ is used)")
    p.add_argument("--weights", required=True, help="ImageNet EfficientNet-Lite0 in timm's layout (.safetensors)")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--shots", type=int, default=50, help="labelled images per class in a draw")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--image-size", type=int, default=300)
    p.add_argument("--pool", default="max")
    p.add_argument("--workdir", type=Path, default=Path("bench/out/choice_rule"))
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    labels, pooled, regions = encode_pool(args.data / "pool", args.weights, args.image_size, args.pool,
                                          args.workdir / f"pool_{args.image_size}_{args.pool}.pt")
    draws = []
    for seed in range(100, 100 + args.draws):
        draws.append(one_draw(seed, args.shots, args.folds, labels, pooled, regions))
        d = draws[-1]
        print(f"draw {seed}: rest probe {d['rest']['probe']['top1']:.3f}, patches {d['rest']['patches']['top1']:.3f}; "
              f"CV top-1 {d['cv']['probe']['top1']:.3f} / {d['cv']['patches']['top1']:.3f}, "
              f"log-loss {d['cv']['probe']['loss']:.3f} / {d['cv']['patches']['loss']:.3f}", file=sys.stderr, flush=True)
    summary = {}
    for rule in RULES:
        got = [d["rest"][d["chosen"][rule]] for d in draws]
        summary[rule] = {"top1": float(np.mean([g["top1"] for g in got])),
                         "recall": float(np.mean([g["mean_per_class_recall"] for g in got])),
                         "patches_kept": sum(d["chosen"][rule] == "patches" for d in draws)}
    (args.workdir / "choice_rule.json").write_text(json.dumps({"draws": draws, "summary": summary}, indent=1) + "\n")
    n_rest = len(labels) - args.shots * (int(labels.max()) + 1)
    print(f"| {len(draws)} draws of {args.shots} per class from pool/, scored on the other {n_rest} | top-1 | "
          f"mean per-class recall | patch classifier kept on |\n|---|---:|---:|---:|")
    for rule, row in summary.items():
        print(f"| {rule} | {100 * row['top1']:.1f}% | {100 * row['recall']:.1f}% | {row['patches_kept']} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
