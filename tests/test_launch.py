"""Processes: torchrun and accelerate launch form one gloo group on the CPU; a dead rank or launcher ends the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "clip_tiny_cpu.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ENDS_WITHIN_S = 30  # a dead rank or launcher ends the whole job this fast (torchrun polls; ranks check their parent each second)


def train_args(shards, out, *extra) -> list[str]:
    return ["-m", "mmcontrast.train", "--config", TINY, "--train-shards", str(shards), "--output-dir", str(out),
            "--workers", "0", "--batch-size", "8", *extra]  # fmt: skip


def job_processes(out: Path) -> list[psutil.Process]:
    """Every process of this machine whose command line names the run dir ``out``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(out) in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
            found.append(proc)
    return found


def wait_for_step(out: Path, proc: subprocess.Popen, deadline_s: float = 240) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
            return
        time.sleep(0.1)
    raise AssertionError(f"the job did not log a step (exit {proc.poll()})")


def test_torchrun_forms_one_gloo_group_on_the_cpu(two_shards_of_16, tmp_path):
    out, one = tmp_path / "run", tmp_path / "one"
    common = ["--steps", "2", "--log-every", "1", "--set", "data.shuffle_buffer=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *train_args(two_shards_of_16, out, *common, "--batch-size", "16")]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = subprocess.run([sys.executable, *train_args(two_shards_of_16, one, *common, "--batch-size", "32")], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    rows, one_rows = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (out, one))
    assert [row["step"] for row in rows] == [1, 2]  # one record per step, not one per process
    assert rows[0]["loss"] == pytest.approx(one_rows[0]["loss"], rel=1e-5)  # one loss over the gathered 2 x 16
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("victim", [pytest.param("rank", marks=pytest.mark.slow), "launcher"])  # a dead rank: -m slow
def test_a_killed_rank_or_launcher_ends_the_whole_job_and_leaves_nothing_running(tiny_shards, tmp_path, victim):
    out = tmp_path / "run"
    cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *train_args(tiny_shards, out, "--steps", "100000", "--log-every", "1")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_step(out, proc)
        launcher = psutil.Process(proc.pid)
        agent = next(p for p in launcher.children(recursive=True) if "torch.distributed.run" in " ".join(p.cmdline()))
        ranks = agent.children()
        assert len(ranks) == 2
        (ranks[1] if victim == "rank" else agent).send_signal(signal.SIGKILL)
        start = time.time()
        while job_processes(out) and time.time() - start < ENDS_WITHIN_S:
            time.sleep(0.2)
        left = [" ".join(p.cmdline())[:120] for p in job_processes(out)]
        assert not left, f"still running {time.time() - start:.0f} s after the {victim} was killed: {left}"
        if victim == "rank":
            assert proc.wait(timeout=5) != 0
    finally:
        for p in job_processes(out):
            p.kill()
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow  # two launches and a wait for the survivor to be ended: ~30 s
def test_a_process_that_fails_alone_says_so_with_its_rank(tiny_shards, tmp_path):
    from mmcontrast import checkpoint as ck

    out = tmp_path / "run"
    cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *train_args(tiny_shards, out, "--steps", "1")]  # fmt: skip
    assert subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300).returncode == 0
    last = out / "checkpoints" / "last"
    (last / "random_states_1.pkl").write_bytes(b"damaged")
    ck.write_manifest(last)  # a consistent manifest: only process 1, restoring its own RNG file, can notice
    r = subprocess.run([*cmd[:-2], "--steps", "2", "--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "error: process 1: --resume: " in r.stderr and "random_states_1.pkl" in r.stderr, r.stderr[-2000:]


def test_a_group_that_did_not_form_is_refused(monkeypatch):
    from mmcontrast.errors import UsageError
    from mmcontrast.launch import check_world

    class OneProcess:
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="started 2 processes but they formed a group of 1"):
        check_world(OneProcess())
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_world(OneProcess())


def _dropout_rank(rank: int, port: int, shards: str, model_json: str, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "true"})  # fmt: skip
    from mmcontrast.train import _set_up_model, _set_up_processes, config_from_args

    cfg = config_from_args(["--config", TINY, "--train-shards", shards, "--output-dir", out_dir, "--steps", "1",
                            "--model", model_json, "--set", "log.trackers=[]"])  # fmt: skip
    _, _, accelerator = _set_up_processes(cfg, Path(out_dir))
    task, _, _ = _set_up_model(cfg, accelerator)
    model = task.model.train()
    images = torch.zeros(4, 3, 32, 32)  # the same input on both processes
    with torch.no_grad():
        torch.save({"weights": {k: v.clone() for k, v in model.state_dict().items()},
                    "embeddings": model.encode_image(images)}, Path(out_dir) / f"rank{rank}.pt")  # fmt: skip
    accelerator.wait_for_everyone()


def test_each_process_draws_its_own_dropout_masks_from_the_same_weights(tiny_shards, tmp_path):
    import socket

    import torch.multiprocessing as mp

    spec = json.loads((ROOT / "configs" / "models" / "mmc-tiny.json").read_text())
    spec["vision_cfg"]["patch_dropout"] = 0.5
    model_json = tmp_path / "mmc-tiny-dropout.json"
    model_json.write_text(json.dumps(spec))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dropout_rank, args=(port, str(tiny_shards), str(model_json), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])  # one model, initialised once
    assert not torch.allclose(r0["embeddings"], r1["embeddings"])  # patch dropout kept other patches on each


STAND_IN_SRUN = """#!/usr/bin/env bash
# stand-in for srun on one machine: the command once per node, in parallel; any failure fails the step
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""


@pytest.mark.slow  # two 'nodes' of two processes, then a requeue: ~30 s quiet; CI keeps the fast launch tests
def test_the_slurm_script_trains_on_two_nodes_and_resumes_when_requeued(tiny_shards, tmp_path):
    import socket

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STAND_IN_SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")  # `show hostnames`: the first node
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[1-2]", "GPUS_PER_NODE": "1", "MASTER_PORT": str(port), "OUTPUT_DIR": str(out),
           "PY": sys.executable}  # fmt: skip
    script = [str(ROOT / "examples" / "slurm" / "train_multinode.sbatch"), "--config", TINY, "--train-shards", str(tiny_shards),
              "--workers", "0", "--batch-size", "8", "--log-every", "1", "--checkpoint-every", "2"]  # fmt: skip
    r = subprocess.run(["bash", *script, "--steps", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(["bash", *script, "--steps", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # "requeued": the script adds --resume itself
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and {row["global_batch"] for row in rows} == {16}
