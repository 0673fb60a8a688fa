"""Shared test fixtures. Everyone may append fixtures here; keep each one small, fast and seeded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

# ---------------------------------------------------------------- tiny image–caption data (data owner)

TINY_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
TINY_SHAPES = ("circle", "square", "triangle")
TINY_PER_CLASS = 16  # 4 colours x 3 shapes x 16 = 192 images
TINY_SHARD_SIZE = 48  # -> 4 shards: divides evenly over 2 processes x 2 workers
TINY_CAPTIONS = ("a {} {}", "a picture of a {} {}", "a {} {} on a grey background")


def write_tiny_images(folder: Path, per_class: int = TINY_PER_CLASS, size: int = 32, seed: int = 0) -> Path:
    """Draw coloured shapes into ``folder/<colour>_<shape>/NNN.jpg`` (class subfolders) and write
    ``folder/captions.jsonl`` (filepath, caption naming colour and shape, label = the folder name).

    The same folder serves all three make_shards layouts' needs: class folders for zero-shot, the
    captions file for image–text shards with labels.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    rows = []
    for colour, rgb in TINY_COLOURS.items():
        for shape in TINY_SHAPES:
            label = f"{colour}_{shape}"
            (folder / label).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                grey = rng.randint(90, 160)
                img = Image.new("RGB", (size, size), (grey, grey, grey))
                draw = ImageDraw.Draw(img)
                r = rng.randint(size // 5, size // 3)
                cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
                fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in rgb)
                if shape == "circle":
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
                elif shape == "square":
                    draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
                rel = f"{label}/{i:03d}.jpg"
                img.save(folder / rel, quality=95)
                caption = rng.choice(TINY_CAPTIONS).format(colour, shape)
                rows.append({"filepath": rel, "caption": caption, "label": label})
    with open(folder / "captions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> Path:
    """192 JPEGs (32 px) in 12 class subfolders ``<colour>_<shape>/`` plus ``captions.jsonl``. Read-only."""
    return write_tiny_images(tmp_path_factory.mktemp("tiny_images"))


@pytest.fixture(scope="session")
def tiny_shards(tiny_image_folder, tmp_path_factory) -> Path:
    """A folder of 4 webdataset shards (``00000.tar`` … ``00003.tar``, 48 samples each) made by
    ``data_tools.make_shards`` from ``tiny_image_folder``: per sample ``jpg``, ``txt`` (caption naming
    colour and shape) and ``json`` (``label`` = class folder name, ``label_index`` in sorted class order);
    plus ``stats.json`` (with ``classes``). Pass ``str(tiny_shards)`` as ``--train-shards``. Read-only."""
    from data_tools import make_shards

    out = tmp_path_factory.mktemp("tiny_shards")
    args = [str(tiny_image_folder), str(out), "--captions", str(tiny_image_folder / "captions.jsonl")]
    rc = make_shards.main(args + ["--shard-size", str(TINY_SHARD_SIZE), "--workers", "1"])
    assert rc == 0, "make_shards failed on the tiny folder"
    return out


@pytest.fixture(scope="session")
def tiny_val_shards(tmp_path_factory) -> Path:
    """Held-out pairs for validation: 48 other images of the same 12 classes (4 each), one shard."""
    from data_tools import make_shards

    folder = write_tiny_images(tmp_path_factory.mktemp("val_images"), per_class=4, seed=1)
    out = tmp_path_factory.mktemp("val_shards") / "shards"
    assert make_shards.main([str(folder), str(out), "--captions", str(folder / "captions.jsonl"), "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def two_shards_of_16(tiny_image_folder, tmp_path_factory) -> Path:
    """32 samples in two shards of 16: one shard per process, or both in one batch of 32."""
    from data_tools import make_shards

    rows = (tiny_image_folder / "captions.jsonl").read_text().splitlines()[::6][:32]
    folder = tmp_path_factory.mktemp("pairs")
    captions = folder / "captions.jsonl"
    captions.write_text("\n".join(rows) + "\n")
    out = folder / "shards"
    assert make_shards.main([str(tiny_image_folder), str(out), "--captions", str(captions), "--shard-size", "16", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def first_step_on_one_and_two_processes(two_shards_of_16):
    """``run(config, tmp_path, port) -> (metrics row of 1 process × 32, of 2 processes × 16, the 2-process run dir)``:
    one training step of ``config`` on ``two_shards_of_16``, once with ``python -m`` and once with
    ``accelerate launch --cpu --num_processes 2`` (one shard per process, or both in one batch)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).with_name("accelerate"))

    def first_row(launcher: list[str], config: str, out: Path, batch_size: int) -> dict:
        cmd = [*launcher, "-m", "mmcontrast.train", "--config", config, "--train-shards", str(two_shards_of_16),
               "--output-dir", str(out), "--batch-size", str(batch_size), "--steps", "1", "--log-every", "1",
               "--workers", "1", "--set", "data.shuffle_buffer=0"]  # fmt: skip
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    def run(config: str, tmp_path: Path, port: int) -> tuple[dict, dict, Path]:
        one = first_row([sys.executable], config, tmp_path / "one", 32)
        two = first_row([accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                         "no", "--dynamo_backend", "no", "--main_process_port", str(port)], config, tmp_path / "two", 16)  # fmt: skip
        return one, two, tmp_path / "two"

    return run


# ---------------------------------------------------------------- a tiny CLIP that has learned 4 colours
# (zero-shot / evaluation tests). Classes are solid colour squares with noise; the captions are the
# default zero-shot templates filled with the class name, so zero-shot prompts match what it saw.

TINY_CLIP_CLASSES = {"red_square": (220, 30, 30), "green_square": (30, 200, 40), "blue_square": (30, 50, 220),
                     "yellow_square": (230, 220, 30)}


def colour_square(rgb, rng, size=32):
    """A noisy solid-colour PIL image of ``rgb``."""
    import numpy as np
    from PIL import Image

    base = np.array(rgb, dtype=np.float32) + rng.normal(0, 25, size=3)  # per-image colour jitter
    pixels = base + rng.normal(0, 20, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_colour_folders(root, per_class, seed, size=32):
    """``root/CLASS/NNN.png`` for every class of TINY_CLIP_CLASSES."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for name, rgb in TINY_CLIP_CLASSES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour_square(rgb, rng, size).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def trained_tiny_clip(tmp_path_factory):
    """Train ``mmc-tiny`` on 200 colour squares (~15 s on one core) and save it as a run dir.

    Returns ``SimpleNamespace(run_dir, test_dir, train_dir, classes)``: ``test_dir`` and ``train_dir``
    hold held-out / fresh images in class subfolders named like ``red_square``.
    """
    from types import SimpleNamespace

    import numpy as np
    import torch

    from mmcontrast.losses import clip_loss
    from mmcontrast.models import create_clip, save_clip_run_files
    from mmcontrast.zeroshot import DEFAULT_TEMPLATES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is several times faster than two contended ones
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bundle = create_clip("mmc-tiny")
    model = bundle.model.train()
    names = list(TINY_CLIP_CLASSES)
    labels = torch.arange(len(names)).repeat_interleave(50)  # 200 images
    images = torch.stack([bundle.preprocess_val(colour_square(TINY_CLIP_CLASSES[names[c]], rng)) for c in labels.tolist()])
    captions = bundle.tokenizer([t.format(n.replace("_", " ")) for n in names for t in DEFAULT_TEMPLATES])
    captions = captions.view(len(names), len(DEFAULT_TEMPLATES), -1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(120):
        idx = torch.randperm(len(labels))[:32]
        text = captions[labels[idx], torch.randint(len(DEFAULT_TEMPLATES), (32,))]
        image_features, text_features, logit_scale = model(images[idx], text)[:3]
        loss = clip_loss(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    root = tmp_path_factory.mktemp("tiny_clip")
    save_clip_run_files(model.eval(), bundle.model_cfg, root / "run", bundle.tokenizer)
    return SimpleNamespace(
        run_dir=root / "run",
        test_dir=write_colour_folders(root / "test", 10, seed=1),
        train_dir=write_colour_folders(root / "train", 20, seed=2),
        classes=names,
        final_loss=loss.item(),
    )


# ---------------------------------------------------------------- shards served over HTTP (remote storage, simulated)


class ShardServer:
    """A folder served over HTTP on 127.0.0.1 (an ephemeral port) from a thread, as object storage would.

    ``bytes_served[name]`` counts what each file sent. ``faults[name]`` makes a file misbehave:
    ``("reset", n)`` ends the connection after n bytes (every time), ``("reset_once", n)`` only the first
    time, ``("reset_later", n)`` every time but the first, ``("stall_once", seconds)`` sends nothing for that
    long the first time.
    """

    def __init__(self, root: Path):
        import collections
        import threading
        from functools import partial
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def copyfile(self, source, outputfile):
                server.serve(Path(self.path).name, source, outputfile)

        self.root, self.bytes_served, self.faults = root, collections.Counter(), {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.handle_error = lambda request, address: None  # a cut connection is the point, not news
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, name: str, source, out) -> None:
        import time

        kind, value = self.faults.get(name, (None, None))
        if kind == "reset_later":
            self.faults[name] = ("reset", value)
            kind = None
        if kind == "stall_once":
            del self.faults[name]
            time.sleep(value)
        limit = value if kind in ("reset", "reset_once") else None
        if kind == "reset_once":
            del self.faults[name]
        sent = 0
        while chunk := source.read(64 * 1024 if limit is None else max(0, min(64 * 1024, limit - sent))):
            out.write(chunk)
            sent += len(chunk)
            self.bytes_served[name] += len(chunk)
        if limit is not None:
            out.flush()
            raise ConnectionResetError(f"{name} cut after {sent} bytes")  # the handler drops the connection

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def shard_server():
    """``serve(folder) -> ShardServer``; every server is stopped when the test ends."""
    servers = []

    def serve(root: Path) -> ShardServer:
        servers.append(ShardServer(root))
        return servers[-1]

    yield serve
    for server in servers:
        server.close()
