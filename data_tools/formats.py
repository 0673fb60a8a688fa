"""The shard format and the image files we read: one definition of each name, used by every tool.

Owns: which file endings are images (``IMAGE_EXTENSIONS``), which sample fields hold an image or a
caption (``IMAGE_FIELDS``, ``TEXT_FIELD``), how a tar member name splits into key and field
(``split_member_name``, webdataset's rule), the names of the files beside the shards (``STATS_FILE``,
``SIZES_FILE``, img2dataset's ``NNNNN_stats.json``) and the per-shard sample counts they hold, and
decoding an image the same way everywhere (``decode_image``: upright by its EXIF orientation, RGB,
decompression bombs refused). ``mmcontrast`` imports these; nothing here imports torch.
Does not own writing shards (``make_shards``), checking them (``inspect``) or streaming them for training
(``mmcontrast.data``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Image files found in folders (make_shards' inputs, zero-shot / eval / embed folders).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Sample fields that hold an image in a shard (make_shards stores jpg, png or webp; img2dataset jpg).
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
TEXT_FIELD = "txt"
STATS_FILE = "stats.json"  # make_shards: {"seen", "written", "skipped", "shards": [{"name", "samples"}], "classes"?}
SIZES_FILE = "sizes.json"  # {shard name: samples}: the file open_clip's trainer reads for the data set size
SHARD_STATS_SUFFIX = "_stats.json"  # NNNNN_stats.json beside NNNNN.tar (img2dataset's convention): "successes"
MANIFEST_FILE = "_manifest.jsonl.gz"  # make_shards: the sorted input listing, one JSON row per input, header first

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


# Pixels above which an image is refused as a decompression bomb: pillow's own limit (≈ 89 M, a 9459² image).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class ImageDecodeError(Exception):
    """An image that cannot be used; ``reason`` is the key it is counted under (``corrupt_image``, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(source: bytes | str | os.PathLike, draft_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file or its bytes into an upright RGB image: the one decoder of every tool.

    Applies the EXIF orientation (a phone photo stored sideways comes out as it is shown), so a sample
    looks the same whether make_shards copied its bytes or re-encoded it, and in training, evaluation,
    zero-shot and embeddings alike. ``draft_size`` decodes JPEGs at the smallest DCT scale (1/2, 1/4,
    1/8) that keeps both sides at least that many pixels. Raises ``ImageDecodeError`` with the reason:
    ``decompression_bomb`` (more than ``max_pixels`` pixels), ``not_an_image``, ``corrupt_image``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own max_pixels decides
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except Image.DecompressionBombError as err:
            raise ImageDecodeError("decompression_bomb", str(err)) from None
        except UnidentifiedImageError as err:
            raise ImageDecodeError("not_an_image", str(err)) from None
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:  # the file itself cannot be read
            raise ImageDecodeError("unreadable_file", f"{type(err).__name__}: {err}") from None
        except Exception as err:
            raise ImageDecodeError("corrupt_image", f"{type(err).__name__}: {err}") from None
        if image.width * image.height > max_pixels:
            raise ImageDecodeError("decompression_bomb", f"{image.width}x{image.height} pixels, more than {max_pixels}")
        try:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            rgb = to_rgb(image)
            ImageOps.exif_transpose(rgb, in_place=True)
        except Exception as err:  # truncated or corrupt data fails in the full decode
            raise ImageDecodeError("corrupt_image", f"{type(err).__name__}: {err}") from None
    return rgb


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown: its sides swapped when the EXIF orientation turns it by 90°."""
    width, height = image.size
    return (height, width) if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8) else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode fully (corrupt or truncated data fails here) and convert to RGB.

    A palette image with transparency goes through RGBA first, which avoids pillow's warning about it.
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")
