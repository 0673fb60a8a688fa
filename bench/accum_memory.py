"""Peak memory and speed of one training step at a fixed global batch, with and without gradient caching.

    python bench/accum_memory.py [--global-batch 1024] [--model mmc-tiny] [--steps 3] [--mode clip|simclr]

Each configuration (batch 1024 K=1, batch 128 K=8, batch 64 K=16) runs in its own process: the tiny
model, synthetic inputs, the config's AdamW, ``mmcontrast.train.train_step`` (the trainer's own step) for one
warm-up step and ``--steps`` timed ones. Step memory is the growth of the process's peak RSS over
its RSS once model, optimiser state and inputs exist (a 2-sample step creates the optimiser state
first): activations, gradients and temporaries — what gradient caching changes. The interpreter,
libraries and optimiser state are the same in every row and would only dilute the ratio; samples/s is global batch × steps / time. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(batch: int, k: int, model_name: str, steps: int, mode: str) -> dict:
    import torch
    from accelerate import Accelerator

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from health_cost import synthetic_batch

    from mmcontrast.config import load_config, set_value
    from mmcontrast.diagnostics import preprocess_geometry
    from mmcontrast.optim import depths_for, optimizer_for
    from mmcontrast.tasks import build_task
    from mmcontrast.train import train_step

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / f"{mode}_tiny_cpu.yaml")
    set_value(cfg, "model.name", model_name)
    task = build_task(cfg)
    task.param_depth = depths_for(task, cfg.optim.layer_decay)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(task.model, optimizer_for(task, cfg.optim))
    size = preprocess_geometry(task.eval_transform)[0]
    data = [[synthetic_batch(task, batch, size) for _ in range(k)] for _ in range(steps + 1)]

    def one_step(micro: list[dict]) -> None:  # the trainer's own step: gradients of K micro-batches, then AdamW
        train_step(accelerator, task, model, optimizer, micro, cfg.optim.grad_clip)

    one_step([synthetic_batch(task, 2, size)])  # optimiser state, at 2 samples
    base = _rss_mib()  # model, optimiser state, inputs and interpreter: the same in every row
    one_step(data[0])  # warm-up at full size
    start = time.perf_counter()
    for micro in data[1:]:
        one_step(micro)
    elapsed = time.perf_counter() - start
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"batch": batch, "k": k, "step_mib": growth, "samples_per_s": batch * k * steps / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--model", default="mmc-tiny")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mode", choices=("clip", "simclr"), default="clip")
    p.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.model, args.steps, args.mode)))
        return
    rows = []
    for k in (1, 8, 16):
        cmd = [sys.executable, __file__, "--worker", str(args.global_batch // k), str(k),
               "--model", args.model, "--steps", str(args.steps), "--mode", args.mode]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{args.mode} mode, model {args.model}, global batch {args.global_batch}, CPU, one process per row")
    print(f"{'batch':>6}{'K':>4}{'step memory MiB':>17}{'samples/s':>11}{'memory vs K=1':>15}{'speed vs K=1':>14}")
    for r in rows:
        print(f"{r['batch']:>6}{r['k']:>4}{r['step_mib']:>17.0f}{r['samples_per_s']:>11.1f}"
              f"{r['step_mib'] / rows[0]['step_mib']:>15.2f}{r['samples_per_s'] / rows[0]['samples_per_s']:>14.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
