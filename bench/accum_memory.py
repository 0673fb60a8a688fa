"""Peak memory and speed of one training step at a fixed global batch, with and without gradient caching.

    python bench/accum_memory.py [--global-batch 1024] [--model mmc-tiny] [--steps 3] [--mode clip|simclr]

Each configuration (batch 1024 K=1, batch 128 K=8, batch 64 K=16) runs in its own process: the tiny
model, synthetic inputs, AdamW, ``mmcontrast.train.step_gradients`` (the trainer's own step) for one
warm-up step and ``--steps`` timed ones. Step memory is the growth of the process's peak RSS over
its RSS once model, optimiser state and inputs exist (a 2-sample step creates the optimiser state
first): activations, gradients and temporaries — what gradient caching changes. The interpreter,
libraries and optimiser state are the same in every row and would only dilute the ratio; samples/s is global batch × steps / time. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(batch: int, k: int, model_name: str, steps: int, mode: str) -> dict:
    import torch

    from mmcontrast import models
    from mmcontrast.train import SimclrModel, Task, step_gradients

    torch.manual_seed(0)
    if mode == "clip":
        bundle = models.create_clip(model_name)
        task = Task("clip", bundle.model, None, bundle.tokenizer, "clip", "plain")
        size = bundle.model.visual.image_size[0]
        ctx = bundle.model.context_length

        def micro_batches():
            return [{"image": torch.randn(batch, 3, size, size), "text": torch.randint(1, 400, (batch, ctx))} for _ in range(k)]
    else:
        spec = models.image_encoder_spec(model_name, {}, False)
        task = Task("simclr", SimclrModel(models.ImageEncoder(spec), 256, 64), None, None, "nt_xent", temperature=0.2)
        size = spec["image_size"]

        def micro_batches():
            return [{"view1": torch.randn(batch, 3, size, size), "view2": torch.randn(batch, 3, size, size)} for _ in range(k)]

    class Single:  # the part of Accelerate that step_gradients uses, one process
        def backward(self, loss):
            loss.backward()

        def no_sync(self, model):
            return contextlib.nullcontext()

    model = task.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = [micro_batches() for _ in range(steps + 1)]

    def one_step(micro):
        opt.zero_grad(set_to_none=True)
        step_gradients(Single(), task, model, micro)
        opt.step()

    one_step([{key: v[:2] for key, v in micro_batches()[0].items()}])  # optimiser state, at 2 samples
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
