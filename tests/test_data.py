"""mmcontrast.data: shard specs, field checks, counts, and the loader's splitting, order, resume and robustness."""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmcontrast.data import LoaderPosition, make_loader
from mmcontrast.errors import UsageError
from mmcontrast.shards import check_fields, count_samples, expand_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A deterministic stand-in for a model's preprocess: (3, 16, 16) float."""
    return torch.from_numpy(__import__("numpy").asarray(img.resize((16, 16)), dtype="float32")).permute(2, 0, 1) / 255


def random_view(img: Image.Image) -> torch.Tensor:
    """A random crop drawing on both torch's and python's RNG, like real augmentations do."""
    i, j = int(torch.randint(0, 16, ()).item()), random.randint(0, 16)
    return to_tensor(img.crop((j, i, j + 16, i + 16)))


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t), sum(map(ord, t)) % 997] for t in texts], dtype=torch.long)


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def loader(shards, **kw):
    kw = {"image_transform": to_tensor, "tokenizer": tokenize, "batch_size": 16, "workers": 0, "seed": 0, **kw}
    return make_loader(shards, **kw)


def jpeg(colour=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """A shard written with tarfile directly (as img2dataset or another tool would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for field, data in sample.items():
                if field != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def shards(tiny_shards) -> list[str]:
    return expand_shards(str(tiny_shards))


def all_keys(shards: list[str]) -> list[str]:
    return keys(loader(shards, shuffle=False, drop_last=False, batch_size=1000))


# ---------------------------------------------------------------- shard specs, fields, counts


def test_expand_shards_accepts_patterns_folders_globs_and_list_files(tiny_shards, tmp_path):
    expected = [str(tiny_shards / f"{i:05d}.tar") for i in range(4)]
    assert expand_shards(str(tiny_shards)) == expected
    assert expand_shards(str(tiny_shards / "{00000..00003}.tar")) == expected
    assert expand_shards(str(tiny_shards / "*.tar")) == expected
    assert expand_shards([expected[0], str(tiny_shards / "{00001..00003}.tar")]) == expected
    listing = tmp_path / "train.txt"
    listing.write_text("# shards\n" + "\n".join(os.path.relpath(p, tmp_path) for p in expected) + "\n")
    assert [os.path.normpath(p) for p in expand_shards(str(listing))] == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("DIR/{00000..00003.tar", "unbalanced braces"),
        ("DIR/{00000..00009}.tar", "6 of 10 shards"),
        ("DIR/*.tgz", "no shards match"),
        ("DIR/nothing_here", "do not exist"),
        ("", "empty"),
    ],
)
def test_expand_shards_says_what_is_wrong(tiny_shards, spec, message):
    with pytest.raises(UsageError, match=message):
        expand_shards(spec.replace("DIR", str(tiny_shards)))


def test_check_fields_names_the_fields_it_found(shards, tmp_path):
    check_fields(shards, need_text=True)
    image_only = write_tar(tmp_path / "img/00000.tar", [{"__key__": f"k{i}", "jpg": jpeg(), "json": b"{}"} for i in range(3)])
    check_fields([str(image_only)], need_text=False)
    with pytest.raises(UsageError, match=r"caption \(txt\); fields found: jpg \(3x\), json \(3x\)"):
        check_fields([str(image_only)], need_text=True)
    not_a_tar = tmp_path / "bad.tar"
    not_a_tar.write_bytes(b"x" * 700)
    with pytest.raises(UsageError, match="cannot be read as a tar"):
        check_fields([str(not_a_tar)], need_text=False)


def test_count_samples_uses_stats_then_img2dataset_stats_then_tar_headers(shards, tmp_path, monkeypatch):
    import mmcontrast.shards as data

    copies = []
    for src in shards[:2]:
        copies.append(str(tmp_path / os.path.basename(src)))
        Path(copies[-1]).write_bytes(Path(src).read_bytes())
    assert count_samples(copies) == 96  # no stats beside the copies: counted from the tar headers
    monkeypatch.setattr(data, "_scan_count", lambda shard: pytest.fail("should have used the stats"))
    assert count_samples(shards) == 192  # make_shards' stats.json
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 48, "count": 50}))
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 48, "count": 48}))
    assert count_samples(copies) == 96  # img2dataset's per-shard stats


# ---------------------------------------------------------------- batches


def test_clip_batches_with_open_clip_preprocess_and_tokenizer(shards):
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    preprocess = open_clip.image_transform(24, is_train=True)
    batch = next(iter(make_loader(shards, image_transform=preprocess, tokenizer=tokenizer, batch_size=8, workers=0, seed=0)))
    assert batch["image"].shape == (8, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (8, 77) and batch["text"].dtype == torch.long
    assert len(batch["__key__"]) == 8 and batch["skipped"] == 0


def test_two_ranks_by_two_workers_read_every_sample_exactly_once(shards):
    expected = sorted(all_keys(shards))
    assert len(expected) == 192
    for subset in (shards, shards[:1]):  # split by sample, across 4 shards or inside 1
        batch_size = 8 if len(subset) == 4 else 4
        seen = [k for rank in (0, 1) for k in keys(loader(subset, rank=rank, world_size=2, workers=2, batch_size=batch_size))]
        assert len(seen) == len(set(seen)), "a sample was read twice"
        assert sorted(seen) == sorted(all_keys(subset)), "a sample was dropped"


def test_sample_order_does_not_depend_on_batch_size(shards):
    small = list(loader(shards, batch_size=32, workers=1))
    large = list(loader(shards, batch_size=128, workers=1))
    assert keys(small[:4]) == keys(large[:1])
    assert torch.equal(torch.cat([b["image"] for b in small[:4]]), large[0]["image"])


def test_order_is_a_function_of_seed_and_epoch(shards):
    first = keys(loader(shards))
    assert first == keys(loader(shards))
    assert first != keys(loader(shards, epoch=1)) and sorted(first) == sorted(keys(loader(shards, epoch=1)))
    assert first != keys(loader(shards, seed=1))


def consumed(batches: list[dict], workers: int) -> LoaderPosition:
    """The position of a loader whose first ``batches`` the trainer consumed."""
    position = LoaderPosition()
    for batch in batches:
        position.advance(batch, workers)
    return position


def test_a_resumed_loader_continues_exactly_where_the_run_stopped(shards):
    kw = {"workers": 2, "image_transform": random_view, "seed": 3, "shuffle_buffer": 20}
    for subset, target in ((shards[:3], None), (shards[:3], 7), (shards[:2], None)):  # until the data ends, or 7 batches
        full = list(loader(subset, batches=target, **kw))
        assert len(full) == (target or 2 * (len(subset) * 48 // 2 // 16))  # each worker drops its partial batch
        for skip in (1, 3, len(full) - 2):
            resumed = list(loader(subset, batches=target, position=consumed(full[:skip], 2), **kw))
            assert keys(resumed) == keys(full[skip:])
            assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[skip:])), "augmentations differ"


def test_resuming_reads_one_window_not_the_epoch_so_far(shards, monkeypatch):
    import mmcontrast.data as data

    read = []
    original = data.stream_samples

    def counting(url, stream, *args):
        for sample in original(url, stream, *args):
            read.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(data, "stream_samples", counting)
    kw = {"workers": 0, "seed": 0, "shuffle_buffer": 16, "batch_size": 8}
    full = list(loader(shards, **kw))
    assert len(read) == 192
    read.clear()
    resumed = iter(loader(shards, position=consumed(full[:20], 1), **kw))  # 160 samples in: the fourth shard
    assert keys([next(resumed)]) == keys(full[20:21])
    assert len(read) <= 16, len(read)  # the window being handed out, reached by seeking in the shard


def test_every_rank_takes_the_same_batches_whatever_the_split(tmp_path):
    """5 shards of uneven size (250 samples) over 3 ranks x 2 workers, 10 batches of 8 each: 240 distinct samples."""
    shards = []
    for i, n in enumerate((50, 70, 30, 90, 10)):
        samples = [{"__key__": f"s{i}_{j:03d}", "jpg": jpeg(), "txt": b"a red square"} for j in range(n)]
        shards.append(str(write_tar(tmp_path / f"{i:05d}.tar", samples)))
    per_rank = [keys(loader(shards, rank=r, world_size=3, workers=2, batch_size=8, batches=10)) for r in range(3)]
    assert [len(k) for k in per_rank] == [80, 80, 80]
    seen = [k for ks in per_rank for k in ks]
    assert len(set(seen)) == 240, "a sample was read twice in one epoch"


def test_simclr_views_are_independent_augmentations_and_leave_global_rng_alone(shards):
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    batch = next(iter(make_loader(shards, image_transform=random_view, views=2, batch_size=8, workers=0, seed=0)))
    after = (torch.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and after[1] == expected[1], "the loader moved the trainer's RNG"
    assert set(batch) == {"view1", "view2", "__key__", "skipped", "__sources__", "__worker__", "__position__"}
    assert batch["view1"].shape == batch["view2"].shape == (8, 3, 16, 16)
    assert not torch.equal(batch["view1"], batch["view2"])


def test_labels_come_from_label_index_or_sorted_class_names(shards, tmp_path):
    batch = next(iter(loader(shards, with_labels=True, batch_size=32)))
    stats = json.loads((Path(shards[0]).parent / "stats.json").read_text())
    assert batch["label"].dtype == torch.long
    names = [stats["classes"][i] for i in batch["label"]]
    assert all(k.startswith(n) for k, n in zip(batch["__key__"], names))  # keys start with the class folder

    samples = [{"__key__": f"s{i}", "jpg": jpeg(), "json": json.dumps({"label": name}).encode()}
               for i, name in enumerate(["zebra", "ant", "moth", "ant"])]
    shard = write_tar(tmp_path / "labels/00000.tar", samples)
    batch = next(iter(loader([str(shard)], with_labels=True, tokenizer=None, batch_size=4, shuffle=False)))
    assert batch["label"].tolist() == [2, 0, 1, 0]  # ant=0, moth=1, zebra=2
    with pytest.raises(UsageError, match="no json 'label'"):
        loader([str(write_tar(tmp_path / "nolabel/0.tar", [{"__key__": "a", "jpg": jpeg()}]))], with_labels=True)


def test_corrupt_samples_are_skipped_counted_and_logged_once(tmp_path, caplog):
    good = [{"__key__": f"good{i}", "jpg": jpeg(), "txt": b"a red square"} for i in range(10)]
    bad = [
        {"__key__": "truncated", "jpg": jpeg()[:200], "txt": b"cut"},
        {"__key__": "garbage", "png": b"\x89PNG not at all", "txt": b"garbage"},
        {"__key__": "garbage2", "png": b"\x89PNG not at all", "txt": b"garbage"},
        {"__key__": "latin1", "jpg": jpeg(), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "nocaption", "jpg": jpeg()},
    ]
    shard = write_tar(tmp_path / "00000.tar", good[:5] + bad + good[5:])
    with caplog.at_level(logging.WARNING, logger="mmcontrast.data"):
        batches = list(loader([str(shard)], batch_size=5, shuffle=False))
    assert [len(b["__key__"]) for b in batches] == [5, 5]
    assert keys(batches) == [f"good{i}" for i in range(10)]
    assert sum(b["skipped"] for b in batches) == 5
    kinds = [r.getMessage().split(" (first")[0] for r in caplog.records]
    assert len(kinds) == len(set(kinds)) >= 3, kinds  # once per kind


def test_reads_img2dataset_layout(tmp_path):
    folder = tmp_path / "img2dataset"
    for s in range(2):
        samples = [
            {"__key__": f"{s:05d}{i:04d}", "jpg": jpeg((i * 20, 0, 0)), "txt": f"caption {i}".encode(),
             "json": json.dumps({"url": f"http://x/{i}.jpg", "caption": f"caption {i}", "status": "success"}).encode()}
            for i in range(6)
        ]
        write_tar(folder / f"{s:05d}.tar", samples)
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": 7, "successes": 6, "failed_to_download": 1}))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1 not read")
    shards = expand_shards(str(folder))
    assert [os.path.basename(p) for p in shards] == ["00000.tar", "00001.tar"]
    assert count_samples(shards) == 12
    check_fields(shards, need_text=True)
    assert sorted(keys(loader(shards, batch_size=3))) == sorted(f"{s:05d}{i:04d}" for s in range(2) for i in range(6))


def test_open_clip_trainer_reads_our_shards(tiny_shards, monkeypatch):
    """open_clip's own loader, as its trainer calls it, on make_shards output (sizes.json gives the count).

    open_clip pins webdataset<=0.2.86; with webdataset 1.x its grouping crashes on the end-of-shard marker
    ``{}``, so — as users of open_clip's trainer with webdataset 1.x must — switch the marker off."""
    import open_clip
    from open_clip_train import data as oc_data
    from webdataset.tariterators import tar_file_expander

    monkeypatch.setattr(oc_data, "tar_file_expander", functools.partial(tar_file_expander, eof_value=None))
    args = argparse.Namespace(
        train_data=str(tiny_shards / "{00000..00003}.tar"), val_data=None, train_num_samples=None,
        dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=16, workers=0, world_size=1,
    )
    info = oc_data.get_wds_dataset(args, open_clip.image_transform(24, is_train=True), is_train=True,
                                   tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    batches = list(info.dataloader)
    assert info.dataloader.num_samples == 192 and len(batches) == 12
    images, texts = batches[0]
    assert images.shape == (16, 3, 24, 24) and texts.shape == (16, 77)


def image_size(img: Image.Image) -> torch.Tensor:
    return torch.tensor(img.size)


def test_decode_size_decodes_large_jpegs_at_reduced_scale(tmp_path):
    shard = write_tar(tmp_path / "big/00000.tar", [{"__key__": "big", "jpg": jpeg(size=(512, 384)), "txt": b"big"}])
    full = next(iter(loader([str(shard)], image_transform=image_size, batch_size=1)))
    draft = next(iter(loader([str(shard)], image_transform=image_size, batch_size=1, decode_size=64)))
    assert full["image"].tolist() == [[512, 384]]
    assert draft["image"].tolist() == [[128, 96]]  # 1/4 scale: the smallest keeping both sides >= 64


def test_sources_are_mixed_by_their_upsampling_factors():
    """open_clip's convention: every shard of source i is drawn with weight factor_i (so a source's share is
    proportional to its shards times its factor)."""
    import itertools

    from mmcontrast.data import ReadPlan

    shards = tuple(f"a{i}" for i in range(2)) + tuple(f"b{i}" for i in range(6))
    sources = (0, 0, 1, 1, 1, 1, 1, 1)
    plan = ReadPlan(shards, None, sources, (3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0), seed=0, epoch=0, rank=0,
                    world_size=1, workers=1, batch_size=8, batches=None, resampled=True)  # fmt: skip
    drawn = [s.source for s in itertools.islice(plan.segments(0), 6000)]
    assert drawn.count(0) / len(drawn) == pytest.approx(6 / 12, abs=0.03)  # 2 shards x 3 against 6 shards x 1
    other_worker = [s.url for s in itertools.islice(plan.segments(1), 50)]
    assert other_worker != [s.url for s in itertools.islice(plan.segments(0), 50)]  # each reader draws its own


def test_a_run_mixing_two_sources_logs_each_ones_samples(tiny_shards, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    spec = f"{tiny_shards}/{{00000..00001}}.tar::{tiny_shards}/{{00002..00003}}.tar"
    cmd = [sys.executable, "-m", "mmcontrast.train", "--config", str(root / "configs" / "clip_tiny_cpu.yaml"), "--train-shards",
           spec, "--output-dir", str(out), "--steps", "4", "--batch-size", "16", "--log-every", "4", "--workers", "0",
           "--set", "data.resampled=true", "--set", "data.upsampling_factors=[1, 3]"]  # fmt: skip
    r = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["data/source0_samples"] + row["data/source1_samples"] == 64


def test_the_stats_beside_a_shard_are_found_through_its_own_scheme():
    from mmcontrast.shards import sibling

    assert sibling("pipe:aws s3 cp s3://b/x/00001.tar -", "stats.json") == "pipe:aws s3 cp s3://b/x/stats.json -"
    assert sibling("pipe:curl -s 'http://h/a/00003.tar' | cat", "stats.json") == "pipe:curl -s 'http://h/a/stats.json' | cat"
    assert sibling("http://h/d/00004.tar?sig=1", "00004_stats.json") == "http://h/d/00004_stats.json?sig=1"
    assert sibling("pipe:produce-shard --id 7", "stats.json") is None  # no .tar named: no guess


def test_a_stalled_command_times_out_instead_of_hanging():
    import time

    from mmcontrast.shards import open_shard

    stream, _ = open_shard("pipe:sleep 30", timeout=0.5)
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="sent nothing"):
        stream.read(1)
    assert time.perf_counter() - start < 5
    failing, _ = open_shard("pipe:exit 3", timeout=5)
    with pytest.raises(OSError, match="status 3"):
        failing.read(1)


def test_a_reader_whose_shards_are_all_unreadable_ends_instead_of_going_round_forever(tmp_path):
    broken = []
    for i in range(3):
        broken.append(tmp_path / f"{i:05d}.tar")
        broken[-1].write_bytes(b"not a tar at all" * 100)
    batches = list(loader([str(p) for p in broken], counts=[10, 10, 10], batches=4, batch_size=5))
    assert batches == []  # the feed then says which process ran out of data


def test_three_ranks_resumed_mid_epoch_still_see_every_sample_once(tmp_path):
    """5 uneven shards (40, 40, 40, 40, 32 = 192) over 3 ranks, 8 batches of 8 each: a run stopped after a
    different number of batches on each rank and resumed from its positions covers the epoch exactly once."""
    shards = []
    for i, n in enumerate((40, 40, 40, 40, 32)):
        samples = [{"__key__": f"s{i}_{j:03d}", "jpg": jpeg(), "txt": b"a red square"} for j in range(n)]
        shards.append(str(write_tar(tmp_path / f"{i:05d}.tar", samples)))
    kw = {"world_size": 3, "workers": 2, "batch_size": 8, "batches": 8, "shuffle_buffer": 6}
    seen = []
    for rank, stop in ((0, 3), (1, 5), (2, 1)):
        before = list(loader(shards, rank=rank, **kw))[:stop]  # what ran before the kill
        after = list(loader(shards, rank=rank, position=consumed(before, 2), **kw))
        assert len(before) + len(after) == 8
        seen += keys(before + after)
    assert len(seen) == 192 and len(set(seen)) == 192
