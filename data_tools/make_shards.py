"""Folders of images and captions to webdataset shards: ``python -m data_tools.make_shards INPUT OUTPUT_DIR``.

Owns: finding the samples in INPUT (three layouts), checking every image and caption, the optional
resize, writing deterministic tar shards (``00000.tar`` …) with a per-shard ``NNNNN_stats.json``, the
run's ``stats.json`` and ``sizes.json``, and ``--resume``. Does not own: reading shards for training
(``mmcontrast.data``) or checking finished shards (``data_tools.inspect``).

Layouts of INPUT (chosen automatically, or forced with ``--layout``):

- ``sidecar``: ``a/1.jpg`` + ``a/1.txt``, searched recursively (img2dataset's "files" layout); a sibling
  ``a/1.json`` object, when present, is merged into the sample's JSON;
- ``captions``: ``--captions FILE``, CSV/TSV with ``filepath,caption`` columns or JSONL with those keys
  (paths relative to INPUT); other columns are kept in the sample's JSON, a ``label`` column included;
- ``classes``: class subfolders and no caption files; the caption is ``--class-template`` filled with the
  folder name (underscores become spaces).

A shard holds ``--shard-size`` consecutive *inputs* (sorted by path, or in the captions file's row
order); skipped inputs leave their shard a little smaller, as in img2dataset. Each shard is therefore a
pure function of its inputs: byte-identical across runs, worker counts and resumes.

Tars are written with ``tarfile`` in webdataset's layout (what ``webdataset.TarWriter`` writes, with fixed
header fields): importing webdataset would import torch, seconds of start-up for a data-only tool.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import tarfile
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing import Pool

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from data_tools.formats import (
    IMAGE_EXTENSIONS,
    SIZES_FILE,
    STATS_FILE,
    is_image_file,
    shard_stats_path,
    upright_size,
)

STORED_EXTENSION = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # other formats are re-encoded as PNG
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}, "PNG": {}}
DEFAULT_CLASS_TEMPLATE = "a photo of a {}."
DEFAULT_SHARD_SIZE = 1000
TAR_MTIME = 0  # fixed tar header fields (time, owner, mode) make shards byte-identical across runs
TAR_MODE = 0o444
OUR_FILES = re.compile(r"^(\d{5})(\.tar|\.tar\.tmp|_stats\.json|_stats\.json\.tmp)$")


class ArgumentError(Exception):
    """An unusable argument or INPUT; ``main`` prints it as one line and exits 2."""


@dataclass
class Item:
    """One input sample, before its files are read."""

    relpath: str  # POSIX path of the image relative to INPUT
    key: str
    caption: str | None = None  # known caption (captions file, class template)
    caption_path: str | None = None  # sidecar caption file, relative to INPUT
    meta_path: str | None = None  # sidecar JSON file, relative to INPUT
    label: str | int | None = None
    label_index: int | None = None
    extra: dict = field(default_factory=dict)  # other fields of the captions row, kept in KEY.json
    reason: str | None = None  # already known to be skipped


@dataclass(frozen=True)
class Settings:
    """What a worker needs to turn an Item into a sample."""

    root: str  # INPUT with symlinks resolved
    max_image_size: int | None
    max_pixels: int


def make_key(relpath: str, occurrence: int = 0) -> str:
    """A webdataset key for ``relpath``: readable, unique, stable, without dots or slashes.

    The readable part keeps the end of the path (the file name says most); the hash of the whole path
    (and of the occurrence, for a file listed twice in a captions file) makes it unique.

    >>> make_key("dogs/Rex 1.jpg")
    'dogs_Rex_1-049da35135'
    """
    stem = posixpath.splitext(relpath)[0]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[-60:].strip("_-") or "sample"
    digest = hashlib.sha1(f"{relpath}#{occurrence}".encode()).hexdigest()[:10]
    return f"{readable}-{digest}"


# ---------------------------------------------------------------- finding the inputs


def _list_files(root: str) -> list[str]:
    """All non-hidden files under ``root`` as sorted POSIX relative paths; symlinked folders not entered."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith("."):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _read_captions_file(path: str) -> list[dict]:
    """Rows of a CSV/TSV (header row) or JSONL captions file, each with ``filepath`` and ``caption``."""
    if not os.path.isfile(path):
        raise ArgumentError(f"--captions {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.lower().endswith((".jsonl", ".json", ".ndjson")):
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                text = f.read()
                first = text.split("\n", 1)[0]
                tab = path.lower().endswith(".tsv") or ("\t" in first and "," not in first)
                rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if tab else ","))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise ArgumentError(f"--captions {path} cannot be parsed: {e}") from e
    if not rows:
        raise ArgumentError(f"--captions {path} has no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise ArgumentError(f"--captions {path}: every JSONL line must be an object with filepath and caption")
    columns = sorted(set().union(*(r.keys() for r in rows)))
    if "filepath" not in columns or "caption" not in columns:
        raise ArgumentError(
            f"--captions {path} has columns {','.join(map(str, columns))}; it needs filepath and caption"
        )
    return rows


def _relative_inside(root: str, path: str) -> str | None:
    """``path`` (relative to root, or absolute) as a normalised relative POSIX path; None if it leaves root."""
    path = path.strip()
    rel = os.path.relpath(path, root) if os.path.isabs(path) else path
    rel = posixpath.normpath(rel.replace(os.sep, "/"))
    return None if rel == ".." or rel.startswith("../") else rel


def _assign_labels(items: list[Item]) -> list[str] | None:
    """Set ``label_index``: the label itself when every label is an integer, else the position of the label
    in the sorted unique class names (returned, and stored in stats.json as ``classes``)."""
    labels = [it.label for it in items if it.label is not None]
    if not labels:
        return None
    if all(isinstance(x, int) or (isinstance(x, str) and x.strip().isdigit()) for x in labels):
        for it in items:
            if it.label is not None:
                it.label = it.label_index = int(it.label)
        return None
    classes = sorted({str(x) for x in labels})
    index = {name: i for i, name in enumerate(classes)}
    for it in items:
        if it.label is not None:
            it.label = str(it.label)
            it.label_index = index[it.label]
    return classes


def find_items(
    root: str, layout: str = "auto", captions: str | None = None, class_template: str = DEFAULT_CLASS_TEMPLATE
) -> tuple[list[Item], str, list[str] | None]:
    """The samples of INPUT in a fixed order; returns (items, layout used, class names or None)."""
    if captions:
        layout = "captions"
    if layout == "captions":
        if not captions:
            raise ArgumentError("--layout captions needs --captions FILE")
        return _captions_items(root, captions)
    files = _list_files(root)
    images = [p for p in files if is_image_file(p)]
    if not images:
        what = "is empty" if not files else f"has {len(files)} files but no images ({', '.join(IMAGE_EXTENSIONS)})"
        raise ArgumentError(f"INPUT {root} {what}; point it at a folder of images")
    texts = {p for p in files if p.endswith(".txt")}
    if layout == "auto":
        if any(posixpath.splitext(p)[0] + ".txt" in texts for p in images):
            layout = "sidecar"
        elif any("/" in p for p in images):
            layout = "classes"
        else:
            raise ArgumentError(
                f"INPUT {root} has images but no captions: put a .txt beside each image, "
                "pass --captions FILE, or sort the images into class subfolders"
            )
    if layout == "sidecar":
        jsons = {p for p in files if p.endswith(".json")}
        items = []
        for p in images:
            stem = posixpath.splitext(p)[0]
            items.append(
                Item(
                    p,
                    make_key(p),
                    caption_path=stem + ".txt" if stem + ".txt" in texts else None,
                    meta_path=stem + ".json" if stem + ".json" in jsons else None,
                )
            )
        return items, layout, None
    if layout == "classes":
        try:
            class_template.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ArgumentError(f"--class-template {class_template!r} must contain one {{}}: {e}") from e
        if "{}" not in class_template:
            raise ArgumentError(f"--class-template {class_template!r} must contain {{}} for the class name")
        items = []
        for p in images:
            if "/" not in p:
                items.append(Item(p, make_key(p), reason="no_class_folder"))
                continue
            name = p.split("/", 1)[0]
            caption = class_template.format(name.replace("_", " "))
            items.append(Item(p, make_key(p), caption=caption, label=name))
        return items, layout, _assign_labels(items)
    raise ArgumentError(f"unknown --layout {layout!r}; use auto, sidecar, captions or classes")


def _captions_items(root: str, captions: str) -> tuple[list[Item], str, list[str] | None]:
    items, seen = [], Counter()
    for row in _read_captions_file(captions):
        path = str(row.get("filepath") or "")
        rel = _relative_inside(root, path) if path else None
        caption = row.get("caption")
        extra = {str(k): v for k, v in row.items() if k not in ("filepath", "caption", "label") and k is not None}
        label = row.get("label")
        label = None if label is None or (isinstance(label, str) and not label.strip()) else label
        if rel is None:
            reason = "missing_file" if not path else "path_outside_input"
            items.append(Item(path, make_key(path or "missing", seen[path]), reason=reason))
            seen[path] += 1
            continue
        items.append(
            Item(
                rel,
                make_key(rel, seen[rel]),
                caption=caption if isinstance(caption, str) else "",
                label=label,
                extra=extra,
            )
        )
        seen[rel] += 1
    return items, "captions", _assign_labels(items)


# ---------------------------------------------------------------- one input to one sample (in a worker)


def _resolve(settings: Settings, relpath: str) -> tuple[str | None, str | None]:
    """(real path, None) or (None, reason to skip)."""
    real = os.path.realpath(os.path.join(settings.root, relpath))
    if not real.startswith(settings.root + os.sep):
        return None, "symlink_outside_input"
    if not os.path.lexists(os.path.join(settings.root, relpath)) or not os.path.exists(real):
        return None, "missing_file"
    if not os.path.isfile(real):
        return None, "not_a_file"
    return real, None


def _read_caption(item: Item, settings: Settings) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason)."""
    if item.caption is not None:
        text = item.caption
    elif item.caption_path is None:
        return None, "missing_caption"
    else:
        path, reason = _resolve(settings, item.caption_path)
        if reason:
            return None, "missing_caption" if reason == "missing_file" else reason
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, "caption_not_utf8"
    text = text.strip()
    return (text, None) if text else (None, "missing_caption")


def _read_meta(item: Item, settings: Settings) -> dict:
    """The sidecar JSON object, if any and readable; other fields of the sample win over it."""
    if item.meta_path is None:
        return {}
    path, reason = _resolve(settings, item.meta_path)
    if reason:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _open_image(data: bytes, settings: Settings) -> tuple[Image.Image | None, tuple[int, int], str | None]:
    """Decode ``data`` fully, so that truncation is caught: (image, its size, None) or (None, (0, 0), reason).

    A JPEG that is not going to be resized is decoded at reduced scale, so the image returned may be
    smaller than the size returned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own --max-pixels
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            return None, (0, 0), "decompression_bomb"
        except UnidentifiedImageError:
            return None, (0, 0), "not_an_image"
        except Exception:
            return None, (0, 0), "corrupt_image"
        width, height = upright_size(img)  # the size reported in KEY.json is the size as shown
        if width * height > settings.max_pixels:
            return None, (0, 0), "decompression_bomb"
        try:
            resize = settings.max_image_size and max(width, height) > settings.max_image_size
            if img.format == "JPEG" and not resize:
                # decode at 1/8 scale: every byte is still entropy-decoded, so truncation is still caught
                img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        except Exception:
            return None, (0, 0), "corrupt_image"
    return img, (width, height), None


def _reencode(img: Image.Image, max_size: int | None) -> tuple[Image.Image, str, bytes]:
    """Resize (keep aspect, never upscale) and encode in the original format (PNG for formats we don't store)."""
    fmt = img.format if img.format in STORED_EXTENSION else "PNG"
    icc = img.info.get("icc_profile")
    img = ImageOps.exif_transpose(img)  # re-encoding drops the EXIF orientation tag, so apply it first
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if max_size and max(img.size) > max_size:
        scale = max_size / max(img.size)
        new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(new, Image.Resampling.LANCZOS)
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    if fmt != "JPEG" and img.mode == "CMYK":
        img = img.convert("RGB")
    options = dict(SAVE_OPTIONS[fmt])
    if icc:
        options["icc_profile"] = icc
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return img, STORED_EXTENSION[fmt], buf.getvalue()


def process_item(item: Item, settings: Settings) -> tuple[str | None, dict[str, bytes]]:
    """Read, check and encode one input: ``(None, {ext: bytes})`` or ``(reason, {})`` to skip it."""
    if item.reason:
        return item.reason, {}
    try:
        path, reason = _resolve(settings, item.relpath)
        if reason:
            return reason, {}
        if os.path.getsize(path) == 0:
            return "zero_byte", {}
        caption, reason = _read_caption(item, settings)
        if reason:
            return reason, {}
        with open(path, "rb") as f:
            data = f.read()
        img, (width, height), reason = _open_image(data, settings)
        if reason:
            return reason, {}
        meta = {**_read_meta(item, settings), **item.extra}
        resize = settings.max_image_size and max(width, height) > settings.max_image_size
        if resize or img.format not in STORED_EXTENSION:
            meta.update(original_width=width, original_height=height, original_format=img.format.lower())
            img, ext, data = _reencode(img, settings.max_image_size)
            width, height = img.size
        else:
            ext = STORED_EXTENSION[img.format]
        meta.update(key=item.key, source_path=item.relpath, width=width, height=height, caption=caption)
        if item.label is not None:
            meta.update(label=item.label, label_index=item.label_index)
        sample_json = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
        return None, {ext: data, "txt": caption.encode("utf-8"), "json": sample_json.encode("utf-8")}
    except OSError:
        return "unreadable_file", {}
    except Exception:  # a bad input must never end the run; it is counted instead
        return "unexpected_error", {}


# ---------------------------------------------------------------- writing shards


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _shard_paths(output_dir: str, shard: int) -> tuple[str, str]:
    tar = os.path.join(output_dir, f"{shard:05d}.tar")
    return tar, shard_stats_path(tar)


def _completed_shard(output_dir: str, shard: int, run: dict) -> dict | None:
    """The stats of a shard finished by an earlier run with the same inputs and settings, else None."""
    tar, stats_path = _shard_paths(output_dir, shard)
    if not (os.path.isfile(tar) and os.path.isfile(stats_path)):
        return None
    try:
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return None
    return stats if stats.get("settings") == run else None


def _remove_our_files(output_dir: str, keep: set[int]) -> None:
    """Delete shards, temporaries and stats of earlier runs, except the complete shards in ``keep``."""
    for name in os.listdir(output_dir):
        m = OUR_FILES.match(name)
        stale = m and not (int(m.group(1)) in keep and m.group(2) in (".tar", "_stats.json"))
        if stale or name in (STATS_FILE, SIZES_FILE):
            os.remove(os.path.join(output_dir, name))


class _ShardWriter:
    """Writes one shard to ``NNNNN.tar.tmp`` and renames it when complete (after its stats file)."""

    def __init__(self, output_dir: str, shard: int, run: dict):
        self.tar_path, self.stats_path = _shard_paths(output_dir, shard)
        self.tar = tarfile.open(self.tar_path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self.stats = {"name": os.path.basename(self.tar_path), "count": 0, "successes": 0, "settings": run}
        self.reasons: Counter = Counter()

    def add(self, key: str, reason: str | None, files: dict[str, bytes]) -> None:
        self.stats["count"] += 1
        if reason:
            self.reasons[reason] += 1
        else:
            for ext in sorted(files):  # image, json, txt: the order webdataset's TarWriter uses
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(files[ext]), TAR_MTIME, TAR_MODE
                self.tar.addfile(info, io.BytesIO(files[ext]))
            self.stats["successes"] += 1

    def close(self) -> dict:
        self.tar.close()
        self.stats.update(skipped=sum(self.reasons.values()), skipped_reasons=dict(sorted(self.reasons.items())))
        _write_json_atomic(self.stats_path, self.stats)
        os.replace(self.tar_path + ".tmp", self.tar_path)  # last: a .tar that exists is complete
        return self.stats


def _fingerprint(items: list[Item]) -> str:
    h = hashlib.sha1()
    for it in items:
        h.update(json.dumps(asdict(it), sort_keys=True, default=str).encode())
    return h.hexdigest()


def write_shards(
    items: list[Item],
    output_dir: str,
    settings: Settings,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 1,
    resume: bool = False,
    run_info: dict | None = None,
) -> dict:
    """Write ``items`` as shards of ``shard_size`` inputs into ``output_dir``; returns the stats.json dict.

    With ``resume``, shards completed by an earlier run with the same inputs and settings are kept.
    """
    run = {
        **(run_info or {}),
        "inputs": len(items),
        "fingerprint": _fingerprint(items),
        "shard_size": shard_size,
        "max_image_size": settings.max_image_size,
        "max_pixels": settings.max_pixels,
    }
    n_shards = max(1, -(-len(items) // shard_size))
    done = {}
    if resume:
        done = {s: st for s in range(n_shards) if (st := _completed_shard(output_dir, s, run)) is not None}
    _remove_our_files(output_dir, keep=set(done))
    todo = [i for s in range(n_shards) if s not in done for i in range(s * shard_size, min((s + 1) * shard_size, len(items)))]
    shard_stats = dict(done)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc="make_shards", disable=None)
    if not todo and not done:  # no inputs at all: still write one empty shard so the layout is complete
        shard_stats[0] = _ShardWriter(output_dir, 0, run).close()
    pool = Pool(workers) if workers > 1 else None
    try:
        work = partial(process_item, settings=settings)
        todo_items = (items[i] for i in todo)
        results = pool.imap(work, todo_items, chunksize=8) if pool else map(work, todo_items)
        writer, current = None, None
        for i, (reason, files) in zip(todo, results):
            shard = i // shard_size
            if shard != current:
                writer, current = _ShardWriter(output_dir, shard, run), shard
            writer.add(items[i].key, reason, files)
            if i == min((shard + 1) * shard_size, len(items)) - 1:
                shard_stats[shard] = writer.close()
            bar.update(1)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return _summarise([shard_stats[s] for s in range(n_shards)], run)


def _summarise(shards: list[dict], run: dict) -> dict:
    reasons: Counter = Counter()
    for st in shards:
        reasons.update(st.get("skipped_reasons", {}))
    stats = {
        "seen": sum(st["count"] for st in shards),
        "written": sum(st["successes"] for st in shards),
        "skipped": sum(reasons.values()),
        "skipped_reasons": dict(sorted(reasons.items())),
        "shards": [{"name": st["name"], "samples": st["successes"]} for st in shards],
        "settings": run,
    }
    return stats


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m data_tools.make_shards",
        description="Convert a folder of images and captions into webdataset shards (00000.tar, ...).",
    )
    p.add_argument("input", metavar="INPUT", help="folder of images (sidecar .txt captions, --captions, or class subfolders)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="where 00000.tar ... and stats.json are written")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="inputs per shard (default %(default)s)")
    p.add_argument(
        "--max-image-size", type=int, default=None,
        help="resize so the longer side is at most this many pixels (never upscales; default: copy the original bytes)",
    )
    p.add_argument("--captions", default=None, help="CSV/TSV (filepath,caption columns) or JSONL with paths relative to INPUT")
    p.add_argument("--class-template", default=DEFAULT_CLASS_TEMPLATE, help="caption for class subfolders (default %(default)r)")
    p.add_argument("--layout", default="auto", choices=["auto", "sidecar", "captions", "classes"], help="force an INPUT layout")
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes that decode/encode (default %(default)s)"
    )
    p.add_argument("--resume", action="store_true", help="keep shards an interrupted run completed and write the rest")
    p.add_argument(
        "--max-pixels", type=int, default=Image.MAX_IMAGE_PIXELS,
        help="skip images with more pixels than this as decompression bombs (default %(default)s, pillow's limit)",
    )
    return p


def _check_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ArgumentError(f"OUTPUT_DIR {path} is not writable ({e.strerror or e}); choose another folder") from e


def run(args: argparse.Namespace) -> dict:
    """Convert as the command line asks; returns the stats.json dict (also written to OUTPUT_DIR)."""
    if not os.path.exists(args.input):
        raise ArgumentError(f"INPUT {args.input} does not exist")
    if not os.path.isdir(args.input):
        raise ArgumentError(f"INPUT {args.input} is not a folder")
    for name in ("shard_size", "workers", "max_pixels") + (("max_image_size",) if args.max_image_size is not None else ()):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be at least 1")
    items, layout, classes = find_items(args.input, args.layout, args.captions, args.class_template)
    _check_output_dir(args.output_dir)
    settings = Settings(os.path.realpath(args.input), args.max_image_size, args.max_pixels)
    run_info = {"layout": layout, "class_template": args.class_template if layout == "classes" else None}
    stats = write_shards(
        items, args.output_dir, settings, shard_size=args.shard_size, workers=args.workers, resume=args.resume, run_info=run_info
    )
    stats["layout"] = layout
    if classes is not None:
        stats["classes"] = classes
    _write_json_atomic(os.path.join(args.output_dir, SIZES_FILE), {s["name"]: s["samples"] for s in stats["shards"]})
    _write_json_atomic(os.path.join(args.output_dir, STATS_FILE), stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        stats = run(args)
    except ArgumentError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_shards: interrupted; run the same command with --resume to finish", file=sys.stderr)
        return 130
    reasons = ", ".join(f"{k} {v}" for k, v in stats["skipped_reasons"].items())
    print(
        f"wrote {stats['written']} samples in {len(stats['shards'])} shards to {args.output_dir}"
        f" (seen {stats['seen']}, skipped {stats['skipped']}{': ' + reasons if reasons else ''})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
