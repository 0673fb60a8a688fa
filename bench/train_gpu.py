"""Training throughput, model FLOPs utilisation, peak memory and the largest global batch, on whatever device is here.

    python bench/train_gpu.py                     # ViT-B-32 in bf16: eager, compiled, DDP and FSDP, open_clip_train
    python bench/train_gpu.py --smoke             # the same code on the CPU with mmc-tiny, in under two minutes
    python bench/train_gpu.py --variants eager,fsdp --steps 40 --batch-size 512 --json out.json

Each row is a run of the trainer itself (``mmcontrast.train``; ``accelerate launch`` for several processes, one per
device, or 2 gloo processes on the CPU) on synthetic shards this script writes: samples/s is the last logging window's
rate (the first one holds start-up), peak memory the allocator's maximum on a GPU (the trainer's ``gpu_memory_gib``)
or the process tree's RSS on the CPU. MFU = samples/s x FLOPs per sample (one forward and backward of the model,
counted by ``torch.utils.flop_counter.FlopCounterMode``) / (the device's bf16 dense peak x devices); the peak comes
from a small table of known GPUs (``PEAK_BF16_TFLOPS``) and is printed; elsewhere it is unknown and MFU is not given.
The largest global batch that fits: the micro-batch doubled until a run fails (out of memory), then, with that
micro-batch and the chunked loss (``loss.clip_mode=chunked``), ``--accum-steps`` doubled up to ``--max-global``;
open_clip_train the same with its ``--accum-freq`` (a column left empty, with a note, when it is not importable).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ENV, ROOT, make_data, open_clip_worker, run_measured  # noqa: E402

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# bf16 dense tensor-core peaks (TFLOPS, no sparsity) from NVIDIA's data sheets; the first name found in the device's wins
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "B200": 2250.0}  # fmt: skip


def device_and_peak() -> tuple[str, int, float | None]:
    """(device description, devices to use, bf16 dense peak TFLOPS per device or None when unknown)."""
    if not torch.cuda.is_available():
        return f"CPU ({os.cpu_count()} cores)", 2, None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return name, torch.cuda.device_count(), peak


def flops_per_sample(model_name: str) -> float:
    """FLOPs of one forward and backward pass of the CLIP model per image-text pair (batch of 2, on the CPU)."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    open_clip.add_model_config(ROOT / "configs" / "models")
    model = open_clip.create_model(model_name)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images, texts = torch.randn(2, 3, *size), torch.zeros(2, model.context_length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        image, text, scale = model(images, texts)[:3]
        (scale * image @ text.T).logsumexp(dim=1).sum().backward()
    return counter.get_total_flops() / 2


def mmcontrast_cmd(shards: str, out: Path, args, processes: int, batch: int, accum: int, *extra: str) -> list[str]:
    """The trainer's command line for one run; several processes through ``accelerate launch`` (--cpu without CUDA)."""
    cpu = [] if torch.cuda.is_available() else ["--cpu"]
    launcher = [ACCELERATE, "launch", *cpu, "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision",
                "bf16", "--dynamo_backend", "no", "-m"] if processes > 1 else [sys.executable, "-m"]  # fmt: skip
    return [*launcher, "mmcontrast.train", "--config", "configs/clip_tiny_cpu.yaml", "--model", args.model, "--train-shards", shards,
            "--output-dir", str(out), "--steps", str(args.steps), "--batch-size", str(batch), "--accum-steps", str(accum),
            "--workers", str(args.workers), "--log-every", str(max(1, args.steps // 3)), "--checkpoint-every", str(10**9),
            "--set", "train.mixed_precision=bf16", "--set", "log.diagnostics_every=0", "--set", "optim.warmup_steps=1", *extra]  # fmt: skip


def run_mmcontrast(shards: str, work: Path, args, processes: int, batch: int, accum: int = 1, *extra: str) -> dict | None:
    """One trainer run: {samples_per_s, memory_gib, data_share}, or None when it failed (out of memory)."""
    out = work / f"run_{time.time_ns()}"
    rss, log = run_measured(mmcontrast_cmd(shards, out, args, processes, batch, accum, *extra), check=False, env=ENV)
    if rss < 0:
        if args.verbose:
            print(log[-2000:], file=sys.stderr)
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = max(r.get("gpu_memory_gib", 0.0) for r in rows) or rss / 1024
    return {"samples_per_s": rows[-1]["samples_per_s"], "memory_gib": memory, "data_share": rows[-1]["data_time_share"]}


def run_open_clip(shards: Path, work: Path, args, batch: int, accum: int = 1) -> dict | None:
    """open_clip_train (one process) on the same shards: {samples_per_s, memory_gib}, or None when it failed."""
    n = len(list(shards.glob("*.tar")))
    precision = "amp_bf16" if torch.cuda.is_available() else "fp32"  # its CPU path has no bf16 autocast
    cmd = [sys.executable, __file__, "--open-clip-worker", "--train-data", f"{shards}/{{00000..{n - 1:05d}}}.tar",
           "--dataset-type", "webdataset", "--dataset-resampled", "--train-num-samples", str(args.steps * batch * accum), "--batch-size", str(batch),
           "--accum-freq", str(accum), "--workers", str(args.workers), "--model", args.model, "--epochs", "1", "--lr", "1e-3",
           "--warmup", "1", "--precision", precision, "--logs", str(work), "--name", f"oc_{time.time_ns()}",
           "--log-every-n-steps", str(max(1, args.steps // 3)), "--save-frequency", "0", "--report-to", "", "--seed", "0"]  # fmt: skip
    rss, log = run_measured(cmd, check=False, env=ENV)
    rates = [float(m) for m in re.findall(r"([0-9.]+)/s/gpu", log)]
    if rss < 0 or not rates:
        return None
    gpu = re.findall(r"peak_gpu_memory_gib ([0-9.]+)", log)
    return {"samples_per_s": rates[-1], "memory_gib": float(gpu[-1]) if gpu else rss / 1024, "data_share": None}


def largest(fits, start: int, limit: int) -> int | None:
    """The largest of start, 2*start, 4*start, ... up to ``limit`` for which ``fits(n)``; None when start does not."""
    best, n = None, start
    while n <= limit and fits(n):
        best, n = n, n * 2
    return best


def largest_global_batch(run, processes: int, start: int, args) -> str:
    """``"G (micro M x accum K x P)"``: the micro-batch doubled until ``run(micro, accum)`` fails, then the accumulation."""
    micro = largest(lambda b: run(b, 1) is not None, start, args.max_micro)
    if micro is None:
        return "-"
    accum = largest(lambda k: run(micro, k) is not None, 2, max(2, args.max_global // (micro * processes))) or 1
    return f"{micro * accum * processes} ({micro} x {accum} x {processes})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the CPU with mmc-tiny, few steps, small searches: the script works")
    p.add_argument("--model", help="open_clip model name or configs/models JSON name (default ViT-B-32; --smoke mmc-tiny)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 30; --smoke 2)")
    p.add_argument("--batch-size", type=int, help="per-process micro-batch of the throughput rows (default 256; --smoke 8)")
    p.add_argument("--workers", type=int, help="data workers per process (default 8; --smoke 1)")
    p.add_argument("--variants", default="eager,compiled,ddp,fsdp,open_clip", help="rows to run (comma-separated)")
    p.add_argument("--max-micro", type=int, help="largest micro-batch tried (default 4096; --smoke 8)")
    p.add_argument("--max-global", type=int, help="largest global batch tried with accumulation (default 65536; --smoke 16)")
    p.add_argument("--no-search", action="store_true", help="skip the largest-batch column")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--verbose", action="store_true", help="print the output of failed runs")
    args = p.parse_args(argv)
    defaults = {"model": "mmc-tiny", "steps": 2, "batch_size": 8, "workers": 1, "max_micro": 8, "max_global": 16} if args.smoke \
        else {"model": "ViT-B-32", "steps": 30, "batch_size": 256, "workers": 8, "max_micro": 4096, "max_global": 65536}  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke and torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the smoke test is the CPU's
        ENV["CUDA_VISIBLE_DEVICES"] = ""
    return args


def rows_to_run(args, devices: int, shards: Path, work: Path) -> dict:
    """Name -> (throughput run, largest-batch probe run, processes); rows that cannot run here are left out."""
    local = str(shards)
    probe = ("--set", "data.resampled=true", "--set", f"data.num_samples={10**9}", "--set", "loss.clip_mode=chunked")
    rows = {}
    for variant in args.variants.split(","):
        processes = devices if variant in ("ddp", "fsdp") else 1
        extra = {"compiled": ("--set", "train.compile=true"), "fsdp": ("--set", "train.fsdp=true")}.get(variant, ())
        if variant in ("ddp", "fsdp") and devices < 2:
            print(f"note: {variant} left out: one device", file=sys.stderr)
            continue
        if variant == "open_clip":
            try:
                import open_clip_train  # noqa: F401
            except ImportError:
                print("note: open_clip_train is not importable: its row and column are left out", file=sys.stderr)
                continue
            rows["open_clip_train, 1 process"] = (lambda b, k=1: run_open_clip(shards, work, args, b, k), 1)
            continue
        name = f"mmcontrast {variant}, {processes} process{'es' if processes > 1 else ''}"
        def run(b: int, k: int = 1, p: int = processes, e: tuple = extra) -> dict | None:
            search = (b, k) != (args.batch_size, 1)  # a probe of the search: data without end, the chunked loss
            return run_mmcontrast(local, work, args, p, b, k, *e, *(probe if search else ()))

        rows[name] = (run, processes)
    return rows


def _remembered(run):
    """``run(batch, accum)`` run once per argument pair (the throughput run is the search's first probe)."""
    seen: dict = {}

    def remembered(batch: int, accum: int = 1):
        if (batch, accum) not in seen:
            seen[batch, accum] = run(batch, accum)
        return seen[batch, accum]

    return remembered


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--open-clip-worker":
        open_clip_worker(sys.argv[2:])
        if torch.cuda.is_available():
            print(f"peak_gpu_memory_gib {torch.cuda.max_memory_allocated() / 2**30:.3f}", flush=True)
        return
    args = parse_args(argv)
    device, devices, peak = device_and_peak()
    flops = flops_per_sample(args.model)
    print(f"device: {device} x {devices}; bf16 dense peak: {f'{peak:.0f} TFLOPS per device' if peak else 'unknown'}; "
          f"{args.model}: {flops / 1e9:.2f} GFLOPs per sample (forward + backward)", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = make_data(work / "data", max(1024, 4 * args.batch_size * devices))
        for name, (uncached, processes) in rows_to_run(args, devices, shards, work).items():
            run = _remembered(uncached)
            got = run(args.batch_size)
            row = {"run": name, "samples_per_s": None, "mfu": None, "memory_gib": None, "largest_global_batch": None}
            if got is not None:
                row.update({k: got[k] for k in ("samples_per_s", "memory_gib")})
                row["mfu"] = got["samples_per_s"] * flops / (peak * 1e12 * processes) if peak else None
            # --smoke searches two rows (the search is the same code for every row): under two minutes
            if not args.no_search and (not args.smoke or name.startswith(("mmcontrast eager", "open_clip"))):
                row["largest_global_batch"] = largest_global_batch(run, processes, args.batch_size, args)
            results.append(row)
            print(f"  {name}: {row}", file=sys.stderr, flush=True)
    print_table(results, args, device, devices)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "devices": devices, "peak_tflops": peak, "flops_per_sample": flops,
                                               "args": vars(args), "rows": results}, indent=1))


def print_table(results: list[dict], args, device: str, devices: int) -> None:
    print(f"\n{args.model} in bf16, micro-batch {args.batch_size} per process, {args.steps} steps, {device} x {devices}\n")
    print("| run | samples/s | MFU | peak memory GiB | largest global batch (micro x accum x processes) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in results:
        rate = f"{r['samples_per_s']:.1f}" if r["samples_per_s"] is not None else "failed"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        memory = f"{r['memory_gib']:.2f}" if r["memory_gib"] is not None else "-"
        print(f"| {r['run']} | {rate} | {mfu} | {memory} | {r['largest_global_batch'] or 'not searched'} |")


if __name__ == "__main__":
    main()
