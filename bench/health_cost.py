"""What representation health costs: one measurement (``log.diagnostics_every``) against a training step.

For each shipped config that runs on the CPU (and ViT-B/32 at its own batch, on whatever this machine has),
times the trainer's optimizer step (``train.train_step``) and one ``diagnostics.batch_health`` on the fixed
batch of ``log.diagnostics_samples``, and prints the share of step time health takes at the config's
``log.diagnostics_every``. Synthetic inputs: the cost does not depend on the pixels.

    python bench/health_cost.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mmcontrast.config import load_config  # noqa: E402
from mmcontrast.diagnostics import batch_health, preprocess_geometry  # noqa: E402
from mmcontrast.optim import build_optimizer  # noqa: E402
from mmcontrast.tasks import build_task  # noqa: E402
from mmcontrast.train import train_step  # noqa: E402

CONFIGS = ("clip_tiny_cpu", "simclr_tiny_cpu", "clip_vit_b32")


def synthetic_batch(task, n: int, size: int) -> dict:
    batch = {"__key__": [str(i) for i in range(n)]}
    if task.views == 1:
        batch["image"] = torch.randn(n, 3, size, size)
    else:
        batch.update(view1=torch.randn(n, 3, size, size), view2=torch.randn(n, 3, size, size))
    if task.tokenizer is not None:
        batch["text"] = task.tokenizer(["a photo of a thing"] * n)
    return batch


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, repeats: int) -> tuple:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # configs differ in mixed precision
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    task = build_task(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)
    o = cfg.optim
    model, optimizer = accelerator.prepare(task.model, build_optimizer(task.model, o.name, o.lr, o.weight_decay, o.betas, o.eps, o.momentum))
    size = preprocess_geometry(task.eval_transform)[0]
    batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v
             for k, v in synthetic_batch(task, cfg.train.batch_size, size).items()}  # fmt: skip
    step = median_seconds(lambda: train_step(accelerator, task, model, optimizer, [batch], o.grad_clip), repeats)
    health_batch = synthetic_batch(task, cfg.log.diagnostics_samples, size)
    health = median_seconds(lambda: batch_health(task.health_pair, accelerator.unwrap_model(model), health_batch,
                                                 task.pairs_are_views), repeats)  # fmt: skip
    every = cfg.log.diagnostics_every
    return name, cfg.train.batch_size, step, cfg.log.diagnostics_samples, health, every, health / (every * step) if every else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(name, args.repeats) for name in args.configs.split(",")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{device}; median of {args.repeats}\n")
    print("| config | batch | step (s) | health samples | one health (s) | diagnostics_every | share of step time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, batch, step, samples, health, every, share in rows:
        print(f"| {name} | {batch} | {step:.3f} | {samples} | {health:.3f} | {every} | {100 * share:.2f}% |")


if __name__ == "__main__":
    main()
