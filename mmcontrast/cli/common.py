"""What every command family shares: the registry commands join, and the arguments, loading, checks and output
they have in common (a checkpoint and its device and precision, image loaders, a JSON result, a predictions file).
No command lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mmcontrast.errors import UsageError

# name -> (help, function adding arguments, handler(args) -> exit code). Subcommands register here.
Registry = dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]]
SUBCOMMANDS: Registry = {}
EVAL_COMMANDS: Registry = {}  # mmcontrast eval KIND


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None], registry: Registry = SUBCOMMANDS):
    """Decorator registering ``handler(args) -> int`` as ``mmcontrast NAME`` (or in another ``registry``)."""

    def register(handler: Callable[[argparse.Namespace], int]):
        registry[name] = (help, add_arguments, handler)
        return handler

    return register


def eval_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``handler(args) -> int`` as ``mmcontrast eval NAME``."""
    return subcommand(name, help, add_arguments, registry=EVAL_COMMANDS)


def model_arguments(p: argparse.ArgumentParser, text_needed: bool = False) -> None:
    p.add_argument("--checkpoint", required=True, metavar="C",
                   help="run dir, model.safetensors (model_config.json beside it), or an open_clip model name with --pretrained"
                   + ("" if text_needed else "; CLIP models and image-only (SimCLR) encoders"))
    p.add_argument("--pretrained", metavar="LOCAL_FILE",
                   help="weights for an open_clip model name or a timm:NAME encoder (timm's layout); never downloaded")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="input size of a timm:NAME checkpoint or a SimCLR run's timm encoder (default: its pretrained "
                   "config's, 224 for ImageNet models; a run's own)")
    pool_argument(p)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the encoders' precision; auto: bf16 on GPUs and on CPUs with AVX512-BF16/AMX, else fp32 "
                   "(similarities and logits stay fp32)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 128)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes (default min(4, CPUs))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def pool_argument(p: argparse.ArgumentParser) -> None:
    """``--pool``: the global pooling of a timm:NAME encoder (``models.POOLS``, named here: ``--help`` loads no torch)."""
    p.add_argument("--pool", choices=("avg", "max", "avgmax", "catavgmax"),
                   help="global pooling of a timm:NAME encoder or a SimCLR run's (default avg, a run's own); max keeps "
                   "small local features")


def template_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--templates", default="default", metavar="default|openai|FILE",
                   help="prompt templates: 'default' (6 general), 'openai' (CLIP's 80 ImageNet ones) or a file, one per line with {}")


def json_output_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", metavar="FILE.json", help="also write the JSON result to this file")


def load_for_eval(args: argparse.Namespace, options: dict | None = None):
    """(model, preprocess, tokenizer) on the chosen device; a UsageError for any unusable argument. Sets
    ``args.precision`` to the precision the encoders run in (``auto`` resolved): every result records it, so a
    number can be reproduced (bf16 and fp32 top-1 can differ by a few images in a thousand).

    Adds ``on_batch`` to the image-folder loader ``options`` when given: CPU threads shared with the decoders.
    """
    from pathlib import Path

    from mmcontrast.evaluate import encoders_in_precision, resolve_device
    from mmcontrast.loading import load

    device = resolve_device(args.device)
    if args.image_size is not None and args.image_size < 8:
        raise UsageError("--image-size is the input size in pixels: at least 8")
    loaded = load(args.checkpoint, pretrained=args.pretrained, device=str(device), image_size=args.image_size, pool=args.pool)
    args.precision = encoders_in_precision(loaded[0], args.precision)  # the one resolved: results record it
    if not Path(args.checkpoint).exists() and not args.pretrained and not args.checkpoint.startswith("timm:"):
        print(f"note: {args.checkpoint} is an open_clip model name without --pretrained, so its weights are random",
              file=sys.stderr)
    if options is not None:
        from mmcontrast.threads import DecodeBalance

        options["on_batch"] = DecodeBalance(device, options["workers"]).update
    return loaded


def require_dir(path: str, flag: str) -> None:
    """Fail at once on a missing folder, before the slow imports."""
    from pathlib import Path

    if not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: " + ("not a folder" if Path(path).exists() else "no such folder"))


def warn_overlap(first: str, second: str, flags: tuple[str, str]) -> int:
    """Count the images of ``second`` that are byte-identical to one of ``first`` (the same image in training and held-out
    folders inflates every score), and say so on stderr when there are any. Both must be class folders (one line and
    exit 2 otherwise, before any warning)."""
    from data_tools.inputs import identical_files
    from mmcontrast.evaluate import class_folders

    pairs = identical_files(class_folders(first)[0], class_folders(second)[0])
    if pairs:
        print(f"warning: {len(pairs)} image(s) of {flags[1]} are byte-identical to images of {flags[0]} (first: {pairs[0][1]} = "
              f"{pairs[0][0]}): held-out scores are inflated; remove them from one of the two", file=sys.stderr)
    return len(pairs)


def loader_options(args: argparse.Namespace) -> dict:
    from mmcontrast.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS

    workers = DEFAULT_WORKERS if args.workers is None else args.workers
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if workers < 0 or batch_size < 1:
        raise UsageError("--workers must be 0 (decode in this process) or more, and --batch-size at least 1")
    return {"batch_size": batch_size, "workers": workers, "progress": not args.quiet and sys.stderr.isatty()}


def emit_json(result: dict, output: str | None) -> int:
    import json
    from pathlib import Path

    text = json.dumps(result, indent=2, ensure_ascii=False)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


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


def print_prediction_table(rows: list[dict], root: str) -> None:
    """One line per image (its path under ``root``, top label, probability, the rest of its top-k), written at once."""
    import os
    from pathlib import Path

    prefix = os.path.join(str(Path(root)), "")  # the paths are Path(root) / ... (evaluate.discover_images)
    names = [r["path"][len(prefix):] if r["path"].startswith(prefix) else r["path"] for r in rows]
    width = min(max(map(len, names), default=5), 60)
    label_width = max([len(str(r["label"])) for r in rows if r["label"] is not None] + [5])
    lines = [f"{'image':<{width}}  {'label':<{label_width}}  probability"]
    for name, row in zip(names, rows):
        if row.get("error"):
            lines.append(f"{name:<{width}}  unreadable: {row['error']}")
            continue
        line = f"{name:<{width}}  {row['label']:<{label_width}}  {row['score']:.4f}"
        if len(row.get("top_k", [])) > 1:
            line += "   " + ", ".join(f"{e['label']} {e['score']:.4f}" for e in row["top_k"][1:])
        lines.append(line)
    sys.stdout.write("\n".join(lines) + "\n")


def errors_list(encoded) -> list[dict]:
    return [{"path": str(encoded.paths[i]), "error": e} for i, e in sorted(encoded.errors.items())]


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes whole numbers separated by commas, e.g. 1,2,5,10; got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} needs at least one number, each 1 or more; got {text!r}")
    return sorted(set(values))


def names(text: str, flag: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise UsageError(f"{flag} takes distinct names separated by commas, e.g. cat,dog; got {text!r}")
    return names


def load_classifier(args: argparse.Namespace, options: dict):
    from mmcontrast.classifier import ImageClassifier

    model, preprocess, _ = load_for_eval(args, options)
    if not isinstance(model, ImageClassifier):
        raise UsageError(f"{args.checkpoint} is not a fine-tuned classifier (make one with mmcontrast finetune); "
                         "for a CLIP checkpoint use mmcontrast zero-shot")
    return model, preprocess
