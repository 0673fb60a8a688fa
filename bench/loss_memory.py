"""Peak memory and time of one CLIP-loss forward+backward: open_clip's ClipLoss vs our plain and chunked modes.

    .venv/bin/python bench/loss_memory.py                        # N = 1024 4096 16384 32768, d = 512
    .venv/bin/python bench/loss_memory.py --sizes 1024 4096 --threads 2

Every (loss, N) pair runs in a fresh subprocess, one at a time, so its peak RSS is its own. Inside
it: warm the kernels up on a tiny batch, build the L2-normalised float32 features (requiring
grad) and logit_scale = 1/0.07, reset the kernel's RSS high-water mark, then time the forward and
backward. "MiB" is ``ru_maxrss`` after the step minus the RSS before it (memory the loss needed
beyond its inputs); "s" is the process CPU time of the step (user + sys), which on a shared machine
measures the work better than the wall clock (printed in parentheses). Each subprocess may use only
the memory available when it starts, minus a margin, so a row that does not fit says so instead
of pushing other processes into swap or the OOM killer. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LOSSES = ("ClipLoss", "plain", "chunked")
MARGIN_BYTES = 2 << 30  # left to the rest of the machine
WORKER_TIMEOUT_S = 3600


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loss_fn(name: str):
    if name == "ClipLoss":
        from open_clip.loss import ClipLoss

        return ClipLoss()
    from mmcontrast.losses import clip_loss

    return lambda img, txt, scale: clip_loss(img, txt, scale, mode=name)


def _features(n: int, d: int, seed: int):
    import torch

    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x.div_(x.norm(dim=1, keepdim=True)).requires_grad_()  # (n, d) unit rows, no (n, d) temporary


def _step(loss_fn, img, txt, scale) -> None:
    loss_fn(img, txt, scale).backward()
    img.grad = txt.grad = scale.grad = None


def measure(name: str, n: int, d: int, threads: int, memory_limit: int) -> dict:
    """One (loss, N) measurement; runs in its own process."""
    import torch

    torch.set_num_threads(threads)
    loss_fn = _loss_fn(name)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    _step(loss_fn, _features(256, d, 0), _features(256, d, 1), scale)  # load kernels, start threads
    img, txt = _features(n, d, 0), _features(n, d, 1)

    limit = resource.getrlimit(resource.RLIMIT_AS)[1]
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + memory_limit, limit))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark: ru_maxrss now starts at the current RSS
    rss_before = _rss_bytes()
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    try:
        _step(loss_fn, img, txt, scale)
    except (RuntimeError, MemoryError) as err:
        if "alloc" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {"status": "out of memory", "limit_gib": memory_limit / 2**30}
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    # Small N: repeat for the time (the minimum is the least disturbed by neighbours).
    while cpu0 + 2.0 > _cpu_seconds() and n <= 4096:
        c0, w0 = _cpu_seconds(), time.perf_counter()
        _step(loss_fn, img, txt, scale)
        cpu, wall = min(cpu, _cpu_seconds() - c0), min(wall, time.perf_counter() - w0)
    return {"status": "ok", "cpu_s": cpu, "wall_s": wall, "peak_mib": peak / 2**20}


def run_worker(name: str, n: int, d: int, threads: int) -> dict:
    budget = _available_bytes() - MARGIN_BYTES
    if budget <= 0:
        return {"status": "skipped: no free memory"}
    cmd = [sys.executable, __file__, "--worker", name, str(n), "--dim", str(d), "--threads", str(threads)]
    cmd += ["--memory-limit", str(budget)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"status": f"failed (exit {proc.returncode}, limit {budget / 2**30:.1f} GiB) {tail[0]}"}
    return json.loads(lines[-1])


def _cells(r: dict) -> list[str]:
    """(time, memory) cells of one measurement."""
    if r["status"] == "ok":
        return [f"{r['cpu_s']:.2f} ({r['wall_s']:.2f})", f"{r['peak_mib']:.1f}"]
    if "limit_gib" in r:
        return ["out of memory", f"> {r['limit_gib'] * 1024:.0f}"]
    return [r["status"], ""]


def print_table(results: dict, d: int, threads: int) -> None:
    import torch

    print(
        f"CLIP loss forward+backward: d={d}, float32, logit_scale 1/0.07, CPU "
        f"({threads} thread{'s' * (threads > 1)}), torch {torch.__version__}. "
        "Time: CPU seconds of the step (wall seconds). Memory: peak RSS above the inputs, MiB."
    )
    header = ["N"] + [f"{name} {unit}" for name in LOSSES for unit in ("s", "MiB")]
    header += ["chunked/ClipLoss time", "chunked/ClipLoss memory"]
    rows = []
    for n, row in results.items():
        cells = [str(n)] + [cell for name in LOSSES for cell in _cells(row[name])]
        ours, theirs = row["chunked"], row["ClipLoss"]
        if ours["status"] == theirs["status"] == "ok":
            cells += [f"{ours['cpu_s'] / theirs['cpu_s']:.2f}", f"{ours['peak_mib'] / theirs['peak_mib']:.4f}"]
        else:
            cells += ["n/a", "n/a"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for cells in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--worker", nargs=2, metavar=("LOSS", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, n = args.worker
        print(json.dumps(measure(name, int(n), args.dim, args.threads, args.memory_limit)))
        return
    results = {}
    for n in args.sizes:
        results[n] = {name: {"status": "not run"} for name in LOSSES}
        for name in args.losses:
            results[n][name] = run_worker(name, n, args.dim, args.threads)
            print(f"N={n} {name}: {json.dumps(results[n][name])}", file=sys.stderr, flush=True)
    print_table(results, args.dim, args.threads)


if __name__ == "__main__":
    main()
