"""Evaluation: image discovery and unreadable files, prediction files, retrieval recall on sets with known
answers, linear probe and kNN on a trained tiny CLIP, the confusion-matrix PNG."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mmcontrast import UsageError, cli
from mmcontrast import evaluate as ev
from mmcontrast.loading import load
from mmcontrast.plots import confusion_matrix_png
from mmcontrast.probe import PROBE_CS
from mmcontrast.zeroshot import ZeroShotClassifier


@pytest.fixture(scope="module")
def tiny(trained_tiny_clip):
    return load(trained_tiny_clip.run_dir)


@pytest.fixture
def folder_with_broken_images(trained_tiny_clip, tmp_path):
    """The held-out class folders plus a zero-byte JPEG, a truncated PNG and a text file."""
    root = shutil.copytree(trained_tiny_clip.test_dir, tmp_path / "images")
    (root / "red_square" / "empty.jpg").write_bytes(b"")
    whole = (root / "blue_square" / "000.png").read_bytes()
    (root / "blue_square" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("not an image")
    return root


def test_discover_images_is_recursive_sorted_and_filters_extensions(tmp_path):
    for rel in ["b/x.PNG", "a/deep/y.jpeg", "z.webp", "c.bmp", "d.jpg", "skip.txt", "skip.json", "e.gif", "f.TIF"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in ev.discover_images(tmp_path)]
    # the same image types make_shards converts (data_tools.formats.IMAGE_EXTENSIONS), nothing else
    assert found == ["a/deep/y.jpeg", "b/x.PNG", "c.bmp", "d.jpg", "e.gif", "f.TIF", "z.webp"]
    assert ev.folder_names(tmp_path, ev.discover_images(tmp_path)) == ["a", "b", None, None, None, None, None]
    with pytest.raises(UsageError, match="does not exist"):
        ev.discover_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images"):
        ev.discover_images(tmp_path / "empty")


def test_match_labels_treats_underscores_as_spaces():
    assert ev.match_labels(["golden_retriever", "Cat", None, "dog"], ["golden retriever", "cat"]) == [0, 1, -1, -1]


def test_unreadable_images_are_counted_listed_and_written(tiny, folder_with_broken_images, trained_tiny_clip, tmp_path):
    model, preprocess, tokenizer = tiny
    labels = trained_tiny_clip.classes
    clf = ZeroShotClassifier(model, tokenizer, [ev.prompt_name(c) for c in labels])
    paths = ev.discover_images(folder_with_broken_images)
    targets = ev.match_labels(ev.folder_names(folder_with_broken_images, paths), labels)
    threads = torch.get_num_threads()
    encoded, probs = ev.zero_shot_classify(clf, preprocess, paths, batch_size=16, workers=2)
    assert torch.get_num_threads() == threads  # the CPU thread balancing is undone
    assert len(paths) == 42 and len(encoded.ok) == 40 and probs.shape == (40, 4)
    broken = {paths[i].name: message for i, message in encoded.errors.items()}
    assert set(broken) == {"empty.jpg", "truncated.png"}
    assert all(message for message in broken.values())

    rows = ev.zero_shot_rows(encoded, probs, labels, top_k=3, targets=targets)
    assert [row["path"] for row in rows] == [str(p) for p in paths]
    assert sum(1 for row in rows if row.get("error")) == 2
    csv_rows = list(csv.DictReader(open(cli.write_predictions(rows, str(tmp_path / "p.csv")))))
    assert len(csv_rows) == 42 and {"path", "label", "score", "error", "label_3", "score_3"} <= set(csv_rows[0])
    good = [r for r in csv_rows if not r["error"]]
    assert all(0 <= float(r["score"]) <= 1 for r in good)
    assert np.mean([r["label"] == r["true_label"] for r in good]) >= 0.9
    lines = Path(cli.write_predictions(rows, str(tmp_path / "p.jsonl"))).read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert len(parsed) == 42 and sum("error" in r for r in parsed) == 2
    assert all(len(r["top_k"]) == 3 for r in parsed if "error" not in r)
    with pytest.raises(UsageError, match=".csv or .jsonl"):
        cli.write_predictions(rows, str(tmp_path / "p.txt"))


def test_cpu_threads_make_room_for_decoders_only_while_decoding_is_the_bottleneck(monkeypatch):
    from mmcontrast import threads as cpu

    monkeypatch.setattr(cpu, "available_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(cpu.THREADS_ENV, raising=False)
    threads = torch.get_num_threads()
    try:
        balance = cpu.DecodeBalance(torch.device("cpu"), workers=2)
        balance.many, balance.few = 8, 6
        balance.update(decode_seconds=1.0, compute_seconds=0.1)  # 0.5 s per worker > 0.1 s: decode-bound
        assert torch.get_num_threads() == 6
        balance.update(decode_seconds=1.0, compute_seconds=5.0)  # the model is now the bottleneck
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(threads)


def test_classification_metrics_and_confusion_png(tmp_path):
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.0, 0.0, 1.0]])
    metrics = ev.classification_metrics(scores, [0, 1, 1, -1], ["a", "b", "c"])
    assert metrics["top1"] == pytest.approx(2 / 3) and metrics["top5"] == 1.0 and metrics["n_labelled"] == 3
    assert metrics["per_class"] == {"a": 1.0, "b": 0.5} and metrics["mean_per_class_recall"] == 0.75
    png = confusion_matrix_png([0, 1, 1], [0, 1, 0], ["a", "b", "c"], tmp_path / "sub" / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- retrieval


def test_retrieval_recall_perfect_and_half_swapped():
    n = 20
    images = torch.eye(n)  # (20, 20) image i = e_i
    owner = torch.arange(n).repeat_interleave(2)  # two captions per image
    perfect = ev.retrieval_recall(images, torch.eye(n)[owner], owner)
    assert perfect == {"image_to_text": {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0},
                       "text_to_image": {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}}
    # Images 10..19 are swapped in pairs: their captions sit closest to the partner image, then their own.
    partner = torch.arange(n)
    partner[10:] = torch.arange(10, n).view(5, 2).flip(1).reshape(-1)
    texts = nn.functional.normalize(torch.eye(n)[partner[owner]] + 0.5 * torch.eye(n)[owner], dim=1)
    retrieval = ev.retrieval_recall(images, texts, owner)
    assert retrieval["image_to_text"] == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0}
    assert retrieval["text_to_image"] == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0}


class _IndexModel(nn.Module):
    """A 'CLIP' whose answer is known: image i (red value of pixel 0,0) and caption 'image i …' both map to e_i."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x.long().view(-1), self.n).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(tokens.view(-1), self.n).float()


def _red_of_first_pixel(image: Image.Image) -> torch.Tensor:
    return torch.tensor([image.getpixel((0, 0))[0]])


def _index_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([int(t.split()[1]) for t in texts])


def _write_shards(folder, samples_per_shard: list[list[dict]]):
    import webdataset as wds

    folder.mkdir()
    for s, samples in enumerate(samples_per_shard):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for sample in samples:
                sink.write(sample)
    return folder


def _png(red: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (red, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_evaluate_retrieval_reads_shards_with_several_captions(tmp_path):
    n = 12
    samples = []
    for i in range(n):
        sample = {"__key__": f"{i:04d}", "png": _png(i)}
        if i % 2:
            sample["txt"] = f"image {i} first\nimage {i} second\n"  # several captions as lines
        else:
            sample["json"] = json.dumps({"captions": [f"image {i} a", f"image {i} b", f"image {i} c"]})
        samples.append(sample)
    samples.append({"__key__": "nocap", "png": _png(1)})  # skipped: no caption
    samples.append({"__key__": "broken", "png": b"\x89PNG broken", "txt": "image 3"})  # skipped: undecodable
    shards = _write_shards(tmp_path / "shards", [samples[:7], samples[7:]])
    result = ev.evaluate_retrieval(_IndexModel(n), _red_of_first_pixel, _index_tokenizer, str(shards), batch_size=4, workers=2)
    assert result["n_images"] == n and result["n_captions"] == 6 * 2 + 6 * 3
    assert result["n_skipped"] == 2
    assert result["image_to_text"]["R@1"] == 1.0 and result["text_to_image"]["R@1"] == 1.0


def test_retrieval_shards_without_captions_name_the_fields_found(tmp_path):
    shards = _write_shards(tmp_path / "shards", [[{"__key__": "a", "png": _png(0), "cls": b"3"}]])
    with pytest.raises(UsageError, match="fields found: cls, png"):
        ev.evaluate_retrieval(_IndexModel(4), _red_of_first_pixel, _index_tokenizer, str(shards), workers=0)
    with pytest.raises(UsageError, match="not exist"):
        ev.evaluate_retrieval(_IndexModel(4), _red_of_first_pixel, _index_tokenizer, str(tmp_path / "no" / "{0..3}.tar"))


# ---------------------------------------------------------------- linear probe and kNN


def test_linear_probe_and_knn_on_learned_features(tiny, trained_tiny_clip):
    model, preprocess, _ = tiny
    train, test, classes = ev.encode_class_folders(model, preprocess, trained_tiny_clip.train_dir,
                                                   trained_tiny_clip.test_dir, workers=0)
    assert classes == sorted(trained_tiny_clip.classes) and len(train.labels) == 80 and len(test.labels) == 40
    probe = ev.linear_probe(train.features.numpy(), train.labels.numpy(), test.features.numpy(), test.labels.numpy(), classes)
    assert probe["top1"] >= 0.9 and probe["C"] in PROBE_CS
    votes = ev.knn_scores(train.features, train.labels, test.features, len(classes))
    assert ev.classification_metrics(votes, test.labels.tolist(), classes)["top1"] >= 0.9


def test_knn_votes_are_temperature_weighted_cosines():
    train = nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    votes = ev.knn_scores(train, labels, query, num_classes=2, k=2, temperature=0.5)
    expected = torch.tensor([[np.exp(1.0 / 0.5), np.exp(0.8 / 0.5)]], dtype=torch.float32)  # 3rd is not a neighbour
    torch.testing.assert_close(votes, expected)


def test_class_folders_need_subfolders_and_matching_classes(tiny, trained_tiny_clip, tmp_path):
    model, preprocess, _ = tiny
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(UsageError, match="one subfolder per class"):
        ev.class_folders(tmp_path)
    other = tmp_path / "other" / "purple_square"
    other.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(other / "a.png")
    with pytest.raises(UsageError, match="purple_square"):
        ev.encode_class_folders(model, preprocess, trained_tiny_clip.train_dir, tmp_path / "other", workers=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_without_a_gpu_is_a_usage_error():
    with pytest.raises(UsageError, match="--device cpu"):
        ev.resolve_device("cuda")
    assert ev.resolve_device(None).type == "cpu"


# ---------------------------------------------------------------- precision


def test_auto_precision_is_bf16_only_where_the_hardware_runs_it_fast(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(ev, "cpu_has_fast_bf16", lambda: False)
    assert ev.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(ev, "cpu_has_fast_bf16", lambda: True)
    assert ev.resolve_precision("auto", cpu) == "bf16"
    assert ev.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(UsageError, match="unknown precision"):
        ev.resolve_precision("int8", cpu)


def test_bf16_zero_shot_agrees_with_fp32(trained_tiny_clip):
    labels = [ev.prompt_name(c) for c in trained_tiny_clip.classes]
    paths = ev.discover_images(trained_tiny_clip.test_dir) + ev.discover_images(trained_tiny_clip.train_dir)
    results = {}
    for precision in ("fp32", "bf16"):
        model, preprocess, tokenizer = load(trained_tiny_clip.run_dir)
        assert ev.encoders_in_precision(model, precision) == precision
        with torch.no_grad():  # the encoder itself runs in the precision asked for
            assert model.encode_image(torch.zeros(1, 3, 32, 32)).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        classifier = ZeroShotClassifier(model, tokenizer, labels)
        assert classifier.class_embeddings.dtype == torch.float32
        encoded, probs = ev.zero_shot_classify(classifier, preprocess, paths, workers=0)
        results[precision] = (encoded.features, probs)
    (f32, p32), (f16, p16) = results["fp32"], results["bf16"]
    assert p16.dtype == torch.float32 and f16.dtype == torch.float32  # low precision inside the encoders only
    agreement = (p32.argmax(dim=1) == p16.argmax(dim=1)).float().mean()
    assert agreement >= 0.99, agreement
    assert torch.nn.functional.cosine_similarity(f32, f16).min() > 0.99
