"""``mmcontrast eval KIND``: zero-shot, retrieval, linear-probe, few-shot, knn and classifier, each one JSON object
(``mmcontrast.evaluate``, ``fewshot``, ``classifier``)."""

from __future__ import annotations

import argparse

from mmcontrast.cli.common import (
    EVAL_COMMANDS,
    emit_json,
    errors_list,
    eval_command,
    int_list,
    json_output_argument,
    load_classifier,
    load_for_eval,
    loader_options,
    model_arguments,
    require_dir,
    subcommand,
    template_argument,
    warn_overlap,
)
from mmcontrast.errors import UsageError


def _eval_zero_shot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR_OF_CLASS_FOLDERS", help="one subfolder per class; its name is the label")
    model_arguments(p, text_needed=True)
    template_argument(p)
    p.add_argument("--plot", metavar="confusion.png", help="also draw the confusion matrix")
    json_output_argument(p)


@eval_command("zero-shot", "zero-shot accuracy on class folders (folder names are the labels)", _eval_zero_shot_arguments)
def _eval_zero_shot(args: argparse.Namespace) -> int:
    require_dir(args.images, "--images")
    from mmcontrast import evaluate as ev
    from mmcontrast.zeroshot import ZeroShotClassifier, load_templates

    templates = load_templates(args.templates)
    paths, names = ev.class_folders(args.images)
    classes = sorted(set(names))
    targets = ev.match_labels(names, classes)
    options = loader_options(args)
    model, preprocess, tokenizer = load_for_eval(args, options)
    classifier = ZeroShotClassifier(model, tokenizer, [ev.prompt_name(c) for c in classes], templates)
    encoded, probs = ev.zero_shot_classify(classifier, preprocess, paths, **options)
    ok_targets = [targets[i] for i in encoded.ok]
    metrics = ev.classification_metrics(probs, ok_targets, classes) if encoded.ok else {"top1": None, "top5": None}
    if args.plot and encoded.ok:
        from mmcontrast.plots import confusion_matrix_png

        metrics["plot"] = str(confusion_matrix_png(ok_targets, probs.argmax(dim=1).tolist(), classes, args.plot))
    result = {**metrics, "n_images": len(paths), "n_classes": len(classes), "n_errors": len(encoded.errors),
              "errors": errors_list(encoded), "templates": args.templates, "checkpoint": args.checkpoint,
              "precision": args.precision}
    return emit_json(result, args.output)


def _eval_retrieval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, metavar="PATTERN",
                   help="image-caption shards: brace pattern, directory or glob; captions from txt (one per line) "
                   "or a json 'captions' list")
    model_arguments(p, text_needed=True)
    json_output_argument(p)


@eval_command("retrieval", "image-to-text and text-to-image recall@1/5/10 over caption shards", _eval_retrieval_arguments)
def _eval_retrieval(args: argparse.Namespace) -> int:
    from mmcontrast import evaluate as ev

    options = loader_options(args)
    from mmcontrast.shards import expand_shards

    expand_shards(args.shards)  # a bad pattern fails before the model loads
    model, preprocess, tokenizer = load_for_eval(args)
    result = ev.evaluate_retrieval(model, preprocess, tokenizer, args.shards, **options)
    return emit_json({**result, "checkpoint": args.checkpoint, "precision": args.precision}, args.output)


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="DIR", help="class subfolders of training images")
    p.add_argument("--test", required=True, metavar="DIR", help="class subfolders of test images (same class names)")
    model_arguments(p)
    json_output_argument(p)


def _linear_probe_arguments(p: argparse.ArgumentParser) -> None:
    _probe_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="the cross-validation folds that choose C (default 0)")


@eval_command("linear-probe", "logistic regression on frozen image features (C chosen by cross-validation on --train)",
               _linear_probe_arguments)
def _eval_linear_probe(args: argparse.Namespace) -> int:
    require_dir(args.train, "--train")
    require_dir(args.test, "--test")
    from mmcontrast import evaluate as ev

    options = loader_options(args)
    model, preprocess, _ = load_for_eval(args, options)
    overlap = warn_overlap(args.train, args.test, ("--train", "--test"))
    train, test, classes = ev.encode_class_folders(model, preprocess, args.train, args.test, normalize=False, **options)
    result = ev.linear_probe(train.features.numpy(), train.labels.numpy(), test.features.numpy(), test.labels.numpy(),
                             classes, seed=args.seed)
    result.update(train_test_identical=overlap, n_train=len(train.labels), n_test=len(test.labels), n_classes=len(classes),
                  n_errors=len(train.errors) + len(test.errors), errors=train.errors + test.errors, checkpoint=args.checkpoint,
                  precision=args.precision)
    return emit_json(result, args.output)


def _few_shot_arguments(p: argparse.ArgumentParser) -> None:
    _probe_arguments(p)
    p.add_argument("--shots", default="1,2,5,10,20,50", metavar="K,K,...",
                   help="labelled images per class to draw from --train (default 1,2,5,10,20,50)")
    p.add_argument("--repeats", type=int, default=5, help="seeded draws per shot count (default 5)")
    p.add_argument("--baselines", default="pixels,random-init", metavar="pixels,random-init",
                   help="baselines fit the same way: raw pixels, the same architecture at random init ('none': neither)")
    template_argument(p)
    p.add_argument("--plot", metavar="curve.png", help="draw accuracy against shots (log x, bands of 1 std)")
    p.add_argument("--seed", type=int, default=0)


@eval_command("few-shot", "label efficiency: accuracy against labelled images per class, with baselines beside it",
               _few_shot_arguments)
def _eval_few_shot(args: argparse.Namespace) -> int:
    shots = int_list(args.shots, "--shots")
    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    baselines = [] if args.baselines == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    from mmcontrast.fewshot import BASELINES, label_efficiency

    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise UsageError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(BASELINES)} or none")
    require_dir(args.train, "--train")
    require_dir(args.test, "--test")
    options = loader_options(args)
    loaded = load_for_eval(args, options)
    overlap = warn_overlap(args.train, args.test, ("--train", "--test"))

    def load(random_init: bool) -> tuple:
        if not random_init:
            return loaded
        from mmcontrast.evaluate import encoders_in_precision
        from mmcontrast.loading import load as load_model

        baseline = load_model(args.checkpoint, pretrained=args.pretrained, device=str(next(loaded[0].parameters()).device),
                              image_size=args.image_size, random_init=True, pool=args.pool)
        encoders_in_precision(baseline[0], args.precision)
        return baseline

    result = label_efficiency(load, args.train, args.test, shots, args.repeats, baselines, args.templates, options, args.seed)
    result["checkpoint"], result["train_test_identical"] = args.checkpoint, overlap
    if args.plot:
        from mmcontrast.plots import few_shot_png

        result["plot"] = str(few_shot_png(result["curves"], args.plot, result["chance"], title=f"label efficiency: {args.checkpoint}"))
    return emit_json(result, args.output)


def _knn_arguments(p: argparse.ArgumentParser) -> None:
    _probe_arguments(p)
    p.add_argument("--k", type=int, help="neighbours (default 20)")
    p.add_argument("--temperature", type=float, help="votes weigh exp(cosine/temperature) (default 0.07)")


@eval_command("knn", "weighted k-nearest-neighbour classification on frozen image features", _knn_arguments)
def _eval_knn(args: argparse.Namespace) -> int:
    if (args.k is not None and args.k < 1) or (args.temperature is not None and args.temperature <= 0):
        raise UsageError("--k must be at least 1 and --temperature positive")
    require_dir(args.train, "--train")
    require_dir(args.test, "--test")
    from mmcontrast import evaluate as ev

    k = ev.KNN_K if args.k is None else args.k
    temperature = ev.KNN_TEMPERATURE if args.temperature is None else args.temperature
    options = loader_options(args)
    model, preprocess, _ = load_for_eval(args, options)
    overlap = warn_overlap(args.train, args.test, ("--train", "--test"))
    train, test, classes = ev.encode_class_folders(model, preprocess, args.train, args.test, **options)
    votes = ev.knn_scores(train.features, train.labels, test.features, len(classes), k, temperature)
    result = ev.classification_metrics(votes, test.labels.tolist(), classes)
    result.update(k=k, temperature=temperature, train_test_identical=overlap, n_train=len(train.labels), n_test=len(test.labels),
                  n_classes=len(classes), n_errors=len(train.errors) + len(test.errors),
                  errors=train.errors + test.errors, checkpoint=args.checkpoint, precision=args.precision)
    return emit_json(result, args.output)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    evaluations = p.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True)
    for name, (help_text, add_arguments, handler) in EVAL_COMMANDS.items():
        sub = evaluations.add_parser(name, help=help_text, description=help_text + ". Prints one JSON object.")
        add_arguments(sub)
        sub.set_defaults(eval_handler=handler)


@subcommand("eval", "evaluate a checkpoint: zero-shot | retrieval | linear-probe | few-shot | knn | classifier (one JSON object)", _eval_arguments)
def _eval(args: argparse.Namespace) -> int:
    return args.eval_handler(args)


def _eval_classifier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR_OF_CLASS_FOLDERS", help="one subfolder per class, named as trained")
    model_arguments(p)
    p.add_argument("--plot", metavar="confusion.png", help="also draw the confusion matrix")
    json_output_argument(p)


@eval_command("classifier", "accuracy, per-class recall and confusion of a fine-tuned classifier on class folders",
               _eval_classifier_arguments)
def _eval_classifier(args: argparse.Namespace) -> int:
    require_dir(args.images, "--images")
    from mmcontrast import evaluate as ev
    from mmcontrast.classifier import predict

    paths, names = ev.class_folders(args.images)
    options = loader_options(args)
    model, preprocess = load_classifier(args, options)
    unknown = sorted(set(names) - set(model.classes))
    if unknown:
        raise UsageError(f"classes {', '.join(unknown)} in {args.images} are not among the classifier's: {', '.join(model.classes)}")
    targets = [model.classes.index(n) for n in names]
    encoded, probs = predict(model, preprocess, paths, **options)
    import numpy as np

    ok_targets = [targets[i] for i in encoded.ok]
    predicted = probs.argmax(dim=1).tolist()
    metrics = ev.classification_metrics(probs, ok_targets, model.classes)
    confusion = np.zeros((len(model.classes), len(model.classes)), dtype=int)
    np.add.at(confusion, (ok_targets, predicted), 1)
    result = {"top1": metrics["top1"], "mean_per_class_recall": metrics["mean_per_class_recall"], "per_class": metrics["per_class"],
              "confusion": confusion.tolist(), "classes": model.classes, "n_images": len(paths),
              "n_errors": len(encoded.errors), "errors": errors_list(encoded), "checkpoint": args.checkpoint}
    if args.plot:
        from mmcontrast.plots import confusion_matrix_png

        result["plot"] = str(confusion_matrix_png(ok_targets, predicted, model.classes, args.plot))
    return emit_json(result, args.output)
