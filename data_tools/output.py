"""OUTPUT_DIR of make_shards: writing one shard, knowing which files are ours, and the run's stats.json.

Owns: ``write_shard`` (shard *i* from its manifest rows: a pure function of those rows and the settings, run
by any worker), the per-shard ``NNNNN_stats.json`` (img2dataset's convention, plus our skip reasons), which
files in OUTPUT_DIR make_shards wrote (``scan``), removing them in an order that never leaves a tar looking
complete, and summing the per-shard stats into ``stats.json``. Does not own listing the inputs (``inputs``,
``manifest``) or scheduling shards (``engines``).

A shard is written to ``NNNNN.tar.tmp``; when it is complete its ``NNNNN_stats.json`` is written (atomically)
and then the tar is renamed. So a ``NNNNN.tar`` whose stats file (with our ``settings``) sits beside it is
complete, and a tar without one is not ours.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from data_tools.formats import MANIFEST_FILE, SIZES_FILE, STATS_FILE, shard_stats_path
from data_tools.inputs import Item, Labels
from data_tools.samples import Settings, process_item

TAR_MTIME = 0  # fixed tar header fields (time, owner, mode) make shards byte-identical across runs
TAR_MODE = 0o444
SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|_stats\.json)(\.tmp)?$")
RUN_FILES = {STATS_FILE, SIZES_FILE, MANIFEST_FILE} | {f"{name}.tmp" for name in (STATS_FILE, SIZES_FILE)}
MANIFEST_TEMPORARY = re.compile(r"^_manifest\..*\.tmp$")
# img2dataset's per-shard fields: an input that could not be read, or not decoded/encoded
FAILED_TO_DOWNLOAD = {"missing_file", "unreadable_file", "zero_byte", "not_a_file", "symlink_outside_input", "path_outside_input"}
FAILED_TO_RESIZE = {"corrupt_image", "not_an_image", "decompression_bomb", "unexpected_error"}
CRASH_ENV = "MAKE_SHARDS_TEST_CRASH"


def crash_for_tests(point: str, count: int) -> None:
    """Test hook: with ``MAKE_SHARDS_TEST_CRASH="POINT:N:MARKER"`` the process ends at once (``os._exit``, as
    if killed) the first time it reaches POINT with count N; the file MARKER records that it did, so a retry
    goes through. Points: ``manifest`` (N rows listed), ``shard`` (half of shard N written), a JSON file name
    (``stats.json``: written, not yet renamed)."""
    spec = os.environ.get(CRASH_ENV)
    if spec:
        want, n, marker = spec.split(":", 2)
        if (want, int(n)) == (point, count) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(137)


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    crash_for_tests(os.path.basename(path), 0)
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def shard_paths(output_dir: str, shard: int) -> tuple[str, str]:
    tar = os.path.join(output_dir, f"{shard:05d}.tar")
    return tar, shard_stats_path(tar)


# ---------------------------------------------------------------- one shard


@dataclass
class ShardContext:
    """Everything ``write_shard`` needs besides the shard's rows; sent once to every worker."""

    output_dir: str
    settings: Settings
    run: dict  # stored in every NNNNN_stats.json as "settings": what a resume compares
    classes: list[str] | None

    @cached_property
    def labels(self) -> Labels:
        return Labels(self.classes)


class ShardWriter:
    """Writes one shard to ``NNNNN.tar.tmp``; ``close`` writes its stats file, then renames the tar."""

    def __init__(self, output_dir: str, shard: int, run: dict):
        self.tar_path, self.stats_path = shard_paths(output_dir, shard)
        self.tar = tarfile.open(self.tar_path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self.stats = {"name": os.path.basename(self.tar_path), "count": 0, "successes": 0, "settings": run}
        self.reasons: Counter = Counter()

    def add(self, key: str, reason: str | None, files: dict[str, bytes]) -> None:
        self.stats["count"] += 1
        if reason:
            self.reasons[reason] += 1
            return
        for ext in sorted(files):  # image, json, txt: the order webdataset's TarWriter uses
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(files[ext]), TAR_MTIME, TAR_MODE
            self.tar.addfile(info, io.BytesIO(files[ext]))
        self.stats["successes"] += 1

    def close(self) -> dict:
        self.tar.close()
        self.stats.update(
            skipped=sum(self.reasons.values()),
            skipped_reasons=dict(sorted(self.reasons.items())),
            failed_to_download=sum(n for r, n in self.reasons.items() if r in FAILED_TO_DOWNLOAD),
            failed_to_resize=sum(n for r, n in self.reasons.items() if r in FAILED_TO_RESIZE),
            tar_bytes=os.path.getsize(self.tar_path + ".tmp"),  # a resume rewrites a tar cut short since
        )
        write_json_atomic(self.stats_path, self.stats)
        os.replace(self.tar_path + ".tmp", self.tar_path)
        return self.stats


def write_shard(ctx: ShardContext, shard: int, lines: list[str]) -> dict:
    """Write shard ``shard`` from its manifest rows (JSON lines); returns its stats.

    A pure function of ``lines`` and ``ctx``: any process on any machine writes the same bytes, so the local
    pool, Ray tasks and ``--part`` runs are interchangeable. A process killed half way leaves only
    ``NNNNN.tar.tmp`` (and no stats file), which the next attempt overwrites.
    """
    writer = ShardWriter(ctx.output_dir, shard, ctx.run)
    for i, line in enumerate(lines):
        if i == len(lines) // 2:
            crash_for_tests("shard", shard)
        item = Item(**json.loads(line))
        reason, files = process_item(item, ctx.settings, ctx.labels)
        writer.add(item.key, reason, files)
    return writer.close()


def completed_shard(output_dir: str, shard: int, run: dict) -> dict | None:
    """The stats of a shard an earlier run finished with the same inputs and settings, else None."""
    tar, stats_path = shard_paths(output_dir, shard)
    stats = _read_json(stats_path)
    if stats is None or stats.get("settings") != run:
        return None
    try:
        complete = os.path.getsize(tar) == stats.get("tar_bytes")
    except OSError:
        return None
    return stats if complete else None


# ---------------------------------------------------------------- what OUTPUT_DIR holds


def _is_our_shard_stats(path: str) -> bool:
    stats = _read_json(path)
    return stats is not None and isinstance(stats.get("settings"), dict) and "fingerprint" in stats["settings"]


def scan(output_dir: str) -> tuple[list[str], list[str]]:
    """(names make_shards wrote, other names) in OUTPUT_DIR.

    Ours: shard tars and stats files whose ``NNNNN_stats.json`` carries our ``settings`` (img2dataset's do
    not), their temporaries, stats.json, sizes.json and the manifest. Anything else, a folder included, is not.
    """
    ours, foreign = [], []
    verdicts: dict[str, bool] = {}  # stats file -> ours?
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        match = SHARD_FILE.match(name)
        if not os.path.isfile(path) and not os.path.islink(path):
            mine = False
        elif match and not match.group(3):
            stats = os.path.join(output_dir, match.group(1) + "_stats.json")
            if stats not in verdicts:
                verdicts[stats] = _is_our_shard_stats(stats)
            mine = verdicts[stats]
        else:
            mine = bool(match) or name in RUN_FILES or bool(MANIFEST_TEMPORARY.match(name))
        (ours if mine else foreign).append(name)
    return ours, foreign


def removal_order(name: str) -> int:
    """Tars go first and stats files after them: a crash part way never leaves a tar beside our stats file
    that did not belong to it."""
    match = SHARD_FILE.match(name)
    return 0 if match and match.group(2) == ".tar" else 1 if match else 2


def remove(output_dir: str, names) -> None:
    for name in sorted(names, key=lambda n: (removal_order(n), n)):
        os.remove(os.path.join(output_dir, name))


def summarise(shards: list[dict], run: dict) -> dict:
    """stats.json from the per-shard stats (in shard order)."""
    reasons: Counter = Counter()
    for st in shards:
        reasons.update(st.get("skipped_reasons", {}))
    return {
        "seen": sum(st["count"] for st in shards),
        "written": sum(st["successes"] for st in shards),
        "skipped": sum(reasons.values()),
        "skipped_reasons": dict(sorted(reasons.items())),
        "shards": [{"name": st["name"], "samples": st["successes"]} for st in shards],
        "settings": run,
    }
