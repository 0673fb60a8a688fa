"""``mmcontrast finetune | predict``: the labelled slice into a classifier, and its predictions (``mmcontrast.finetune``,
``classifier``)."""

from __future__ import annotations

import argparse

from mmcontrast.cli.common import (
    PREDICTION_FORMATS,
    load_classifier,
    loader_options,
    model_arguments,
    names,
    pool_argument,
    print_prediction_table,
    require_dir,
    subcommand,
    template_argument,
    warn_overlap,
    write_predictions,
)
from mmcontrast.errors import UsageError


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast.finetune import HEAD_INITS, Settings  # no torch: --help stays instant

    p.add_argument("--train", required=True, metavar="DIR_OF_CLASS_FOLDERS", help="labelled images, one subfolder per class")
    p.add_argument("--checkpoint", required=True, metavar="C",
                   help="where the encoder starts: a SimCLR or CLIP run, an open_clip name or timm:NAME with --pretrained")
    p.add_argument("--pretrained", metavar="LOCAL_FILE", help="weights for an open_clip name or timm:NAME (never downloaded)")
    p.add_argument("--output-dir", required=True, metavar="RUN", help="the run directory (config, metrics, checkpoints, weights)")
    p.add_argument("--val", metavar="DIR", help="held-out class folders that choose between the probe and fine-tuning "
                   "(default: cross-validation over --train)")
    p.add_argument("--folds", type=int, default=Settings.folds, help=f"cross-validation folds over --train (default {Settings.folds})")
    p.add_argument("--epochs", type=int, default=Settings.epochs,
                   help=f"passes over --train (default {Settings.epochs}); 0: no fine-tuning, the frozen candidates only")
    p.add_argument("--unlabelled", metavar="DIR", help="images without labels (may include the labelled ones): they fill the "
                   "patch classifier's region banks, each class with the images the probe gives it most confidently")
    p.add_argument("--lr", type=float, default=Settings.lr,
                   help=f"the head's peak learning rate; the encoder's is {Settings.backbone_lr_scale}x (default {Settings.lr})")
    p.add_argument("--batch-size", type=int, default=Settings.batch_size, help=f"default {Settings.batch_size}")
    p.add_argument("--image-size", metavar="PX|native",
                   help="input size of a timm:NAME encoder or a SimCLR run's (default: its pretrained size, a run's own); native: the labelled images' own")
    pool_argument(p)
    p.add_argument("--classes", metavar="A,B,...", help="the class list in this order (default: the folder names sorted as "
                   "strings); stored in the run and read by predict and eval classifier")
    p.add_argument("--init", default=Settings.init, choices=HEAD_INITS,
                   help="the head's start: a linear probe on frozen features (LP-FT), the class names (CLIP), or random")
    template_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=Settings.workers, help="data-loading processes")
    p.add_argument("--resume", action="store_true", help="continue RUN from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE", help="any config field")


@subcommand("finetune", "the labelled slice into a classifier: the frozen probe, the patch classifier or fine-tuning (LP-FT), "
            "whichever has the lowest held-out log-loss in cross-validation", _finetune_arguments)
def _finetune(args: argparse.Namespace) -> int:
    require_dir(args.train, "--train")
    if args.val:
        require_dir(args.val, "--val")
        warn_overlap(args.train, args.val, ("--train", "--val"))
    if args.unlabelled:
        require_dir(args.unlabelled, "--unlabelled")
    if args.epochs < 0 or args.batch_size < 1 or args.lr <= 0:
        raise UsageError("--epochs must be 0 (no fine-tuning) or more, --batch-size at least 1 and --lr positive")
    size = image_size(args.image_size)
    from mmcontrast import finetune

    settings = finetune.Settings(args.train, args.checkpoint, args.output_dir, args.val, args.pretrained, args.epochs, args.lr,
                                 batch_size=args.batch_size, image_size=size, pool=args.pool, init=args.init,
                                 templates=args.templates, seed=args.seed, workers=args.workers,
                                 classes=names(args.classes, "--classes") if args.classes else None,
                                 folds=args.folds, unlabelled_dir=args.unlabelled, resume=args.resume, overrides=args.overrides)
    selection = finetune.run(settings)
    on = f"{selection.folds}-fold cross-validation" if selection.folds else f"--val {args.val}"
    scored = {"frozen probe": selection.probe, "patch classifier": selection.patches, "fine-tuned": selection.finetuned}
    print("; ".join(f"{name}: log-loss {e['loss']:.3f} ± {e['loss_std']:.3f}, top-1 {e['top1']:.1%} ± {e['top1_std']:.1%}, "
                    f"mean per-class recall {e['mean_per_class_recall']:.1%}" for name, e in scored.items() if e) + f" ({on})")
    if selection.patches_note:
        print(selection.patches_note)
    print(f"kept the {finetune.NAMES[selection.choice].removeprefix('the ').replace('fine-tuning', 'fine-tuned model')}: {selection.reason}")
    run_dir = selection.run_dir
    print(f"classifier: {run_dir} (predict with: mmcontrast predict --images DIR --checkpoint {run_dir})")
    if selection.choice == "finetuned":
        print(f"the same recipe on several GPUs: accelerate launch -m mmcontrast.train --config {run_dir}/config.yaml "
              f"--output-dir {run_dir}_multi")
    return 0


def image_size(text: str | None) -> int | str | None:
    """``--image-size``: a number of pixels, or ``native`` (the labelled images' own size)."""
    if text is None or text == "native":
        return text
    try:
        size = int(text)
    except ValueError:
        raise UsageError(f"--image-size takes a number of pixels or native, not {text!r}") from None
    if size < 8:
        raise UsageError(f"--image-size {size}: give at least 8 px, or native")
    return size


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
    model_arguments(p)
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="classes shown per image (default 1)")
    p.add_argument("--output", metavar="preds.csv|preds.jsonl", help="one row per image: path,label,score (+ top-k, error)")


@subcommand("predict", "classify a folder of images with a fine-tuned classifier (mmcontrast finetune)", _predict_arguments)
def _predict(args: argparse.Namespace) -> int:
    require_dir(args.images, "--images")
    if args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if args.output and not args.output.lower().endswith(PREDICTION_FORMATS):
        raise UsageError(f"--output {args.output}: use a .csv or .jsonl file name")
    from mmcontrast import evaluate as ev
    from mmcontrast.classifier import predict

    options = loader_options(args)
    model, preprocess = load_classifier(args, options)
    paths = ev.discover_images(args.images)
    targets = ev.match_labels(ev.folder_names(args.images, paths), model.classes)
    encoded, probs = predict(model, preprocess, paths, **options)
    rows = ev.zero_shot_rows(encoded, probs, model.classes, args.top_k, targets)
    print_prediction_table(rows, args.images)
    print(f"\n{len(paths)} images, {len(encoded.ok)} classified, {len(encoded.errors)} unreadable")
    ok_targets = [targets[i] for i in encoded.ok]
    if max(ok_targets, default=-1) >= 0:
        metrics = ev.classification_metrics(probs, ok_targets, model.classes)
        print(f"accuracy over {metrics['n_labelled']} images in class-named folders: top-1 {metrics['top1']:.4f}")
    if args.output:
        print(f"predictions: {write_predictions(rows, args.output)}")
    return 0


def _views_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="DIR_OF_CLASS_FOLDERS", help="labelled images, one subfolder per class")
    p.add_argument("--checkpoint", required=True, metavar="C",
                   help="the encoder whose frozen features are probed: a run, an open_clip name or timm:NAME with --pretrained")
    p.add_argument("--pretrained", metavar="LOCAL_FILE", help="weights for an open_clip name or timm:NAME (never downloaded)")
    p.add_argument("--image-size", metavar="PX|native", help="input size of a timm:NAME encoder or a SimCLR run's; native: the images' own")
    pool_argument(p)
    p.add_argument("--copies", type=int, default=2, help="augmented copies of each image per view (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="FILE.json", help="also write the JSON result to this file")


@subcommand("views", "which augmentation presets keep the label: each preset and part scored by what a cross-validated "
            "probe loses on augmented copies of labelled images", _views_arguments)
def _views(args: argparse.Namespace) -> int:
    require_dir(args.train, "--train")
    if args.copies < 1:
        raise UsageError("--copies must be at least 1")
    from mmcontrast import views
    from mmcontrast.labelled import labelled_encoder

    encoder, spec, paths, labels = labelled_encoder(args.train, args.checkpoint, args.pretrained, image_size(args.image_size),
                                                   args.pool)
    result = views.measure_views(encoder, spec, paths, labels, copies=args.copies, seed=args.seed)
    result["chosen"] = views.choose_preset(result)
    print(f"{'view':<24} {'top-1':>6} {'loss':>6} {'strength':>8}")
    for view in result["views"]:
        print(f"{view['name']:<24} {view['top1']:>6.1%} {view['loss']:>+6.1%} {view['strength']:>8.3f}")
    chosen = result["chosen"]
    print(f"\nclean top-1 {result['clean']['top1']:.1%}; a view keeps the label when it loses at most {result['tolerance']:.1%}")
    print(f"strongest preset that keeps the label: {chosen} (train with --set data.augment.preset={chosen})" if chosen else
          "no preset keeps the label: every one costs the probe more than the folds' noise; compose views from the parts above")
    result.update(checkpoint=args.checkpoint, n_images=len(paths))
    if args.output:
        import json
        from pathlib import Path

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0
