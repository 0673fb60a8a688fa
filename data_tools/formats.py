"""The shard format and the image files we read: one definition of each name, used by every tool.

Owns: which file endings are images (``IMAGE_EXTENSIONS``), which sample fields hold an image or a
caption (``IMAGE_FIELDS``, ``TEXT_FIELD``), how a tar member name splits into key and field
(``split_member_name``, webdataset's rule), the names of the files beside the shards (``STATS_FILE``,
``SIZES_FILE``, img2dataset's ``NNNNN_stats.json``) and the per-shard sample counts they hold, and
turning decoded pixels into RGB (``to_rgb``). ``mmcontrast`` imports these; nothing here imports torch.
Does not own writing shards (``make_shards``), checking them (``inspect``) or streaming them for training
(``mmcontrast.data``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from PIL import Image

# Image files found in folders (make_shards' inputs, zero-shot / eval / embed folders).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Sample fields that hold an image in a shard (make_shards stores jpg, png or webp; img2dataset jpg).
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
TEXT_FIELD = "txt"
STATS_FILE = "stats.json"  # make_shards: {"seen", "written", "skipped", "shards": [{"name", "samples"}], "classes"?}
SIZES_FILE = "sizes.json"  # {shard name: samples}: the file open_clip's trainer reads for the data set size
SHARD_STATS_SUFFIX = "_stats.json"  # NNNNN_stats.json beside NNNNN.tar (img2dataset's convention): "successes"

_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: the key ends at the first dot


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/key.field.ext"`` → ``("dir/key", "field.ext")`` as webdataset groups tar members; None when no dot."""
    match = _KEY_AND_FIELD.match(name)
    return (match.group(1), match.group(2)) if match else None


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def shard_stats_path(shard: str) -> str | None:
    """``NNNNN_stats.json`` for ``NNNNN.tar`` (None for a name that does not end in .tar)."""
    return shard[: -len(".tar")] + SHARD_STATS_SUFFIX if shard.endswith(".tar") else None


def folder_sample_counts(stats_json: bytes | str) -> dict[str, int]:
    """{shard name: samples} from the text of make_shards' ``stats.json`` (empty when it has none)."""
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        return {s["name"]: int(s["samples"]) for s in json.loads(stats_json)["shards"]}
    return {}


def shard_sample_count(shard_stats_json: bytes | str) -> int | None:
    """``successes`` from the text of a per-shard ``NNNNN_stats.json`` (make_shards' or img2dataset's)."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return int(json.loads(shard_stats_json)["successes"])
    return None


def local_folder_counts(folder: str) -> dict[str, int]:
    """{shard name: samples} from ``folder/stats.json`` on the local file system (empty when absent)."""
    try:
        with open(os.path.join(folder, STATS_FILE), encoding="utf-8") as f:
            return folder_sample_counts(f.read())
    except OSError:
        return {}


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode fully (corrupt or truncated data fails here) and convert to RGB.

    A palette image with transparency goes through RGBA first, which avoids pillow's warning about it.
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")
