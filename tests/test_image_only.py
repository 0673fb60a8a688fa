"""Image-only shards (``make_shards --layout images``) in training: simclr reads them, clip refuses them in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def image_only_shards(tmp_path_factory) -> Path:
    """16 unlabelled 32 px images in nested folders, as image-only shards (jpg + json, no txt)."""
    from data_tools import make_shards

    root = tmp_path_factory.mktemp("unlabelled") / "photos"
    for i in range(16):
        (root / f"roll{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (15 * i, 90, 200 - 10 * i)).save(root / f"roll{i % 3}/{i:02d}.jpg")
    out = root.parent / "shards"
    assert make_shards.main([str(root), str(out), "--layout", "images", "--shard-size", "8", "--workers", "1"]) == 0
    return out


def test_simclr_trains_on_image_only_shards(image_only_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmcontrast.train", "--config", str(ROOT / "configs" / "simclr_tiny_cpu.yaml"),
           "--train-shards", str(image_only_shards), "--output-dir", str(out), "--steps", "1", "--batch-size", "8",
           "--log-every", "1", "--workers", "0"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [row["step"] for row in rows] == [1] and math.isfinite(rows[0]["loss"])
    assert rows[0]["skipped_samples"] == 0 and (out / "model.safetensors").is_file()


def test_clip_refuses_image_only_shards_with_one_line_naming_the_fields(image_only_shards, tmp_path, capsys):
    from mmcontrast import train

    rc = train.main(["--config", str(ROOT / "configs" / "clip_tiny_cpu.yaml"), "--train-shards", str(image_only_shards),
                     "--output-dir", str(tmp_path / "run"), "--steps", "1"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert "fields found: jpg (16x), json (16x)" in err[0] and "--mode simclr" in err[0], err[0]
