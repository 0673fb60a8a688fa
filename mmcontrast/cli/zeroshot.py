"""``mmcontrast zero-shot``: a folder of images classified among labels by a CLIP checkpoint (``mmcontrast.zeroshot``,
``evaluate``)."""

from __future__ import annotations

import argparse

from mmcontrast.cli.common import (
    PREDICTION_FORMATS,
    load_for_eval,
    loader_options,
    model_arguments,
    print_prediction_table,
    require_dir,
    subcommand,
    template_argument,
    write_predictions,
)
from mmcontrast.errors import UsageError


def _read_labels(args: argparse.Namespace) -> list[str]:
    from pathlib import Path

    if args.labels is None and args.labels_file is None:
        raise UsageError("give the labels: --labels cat,dog or --labels-file FILE (one per line); "
                         "`mmcontrast eval zero-shot` takes them from class folders")
    labels = args.labels.split(",") if args.labels is not None else []
    if args.labels_file:
        if not Path(args.labels_file).is_file():
            raise UsageError(f"labels file {args.labels_file} does not exist")
        labels += [line for line in Path(args.labels_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [label.strip() for label in labels]
    if not any(labels):
        raise UsageError("the label list is empty; give labels with --labels cat,dog or --labels-file FILE (one per line)")
    return labels


def _zero_shot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
    p.add_argument("--labels", metavar="A,B,...", help="comma-separated label names")
    p.add_argument("--labels-file", metavar="FILE", help="labels, one per line (added to --labels)")
    model_arguments(p, text_needed=True)
    template_argument(p)
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="labels shown per image (default 1)")
    p.add_argument("--output", metavar="preds.csv|preds.jsonl", help="one row per image: path,label,score (+ top-k, error)")
    p.add_argument("--plot", metavar="confusion.png", help="confusion matrix of images in label-named subfolders")


@subcommand("zero-shot", "classify a folder of images among labels with a CLIP checkpoint", _zero_shot_arguments)
def _zero_shot(args: argparse.Namespace) -> int:
    labels = _read_labels(args)
    require_dir(args.images, "--images")
    if args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    from mmcontrast import evaluate as ev
    from mmcontrast.zeroshot import ZeroShotClassifier, check_labels, load_templates

    labels = check_labels(labels)
    if args.output and not args.output.lower().endswith(PREDICTION_FORMATS):
        raise UsageError(f"--output {args.output}: use a .csv or .jsonl file name")
    templates = load_templates(args.templates)
    paths = ev.discover_images(args.images)
    targets = ev.match_labels(ev.folder_names(args.images, paths), labels)
    if args.plot and max(targets) < 0:
        raise UsageError(f"--plot needs images in subfolders named after the labels; none of {args.images}'s subfolders is one")
    options = loader_options(args)
    model, preprocess, tokenizer = load_for_eval(args, options)
    classifier = ZeroShotClassifier(model, tokenizer, [ev.prompt_name(label) for label in labels], templates)
    encoded, probs = ev.zero_shot_classify(classifier, preprocess, paths, **options)
    rows = ev.zero_shot_rows(encoded, probs, labels, args.top_k, targets)
    print_prediction_table(rows, args.images)
    print(f"\n{len(paths)} images, {len(encoded.ok)} classified, {len(encoded.errors)} unreadable")
    ok_targets = [targets[i] for i in encoded.ok]
    if max(ok_targets, default=-1) >= 0:
        metrics = ev.classification_metrics(probs, ok_targets, labels)
        print(f"accuracy over {metrics['n_labelled']} images in label-named folders: "
              f"top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}")
        if args.plot:
            from mmcontrast.plots import confusion_matrix_png

            labelled = [(t, int(p)) for t, p in zip(ok_targets, probs.argmax(dim=1).tolist()) if t >= 0]
            print(f"confusion matrix: {confusion_matrix_png(*zip(*labelled), labels, args.plot)}")
    if args.output:
        print(f"predictions: {write_predictions(rows, args.output)}")
    return 0
