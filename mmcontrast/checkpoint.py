"""Training checkpoints in a run directory: atomic save, load, pruning, and cutting metrics back on resume.

Owns the layout under ``RUN_DIR/checkpoints``: ``step_NNNNNN/`` (Accelerate's ``save_state`` — model,
optimizer, RNG states — plus ``train_state.json`` with the step and data position) and ``last``, a
symlink switched with one rename. A checkpoint is written into a temporary directory and renamed when
complete, so a run killed at any moment leaves the previous checkpoint intact. Does not own what the
state means (the loop) or the exported model files (``models.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from mmcontrast.config import CHECKPOINTS_DIR, LAST_CHECKPOINT, TRAIN_STATE_FILE
from mmcontrast.errors import TrainingError, UsageError


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def has_checkpoint(output_dir: Path) -> bool:
    return (checkpoints_dir(output_dir) / LAST_CHECKPOINT).exists()


def save_checkpoint(accelerator, model: nn.Module, output_dir: Path, state: dict, keep: int) -> None:
    """Write checkpoints/step_NNNNNN atomically (temp dir + rename), point ``last`` at it, prune old ones."""
    unwrapped = accelerator.unwrap_model(model)
    if not all(torch.isfinite(p).all() for p in unwrapped.parameters()):
        raise TrainingError(f"refusing to checkpoint non-finite weights at step {state['step']}; lower the learning rate")
    root = checkpoints_dir(output_dir)
    name = f"step_{state['step']:06d}"
    tmp = root / f".tmp_{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=2))
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        link = root / ".last.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(name)
        os.replace(link, root / LAST_CHECKPOINT)  # atomic switch of `last`
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, output_dir: Path) -> dict:
    """Restore model, optimizer and RNG states from ``checkpoints/last``; returns its train state."""
    last = checkpoints_dir(output_dir) / LAST_CHECKPOINT
    if not (last / TRAIN_STATE_FILE).is_file():
        raise UsageError(f"--resume: no checkpoint at {last}; train without --resume to start this run")
    accelerator.load_state(str(last))
    return json.loads((last / TRAIN_STATE_FILE).read_text())


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint so the file stays one continuous run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
