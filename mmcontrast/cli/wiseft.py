"""``mmcontrast wise-ft``: the weights of a zero-shot and a fine-tuned CLIP interpolated, written or swept
(``mmcontrast.wiseft``)."""

from __future__ import annotations

import argparse

from mmcontrast.cli.common import json_output_argument, require_dir, subcommand
from mmcontrast.errors import UsageError


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
    p.add_argument("--choose-on", dest="choose_on", action="append", default=[], metavar="zero-shot=DIR",
                   help="class folders held out from --eval whose mean zero-shot top-1 chooses alpha; repeat for more")
    p.add_argument("--output-dir", metavar="RUN", help="write the interpolated model as a run dir (with --alphas: the alpha "
                   "--choose-on chose)")
    p.add_argument("--plot", metavar="curve.png", help="draw each evaluation against alpha")
    json_output_argument(p)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="the encoders' precision in evaluations")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes in evaluations (default 0)")


def _choose_on_folders(args: argparse.Namespace, evaluations: list[tuple[str, str]]) -> list[str]:
    """The ``--choose-on zero-shot=DIR`` folders, checked: class folders, none of them among the ``--eval`` ones."""
    from pathlib import Path

    folders = []
    for spec in args.choose_on:
        kind, _, target = spec.partition("=")
        if kind != "zero-shot" or not target:
            raise UsageError(f"--choose-on {spec!r}: give zero-shot=DIR_OF_CLASS_FOLDERS (held out from --eval)")
        require_dir(target, "--choose-on zero-shot=")
        folders.append(target)
    evaluated = {Path(t).resolve() for kind, t in evaluations if kind == "zero-shot"}
    shared = [f for f in folders if Path(f).resolve() in evaluated]
    if shared:
        raise UsageError(f"--choose-on {shared[0]} is also an --eval folder: alpha chosen on the folders it is scored on "
                         "flatters it; choose on held-out class folders")
    return folders


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
            require_dir(target, "--eval zero-shot=")
        elif kind == "retrieval" and target:
            from mmcontrast.shards import expand_shards

            expand_shards(target)
        else:
            raise UsageError(f"--eval {spec!r}: give zero-shot=DIR_OF_CLASS_FOLDERS or retrieval=SHARDS")
        evaluations.append((kind, target))
    if args.alphas and not evaluations and not args.choose_on:
        raise UsageError("--alphas scores each interpolant: give --eval zero-shot=DIR (or retrieval=SHARDS) and/or "
                         "--choose-on zero-shot=DIR, or one --alpha")
    if args.alpha is not None and args.choose_on:
        raise UsageError("--choose-on chooses among --alphas; with one --alpha there is nothing to choose")
    if args.alphas and args.output_dir and not args.choose_on:
        raise UsageError("--output-dir with --alphas writes the alpha chosen on held-out folders: give --choose-on "
                         "zero-shot=DIR (not an --eval folder), or write one --alpha")
    if args.alpha is not None and not (args.output_dir or evaluations):
        raise UsageError("--alpha A writes that model: give --output-dir RUN (or --eval to score it)")
    return alphas, evaluations


_SWEEP_MEANS = {"mean_zero_shot_top1": "mean zero-shot top-1", "choose_on_mean_top1": "chooses: mean top-1"}


def _print_sweep(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k != "alpha"]
    print("  ".join([f"{'alpha':>5}"] + [f"{k[:40]:>40}" if k not in _SWEEP_MEANS else f"{_SWEEP_MEANS[k]:>20}" for k in keys]))
    for row in rows:
        cells = [f"{row['alpha']:>5g}"]
        for k in keys:
            value = row[k]
            if isinstance(value, dict):
                value = value["top1"] if "top1" in value else (value["image_to_text"]["R@1"] + value["text_to_image"]["R@1"]) / 2
            cells.append(f"{value:>{20 if k in _SWEEP_MEANS else 40}.4f}")
        print("  ".join(cells))


@subcommand("wise-ft", "interpolate the weights of a zero-shot and a fine-tuned CLIP (WiSE-FT): write one, or sweep alpha "
            "and score each", _wise_ft_arguments)
def _wise_ft(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    alphas, evaluations = _wise_ft_request(args)
    choose_on = _choose_on_folders(args, evaluations)
    from mmcontrast import wiseft
    from mmcontrast.evaluate import encoders_in_precision, resolve_device

    if args.output_dir:
        wiseft.check_output_dir(args.output_dir)
    ends = wiseft.load_endpoints(args.zero_shot, args.finetuned, args.pretrained, str(resolve_device(args.device)))
    result: dict = {"zero_shot": args.zero_shot, "finetuned": args.finetuned}
    if evaluations or choose_on:
        result["precision"] = encoders_in_precision(ends.model, args.precision)
        result["results"] = rows = wiseft.sweep(ends, alphas, evaluations, workers=args.workers, choose_on=choose_on)
        _print_sweep(rows)
        if choose_on:
            result["chosen_alpha"], result["chosen_on"] = wiseft.best_alpha(rows), choose_on
            print(f"alpha {result['chosen_alpha']:g}: the best mean zero-shot top-1 on {', '.join(choose_on)} (held out)")
        if args.plot:
            from mmcontrast.plots import wise_ft_png

            result["plot"] = str(wise_ft_png(rows, args.plot))
    if args.output_dir:
        alpha = args.alpha if args.alpha is not None else result["chosen_alpha"]
        result["output_dir"] = str(wiseft.write_run(ends, alpha, args.output_dir, (args.zero_shot, args.finetuned)))
        print(f"wrote {args.output_dir}: alpha {alpha:g} between {args.zero_shot} (0) and {args.finetuned} (1)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
