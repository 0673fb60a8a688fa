"""bench/train_gpu.py works before any GPU touches it: ``--smoke`` runs its code on the CPU with the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.slow  # 30 s of CPU: run with -m slow before a GPU session (the GPU run has minutes to spare, not retries)
def test_train_gpu_smoke_prints_the_table_and_finds_a_batch_that_fits(tmp_path):
    """The eager trainer and open_clip_train rows (the compiled, DDP and FSDP rows are the same runner with other
    flags, each trained on its own by tests/test_train.py and tests/test_sharding.py), with the largest-batch search:
    FLOPs per sample counted, a rate, memory and 8 x 2 found to fit. ``--smoke`` alone runs every row."""
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "bench/train_gpu.py", "--smoke", "--variants", "eager,open_clip", "--json", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "bf16 dense peak: unknown" in r.stdout and "| run | samples/s | MFU |" in r.stdout
    result = json.loads(out.read_text())
    assert result["flops_per_sample"] > 0 and result["peak_tflops"] is None
    rows = {row["run"]: row for row in result["rows"]}
    expected = {"mmcontrast eager, 1 process"} | ({"open_clip_train, 1 process"} if importable("open_clip_train") else set())
    assert set(rows) == expected
    assert importable("open_clip_train") or "open_clip_train is not importable" in r.stderr
    for row in rows.values():
        assert row["samples_per_s"] > 0 and row["memory_gib"] > 0 and row["mfu"] is None
        assert row["largest_global_batch"] == "16 (8 x 2 x 1)"


def test_the_peak_table_names_known_gpus():
    sys.path.insert(0, str(ROOT / "bench"))
    import train_gpu

    peaks = train_gpu.PEAK_BF16_TFLOPS
    assert peaks["H100"] == peaks["H200"] == 989.0 and peaks["A100"] == 312.0
    assert list(peaks).index("H100 PCIe") < list(peaks).index("H100")  # the PCIe card is found before the SXM name
