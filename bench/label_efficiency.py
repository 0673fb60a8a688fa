"""Label efficiency on a real labelled slice, every row a product command: the whole table in one command.

    python examples/real_data.py elpv data/elpv        # the ELPV protocol: test/, pool/, unlabelled/, shots50_s{0,1,2}/
    python examples/imagenet_weights/convert_efficientnet_lite0.py weights/efficientnet_lite0.safetensors
    python bench/label_efficiency.py data/elpv --weights weights/efficientnet_lite0.safetensors [--rows ...]

Rows (``--rows``, comma-separated; default every row but ``ceiling-finetune``), each top-1 and mean per-class recall on
``DATA/test``, mean ± std over the draws ``DATA/shots*_s*`` (their images per class are the draw):

* ``baselines``: ``mmcontrast eval few-shot`` on each draw (all its images: ``--shots N --repeats 1``): raw pixels,
  the architecture at random init, the frozen ImageNet features under the logistic probe and nearest class mean;
* ``native-max``: the frozen features at the images' own size with global max pooling instead of the average
  (``eval few-shot --image-size N --pool max``): a small defect's response is not averaged away;
* ``patches``: ``mmcontrast finetune --epochs 0 --image-size N --pool max`` on each draw: no fine-tuning, the frozen
  probe against the patch classifier (region banks per class; those that set their class apart are stacked with the
  probe), kept by its cross-validation;
* ``patches-unlabelled``: the same with ``--unlabelled DATA/unlabelled``: the banks take the unlabelled images the
  probe gives each class most confidently;
* ``finetune``: ``mmcontrast finetune`` with its defaults on each draw (it cross-validates the frozen probe, the patch
  classifier and fine-tuning and keeps the lowest held-out log-loss), then ``mmcontrast eval classifier``;
* ``simclr``: ``configs/simclr_imagenet_cpu.yaml`` continued on ``DATA/unlabelled`` (``make_shards --layout images``
  first), then, like ``native-max`` and ``patches`` with its encoder in ImageNet's place, the probe (``eval few-shot
  --checkpoint RUN --image-size N --pool max``) and ``finetune --checkpoint RUN --epochs 0 --image-size N --pool max``
  on each draw;
* ``simclr-finetune``: ``finetune --checkpoint RUN`` with its defaults on each draw (a quarter of an hour a draw on 2 cores);
* ``ceiling-probe``: the frozen probe with every label of ``DATA/pool`` (``eval linear-probe``);
* ``ceiling-finetune``: ``finetune`` on every label of ``DATA/pool`` (hours on a CPU).

Features are computed in float32 everywhere (``--precision fp32``: the probe `finetune` weighs is fitted on float32
features, and bf16 features move a 100-image probe by points). Every command's wall time is recorded. Writes ``OUT/label_efficiency.json`` and ``OUT/label_efficiency.png`` and
prints a Markdown table (``--report``: of what is finished, running nothing) with the majority class's share of the test set (what guessing one class scores) and the
published reference given with ``--reference``. Runs already finished in ``--workdir`` are read, not run again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("baselines", "native-max", "patches", "patches-unlabelled", "finetune", "simclr", "simclr-finetune", "ceiling-probe",
        "ceiling-finetune")
DEFAULT_ROWS = ("baselines", "native-max", "patches", "patches-unlabelled", "finetune", "simclr", "ceiling-probe")
CHECKPOINT = "timm:efficientnet_lite0"
NAMES = {  # result key -> the table's row
    "pixels": "raw pixels, logistic probe",
    "random_init": "Lite0 at random init, logistic probe",
    "checkpoint_ncm": "frozen ImageNet Lite0, nearest class mean",
    "checkpoint": "frozen ImageNet Lite0, logistic probe",
    "native_max_probe": "the same at the images' own size, max pooling (`--image-size N --pool max`)",
    "patches": "`finetune --epochs 0`, native size, max pooling: probe or patch classifier (CV)",
    "patches_unlabelled": "the same with `--unlabelled DATA/unlabelled` (region banks filled)",
    "finetune": "`finetune`, defaults (CV: probe, patch classifier or fine-tuned)",
    "simclr_native_max_probe": "continued SimCLR on unlabelled, then the probe (native size, max pooling)",
    "simclr_patches": "continued SimCLR on unlabelled, then `finetune --epochs 0` (native size, max pooling)",
    "simclr_finetune": "continued SimCLR on unlabelled, then `finetune`, defaults",
    "ceiling_probe": "frozen ImageNet Lite0 probe, every label of pool/",
    "ceiling_finetune": "`finetune` on every label of pool/",
}


def _mmcontrast(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmcontrast.cli", *args]


def _run(cmd: list[str], log: Path) -> float:
    """Run one product command (stdout and stderr to ``log``); returns its wall time. A failure ends the benchmark."""
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        sys.exit(f"error: {shlex.join(cmd)} exited {code}; see {log}")
    return time.perf_counter() - start


REPORT_ONLY = False  # --report: the table of what is finished, nothing run


def _cached(result: Path, cmd: list[str], log: Path) -> tuple[dict | None, float]:
    """``cmd``'s JSON output at ``result`` and its wall time, running it only when ``result`` is not there yet (with
    ``--report``, None instead)."""
    timing = result.with_suffix(".seconds")
    if not result.is_file():
        if REPORT_ONLY:
            return None, float("nan")
        timing.write_text(str(_run(cmd, log)))
    return json.loads(result.read_text()), float(timing.read_text()) if timing.is_file() else float("nan")


class Table:
    """Per-row lists of (top-1, mean per-class recall) over the draws, and wall seconds."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, key: str, top1: float, recall: float, seconds: float, command: list[str]) -> None:
        row = self.rows.setdefault(key, {"top1": [], "recall": [], "seconds": [], "command": shlex.join(command)})
        row["top1"].append(top1)
        row["recall"].append(recall)
        row["seconds"].append(seconds)

    def summary(self) -> dict:
        import numpy as np

        return {key: {**row, "top1_mean": float(np.mean(row["top1"])), "top1_std": float(np.std(row["top1"])),
                      "recall_mean": float(np.mean(row["recall"])), "recall_std": float(np.std(row["recall"])),
                      "seconds_mean": float(np.nanmean(row["seconds"]))} for key, row in self.rows.items()}


def few_shot(table: Table, checkpoint: list[str], draw: Path, test: Path, work: Path, prefix: str = "", baselines: str = "none") -> None:
    """``eval few-shot`` on every image of ``draw`` (its images per class are the draw), adding its curves to ``table``."""
    per_class = min(len(list(d.iterdir())) for d in draw.iterdir() if d.is_dir())
    out = work / f"{prefix}fewshot_{draw.name}.json"
    cmd = _mmcontrast("eval", "few-shot", *checkpoint, "--train", str(draw), "--test", str(test), "--shots", str(per_class),
                      "--repeats", "1", "--baselines", baselines, "--precision", "fp32", "--output", str(out))
    result, seconds = _cached(out, cmd, out.with_suffix(".log"))
    if result is None:
        return
    rows = {"checkpoint": f"{prefix}probe"} if prefix else {k: k for k in ("pixels", "random_init", "checkpoint_ncm", "checkpoint")}
    for name, row in rows.items():
        point = result["curves"][name][-1]
        table.add(row, point["mean"], point["recall_mean"], seconds, cmd)


def finetune(table: Table, key: str, checkpoint: list[str], train: Path, test: Path, work: Path, extra: tuple = ()) -> None:
    """``finetune`` with its defaults (and ``extra``) on ``train``, then ``eval classifier`` on ``test``."""
    run = work / f"{key}_{train.name}"
    cmd = _mmcontrast("finetune", "--train", str(train), *checkpoint, *extra, "--output-dir", str(run),
                      *(["--resume"] if (run / "data").exists() and not (run / "best.json").is_file() else []))
    timing = run.with_suffix(".seconds")
    if not (run / "best.json").is_file():
        if REPORT_ONLY:
            return
        run.parent.mkdir(parents=True, exist_ok=True)
        timing.write_text(str(_run(cmd, run.with_suffix(".log"))))
    scored = work / f"{key}_{train.name}_test.json"
    result, _ = _cached(scored, _mmcontrast("eval", "classifier", "--checkpoint", str(run), "--images", str(test),
                                            "--precision", "fp32", "--output", str(scored)), scored.with_suffix(".log"))
    table.add(key, result["top1"], result["mean_per_class_recall"], float(timing.read_text()), cmd)


def continued_simclr(data: Path, weights: str, work: Path) -> tuple[Path, float]:
    """Image-only shards of ``DATA/unlabelled`` and ``configs/simclr_imagenet_cpu.yaml`` on them; (run dir, seconds)."""
    shards, run = work / "unlabelled_shards", work / "simclr_unlabelled"
    if not (shards / "stats.json").is_file():
        _run([sys.executable, "-m", "data_tools.make_shards", str(data / "unlabelled"), str(shards), "--layout", "images",
              "--workers", "1"], work / "unlabelled_shards.log")
    timing = run.with_suffix(".seconds")
    if not (run / "model.safetensors").is_file():
        resume = ["--resume"] if (run / "checkpoints").exists() else []
        timing.write_text(str(_run([sys.executable, "-m", "mmcontrast.train", "--config", "configs/simclr_imagenet_cpu.yaml",
                                    "--train-shards", str(shards), "--output-dir", str(run), "--set",
                                    f"model.pretrained={weights}", *resume], work / "simclr_unlabelled.log")))
    return run, float(timing.read_text())


def plot(summary: dict, path: Path, majority: float, reference: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(keys) + 1.5))
    y = range(len(keys))
    for offset, metric, colour in ((-0.2, "top1", "tab:blue"), (0.2, "recall", "tab:orange")):
        ax.barh([i + offset for i in y], [100 * summary[k][f"{metric}_mean"] for k in keys], height=0.4, color=colour,
                xerr=[100 * summary[k][f"{metric}_std"] for k in keys], label="top-1" if metric == "top1" else "mean per-class recall")
    ax.axvline(100 * majority, color="grey", linestyle=":", label=f"majority class ({majority:.1%})")
    if reference:
        ax.axvline(reference, color="black", linestyle="--", label=f"published, every label ({reference:.1f}%)")
    ax.set_yticks(list(y), [NAMES.get(k, k).replace("`", "") for k in keys])
    ax.invert_yaxis()
    ax.set_xlabel("% on the test set (mean ± std over the draws)")
    ax.set_xlim(40, 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / len(keys)), ncol=2, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the long row names and the legend below stay in the picture


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="test/, pool/, unlabelled/ and shots*_s*/ (examples/real_data.py)")
    p.add_argument("--weights", required=True, help="ImageNet EfficientNet-Lite0 in timm's layout (.safetensors)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"any of {', '.join(ROWS)}")
    p.add_argument("--workdir", type=Path, default=Path("bench/out/label_efficiency"))
    p.add_argument("--report", action="store_true", help="only the table of the runs already finished in --workdir")
    p.add_argument("--reference", type=float, default=88.4, help="a published figure with every label, in %% (ELPV: 88.4)")
    args = p.parse_args(argv)
    global REPORT_ONLY
    REPORT_ONLY = args.report
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := sorted(set(rows) - set(ROWS)):
        p.error(f"--rows: unknown {', '.join(unknown)}")
    draws = sorted(d for d in args.data.glob("shots*_s*") if d.is_dir())
    test, work = args.data / "test", args.workdir
    if not draws or not test.is_dir():
        p.error(f"{args.data} holds no shots*_s*/ draws or no test/: write it with examples/real_data.py")
    work.mkdir(parents=True, exist_ok=True)
    imagenet = ["--checkpoint", CHECKPOINT, "--pretrained", args.weights]
    table = Table()
    for draw in draws if "baselines" in rows else []:  # the cheap rows first: minutes, where fine-tuning takes an hour
        few_shot(table, imagenet, draw, test, work, baselines="pixels,random-init")
    from PIL import Image

    with Image.open(next(p for p in sorted(test.rglob("*")) if p.is_file())) as image:
        native = ["--image-size", str(min(image.size)), "--pool", "max"]
    for draw in draws if "native-max" in rows else []:
        few_shot(table, imagenet + native, draw, test, work, prefix="native_max_")
    for draw in draws if "patches" in rows else []:
        finetune(table, "patches", imagenet, draw, test, work, ("--epochs", "0", *native))
    for draw in draws if "patches-unlabelled" in rows else []:
        finetune(table, "patches_unlabelled", imagenet, draw, test, work,
                 ("--epochs", "0", *native, "--unlabelled", str(args.data / "unlabelled")))
    if "ceiling-probe" in rows:
        out = work / "ceiling_probe.json"
        cmd = _mmcontrast("eval", "linear-probe", *imagenet, "--train", str(args.data / "pool"), "--test", str(test),
                          "--precision", "fp32", "--output", str(out))
        result, seconds = _cached(out, cmd, out.with_suffix(".log"))
        if result is not None:
            table.add("ceiling_probe", result["top1"], result["mean_per_class_recall"], seconds, cmd)
    for draw in draws if "finetune" in rows else []:
        finetune(table, "finetune", imagenet, draw, test, work)
    if "simclr" in rows or "simclr-finetune" in rows:
        run, seconds = continued_simclr(args.data, args.weights, work)
        for draw in draws if "simclr" in rows else []:
            few_shot(table, ["--checkpoint", str(run), *native], draw, test, work, prefix="simclr_native_max_")
            finetune(table, "simclr_patches", ["--checkpoint", str(run)], draw, test, work, ("--epochs", "0", *native))
        for draw in draws if "simclr-finetune" in rows else []:
            finetune(table, "simclr_finetune", ["--checkpoint", str(run)], draw, test, work)
        print(f"continued SimCLR on the unlabelled images: {seconds / 60:.1f} min", file=sys.stderr)
    if "ceiling-finetune" in rows:
        finetune(table, "ceiling_finetune", imagenet, args.data / "pool", test, work)
    counts = {d.name: len(list(d.iterdir())) for d in test.iterdir() if d.is_dir()}
    majority = max(counts.values()) / sum(counts.values())
    summary = table.summary()
    (work / "label_efficiency.json").write_text(json.dumps({"data": str(args.data), "draws": [d.name for d in draws],
                                                            "test_counts": counts, "majority": majority,
                                                            "reference": args.reference, "rows": summary}, indent=2))
    plot(summary, work / "label_efficiency.png", majority, args.reference)
    print(f"\n| what ({sum(counts.values())} test images) | draws | top-1 | mean per-class recall | wall time |")
    print("|---|---:|---:|---:|---:|")
    for key, row in summary.items():
        print(f"| {NAMES.get(key, key)} | {len(row['top1'])} | {100 * row['top1_mean']:.1f}% ± {100 * row['top1_std']:.1f} | "
              f"{100 * row['recall_mean']:.1f}% ± {100 * row['recall_std']:.1f} | {row['seconds_mean'] / 60:.1f} min |")
    print(f"| majority class alone | | {100 * majority:.1f}% | 50.0% | |")
    print(f"\nwrote {work / 'label_efficiency.json'} and {work / 'label_efficiency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
