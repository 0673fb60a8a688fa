"""Training checkpoints in a run directory: atomic save, verified load with fallback, pruning, metrics cut-back.

Owns the layout under ``RUN_DIR/checkpoints``: ``step_NNNNNN/`` holds Accelerate's ``save_state`` (model,
optimizer, one RNG file per process), ``train_state.json`` (step, data position, what the run is) and
``manifest.json`` (every file's size and SHA-256), and ``last`` is a symlink to the newest complete one.

Nothing a kill can interrupt leaves the run without a complete checkpoint: a checkpoint is written into
``.tmp_step_NNNNNN``, every process finishes writing (a barrier) and hashes its share of the files, rank 0 writes the manifest last and
renames the directory into place, then switches ``last`` with one rename; old ones are pruned after
that, by step number, never the one ``last`` names. On resume the manifest is checked before anything
is loaded: a damaged or missing ``last`` falls back to the newest complete checkpoint with a warning,
and with none left the error names the damaged file. Does not own what the state means (the loop) or
the exported model files (``models.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmcontrast.config import CHECKPOINTS_DIR, LAST_CHECKPOINT, TRAIN_STATE_FILE, Config
from mmcontrast.errors import TrainingError, UsageError

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
RNG_FILE = "random_states_{}.pkl"  # Accelerate's name for process i's RNG states
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HASH_CHUNK = 1 << 24


# ---------------------------------------------------------------- where a run stands, and what a resume must keep


@dataclass
class TrainState:
    """Where the run stands; saved with every checkpoint (``train_state.json``)."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0  # samples in the batches all processes consumed
    skipped_samples: int = 0  # samples the loaders of all processes skipped (corrupt, incomplete, lost to damage)
    nonfinite_steps: int = 0  # steps skipped because the gradient was not finite
    cpu_threads: int | None = None  # compute threads per process the run chose on the CPU (threads.TrainingThreads)
    data: list = field(default_factory=list)  # each process's position in the epoch (data.LoaderPosition)
    identity: dict = field(default_factory=dict)  # what a resume must not change (config.RESUME_IDENTITY, processes, shards)


def run_identity(cfg: Config, processes: int, sources) -> dict:
    """``config.identity`` plus what only the launch knows: the number of processes and the shards (file names,
    sources and sample counts: a position in the data means these samples)."""
    import hashlib

    from mmcontrast.config import identity

    listing = "\n".join(f"{os.path.basename(s)} {i} {n}" for s, i, n in zip(sources.shards, sources.source_of, sources.counts))
    digest = hashlib.sha1(listing.encode()).hexdigest()[:12]
    return {**identity(cfg), "processes": processes, "data.shards": f"{len(sources.shards)} shards ({digest})"}


def refuse_changed_identity(now: dict) -> Callable[[dict], None]:
    def check(saved_state: dict) -> None:
        from mmcontrast.config import resume_conflict

        conflict = resume_conflict(saved_state.get("identity", {}), now)
        if conflict is not None:
            field_name, saved, current = conflict
            raise UsageError(
                f"--resume: {field_name} is {current!r} but the checkpoint was made with {saved!r}; resume with the "
                "same value (only things like the learning rate, log cadence and --steps may change) or use a new --output-dir"
            )

    return check


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def has_checkpoint(output_dir: Path) -> bool:
    last = checkpoints_dir(output_dir) / LAST_CHECKPOINT
    return last.is_symlink() or last.exists()


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_dirs(root: Path) -> list[Path]:
    """``step_NNNNNN`` directories under ``root``, oldest first by step number (not by name: 1000000 > 999999)."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))] if root.is_dir() else []
    return [p for _, p in sorted(found)]


# ---------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` but the manifest: relative name -> size."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}


def share_by_size(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """``sizes``' names split into ``parts`` lists of about equal bytes (largest first, each to the lightest part so
    far): the same split on every process that lists the same files, no part more than an even share plus the largest
    file."""
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += sizes[name]
    return shares


def hash_share(folder: Path, part: int = 0, parts: int = 1) -> dict[str, dict]:
    """Size and SHA-256 of part ``part`` of ``parts`` of the files under ``folder`` (``share_by_size``): with every
    process hashing its part, a checkpoint of many large files (FSDP shards) is sealed in the time of one part while
    no process waits on one that hashes them all."""
    sizes = _listed(folder)
    return {name: {"size": sizes[name], "sha256": _sha256(folder / name)} for name in share_by_size(sizes, parts)[part]}


def write_manifest(folder: Path, files: dict[str, dict] | None = None) -> None:
    """``manifest.json``: size and SHA-256 of every other file under ``folder`` (``files``: ``hash_share``'s parts,
    merged; None: hashed here), written last and atomically."""
    files = dict(sorted((files if files is not None else hash_share(folder)).items()))
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST_FILE)


def damage(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (naming the file), or None when its manifest checks out."""
    manifest = folder / MANIFEST_FILE
    if not folder.is_dir():
        return f"{folder} does not exist"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest} is missing or unreadable"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its checksum"
    return None


# ---------------------------------------------------------------- saving


def _check_finite(model: nn.Module, step: int) -> None:
    """Parameters must be finite and buffers (BatchNorm statistics) free of NaN before they are written.

    Buffers may hold infinities by design (a causal attention mask of -inf), never NaN.
    """
    def local(t: torch.Tensor) -> torch.Tensor:  # this process's shard of a sharded (FSDP2) tensor
        return t.to_local() if hasattr(t, "to_local") else t

    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(local(p)).all()), None)
    bad = bad or next((n for n, b in model.named_buffers() if b.is_floating_point() and torch.isnan(local(b)).any()), None)
    if bad is not None:
        raise TrainingError(f"refusing to checkpoint non-finite weights ({bad}) at step {step}; lower the learning rate")


def _point_last_at(root: Path, name: str) -> None:
    link = root / ".last.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(name)
    os.replace(link, root / LAST_CHECKPOINT)  # one rename: `last` is always the old or the new target


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step directories (by step number), never the one ``last`` names."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    last = os.readlink(root / LAST_CHECKPOINT) if (root / LAST_CHECKPOINT).is_symlink() else None
    for old in step_dirs(root)[:-keep]:
        if old.name != last:
            shutil.rmtree(old, ignore_errors=True)


def _broadcast(accelerator, value):
    """Rank 0's ``value`` on every process (a decision only rank 0 takes, from the file system)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _hashed_by_every_process(accelerator, folder: Path) -> dict[str, dict]:
    """``hash_share`` of every process, merged (on every process)."""
    mine = hash_share(folder, accelerator.process_index, accelerator.num_processes)
    if accelerator.num_processes == 1:
        return mine
    from accelerate.utils import gather_object

    return {name: entry for part in gather_object([mine]) for name, entry in part.items()}


def save_checkpoint(accelerator, model: nn.Module, output_dir: Path, state: dict, keep: int,
                    save_more: Callable[[Path], None] | None = None) -> None:
    """Write ``checkpoints/step_NNNNNN`` (see the module docstring for why a kill never loses a checkpoint).

    ``save_more(folder)`` runs on every process after Accelerate's state is written (sharded model and
    optimizer state, for a model Accelerate does not manage).
    """
    _check_finite(accelerator.unwrap_model(model, keep_torch_compile=False), state["step"])
    root, name = checkpoints_dir(output_dir), step_dir_name(state["step"])
    final, tmp = root / name, root / f".tmp_{name}"
    # the same step saved again (a finished run resumed, an epoch end on a checkpoint step): the complete
    # copy already holds this step; rewriting it would open a window with no valid checkpoint
    reuse = _broadcast(accelerator, accelerator.is_main_process and final.is_dir() and damage(final) is None)
    if not reuse:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if save_more is not None:
            save_more(tmp)
        if accelerator.is_main_process:
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()  # every process's files are in before they are hashed
        files = _hashed_by_every_process(accelerator, tmp)
    if accelerator.is_main_process:
        if not reuse:
            write_manifest(tmp, files)
            shutil.rmtree(final, ignore_errors=True)  # only ever a damaged copy of this step
            tmp.rename(final)
        _point_last_at(root, name)
        prune(root, keep)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------- loading


def _choose(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from: ``last`` when complete, else the newest complete one; plus what was damaged."""
    root = checkpoints_dir(output_dir)
    last = root / LAST_CHECKPOINT
    candidates = ([root / os.readlink(last)] if last.is_symlink() else []) + step_dirs(root)[::-1]
    problems = []
    for folder in dict.fromkeys(candidates):  # in order, without repeats
        problem = damage(folder)
        if problem is None:
            return folder, problems
        problems.append(problem)
    return None, problems


def _check_rng_restored(folder: Path, process_index: int) -> None:
    """Accelerate logs and goes on when it cannot restore the RNG states; an exact resume needs them."""
    from accelerate.utils import load

    path = folder / RNG_FILE.format(process_index)
    try:
        states = load(path)
    except Exception as err:
        raise UsageError(f"--resume: {path} cannot be read ({type(err).__name__}); the checkpoint was written by "
                         "a different number of processes or is damaged") from None
    if not torch.equal(torch.get_rng_state(), states["torch_manual_seed"]):
        raise TrainingError(f"--resume: the random state in {path} was not restored")


def load_checkpoint(accelerator, output_dir: Path, check: Callable[[dict], None] | None = None,
                    load_more: Callable[[Path], None] | None = None) -> dict:
    """Restore model, optimizer and RNG states from the newest complete checkpoint; returns its train state.

    ``check(train_state)`` runs before anything is loaded (the trainer refuses a changed config there);
    ``load_more(folder)`` after Accelerate's states (the counterpart of ``save_checkpoint``'s ``save_more``).
    Raises ``UsageError`` when there is no complete checkpoint, naming the damaged file.
    """
    chosen, problems = _choose(output_dir) if accelerator.is_main_process else (None, [])
    chosen, problems = _broadcast(accelerator, (chosen, problems))
    if chosen is None:
        where = checkpoints_dir(output_dir) / LAST_CHECKPOINT
        if not problems:
            raise UsageError(f"--resume: no checkpoint at {where}; train without --resume to start this run")
        raise UsageError(f"--resume: no complete checkpoint to resume from: {problems[0]}; "
                         "restore that file or start a new --output-dir")
    if problems and accelerator.is_main_process:
        log.warning("checkpoint damaged: %s; resuming from %s instead", problems[0], chosen.name)
    state = json.loads((chosen / TRAIN_STATE_FILE).read_text())
    if check is not None:
        check(state)
    accelerator.load_state(str(chosen))
    _check_rng_restored(chosen, accelerator.process_index)
    if load_more is not None:
        load_more(chosen)
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint, and a line a kill left half-written."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # torn by a kill mid-write
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
