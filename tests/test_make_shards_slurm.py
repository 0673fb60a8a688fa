"""examples/slurm/make_shards_array.sh, run against a stand-in ``sbatch`` that runs each job at once, in order.

The stand-in runs an array job's tasks one after another with ``SLURM_ARRAY_TASK_ID`` set, ignores the
dependencies (the jobs come in dependency order) and, like SLURM, carries on when a task fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from data_tools import make_shards
from data_tools.output import CRASH_ENV

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "slurm" / "make_shards_array.sh"

FAKE_SBATCH = '''#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
options = {{a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for a in args if a.startswith("--") and a != "--wrap"}}
wrap = args[args.index("--wrap") + 1]
first, last = (int(x) for x in options.get("--array", "0-0").split("-"))
codes = []
for task in range(first, last + 1):
    env = {{**os.environ, **({{"SLURM_ARRAY_TASK_ID": str(task)}} if "--array" in options else {{}})}}
    with open(os.environ["FAKE_SBATCH_LOG"] + ".out", "a") as job_output:  # like slurm-%j.out, not sbatch's stdout
        codes.append(subprocess.run(["bash", "-c", wrap], env=env, stdout=job_output, stderr=job_output).returncode)
with open(os.environ["FAKE_SBATCH_LOG"], "a") as log:
    log.write(json.dumps({{"options": options, "wrap": wrap, "codes": codes}}) + "\\n")
print(sum(1 for _ in open(os.environ["FAKE_SBATCH_LOG"])))  # the job id, as --parsable prints it
'''


def test_the_slurm_array_script_gives_the_bytes_of_one_run_even_when_a_task_dies(tmp_path):
    root = tmp_path / "in photos"  # a space: the script must quote what it wraps
    for i in range(14):
        (root / str(i % 3)).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 16), (9 * i, 90, 0)).save(root / f"{i % 3}/{i}.jpg")
        (root / f"{i % 3}/{i}.txt").write_text(f"picture {i}")
    options = ["--shard-size", "2", "--max-image-size", "24"]
    reference = tmp_path / "reference"
    assert make_shards.main([str(root), str(reference), *options, "--workers", "1"]) == 0

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (bin_dir / "sbatch").chmod(0o755)
    log, marker, out = tmp_path / "sbatch.jsonl", tmp_path / "task_killed", tmp_path / "out"
    env = {
        **os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PY": sys.executable, "CPUS": "1",
        "FAKE_SBATCH_LOG": str(log), CRASH_ENV: f"shard:4:{marker}",  # the task of part 1/3 dies in shard 4
    }  # fmt: skip
    result = subprocess.run(["bash", str(SCRIPT), str(root), str(out), "3", *options], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [job["options"]["--job-name"] for job in jobs] == ["shards-list", "shards-part", "shards-finish"]
    assert jobs[1]["options"]["--array"] == "0-2" and jobs[1]["options"]["--dependency"] == "afterok:1"
    assert jobs[2]["options"]["--dependency"] == "afterany:2"
    assert marker.exists() and jobs[1]["codes"][1] != 0 and jobs[1]["codes"][0] == jobs[1]["codes"][2] == 0
    assert jobs[2]["codes"] == [0]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for p in reference.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
