"""data_tools.make_shards and data_tools.inspect: layouts, bad inputs, determinism, resume, CLI errors."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from data_tools import inspect as inspect_tool
from data_tools import make_shards
from data_tools.inputs import make_key

REPO = Path(__file__).resolve().parents[1]


def image_bytes(size=(40, 30), colour=(200, 30, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {field: bytes}} over all shards, asserting no key appears twice."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                sample = samples.setdefault(key, {})
                assert field not in sample, f"duplicate {member.name}"
                sample[field] = tar.extractfile(member).read()
    return samples


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_tools.make_shards", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """4 good samples in nested folders and one of every kind of bad input."""
    root = tmp_path / "in"
    write(root / "a/1.jpg", image_bytes())
    write(root / "a/1.txt", "a red box\n")
    write(root / "a/b/2.png", image_bytes((20, 20), (0, 0, 255), "PNG"))
    write(root / "a/b/2.txt", "a blue square")
    write(root / "3.webp", image_bytes((16, 24), (0, 255, 0), "WEBP"))
    write(root / "3.txt", "a green bar")
    write(root / "4.bmp", image_bytes((8, 8), (9, 9, 9), "BMP"))
    write(root / "4.txt", "a dark tile")
    write(root / "zero.jpg", b"")
    write(root / "zero.txt", "empty file")
    write(root / "trunc.jpg", image_bytes((64, 64))[:300])
    write(root / "trunc.txt", "cut short")
    write(root / "text.png", "this is not a picture")
    write(root / "text.txt", "liar")
    write(root / "nocap.jpg", image_bytes())
    write(root / "badcap.jpg", image_bytes())
    write(root / "badcap.txt", b"\xff\xfe\xfa caption in latin-1 \xe9")
    write(root / "huge.png", image_bytes((100, 100), fmt="PNG"))  # over --max-pixels 5000 below
    write(root / "huge.txt", "too big")
    outside = write(tmp_path / "outside/secret.jpg", image_bytes())
    os.symlink(outside, root / "link.jpg")
    write(root / "link.txt", "points outside")
    write(root / ".DS_Store", b"\x00\x01")  # hidden: ignored
    return root


def test_sidecar_layout_counts_every_bad_input_by_reason(messy_folder, tmp_path):
    out = tmp_path / "out"
    rc = make_shards.main([str(messy_folder), str(out), "--max-pixels", "5000", "--workers", "1", "--shard-size", "5"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped_reasons"] == {
        "caption_not_utf8": 1, "corrupt_image": 1, "decompression_bomb": 1, "missing_caption": 1,
        "not_an_image": 1, "symlink_outside_input": 1, "zero_byte": 1,
    }
    assert (stats["seen"], stats["written"], stats["skipped"]) == (11, 4, 7)
    assert stats["seen"] == stats["written"] + stats["skipped"]
    assert [s["name"] for s in stats["shards"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(s["samples"] for s in stats["shards"]) == 4
    assert json.loads((out / "sizes.json").read_text()) == {s["name"]: s["samples"] for s in stats["shards"]}
    per_shard = [json.loads((out / f"{i:05d}_stats.json").read_text()) for i in range(3)]
    assert [st["count"] for st in per_shard] == [5, 5, 1]
    assert all(st["count"] == st["successes"] + st["skipped"] for st in per_shard)
    # img2dataset's fields: zero_byte + symlink_outside_input could not be read; corrupt, not an image, bomb not decoded
    assert sum(st["failed_to_download"] for st in per_shard) == 2
    assert sum(st["failed_to_resize"] for st in per_shard) == 3

    samples = read_shards(out)
    by_source = {json.loads(s["json"])["source_path"]: (k, s) for k, s in samples.items()}
    assert set(by_source) == {"a/1.jpg", "a/b/2.png", "3.webp", "4.bmp"}
    for source, (key, sample) in by_source.items():
        assert key == make_key(source) and "." not in key and "/" not in key
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["caption"] == sample["txt"].decode()
        image_field = next(f for f in ("jpg", "png", "webp") if f in sample)
        assert set(sample) == {image_field, "json", "txt"}
        assert Image.open(io.BytesIO(sample[image_field])).size == (meta["width"], meta["height"])
    # originals are copied byte for byte; formats we do not store (BMP) are re-encoded losslessly as PNG
    assert by_source["a/1.jpg"][1]["jpg"] == (messy_folder / "a/1.jpg").read_bytes()
    assert by_source["a/b/2.png"][1]["png"] == (messy_folder / "a/b/2.png").read_bytes()
    assert by_source["3.webp"][1]["webp"] == (messy_folder / "3.webp").read_bytes()
    assert by_source["a/1.jpg"][1]["txt"] == b"a red box"
    bmp = Image.open(io.BytesIO(by_source["4.bmp"][1]["png"]))
    assert bmp.size == (8, 8) and bmp.convert("RGB").getpixel((0, 0)) == (9, 9, 9)


def test_rerun_with_more_workers_gives_byte_identical_shards(messy_folder, tmp_path):
    args = [str(messy_folder), "--max-pixels", "5000", "--shard-size", "3"]
    assert make_shards.main([args[0], str(tmp_path / "one"), *args[1:], "--workers", "1"]) == 0
    assert make_shards.main([args[0], str(tmp_path / "two"), *args[1:], "--workers", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    headers = set()
    for tar_path in (tmp_path / "one").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            headers |= {(m.mtime, m.uid, m.gid, m.uname) for m in tar.getmembers()}
    assert headers == {(0, 0, 0, "")}


def test_captions_file_layouts_keep_extra_fields_and_index_labels(tmp_path):
    root = tmp_path / "in"
    write(root / "img/cat.jpg", image_bytes())
    write(root / "img/dog.png", image_bytes(fmt="PNG"))
    rows = [
        ("img/cat.jpg", "a cat", "cat", "flickr"),
        ("img/dog.png", "a dog", "dog", "web"),
        ("img/cat.jpg", "a second caption for the cat", "cat", "flickr"),  # same file twice: two samples
        ("img/missing.jpg", "gone", "cat", "x"),
        ("../escape.jpg", "outside", "dog", "x"),
        ("img/dog.png", "", "dog", "x"),  # empty caption
    ]
    csv_text = "filepath,caption,label,source\n" + "".join(",".join(r) + "\n" for r in rows)
    files = {
        "captions.csv": csv_text,
        "captions.tsv": csv_text.replace(",", "\t"),
        "captions.jsonl": "".join(
            json.dumps(dict(zip(("filepath", "caption", "label", "source"), r))) + "\n" for r in rows
        ),
    }
    for name, text in files.items():
        cap = write(tmp_path / name, text)
        out = tmp_path / f"out_{name}"
        assert make_shards.main([str(root), str(out), "--captions", str(cap), "--workers", "1"]) == 0
        stats = json.loads((out / "stats.json").read_text())
        assert stats["layout"] == "captions" and stats["classes"] == ["cat", "dog"]
        assert stats["skipped_reasons"] == {"missing_caption": 1, "missing_file": 1, "path_outside_input": 1}
        metas = sorted((json.loads(s["json"]) for s in read_shards(out).values()), key=lambda m: m["caption"])
        assert [(m["caption"], m["label"], m["label_index"], m["source"]) for m in metas] == [
            ("a cat", "cat", 0, "flickr"),
            ("a dog", "dog", 1, "web"),
            ("a second caption for the cat", "cat", 0, "flickr"),
        ]
        assert metas[0]["key"] != metas[2]["key"]


def test_class_folders_use_the_template_and_store_the_label(tmp_path):
    root = tmp_path / "in"
    for name in ("cats", "dogs", "hot_dogs"):
        for i in range(2):
            write(root / name / f"{i}.jpg", image_bytes())
    write(root / "loose.jpg", image_bytes())  # not in a class folder
    out = tmp_path / "out"
    assert make_shards.main([str(root), str(out), "--class-template", "a photo of {}.", "--workers", "1"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["layout"] == "classes" and stats["classes"] == ["cats", "dogs", "hot_dogs"]
    assert stats["skipped_reasons"] == {"no_class_folder": 1}
    metas = {m["source_path"]: m for m in (json.loads(s["json"]) for s in read_shards(out).values())}
    assert metas["hot_dogs/1.jpg"]["caption"] == "a photo of hot dogs."
    assert (metas["hot_dogs/1.jpg"]["label"], metas["hot_dogs/1.jpg"]["label_index"]) == ("hot_dogs", 2)
    assert metas["cats/0.jpg"]["label_index"] == 0


def test_max_image_size_resizes_keeping_aspect_and_format_and_never_upscales(tmp_path):
    root = tmp_path / "in"
    write(root / "wide.jpg", image_bytes((80, 40)))
    write(root / "tall.png", image_bytes((30, 90), fmt="PNG"))
    small = write(root / "small.webp", image_bytes((20, 10), fmt="WEBP"))
    for stem in ("wide", "tall", "small"):
        write(root / f"{stem}.txt", stem)
    out = tmp_path / "out"
    assert make_shards.main([str(root), str(out), "--max-image-size", "32", "--workers", "1"]) == 0
    samples = {json.loads(s["json"])["source_path"]: s for s in read_shards(out).values()}
    wide, tall = samples["wide.jpg"], samples["tall.png"]
    assert Image.open(io.BytesIO(wide["jpg"])).format == "JPEG"
    assert Image.open(io.BytesIO(wide["jpg"])).size == (32, 16)
    assert Image.open(io.BytesIO(tall["png"])).size == (11, 32)  # 30/90*32 = 10.7
    assert json.loads(wide["json"])["original_width"] == 80
    assert samples["small.webp"]["webp"] == small.read_bytes()  # not upscaled: original bytes


def test_resume_after_kill_finishes_without_duplicates_or_losses(tmp_path):
    root = tmp_path / "in"
    noise = Image.effect_noise((128, 128), 80).convert("RGB")
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=90)
    relpaths = [f"d{i % 7}/img_{i:04d}.jpg" for i in range(600)]
    for rel in relpaths:
        write(root / rel, buf.getvalue())
        write(root / rel.replace(".jpg", ".txt"), f"noise number {rel}")
    out = tmp_path / "out"
    cmd = [str(root), str(out), "--shard-size", "20", "--max-image-size", "64", "--workers", "1"]

    proc = subprocess.Popen(
        [sys.executable, "-m", "data_tools.make_shards", *cmd], cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not (out / "00002.tar").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the converter and any pool workers
    proc.wait()
    assert not (out / "stats.json").exists(), "the run finished before it could be interrupted"
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(kept) >= 3

    assert make_shards.main([*cmd, "--resume"]) == 0
    for name, mtime in kept.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"complete shard {name} was rewritten"
    assert not list(out.glob("*.tmp"))
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["seen"], stats["written"], stats["skipped"]) == (600, 600, 0)
    assert len(stats["shards"]) == 30
    keys = set(read_shards(out))  # read_shards asserts no duplicates
    assert keys == {make_key(rel) for rel in relpaths}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"), ("empty", "is empty"), ("unwritable", "not writable"), ("nocaptions", "no captions"),
        ("resume+overwrite", "--overwrite: not allowed with argument --resume"), ("part", "'3/3' is not I/N"),
    ],
)  # fmt: skip
def test_unusable_arguments_exit_2_with_one_line(tmp_path, case, expected):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    if case == "missing":
        inp = tmp_path / "nope"
    if case in ("unwritable", "nocaptions"):
        write(inp / "x.jpg", image_bytes())
        write(inp / "x.txt", "caption")
    if case == "unwritable":
        out = write(tmp_path / "a_file", "not a folder") / "out"
    if case == "nocaptions":
        (inp / "x.txt").unlink()
    extra = {"resume+overwrite": ["--resume", "--overwrite"], "part": ["--part", "3/3"]}.get(case, [])
    result = run_cli(str(inp), str(out), *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not out.exists(), "a refused run left OUTPUT_DIR behind"


def test_inspect_reports_counts_and_finds_corrupt_samples(messy_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert make_shards.main([str(messy_folder), str(out), "--max-pixels", "5000", "--workers", "1"]) == 0
    capsys.readouterr()
    assert inspect_tool.main([str(out)]) == 0
    report = capsys.readouterr().out
    assert "samples       4" in report and "OK" in report
    with tarfile.open(out / "00000.tar", "w") as tar:  # replace the shard by one with a broken image
        for name, data in (("k.jpg", b"\xff\xd8 not really"), ("k.txt", b"caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert inspect_tool.main([str(out)]) == 1
    report = capsys.readouterr().out
    assert "k: jpg does not decode" in report
    assert "00000.tar: has 1 samples, its stats say 4" in report


def test_shards_read_back_with_plain_webdataset(tiny_shards):
    import webdataset as wds

    stats = json.loads((tiny_shards / "stats.json").read_text())
    urls = [str(tiny_shards / s["name"]) for s in stats["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    assert len(samples) == stats["written"] == 192
    image, caption, meta = samples[0]
    assert image.size == (32, 32) and caption == meta["caption"] and isinstance(meta["label_index"], int)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime, and the folder's own mtime: what "left exactly as it was" means."""
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    return {**files, ".": (b"", folder.stat().st_mtime_ns)}


def tar_of(samples: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def small_folder(tmp_path) -> Path:
    root = tmp_path / "in"
    for i in range(6):
        write(root / f"{i}.jpg", image_bytes((20 + i, 20), (40 * i, 0, 0)))
        write(root / f"{i}.txt", f"picture {i}")
    return root


def test_a_folder_that_holds_other_files_is_refused_and_left_exactly_as_it_was(small_folder, tmp_path, capsys):
    """An img2dataset output folder given as OUTPUT_DIR by mistake: no flag makes make_shards touch it."""
    out = tmp_path / "img2dataset_out"
    for i in range(2):
        write(out / f"{i:05d}.tar", tar_of({f"{i:05d}0001.jpg": image_bytes(), f"{i:05d}0001.txt": b"a caption"}))
        write(out / f"{i:05d}_stats.json", json.dumps({"count": 1, "successes": 1, "failed_to_download": 0}))
        write(out / f"{i:05d}.parquet", b"PAR1 not really parquet PAR1")
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))  # a distinct folder mtime, so that a change would show
    before = snapshot(out)
    for flags in ([], ["--resume"], ["--overwrite"], ["--part", "0/2"]):
        assert make_shards.main([str(small_folder), str(out), "--workers", "1", *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        expected = "pass --resume to finish what is missing, or --overwrite" if not flags else "did not write (00000.parquet"
        assert expected in err[0], (flags, err)
        assert snapshot(out) == before, flags
    for name in ("00000.parquet", "00001.parquet"):  # without the parquet files the tars are still not ours
        (out / name).unlink()
    before = snapshot(out)
    assert make_shards.main([str(small_folder), str(out), "--workers", "1", "--overwrite"]) == 2
    assert "did not write (00000.tar, 00000_stats.json, 00001.tar" in capsys.readouterr().err
    assert snapshot(out) == before


def test_overwrite_replaces_our_own_earlier_output_completely(small_folder, tmp_path):
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert make_shards.main([str(small_folder), str(fresh), "--workers", "1", "--shard-size", "4"]) == 0
    assert make_shards.main([str(small_folder), str(out), "--workers", "1", "--shard-size", "1"]) == 0
    assert len(list(out.glob("*.tar"))) == 6
    assert make_shards.main([str(small_folder), str(out), "--workers", "1", "--shard-size", "4"]) == 2
    # --resume with other settings is refused too: it would mix two conversions
    assert make_shards.main([str(small_folder), str(out), "--workers", "1", "--shard-size", "4", "--resume"]) == 2
    assert len(list(out.glob("*.tar"))) == 6
    assert make_shards.main([str(small_folder), str(out), "--workers", "1", "--shard-size", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    for p in fresh.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_inspect_names_the_shards_to_re_create_and_resume_re_creates_them(small_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert make_shards.main([str(small_folder), str(out), "--workers", "1", "--shard-size", "2"]) == 0
    good = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    for name in ("00000.tar", "00002.tar"):  # cut short, as by a full disk or an interrupted copy
        (out / name).write_bytes(good[name][: len(good[name]) // 3])
    capsys.readouterr()
    assert inspect_tool.main([str(out)]) == 1
    report = capsys.readouterr().out.strip().splitlines()
    assert report[-1] == "fix or re-create: 00000.tar, 00002.tar"
    assert make_shards.main([str(small_folder), str(out), "--workers", "1", "--shard-size", "2", "--resume"]) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == good
    capsys.readouterr()
    assert inspect_tool.main([str(out)]) == 0
    assert "fix or re-create" not in capsys.readouterr().out


# ---------------------------------------------------------------- image-only shards, symlinks, nothing written, mixing


def test_layout_images_writes_image_only_shards_that_webdataset_and_inspect_read(tmp_path, capsys):
    import webdataset as wds

    root = tmp_path / "in"
    for i in range(5):
        write(root / f"trip/day{i % 2}/{i}.jpg", image_bytes((16 + i, 12), (50 * i, 90, 0)))
    write(root / "trip/day0/0.txt", "a caption the image-only layout ignores")
    write(root / "top.png", image_bytes((10, 10), fmt="PNG"))
    write(root / "top.json", json.dumps({"camera": "pinhole"}))  # a sidecar JSON is kept, as in the sidecar layout
    out = tmp_path / "out"
    assert make_shards.main([str(root), str(out), "--layout", "images", "--workers", "1", "--shard-size", "4"]) == 0
    assert "wrote 6 image-only (for --mode simclr) samples" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["layout"], stats["written"], stats["skipped"]) == ("images", 6, 0)
    samples = read_shards(out)
    assert all(set(s) in ({"jpg", "json"}, {"png", "json"}) for s in samples.values()), samples
    metas = {json.loads(s["json"])["source_path"]: json.loads(s["json"]) for s in samples.values()}
    assert set(metas) == {"top.png", *(f"trip/day{i % 2}/{i}.jpg" for i in range(5))}
    assert "caption" not in metas["trip/day0/0.jpg"] and metas["top.png"]["camera"] == "pinhole"

    urls = [str(out / s["name"]) for s in stats["shards"]]
    read = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "json"))
    assert len(read) == 6 and all(meta["width"] == image.size[0] for image, meta in read)
    assert inspect_tool.main([str(out)]) == 0
    report = capsys.readouterr().out
    assert "image-only" in report and "OK" in report and "problems" not in report


def test_images_without_captions_are_refused_by_auto_naming_layout_images(tmp_path, capsys):
    root = tmp_path / "in"
    for i in range(3):
        write(root / f"{i}.jpg", image_bytes())
    assert make_shards.main([str(root), str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no captions" in err[0] and "--layout images" in err[0], err
    write(root / "captions.csv", "filepath,caption\n0.jpg,zero\n")
    assert make_shards.main([str(root), str(tmp_path / "out"), "--layout", "images", "--captions", str(root / "captions.csv")]) == 2
    assert "--layout images writes image-only shards and reads no --captions" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_symlinks_outside_input_are_counted_unless_follow_symlinks_reads_them(tmp_path, capsys):
    elsewhere = tmp_path / "disk2" / "cats"  # e.g. a class folder linked in from another disk
    for i in range(3):
        write(elsewhere / f"{i}.jpg", image_bytes((12, 12), (0, 80 * i, 0)))
    os.symlink(elsewhere, elsewhere / "loop")  # a symlink loop must not hang the walk
    root = tmp_path / "in"
    write(root / "dogs/0.jpg", image_bytes((12, 12), (200, 0, 0)))
    write(root / "dogs/1.jpg", image_bytes((12, 12), (0, 0, 200)))
    os.symlink(elsewhere, root / "cats")
    os.symlink(root / "dogs", root / "dogs_again")  # points inside INPUT: not entered (no duplicates)

    out = tmp_path / "out"
    assert make_shards.main([str(root), str(out), "--workers", "1"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["written"], stats["skipped_reasons"]) == (2, {"symlink_outside_input": 3})

    followed = tmp_path / "followed"
    assert make_shards.main([str(root), str(followed), "--workers", "1", "--follow-symlinks"]) == 0
    metas = [json.loads(s["json"]) for s in read_shards(followed).values()]
    assert sorted(m["source_path"] for m in metas) == ["cats/0.jpg", "cats/1.jpg", "cats/2.jpg", "dogs/0.jpg", "dogs/1.jpg"]
    assert read_shards(followed)[make_key("cats/2.jpg")]["jpg"] == (elsewhere / "2.jpg").read_bytes()
    assert json.loads((followed / "stats.json").read_text())["classes"] == ["cats", "dogs"]

    capsys.readouterr()
    only_links = tmp_path / "only_links"
    only_links.mkdir()
    os.symlink(elsewhere, only_links / "cats")
    assert make_shards.main([str(only_links), str(tmp_path / "none"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 of 3 inputs were skipped as symlink_outside_input" in err[0], err
    assert "--follow-symlinks" in err[0] and not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "case, needle",
    [("corrupt", "2 of 3 inputs were skipped as corrupt_image (also zero_byte 1); the images are truncated"),
     ("loose", "3 of 3 inputs were skipped as no_class_folder; the images are not in class subfolders")],
)  # fmt: skip
def test_a_run_that_writes_nothing_exits_2_naming_the_main_skip_reason(tmp_path, case, needle):
    root = tmp_path / "in"
    if case == "corrupt":
        for i, data in enumerate([image_bytes()[:200], image_bytes()[:100], b""]):
            write(root / f"{i}.jpg", data)
            write(root / f"{i}.txt", f"caption {i}")
        extra = []
    else:
        for i in range(3):
            write(root / f"{i}.jpg", image_bytes())
        extra = ["--layout", "classes"]
    out = tmp_path / "out"
    result = run_cli(str(root), str(out), "--workers", "1", *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not out.exists(), "nothing written, but OUTPUT_DIR was left behind"


def test_class_sorted_input_gives_shards_that_each_hold_every_class(tmp_path, capsys):
    from collections import Counter

    classes = {"ants": (200, 0, 0), "bees": (0, 200, 0), "wasps": (0, 0, 200)}
    root = tmp_path / "in"
    for name, colour in classes.items():
        for i in range(40):
            write(root / name / f"{i:02d}.jpg", image_bytes((8, 8), colour))
    out = tmp_path / "out"
    assert make_shards.main([str(root), str(out), "--shard-size", "30", "--workers", "1"]) == 0
    per_shard = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            labels = [json.loads(tar.extractfile(m).read())["label"] for m in tar.getmembers() if m.name.endswith(".json")]
        per_shard[tar_path.name] = Counter(labels)
    assert len(per_shard) == 4 and all(sum(c.values()) == 30 for c in per_shard.values())
    for name, counts in per_shard.items():  # 10 of each class expected; every shard holds every class
        assert set(counts) == set(classes) and min(counts.values()) >= 5, (name, counts)
    assert json.loads((out / "stats.json").read_text())["settings"]["seed"] == 0

    reseeded = tmp_path / "seed1"
    assert make_shards.main([str(root), str(reseeded), "--shard-size", "30", "--workers", "1", "--seed", "1"]) == 0
    assert read_shards(reseeded) == read_shards(out)  # the same samples, spread another way
    assert (reseeded / "00000.tar").read_bytes() != (out / "00000.tar").read_bytes()
    capsys.readouterr()
    assert make_shards.main([str(root), str(out), "--shard-size", "30", "--workers", "1", "--seed", "1", "--resume"]) == 2
    assert "seed 0 there, 1 here" in capsys.readouterr().err


def test_the_seeded_order_is_a_permutation_that_does_not_depend_on_the_memory_used(tmp_path):
    from data_tools.shuffle import shard_order

    lines = [f'{{"key": "k{i}"}}\n'.encode() for i in range(100)]
    in_memory = list(shard_order(iter(lines), 100, 7, lambda name: str(tmp_path / name)))
    bucketed = list(shard_order(iter(lines), 100, 7, lambda name: str(tmp_path / name), bucket_rows=9))
    assert bucketed == in_memory and sorted(in_memory) == sorted(lines) and in_memory != lines
    assert list(tmp_path.iterdir()) == []  # the bucket files are gone
    assert list(shard_order(iter(lines), 100, 8, str)) != in_memory


def test_a_listing_too_long_for_memory_gives_the_same_bytes(small_folder, tmp_path, monkeypatch):
    import functools

    from data_tools import manifest, shuffle

    args = ["--shard-size", "2", "--workers", "1"]
    assert make_shards.main([str(small_folder), str(tmp_path / "in_memory"), *args]) == 0
    monkeypatch.setattr(manifest, "shard_order", functools.partial(shuffle.shard_order, bucket_rows=2))  # 3 buckets
    assert make_shards.main([str(small_folder), str(tmp_path / "bucketed"), *args]) == 0
    names = sorted(p.name for p in (tmp_path / "in_memory").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "bucketed").iterdir())  # no temporary left behind
    for name in names:
        assert (tmp_path / "bucketed" / name).read_bytes() == (tmp_path / "in_memory" / name).read_bytes(), name
