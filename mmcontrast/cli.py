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
    p.add_argument("--pretrained", metavar="LOCAL_FILE",
                   help="weights for an open_clip model name or a timm:NAME encoder (timm's layout); never downloaded")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="input size of a timm:NAME checkpoint (default: its pretrained config's, 224 for ImageNet models)")
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
    if args.image_size is not None and (args.image_size < 8 or not args.checkpoint.startswith("timm:")):
        raise UsageError("--image-size sets the input size of a timm:NAME checkpoint (at least 8 px); "
                         "run dirs and open_clip models preprocess at their own size")
    loaded = load(args.checkpoint, pretrained=args.pretrained, device=str(device), image_size=args.image_size)
    args.precision = encoders_in_precision(loaded[0], args.precision)  # the one resolved: results record it
    if not Path(args.checkpoint).exists() and not args.pretrained and not args.checkpoint.startswith("timm:"):
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


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes whole numbers separated by commas, e.g. 1,2,5,10; got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} needs at least one number, each 1 or more; got {text!r}")
    return sorted(set(values))


def _few_shot_arguments(p: argparse.ArgumentParser) -> None:
    _probe_arguments(p)
    p.add_argument("--shots", default="1,2,5,10,20,50", metavar="K,K,...",
                   help="labelled images per class to draw from --train (default 1,2,5,10,20,50)")
    p.add_argument("--repeats", type=int, default=5, help="seeded draws per shot count (default 5)")
    p.add_argument("--baselines", default="pixels,random-init", metavar="pixels,random-init",
                   help="baselines fit the same way: raw pixels, the same architecture at random init ('none': neither)")
    _template_argument(p)
    p.add_argument("--plot", metavar="curve.png", help="draw accuracy against shots (log x, bands of 1 std)")
    p.add_argument("--seed", type=int, default=0)


@_eval_command("few-shot", "label efficiency: accuracy against labelled images per class, with baselines beside it",
               _few_shot_arguments)
def _eval_few_shot(args: argparse.Namespace) -> int:
    shots = _int_list(args.shots, "--shots")
    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    baselines = [] if args.baselines == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    from mmcontrast.fewshot import BASELINES, label_efficiency

    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise UsageError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(BASELINES)} or none")
    _require_dir(args.train, "--train")
    _require_dir(args.test, "--test")
    options = _loader_options(args)
    loaded = _load_for_eval(args, options)

    def load(random_init: bool) -> tuple:
        if not random_init:
            return loaded
        from mmcontrast.evaluate import encoders_in_precision
        from mmcontrast.models import load as load_model

        baseline = load_model(args.checkpoint, pretrained=args.pretrained, device=str(next(loaded[0].parameters()).device),
                              image_size=args.image_size, random_init=True)
        encoders_in_precision(baseline[0], args.precision)
        return baseline

    result = label_efficiency(load, args.train, args.test, shots, args.repeats, baselines, args.templates, options, args.seed)
    result["checkpoint"] = args.checkpoint
    if args.plot:
        from mmcontrast.plots import few_shot_png

        result["plot"] = str(few_shot_png(result["curves"], args.plot, result["chance"], title=f"label efficiency: {args.checkpoint}"))
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
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of images, searched recursively")
    source.add_argument("--texts", metavar="FILE", help="texts to embed, one per line (blank lines left out; CLIP checkpoints)")
    p.add_argument("--output", required=True, metavar="emb.npy",
                   help="(N, d) float32; the N paths (or texts) go to emb.paths.txt (emb.texts.txt) beside it")
    _model_arguments(p)
    p.add_argument("--no-normalize", action="store_true", help="keep raw features (default: L2-normalised)")


@subcommand("embed", "write image (or text) embeddings (N, d) to a .npy file and their paths (texts) beside it",
            _embed_arguments)
def _embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not args.output.endswith(".npy"):
        raise UsageError(f"--output {args.output}: name the embeddings file NAME.npy (paths go to NAME.paths.txt)")
    if args.texts is not None:
        return _embed_texts(args)
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


def _embed_texts(args: argparse.Namespace) -> int:
    """``embed --texts FILE``: one embedding per non-blank line, through the checkpoint's text tower."""
    from pathlib import Path

    if not Path(args.texts).is_file():
        raise UsageError(f"--texts {args.texts}: no such file (give a text file, one text per line)")
    texts = [line.strip() for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UsageError(f"--texts {args.texts} holds no text; write one text per line")
    if args.no_normalize:
        raise UsageError("--no-normalize applies to images; text embeddings are always L2-normalised")
    import numpy as np

    from mmcontrast.evaluate import encode_texts

    options = _loader_options(args)
    model, _, tokenizer = _load_for_eval(args)
    if tokenizer is None or not hasattr(model, "encode_text"):
        raise UsageError(f"{args.checkpoint} is an image-only encoder; text embeddings need a CLIP checkpoint")
    features = encode_texts(model, tokenizer, texts, options["batch_size"])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, features.numpy().astype(np.float32))
    texts_file = out.with_name(out.name[: -len(".npy")] + ".texts.txt")
    texts_file.write_text("".join(f"{t}\n" for t in texts), encoding="utf-8")
    return _emit_json({"embeddings": str(out), "texts": str(texts_file), "n_texts": len(texts),
                       "dim": int(features.shape[1]), "normalized": True, "checkpoint": args.checkpoint}, None)


# ---- search: index a collection, query it, find its near-duplicates, serve a page (mmcontrast.search, .dedup, .web)


def _index_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast import ann, search

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of images, searched recursively")
    source.add_argument("--shards", metavar="PATTERN", help="webdataset shards (brace pattern, directory, glob, list file); "
                        "captions are kept and embedded too")
    p.add_argument("--output-dir", required=True, metavar="INDEX", help="folder for the embeddings, metadata and faiss index")
    _model_arguments(p)
    p.add_argument("--index-key", default="auto", metavar="auto|FAISS_KEY",
                   help=f"auto: exact (Flat) under {ann.EXACT_BELOW} images, else the approximate index autofaiss "
                   "would choose for the size (HNSW, IVF, OPQ+IVF+PQ); or any faiss index_factory string (HNSW32, IVF64,Flat)")
    p.add_argument("--recall-target", type=float, default=ann.RECALL_TARGET, metavar="R",
                   help=f"an approximate index searches with the cheapest setting reaching this recall@10 (default {ann.RECALL_TARGET})")
    p.add_argument("--part-size", type=int, default=search.DEFAULT_PART_SIZE, metavar="N",
                   help=f"images per part, the unit of resuming and of sharing work between processes (default {search.DEFAULT_PART_SIZE}; "
                   "shards: one part each)")
    p.add_argument("--resume", action="store_true", help="finish an index that was stopped: finished parts are kept, not embedded again")
    p.add_argument("--overwrite", action="store_true", help="replace the index in --output-dir")


@subcommand("index", "embed a folder of images or shards into a searchable faiss index (runs under accelerate launch too)",
            _index_arguments)
def _index(args: argparse.Namespace) -> int:
    if args.images is not None:
        _require_dir(args.images, "--images")
    if not 0 < args.recall_target <= 1:
        raise UsageError("--recall-target must be in (0, 1]")
    import os

    from mmcontrast import ann, launch, search

    options = _loader_options(args)
    ann.check_index_key(args.index_key)
    plan = search.make_plan(args.images, args.shards, args.checkpoint, args.pretrained, args.precision, args.part_size)
    n_processes, threads = launch.requested_cpu_processes()
    if int(os.environ.get("RANK", "0")) == 0:
        search.check_folder(args.output_dir, plan, args.resume, args.overwrite)  # a mistake is one line, not one per process
    if n_processes > 1:  # accelerate launch --cpu --num_processes N started only us: torchrun starts the N
        launch.exec_torchrun(n_processes, "mmcontrast.cli", sys.argv[1:],
                             threads or launch.cpu_threads_per_process(n_processes, options["workers"]))
    processes = search.join_processes(args.device)
    args.device = processes.device
    infos = search.build_index(plan, args.output_dir, processes, lambda: _load_for_eval(args, options), options,
                               resume=args.resume, overwrite=args.overwrite, index_key=args.index_key,
                               recall_target=args.recall_target, progress=options["progress"])
    return 0 if infos is None else _emit_json({"index": args.output_dir, **infos}, None)


def _search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="INDEX", help="a folder made by `mmcontrast index`")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find the images that match this text (CLIP checkpoints)")
    query.add_argument("--image", metavar="FILE", help="find the images most like this one")
    p.add_argument("--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--output", metavar="results.json|results.html",
                   help="also write the results: JSON, or an HTML contact sheet with the images inside it")
    p.add_argument("--device", help="cpu, cuda or cuda:N for the query's encoder (default: cuda when available)")


def _print_results(result: dict) -> None:
    rows = [(str(i + 1), f"{r['score']:.4f}", str(r.get("path") or r.get("key")), r.get("caption") or "")
            for i, r in enumerate(result["results"])]
    width = min(max((len(r[2]) for r in rows), default=4), 80)
    item = "path" if any("path" in r for r in result["results"]) or not rows else "key"
    print(f"{'rank':>4}  {'score':>6}  {item:<{width}}  caption")
    for rank, score, name, caption in rows:
        print(f"{rank:>4}  {score:>6}  {name:<{width}}  {caption}".rstrip())


@subcommand("search", "the images of an index nearest to a text or an image (a table; JSON or an HTML contact sheet)",
            _search_arguments)
def _search(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.k < 1:
        raise UsageError(f"--k must be at least 1, not {args.k}")
    if args.output and Path(args.output).suffix.lower() not in (".json", ".html", ".htm"):
        raise UsageError(f"--output {args.output}: use a .json or .html file name")
    if args.text is not None and not args.text.strip():
        raise UsageError("--text is empty; give some words to search for")
    if args.image is not None and not Path(args.image).is_file():
        raise UsageError(f"--image {args.image}: no such file")
    from mmcontrast.evaluate import resolve_device
    from mmcontrast.search import Searcher

    searcher = Searcher(args.index, device=str(resolve_device(args.device)))
    result = searcher.search_text(args.text, args.k) if args.text is not None else searcher.search_image(args.image, args.k)
    _print_results(result)
    if args.output:
        import json

        from mmcontrast import web

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        is_json = out.suffix.lower() == ".json"
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n" if is_json else web.contact_sheet(searcher, result),
                       encoding="utf-8")
        print(f"\nresults: {out}")
    return 0


def _dedup_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast.dedup import CALIBRATION_RECALL

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", metavar="INDEX", help="a folder made by `mmcontrast index`")
    source.add_argument("--images", metavar="DIR", help="a folder of images (embedded with --checkpoint, not kept)")
    _model_arguments(p)
    next(a for a in p._actions if a.dest == "checkpoint").required = False  # only --images needs one
    p.add_argument("--threshold", default="auto", metavar="auto|T",
                   help="cosine at or above which two images are near-duplicates; auto (default): the cosine that "
                   f"{100 * CALIBRATION_RECALL:g}%% of resized, recompressed and cropped copies of indexed images reach with their "
                   "original under this checkpoint (README 'Search' has its measured precision and recall)")
    p.add_argument("--output", required=True, metavar="dups.csv", help="group,path,score rows; each group's first row is the one to keep")
    p.add_argument("--html", metavar="report.html", help="also a self-contained page of the groups with their images")


def _dedup_searcher(args: argparse.Namespace, tmp: str):
    """The Searcher of --index, or of an exact index of --images built in ``tmp``."""
    from mmcontrast import search
    from mmcontrast.evaluate import resolve_device

    if args.index is not None:
        return search.Searcher(args.index, device=str(resolve_device(args.device)))
    if not args.checkpoint:
        raise UsageError("--images needs --checkpoint to embed them (or give --index of an index made by `mmcontrast index`)")
    _require_dir(args.images, "--images")
    options = _loader_options(args)
    plan = search.make_plan(args.images, None, args.checkpoint, args.pretrained, args.precision)
    processes = search.join_processes(args.device)
    search.build_index(plan, tmp, processes, lambda: _load_for_eval(args, options), options, progress=options["progress"])
    return search.Searcher(tmp, device=processes.device)


@subcommand("dedup", "groups of near-duplicate images (resized, recompressed, cropped copies) to a CSV", _dedup_arguments)
def _dedup(args: argparse.Namespace) -> int:
    import csv
    import tempfile
    from pathlib import Path

    try:
        threshold = None if args.threshold == "auto" else float(args.threshold)
    except ValueError:
        raise UsageError(f"--threshold must be auto or a cosine similarity, not {args.threshold!r}") from None
    if threshold is not None and not 0 < threshold <= 1:
        raise UsageError(f"--threshold must be a cosine similarity in (0, 1], not {threshold}")
    if not args.output.lower().endswith(".csv"):
        raise UsageError(f"--output {args.output}: use a .csv file name")
    from mmcontrast import dedup, web

    with tempfile.TemporaryDirectory(prefix="mmcontrast-dedup-") as tmp:
        searcher = _dedup_searcher(args, tmp)
        calibration = dedup.calibrate_threshold(searcher) if threshold is None else None
        threshold = calibration["threshold"] if calibration else threshold
        groups = dedup.find_duplicates(searcher, threshold)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["group", "path", "score"])
            writer.writeheader()
            writer.writerows(dedup.duplicate_rows(searcher, groups))
        if args.html:
            Path(args.html).parent.mkdir(parents=True, exist_ok=True)
            Path(args.html).write_text(web.dedup_report(searcher, groups, threshold), encoding="utf-8")
        result = {"groups": len(groups), "duplicates": sum(len(g.ids) - 1 for g in groups), "images": len(searcher),
                  "threshold": threshold, **({"calibration": calibration} if calibration else {}), "output": str(out),
                  "html": args.html}
    return _emit_json(result, None)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast.web import DEFAULT_HOST, DEFAULT_PORT

    p.add_argument("--index", required=True, metavar="INDEX", help="a folder made by `mmcontrast index`")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--device", help="cpu, cuda or cuda:N for the queries' encoder (default: cuda when available)")


@subcommand("serve", "a web page to search an index: GET /?q=TEXT, GET /api/search?q=TEXT&k=K", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    from mmcontrast import web
    from mmcontrast.evaluate import resolve_device
    from mmcontrast.search import Searcher

    searcher = Searcher(args.index, device=str(resolve_device(args.device)))
    searcher.model  # noqa: B018 (load the encoders now, not on the first query)
    server = web.make_server(searcher, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {len(searcher)} images of {args.index} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


# ---- the labelled slice: fine-tune into a classifier, predict with it, evaluate it


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    from mmcontrast.finetune import HEAD_INITS, Settings  # no torch: --help stays instant

    p.add_argument("--train", required=True, metavar="DIR_OF_CLASS_FOLDERS", help="labelled images, one subfolder per class")
    p.add_argument("--checkpoint", required=True, metavar="C",
                   help="where the encoder starts: a SimCLR or CLIP run, an open_clip name or timm:NAME with --pretrained")
    p.add_argument("--pretrained", metavar="LOCAL_FILE", help="weights for an open_clip name or timm:NAME (never downloaded)")
    p.add_argument("--output-dir", required=True, metavar="RUN", help="the run directory (config, metrics, checkpoints, weights)")
    p.add_argument("--val", metavar="DIR", help="validation class folders that choose the epoch (default: a tenth of --train)")
    p.add_argument("--epochs", type=int, default=Settings.epochs, help=f"passes over --train (default {Settings.epochs})")
    p.add_argument("--lr", type=float, default=Settings.lr,
                   help=f"the head's peak learning rate; the encoder's is {Settings.backbone_lr_scale}x (default {Settings.lr})")
    p.add_argument("--batch-size", type=int, default=Settings.batch_size, help=f"default {Settings.batch_size}")
    p.add_argument("--image-size", type=int, metavar="PX", help="input size of a timm:NAME encoder (default: its pretrained size)")
    p.add_argument("--init", default=Settings.init, choices=HEAD_INITS,
                   help="the head's start: a linear probe on frozen features (LP-FT), the class names (CLIP), or random")
    _template_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=Settings.workers, help="data-loading processes")
    p.add_argument("--resume", action="store_true", help="continue RUN from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE", help="any config field")


@subcommand("finetune", "fine-tune an encoder with a linear head on class folders (LP-FT): the labelled slice into a classifier",
            _finetune_arguments)
def _finetune(args: argparse.Namespace) -> int:
    _require_dir(args.train, "--train")
    if args.val:
        _require_dir(args.val, "--val")
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise UsageError("--epochs and --batch-size must be at least 1 and --lr positive")
    from mmcontrast import finetune
    from mmcontrast.config import apply_overrides, validate
    from mmcontrast.train import train

    settings = finetune.Settings(args.train, args.checkpoint, args.output_dir, args.val, args.pretrained, args.epochs, args.lr,
                                 batch_size=args.batch_size, image_size=args.image_size, init=args.init,
                                 templates=args.templates, seed=args.seed, workers=args.workers)
    cfg = finetune.prepare(settings)
    cfg.train.resume = args.resume
    apply_overrides(cfg, args.overrides)
    validate(cfg)
    run_dir = train(cfg)
    print(f"classifier: {run_dir} (predict with: mmcontrast predict --images DIR --checkpoint {run_dir}); on several GPUs: "
          f"accelerate launch -m mmcontrast.train --config {run_dir}/config.yaml --resume")
    return 0


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
    _model_arguments(p)
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="classes shown per image (default 1)")
    p.add_argument("--output", metavar="preds.csv|preds.jsonl", help="one row per image: path,label,score (+ top-k, error)")


def _load_classifier(args: argparse.Namespace, options: dict):
    from mmcontrast.classifier import ImageClassifier

    model, preprocess, _ = _load_for_eval(args, options)
    if not isinstance(model, ImageClassifier):
        raise UsageError(f"{args.checkpoint} is not a fine-tuned classifier (make one with mmcontrast finetune); "
                         "for a CLIP checkpoint use mmcontrast zero-shot")
    return model, preprocess


@subcommand("predict", "classify a folder of images with a fine-tuned classifier (mmcontrast finetune)", _predict_arguments)
def _predict(args: argparse.Namespace) -> int:
    _require_dir(args.images, "--images")
    if args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if args.output and not args.output.lower().endswith(PREDICTION_FORMATS):
        raise UsageError(f"--output {args.output}: use a .csv or .jsonl file name")
    from mmcontrast import evaluate as ev
    from mmcontrast.classifier import predict

    options = _loader_options(args)
    model, preprocess = _load_classifier(args, options)
    paths = ev.discover_images(args.images)
    targets = ev.match_labels(ev.folder_names(args.images, paths), model.classes)
    encoded, probs = predict(model, preprocess, paths, **options)
    rows = ev.zero_shot_rows(encoded, probs, model.classes, args.top_k, targets)
    _print_prediction_table(rows, args.images)
    print(f"\n{len(paths)} images, {len(encoded.ok)} classified, {len(encoded.errors)} unreadable")
    ok_targets = [targets[i] for i in encoded.ok]
    if max(ok_targets, default=-1) >= 0:
        metrics = ev.classification_metrics(probs, ok_targets, model.classes)
        print(f"accuracy over {metrics['n_labelled']} images in class-named folders: top-1 {metrics['top1']:.4f}")
    if args.output:
        print(f"predictions: {write_predictions(rows, args.output)}")
    return 0


def _eval_classifier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR_OF_CLASS_FOLDERS", help="one subfolder per class, named as trained")
    _model_arguments(p)
    p.add_argument("--plot", metavar="confusion.png", help="also draw the confusion matrix")
    _json_output_argument(p)


@_eval_command("classifier", "accuracy, per-class recall and confusion of a fine-tuned classifier on class folders",
               _eval_classifier_arguments)
def _eval_classifier(args: argparse.Namespace) -> int:
    _require_dir(args.images, "--images")
    from mmcontrast import evaluate as ev
    from mmcontrast.classifier import predict

    paths, names = ev.class_folders(args.images)
    options = _loader_options(args)
    model, preprocess = _load_classifier(args, options)
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
              "n_errors": len(encoded.errors), "errors": _errors_list(encoded), "checkpoint": args.checkpoint}
    if args.plot:
        from mmcontrast.plots import confusion_matrix_png

        result["plot"] = str(confusion_matrix_png(ok_targets, predicted, model.classes, args.plot))
    return _emit_json(result, args.output)


# ---- WiSE-FT: interpolate a zero-shot and a fine-tuned run (mmcontrast.wiseft)


def _wise_ft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("zero_shot", metavar="ZERO_SHOT_RUN",
                   help="the start: a run dir, a model.safetensors (model_config.json beside it), or an open_clip model name with --pretrained")
    p.add_argument("finetuned", metavar="FINETUNED_RUN", help="the fine-tuned end: a run dir of the same architecture")
    p.add_argument("--pretrained", metavar="LOCAL_FILE", help="weights of ZERO_SHOT_RUN when it is an open_clip model name")
    at = p.add_mutually_exclusive_group(required=True)
    at.add_argument("--alpha", type=float, help="one mixing coefficient (0: the zero-shot end, 1: the fine-tuned one)")
    at.add_argument("--alphas", metavar="A,B,...", help="a sweep, e.g. 0,0.1,0.2,...,1: each scored on --eval")
    p.add_argument("--eval", dest="evals", action="append", default=[], metavar="zero-shot=DIR | retrieval=SHARDS",
                   help="score each interpolant: zero-shot top-1 on class folders, or image-text recall on caption shards; repeat for more")
    p.add_argument("--output-dir", metavar="RUN", help="write the interpolated model as a run dir (with --alphas: the alpha with "
                   "the best mean zero-shot top-1)")
    p.add_argument("--plot", metavar="curve.png", help="draw each evaluation against alpha")
    _json_output_argument(p)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="the encoders' precision in evaluations")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes in evaluations (default 0)")


def _wise_ft_request(args: argparse.Namespace) -> tuple[list[float], list[tuple[str, str]]]:
    """The alphas and the evaluations ``(kind, target)``, checked before anything loads."""
    text = str(args.alpha) if args.alpha is not None else args.alphas
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise UsageError(f"--alphas takes numbers separated by commas, e.g. 0,0.5,1; got {text!r}") from None
    if not alphas or not all(0 <= a <= 1 for a in alphas):
        raise UsageError(f"alpha is a mixing coefficient in [0, 1] (0: the zero-shot end, 1: the fine-tuned one); got {text!r}")
    evaluations = []
    for spec in args.evals:
        kind, _, target = spec.partition("=")
        if kind == "zero-shot":
            _require_dir(target, "--eval zero-shot=")
        elif kind == "retrieval" and target:
            from mmcontrast.shards import expand_shards

            expand_shards(target)
        else:
            raise UsageError(f"--eval {spec!r}: give zero-shot=DIR_OF_CLASS_FOLDERS or retrieval=SHARDS")
        evaluations.append((kind, target))
    if args.alphas and not evaluations:
        raise UsageError("--alphas scores each interpolant: give --eval zero-shot=DIR (or retrieval=SHARDS), or one --alpha")
    if args.alpha is not None and not (args.output_dir or evaluations):
        raise UsageError("--alpha A writes that model: give --output-dir RUN (or --eval to score it)")
    return alphas, evaluations


def _print_sweep(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k != "alpha"]
    print("  ".join([f"{'alpha':>5}"] + [f"{k[:40]:>40}" if k != "mean_zero_shot_top1" else f"{'mean zero-shot top-1':>20}" for k in keys]))
    for row in rows:
        cells = [f"{row['alpha']:>5g}"]
        for k in keys:
            value = row[k]
            if isinstance(value, dict):
                value = value["top1"] if "top1" in value else (value["image_to_text"]["R@1"] + value["text_to_image"]["R@1"]) / 2
            cells.append(f"{value:>{20 if k == 'mean_zero_shot_top1' else 40}.4f}")
        print("  ".join(cells))


@subcommand("wise-ft", "interpolate the weights of a zero-shot and a fine-tuned CLIP (WiSE-FT): write one, or sweep alpha "
            "and score each", _wise_ft_arguments)
def _wise_ft(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    alphas, evaluations = _wise_ft_request(args)
    from mmcontrast import wiseft
    from mmcontrast.evaluate import encoders_in_precision, resolve_device

    if args.output_dir:
        wiseft.check_output_dir(args.output_dir)
    ends = wiseft.load_endpoints(args.zero_shot, args.finetuned, args.pretrained, str(resolve_device(args.device)))
    result: dict = {"zero_shot": args.zero_shot, "finetuned": args.finetuned}
    if evaluations:
        result["precision"] = encoders_in_precision(ends.model, args.precision)
        result["results"] = rows = wiseft.sweep(ends, alphas, evaluations, workers=args.workers)
        result["best_alpha"] = wiseft.best_alpha(rows)
        _print_sweep(rows)
        if args.plot:
            from mmcontrast.plots import wise_ft_png

            result["plot"] = str(wise_ft_png(rows, args.plot))
    if args.output_dir:
        alpha = args.alpha if args.alpha is not None else result.get("best_alpha")
        if alpha is None:
            raise UsageError("--output-dir with --alphas writes the best alpha by zero-shot top-1: give --eval zero-shot=DIR")
        result["output_dir"] = str(wiseft.write_run(ends, alpha, args.output_dir, (args.zero_shot, args.finetuned)))
        print(f"wrote {args.output_dir}: alpha {alpha:g} between {args.zero_shot} (0) and {args.finetuned} (1)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


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
    p.add_argument("--preset", default="natural", choices=("natural", "texture", "overhead", "finetune"),
                   help="the two views' recipe (data.augment.preset): can this encoder match views made this way?")
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
