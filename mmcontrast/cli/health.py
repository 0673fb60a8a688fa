"""``mmcontrast plot | diagnose``: a run's curves as a PNG, and the representation health of any checkpoint
(``mmcontrast.plots``, ``diagnostics``)."""

from __future__ import annotations

import argparse
import sys

from mmcontrast.cli.common import (
    emit_json,
    json_output_argument,
    load_for_eval,
    loader_options,
    model_arguments,
    subcommand,
)
from mmcontrast.errors import UsageError


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of mmcontrast.train (reads its metrics.jsonl)")
    p.add_argument("--output", metavar="run.png", help="image to write (default RUN_DIR/run.png); a .svg or .pdf name gives that format")
    p.add_argument("--title", help="figure title (default: the run directory's name)")


def _read_metrics(run_dir: str) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl; a line still being written (a run in progress) is left out."""
    import json
    from pathlib import Path

    from mmcontrast.config import METRICS_FILE

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir} has no {METRICS_FILE}; pass a run directory of mmcontrast.train "
                         "(it appears after the first log.every steps)")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    if not rows:
        raise UsageError(f"{path} holds no metrics yet; plot again after the first log.every steps")
    return rows


@subcommand("plot", "draw a run's loss, temperature, lr, throughput and representation health against step (one PNG)",
            _plot_arguments)
def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmcontrast.plots import run_curves_png

    rows = _read_metrics(args.run_dir)
    output = args.output or str(Path(args.run_dir) / "run.png")
    print(run_curves_png(rows, output, title=args.title or Path(args.run_dir).resolve().name))
    return 0


def _diagnose_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast.config import AUGMENT_PRESETS, LogConfig

    p.add_argument("--shards", required=True, metavar="PATTERN",
                   help="image-caption (or image-only) shards: brace pattern, directory or glob")
    model_arguments(p)
    p.add_argument("--samples", type=int, default=512, metavar="N", help="pairs to embed (default 512)")
    p.add_argument("--views", action="store_true",
                   help="two augmented views of each image even for a CLIP checkpoint (always so for image-only encoders)")
    p.add_argument("--seed", type=int, default=0, help="which samples and which augmentations (default 0)")
    p.add_argument("--preset", default="natural", choices=tuple(AUGMENT_PRESETS),
                   help="the two views' recipe (data.augment.preset): can this encoder match views made this way?")
    p.add_argument("--min-rank-fraction", type=float, default=LogConfig.min_rank_fraction, metavar="F",
                   help=f"warn below this effective rank / dimension (default {LogConfig.min_rank_fraction})")
    p.add_argument("--min-std-ratio", type=float, default=LogConfig.min_std_ratio, metavar="R",
                   help=f"warn below this embedding std x sqrt(d) (default {LogConfig.min_std_ratio})")
    json_output_argument(p)


@subcommand("diagnose", "representation health of a checkpoint on shards: alignment, uniformity, effective rank, ... "
            "(one JSON object)", _diagnose_arguments)
def _diagnose(args: argparse.Namespace) -> int:
    if args.samples < 2:
        raise UsageError("--samples must be at least 2 (uniformity and ranks compare samples with each other)")
    options = loader_options(args)
    from mmcontrast import diagnostics
    from mmcontrast.shards import expand_shards

    shards = expand_shards(args.shards)  # a bad pattern fails before the model loads
    model, preprocess, tokenizer = load_for_eval(args)
    x, y, views = diagnostics.embed_shard_pairs(model, preprocess, tokenizer, shards, samples=args.samples, views=args.views,
                                                batch_size=options["batch_size"], workers=options["workers"], seed=args.seed,
                                                preset=args.preset)
    metrics = diagnostics.health(x, y, views=views)
    metrics.update(diagnostics.judge(metrics, int(x.shape[0]), views, args.min_rank_fraction))
    if metrics["at_chance"]:
        print(f"warning: positives are found {metrics['positive_accuracy']:.1%} of the time, under twice chance "
              f"({metrics['chance_positive_accuracy']:.1%}): this encoder does not tell these samples apart", file=sys.stderr)
    for line in diagnostics.collapse_warnings(metrics, args.min_rank_fraction, args.min_std_ratio):
        print(f"warning: {line}", file=sys.stderr)
    result = {**metrics, "pairs": "two views" if views else "image-text", **({"preset": args.preset} if views else {}),
              "n_samples": int(x.shape[0]),
              "dim": int(x.shape[1]), "checkpoint": args.checkpoint, "shards": args.shards,
              "precision": args.precision}
    return emit_json(result, args.output)
