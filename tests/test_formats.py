"""data_tools.formats: one image decoder for every path (EXIF orientation, decompression bombs) and the shard names."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import make_shards
from data_tools.formats import ImageDecodeError, decode_image, split_member_name

ORIENTATION = 0x0112
SIZE = (48, 24)  # the upright picture is wide; stored sideways it is tall


def upright() -> Image.Image:
    """A wide picture whose orientation is unmistakable: a red left half, a blue right half, a green corner."""
    image = Image.new("RGB", SIZE, (220, 30, 30))
    image.paste((30, 30, 220), (SIZE[0] // 2, 0, SIZE[0], SIZE[1]))
    image.paste((30, 200, 30), (0, 0, 8, 8))
    return image


def sideways_jpeg() -> bytes:
    """``upright()`` stored rotated, with EXIF orientation 6 ("rotate 90° clockwise to display"), as phones do."""
    stored = upright().transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote: tall
    exif = stored.getexif()
    exif[ORIENTATION] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize(SIZE), dtype=np.float32)


def looks_upright(array: np.ndarray) -> bool:
    """Mean absolute difference to the upright picture (HWC, 0–255) is small, and far from the sideways one."""
    want = pixels(upright())
    return array.shape == want.shape and np.abs(array - want).mean() < 12


def to_array(image: Image.Image) -> torch.Tensor:
    """A deterministic preprocess: resize to SIZE, HWC float 0–255 as a tensor."""
    return torch.from_numpy(pixels(image))


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    root = tmp_path / "photos" / "things"
    root.mkdir(parents=True)
    (root / "phone.jpg").write_bytes(sideways_jpeg())
    (root / "phone.txt").write_text("a photo taken sideways")
    return tmp_path / "photos"


def test_decode_image_applies_the_exif_orientation():
    raw = Image.open(io.BytesIO(sideways_jpeg()))
    assert raw.size == (SIZE[1], SIZE[0]) and raw.getexif()[ORIENTATION] == 6  # stored tall
    image = decode_image(sideways_jpeg())
    assert image.mode == "RGB" and image.size == SIZE
    assert looks_upright(pixels(image))
    assert not looks_upright(pixels(raw.convert("RGB").resize(SIZE)))  # the test has teeth


def test_decode_image_names_what_is_wrong(tmp_path):
    big = io.BytesIO()
    Image.new("L", (200, 200)).save(big, format="PNG")
    with pytest.raises(ImageDecodeError) as bomb:
        decode_image(big.getvalue(), max_pixels=10_000)
    assert bomb.value.reason == "decompression_bomb"
    with pytest.raises(ImageDecodeError) as text:
        decode_image(b"not an image at all")
    assert text.value.reason == "not_an_image"
    with pytest.raises(ImageDecodeError) as cut:
        decode_image(sideways_jpeg()[:400])
    assert cut.value.reason == "corrupt_image"
    with pytest.raises(ImageDecodeError) as missing:
        decode_image(tmp_path / "missing.jpg")
    assert missing.value.reason == "unreadable_file"


def test_a_sideways_photo_is_upright_on_every_decode_path(photo_folder, tmp_path):
    from mmcontrast import evaluate
    from mmcontrast.data import make_loader

    views = {}
    for name, extra in (("copied", []), ("re-encoded", ["--max-image-size", "40"])):
        out = tmp_path / name
        assert make_shards.main([str(photo_folder), str(out), "--workers", "1", "--layout", "sidecar", *extra]) == 0
        batch = next(iter(make_loader([str(out / "00000.tar")], image_transform=to_array, tokenizer=None, batch_size=1,
                                      workers=0, seed=0, shuffle=False)))  # fmt: skip
        views[f"training, shards {name}"] = batch["image"][0].numpy()
        with tarfile.open(out / "00000.tar") as tar:
            sample = {split_member_name(m.name)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
        meta = json.loads(sample["json"])
        assert meta["width"] > meta["height"], meta  # the size as it is shown, like the pixels
        decoded = evaluate._decode_retrieval_sample({"__key__": "k", **sample}, to_array)
        views[f"retrieval, shards {name}"] = decoded["image"].numpy()
    files = evaluate._ImageFiles(evaluate.discover_images(photo_folder), to_array)
    views["zero-shot / eval / embed folders"] = files[0][1].numpy()
    assert all(looks_upright(array) for array in views.values()), {k: float(np.abs(v - pixels(upright())).mean()) for k, v in views.items()}


def test_split_member_name_is_webdatasets_rule():
    assert split_member_name("dir/key.seg.jpg") == ("dir/key", "seg.jpg")
    assert split_member_name("00001.txt") == ("00001", "txt")
    assert split_member_name("no_dot") is None
