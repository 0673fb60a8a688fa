"""One input to one sample: read, check and (optionally) resize an image and its caption.

Owns: the checks that turn a bad input into a counted skip reason (``zero_byte``, ``corrupt_image``,
``symlink_outside_input`` unless ``--follow-symlinks``, ...), the copy-or-re-encode decision and the sample's
files (``KEY.jpg|png|webp``, ``KEY.txt`` unless the shards are image-only, ``KEY.json``). Runs in
any worker: a local process, a Ray task. Does not own finding the inputs (``inputs``) or writing tars
(``output``).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from data_tools.formats import upright_size
from data_tools.inputs import Item, Labels, is_inside

STORED_EXTENSION = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # other formats are re-encoded as PNG
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}, "PNG": {}}


@dataclass(frozen=True)
class Settings:
    """What a worker needs to turn an Item into a sample."""

    root: str  # INPUT with symlinks resolved
    max_image_size: int | None
    max_pixels: int
    image_only: bool = False  # --layout images: no caption is read or stored
    follow_symlinks: bool = False  # read files whose symlinks point outside INPUT


def _resolve(settings: Settings, relpath: str) -> tuple[str | None, str | None]:
    """(real path, None) or (None, reason to skip)."""
    real = os.path.realpath(os.path.join(settings.root, relpath))
    if not settings.follow_symlinks and not is_inside(real, settings.root):
        return None, "symlink_outside_input"
    if not os.path.lexists(os.path.join(settings.root, relpath)) or not os.path.exists(real):
        return None, "missing_file"
    if not os.path.isfile(real):
        return None, "not_a_file"
    return real, None


def _read_caption(item: Item, settings: Settings) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason); (None, None) for image-only shards."""
    if settings.image_only:
        return None, None
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


def process_item(item: Item, settings: Settings, labels: Labels) -> tuple[str | None, dict[str, bytes]]:
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
        meta.update(key=item.key, source_path=item.relpath, width=width, height=height)
        files = {ext: data}
        if caption is not None:
            meta["caption"] = caption
            files["txt"] = caption.encode("utf-8")
        if item.label is not None:
            label, label_index = labels.resolve(item.label)
            meta.update(label=label, label_index=label_index)
        files["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
        return None, files
    except OSError:
        return "unreadable_file", {}
    except Exception:  # a bad input must never end the run; it is counted instead
        return "unexpected_error", {}
