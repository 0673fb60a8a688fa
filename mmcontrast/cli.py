"""The ``mmcontrast`` command: argument parsing and user-facing errors only.

Each subcommand registers its parser here and calls into the library; heavy packages (torch,
open_clip) are imported inside the handlers so ``mmcontrast --help`` answers at once. A
``UsageError`` (or a missing file) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

from mmcontrast import __version__
from mmcontrast.errors import UsageError, run_user_command

# name -> (help, function adding arguments, handler(args) -> exit code). Subcommands register here.
Registry = dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]]
SUBCOMMANDS: Registry = {}


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None], registry: Registry = SUBCOMMANDS):
    """Decorator registering ``handler(args) -> int`` as ``mmcontrast NAME`` (or in another ``registry``)."""

    def register(handler: Callable[[argparse.Namespace], int]):
        registry[name] = (help, add_arguments, handler)
        return handler

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcontrast",
        description="CLIP-style contrastive learning: zero-shot, evaluation, embeddings and diagnostics. "
        "Training runs as `accelerate launch -m mmcontrast.train` (or `python -m mmcontrast.train`).",
    )
    parser.add_argument("--version", action="version", version=f"mmcontrast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, handler) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(handler=handler)
    return parser


# --- subcommands (each registers itself with @subcommand; heavy imports inside handlers) ---


# zero-shot, eval (zero-shot | retrieval | linear-probe | knn) and embed: thin wrappers over
# mmcontrast.zeroshot / mmcontrast.evaluate. Results go to stdout; progress bars to stderr.


def _model_arguments(p: argparse.ArgumentParser, text_needed: bool = False) -> None:
    p.add_argument("--checkpoint", required=True, metavar="C",
                   help="run dir, model.safetensors (model_config.json beside it), or an open_clip model name with --pretrained"
                   + ("" if text_needed else "; CLIP models and image-only (SimCLR) encoders"))
    p.add_argument("--pretrained", metavar="LOCAL_FILE", help="weights for an open_clip model name (never downloaded)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the encoders' precision; auto: bf16 on GPUs and on CPUs with AVX512-BF16/AMX, else fp32 "
                   "(similarities and logits stay fp32)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 128)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes (default min(4, CPUs))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _template_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--templates", default="default", metavar="default|openai|FILE",
                   help="prompt templates: 'default' (6 general), 'openai' (CLIP's 80 ImageNet ones) or a file, one per line with {}")


def _json_output_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", metavar="FILE.json", help="also write the JSON result to this file")


def _load_for_eval(args: argparse.Namespace, options: dict | None = None):
    """(model, preprocess, tokenizer) on the chosen device; a UsageError for any unusable argument. Sets
    ``args.precision`` to the precision the encoders run in (``auto`` resolved): every result records it, so a
    number can be reproduced (bf16 and fp32 top-1 can differ by a few images in a thousand).

    Adds ``on_batch`` to the image-folder loader ``options`` when given: CPU threads shared with the decoders.
    """
    from pathlib import Path

    from mmcontrast.evaluate import encoders_in_precision, resolve_device
    from mmcontrast.models import load

    device = resolve_device(args.device)
    loaded = load(args.checkpoint, pretrained=args.pretrained, device=str(device))
    args.precision = encoders_in_precision(loaded[0], args.precision)  # the one resolved: results record it
    if not Path(args.checkpoint).exists() and not args.pretrained:
        print(f"note: {args.checkpoint} is an open_clip model name without --pretrained, so its weights are random",
              file=sys.stderr)
    if options is not None:
        options["on_batch"] = _CpuThreadBalance(device, options["workers"]).update
    return loaded


class _CpuThreadBalance:
    """Shares the CPU cores between decode workers and the model's intra-op threads.

    While the decoders are the bottleneck (their time per batch, divided among them, exceeds the
    model's), the model gets one thread fewer per worker: idle intra-op threads spin on the cores the
    decoders need (on 2 cores, mmc-tiny with 2 decode workers ran 1.5× faster with 1 thread than with
    2). While the model is the bottleneck it keeps every thread (ViT-B-32 on 2 cores: 2× faster).
    A no-op on GPUs and without workers. Changes the process's torch thread count: ``main`` restores it.
    """

    def __init__(self, device, workers: int):
        import torch

        from mmcontrast.evaluate import available_cpus

        self.active = device.type == "cpu" and workers > 0
        self.workers = workers
        self.many = torch.get_num_threads()
        self.few = max(1, min(self.many, available_cpus() - workers))
        self.decode = self.compute = 0.0

    def update(self, decode_seconds: float, compute_seconds: float) -> None:
        import torch

        if not self.active:
            return
        self.decode += decode_seconds
        self.compute += compute_seconds
        wanted = self.few if self.decode / self.workers > self.compute else self.many
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)


def _require_dir(path: str, flag: str) -> None:
    """Fail at once on a missing folder, before the slow imports."""
    from pathlib import Path

    if not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: " + ("not a folder" if Path(path).exists() else "no such folder"))


def _loader_options(args: argparse.Namespace) -> dict:
    from mmcontrast.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS

    workers = DEFAULT_WORKERS if args.workers is None else args.workers
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if workers < 0 or batch_size < 1:
        raise UsageError("--workers must be 0 (decode in this process) or more, and --batch-size at least 1")
    return {"batch_size": batch_size, "workers": workers, "progress": not args.quiet and sys.stderr.isatty()}


def _emit_json(result: dict, output: str | None) -> int:
    import json
    from pathlib import Path

    text = json.dumps(result, indent=2, ensure_ascii=False)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


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
    _model_arguments(p, text_needed=True)
    _template_argument(p)
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="labels shown per image (default 1)")
    p.add_argument("--output", metavar="preds.csv|preds.jsonl", help="one row per image: path,label,score (+ top-k, error)")
    p.add_argument("--plot", metavar="confusion.png", help="confusion matrix of images in label-named subfolders")


def _print_prediction_table(rows: list[dict], root: str) -> None:
    from pathlib import Path

    def shown(path: str) -> str:
        return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path

    width = min(max((len(shown(r["path"])) for r in rows), default=5), 60)
    label_width = max([len(str(r["label"])) for r in rows if r["label"] is not None] + [5])
    print(f"{'image':<{width}}  {'label':<{label_width}}  probability")
    for row in rows:
        name = shown(row["path"])
        if row.get("error"):
            print(f"{name:<{width}}  unreadable: {row['error']}")
            continue
        line = f"{name:<{width}}  {row['label']:<{label_width}}  {row['score']:.4f}"
        if len(row.get("top_k", [])) > 1:
            line += "   " + ", ".join(f"{e['label']} {e['score']:.4f}" for e in row["top_k"][1:])
        print(line)


PREDICTION_FORMATS = (".csv", ".jsonl")


def write_predictions(rows: Sequence[dict], path: str) -> str:
    """Write ``evaluate.zero_shot_rows`` as CSV (top-k spread over ``label_2, score_2, …``) or JSONL, by suffix."""
    import csv
    import json
    from pathlib import Path

    out = Path(path)
    if out.suffix.lower() not in PREDICTION_FORMATS:
        raise UsageError(f"--output {path}: use a .csv or .jsonl file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".jsonl":
        with out.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return str(out)
    k = max((len(row.get("top_k", [])) for row in rows), default=0)
    columns = ["path", "label", "score", "true_label", "error"]
    columns += [f"{name}_{r}" for r in range(2, k + 1) for name in ("label", "score")]
    with out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = dict(row)
            for r, entry in enumerate(row.get("top_k", [])[1:], start=2):
                flat[f"label_{r}"], flat[f"score_{r}"] = entry["label"], entry["score"]
            writer.writerow(flat)
    return str(out)


@subcommand("zero-shot", "classify a folder of images among labels with a CLIP checkpoint", _zero_shot_arguments)
def _zero_shot(args: argparse.Namespace) -> int:
    labels = _read_labels(args)
    _require_dir(args.images, "--images")
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
    options = _loader_options(args)
    model, preprocess, tokenizer = _load_for_eval(args, options)
    classifier = ZeroShotClassifier(model, tokenizer, [ev.prompt_name(label) for label in labels], templates)
    encoded, probs = ev.zero_shot_classify(classifier, preprocess, paths, **options)
    rows = ev.zero_shot_rows(encoded, probs, labels, args.top_k, targets)
    _print_prediction_table(rows, args.images)
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


# ---- eval: one parser, its own sub-commands

EVAL_COMMANDS: Registry = {}
_eval_command = functools.partial(subcommand, registry=EVAL_COMMANDS)


def _errors_list(encoded) -> list[dict]:
    return [{"path": str(encoded.paths[i]), "error": e} for i, e in sorted(encoded.errors.items())]


def _eval_zero_shot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR_OF_CLASS_FOLDERS", help="one subfolder per class; its name is the label")
    _model_arguments(p, text_needed=True)
    _template_argument(p)
    p.add_argument("--plot", metavar="confusion.png", help="also draw the confusion matrix")
    _json_output_argument(p)


@_eval_command("zero-shot", "zero-shot accuracy on class folders (folder names are the labels)", _eval_zero_shot_arguments)
def _eval_zero_shot(args: argparse.Namespace) -> int:
    _require_dir(args.images, "--images")
    from mmcontrast import evaluate as ev
    from mmcontrast.zeroshot import ZeroShotClassifier, load_templates

    templates = load_templates(args.templates)
    paths, names = ev.class_folders(args.images)
    classes = sorted(set(names))
    targets = ev.match_labels(names, classes)
    options = _loader_options(args)
    model, preprocess, tokenizer = _load_for_eval(args, options)
    classifier = ZeroShotClassifier(model, tokenizer, [ev.prompt_name(c) for c in classes], templates)
    encoded, probs = ev.zero_shot_classify(classifier, preprocess, paths, **options)
    ok_targets = [targets[i] for i in encoded.ok]
    metrics = ev.classification_metrics(probs, ok_targets, classes) if encoded.ok else {"top1": None, "top5": None}
    if args.plot and encoded.ok:
        from mmcontrast.plots import confusion_matrix_png

        metrics["plot"] = str(confusion_matrix_png(ok_targets, probs.argmax(dim=1).tolist(), classes, args.plot))
    result = {**metrics, "n_images": len(paths), "n_classes": len(classes), "n_errors": len(encoded.errors),
              "errors": _errors_list(encoded), "templates": args.templates, "checkpoint": args.checkpoint,
              "precision": args.precision}
    return _emit_json(result, args.output)


def _eval_retrieval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, metavar="PATTERN",
                   help="image-caption shards: brace pattern, directory or glob; captions from txt (one per line) "
                   "or a json 'captions' list")
    _model_arguments(p, text_needed=True)
    _json_output_argument(p)


@_eval_command("retrieval", "image-to-text and text-to-image recall@1/5/10 over caption shards", _eval_retrieval_arguments)
def _eval_retrieval(args: argparse.Namespace) -> int:
    from mmcontrast import evaluate as ev

    options = _loader_options(args)
    from mmcontrast.shards import expand_shards

    expand_shards(args.shards)  # a bad pattern fails before the model loads
    model, preprocess, tokenizer = _load_for_eval(args)
    result = ev.evaluate_retrieval(model, preprocess, tokenizer, args.shards, **options)
    return _emit_json({**result, "checkpoint": args.checkpoint, "precision": args.precision}, args.output)


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="DIR", help="class subfolders of training images")
    p.add_argument("--test", required=True, metavar="DIR", help="class subfolders of test images (same class names)")
    _model_arguments(p)
    _json_output_argument(p)


def _linear_probe_arguments(p: argparse.ArgumentParser) -> None:
    _probe_arguments(p)
    p.add_argument("--val-fraction", type=float, help="share of --train held out to choose C (default 0.2)")
    p.add_argument("--seed", type=int, default=0)


@_eval_command("linear-probe", "logistic regression on frozen image features (C chosen on a validation split)",
               _linear_probe_arguments)
def _eval_linear_probe(args: argparse.Namespace) -> int:
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UsageError("--val-fraction must be between 0 and 1")
    _require_dir(args.train, "--train")
    _require_dir(args.test, "--test")
    from mmcontrast import evaluate as ev

    val_fraction = ev.LINEAR_PROBE_VAL_FRACTION if args.val_fraction is None else args.val_fraction

    options = _loader_options(args)
    model, preprocess, _ = _load_for_eval(args, options)
    train, test, classes = ev.encode_class_folders(model, preprocess, args.train, args.test, **options)
    result = ev.linear_probe(train.features.numpy(), train.labels.numpy(), test.features.numpy(), test.labels.numpy(),
                             classes, val_fraction=val_fraction, seed=args.seed)
    result.update(n_train=len(train.labels), n_test=len(test.labels), n_classes=len(classes),
                  n_errors=len(train.errors) + len(test.errors), errors=train.errors + test.errors, checkpoint=args.checkpoint,
                  precision=args.precision)
    return _emit_json(result, args.output)


def _knn_arguments(p: argparse.ArgumentParser) -> None:
    _probe_arguments(p)
    p.add_argument("--k", type=int, help="neighbours (default 20)")
    p.add_argument("--temperature", type=float, help="votes weigh exp(cosine/temperature) (default 0.07)")


@_eval_command("knn", "weighted k-nearest-neighbour classification on frozen image features", _knn_arguments)
def _eval_knn(args: argparse.Namespace) -> int:
    if (args.k is not None and args.k < 1) or (args.temperature is not None and args.temperature <= 0):
        raise UsageError("--k must be at least 1 and --temperature positive")
    _require_dir(args.train, "--train")
    _require_dir(args.test, "--test")
    from mmcontrast import evaluate as ev

    k = ev.KNN_K if args.k is None else args.k
    temperature = ev.KNN_TEMPERATURE if args.temperature is None else args.temperature

    options = _loader_options(args)
    model, preprocess, _ = _load_for_eval(args, options)
    train, test, classes = ev.encode_class_folders(model, preprocess, args.train, args.test, **options)
    votes = ev.knn_scores(train.features, train.labels, test.features, len(classes), k, temperature)
    result = ev.classification_metrics(votes, test.labels.tolist(), classes)
    result.update(k=k, temperature=temperature, n_train=len(train.labels), n_test=len(test.labels),
                  n_classes=len(classes), n_errors=len(train.errors) + len(test.errors),
                  errors=train.errors + test.errors, checkpoint=args.checkpoint, precision=args.precision)
    return _emit_json(result, args.output)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    evaluations = p.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True)
    for name, (help_text, add_arguments, handler) in EVAL_COMMANDS.items():
        sub = evaluations.add_parser(name, help=help_text, description=help_text + ". Prints one JSON object.")
        add_arguments(sub)
        sub.set_defaults(eval_handler=handler)


@subcommand("eval", "evaluate a checkpoint: zero-shot | retrieval | linear-probe | knn (one JSON object)", _eval_arguments)
def _eval(args: argparse.Namespace) -> int:
    return args.eval_handler(args)


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
    p.add_argument("--output", required=True, metavar="emb.npy", help="(N, d) float32; the N paths go to emb.paths.txt beside it")
    _model_arguments(p)
    p.add_argument("--no-normalize", action="store_true", help="keep raw features (default: L2-normalised)")


@subcommand("embed", "write image embeddings (N, d) to a .npy file and their paths beside it", _embed_arguments)
def _embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not args.output.endswith(".npy"):
        raise UsageError(f"--output {args.output}: name the embeddings file NAME.npy (paths go to NAME.paths.txt)")
    _require_dir(args.images, "--images")
    import numpy as np

    from mmcontrast import evaluate as ev

    paths = ev.discover_images(args.images)
    options = _loader_options(args)
    model, preprocess, _ = _load_for_eval(args, options)
    encoded = ev.encode_images(model, preprocess, paths, normalize=not args.no_normalize, desc="embed", **options)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, encoded.features.numpy().astype(np.float32))
    paths_file = out.with_name(out.name[: -len(".npy")] + ".paths.txt")
    paths_file.write_text("".join(f"{paths[i]}\n" for i in encoded.ok), encoding="utf-8")
    result = {"embeddings": str(out), "paths": str(paths_file), "n_images": len(paths), "n_embedded": len(encoded.ok),
              "dim": int(encoded.features.shape[1]) if encoded.ok else 0, "normalized": not args.no_normalize,
              "n_errors": len(encoded.errors), "errors": _errors_list(encoded), "checkpoint": args.checkpoint,
              "precision": args.precision}
    return _emit_json(result, None)


# ---- representation health: plot a run's curves, diagnose any checkpoint


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
    from mmcontrast.config import LogConfig

    p.add_argument("--shards", required=True, metavar="PATTERN",
                   help="image-caption (or image-only) shards: brace pattern, directory or glob")
    _model_arguments(p)
    p.add_argument("--samples", type=int, default=512, metavar="N", help="pairs to embed (default 512)")
    p.add_argument("--views", action="store_true",
                   help="two augmented views of each image even for a CLIP checkpoint (always so for image-only encoders)")
    p.add_argument("--seed", type=int, default=0, help="which samples and which augmentations (default 0)")
    p.add_argument("--min-rank-fraction", type=float, default=LogConfig.min_rank_fraction, metavar="F",
                   help=f"warn below this effective rank / dimension (default {LogConfig.min_rank_fraction})")
    p.add_argument("--min-std-ratio", type=float, default=LogConfig.min_std_ratio, metavar="R",
                   help=f"warn below this embedding std x sqrt(d) (default {LogConfig.min_std_ratio})")
    _json_output_argument(p)


@subcommand("diagnose", "representation health of a checkpoint on shards: alignment, uniformity, effective rank, ... "
            "(one JSON object)", _diagnose_arguments)
def _diagnose(args: argparse.Namespace) -> int:
    if args.samples < 2:
        raise UsageError("--samples must be at least 2 (uniformity and ranks compare samples with each other)")
    options = _loader_options(args)
    from mmcontrast import diagnostics
    from mmcontrast.shards import expand_shards

    shards = expand_shards(args.shards)  # a bad pattern fails before the model loads
    model, preprocess, tokenizer = _load_for_eval(args)
    x, y, views = diagnostics.embed_shard_pairs(model, preprocess, tokenizer, shards, samples=args.samples, views=args.views,
                                                batch_size=options["batch_size"], workers=options["workers"], seed=args.seed)
    metrics = diagnostics.health(x, y, views=views)
    metrics.update(diagnostics.judge(metrics, int(x.shape[0]), views, args.min_rank_fraction))
    if metrics["at_chance"]:
        print(f"warning: positives are found {metrics['positive_accuracy']:.1%} of the time, under twice chance "
              f"({metrics['chance_positive_accuracy']:.1%}): this encoder does not tell these samples apart", file=sys.stderr)
    for line in diagnostics.collapse_warnings(metrics, args.min_rank_fraction, args.min_std_ratio):
        print(f"warning: {line}", file=sys.stderr)
    result = {**metrics, "pairs": "two views" if views else "image-text", "n_samples": int(x.shape[0]),
              "dim": int(x.shape[1]), "checkpoint": args.checkpoint, "shards": args.shards,
              "precision": args.precision}
    return _emit_json(result, args.output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    torch = sys.modules.get("torch")  # commands may rebalance CPU threads; in-process callers get theirs back
    threads = torch.get_num_threads() if torch else None
    try:
        return run_user_command(lambda: args.handler(args))
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
