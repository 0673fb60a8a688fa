"""Search: index (one and two processes, resumed after a kill), search by text and image, dedup, serve, the browser."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mmcontrast import ann, cli, search

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
QUERIES = [f"a {colour} {shape}" for colour in ("red", "green", "blue", "yellow") for shape in ("circle", "square", "triangle")]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def index_args(images, run_dir, out, *extra) -> list[str]:
    # fp32: the queries a test embeds itself are float32, so scores compare to float rounding
    return ["index", "--images", str(images), "--checkpoint", str(run_dir), "--output-dir", str(out), "--workers", "0",
            "--precision", "fp32", "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def clip_index(trained_tiny_clip, tiny_image_folder, tmp_path_factory) -> Path:
    """The 192 shapes of ``tiny_image_folder`` indexed with the tiny CLIP (exact: a Flat index), in 3 parts."""
    out = tmp_path_factory.mktemp("index") / "exact"
    assert cli.main(index_args(tiny_image_folder, trained_tiny_clip.run_dir, out, "--part-size", "64")) == 0
    return out


@pytest.fixture(scope="module")
def text_model(trained_tiny_clip):
    from mmcontrast.loading import load

    return load(str(trained_tiny_clip.run_dir))


def brute_force(index_dir: Path, text_model, text: str) -> np.ndarray:
    """Cosine of ``text`` with every indexed image: ``(N,)``."""
    from mmcontrast.evaluate import encode_texts

    model, _, tokenizer = text_model
    vectors = search.load_embeddings(index_dir)
    return vectors @ encode_texts(model, tokenizer, [text]).numpy()[0]


# ---------------------------------------------------------------- index and search


def test_text_search_is_the_exact_brute_force_ranking(clip_index, text_model, capsys, tmp_path):
    infos = json.loads((clip_index / search.INFOS_FILE).read_text())
    assert infos["index_key"] == "Flat" and infos["exact"] and infos["n_indexed"] == 192 and infos["rows_per_part"] == [64] * 3
    for text in ("a red circle", "a blue triangle"):
        rc, out, _ = run_cli(["search", "--index", str(clip_index), "--text", text, "--k", "10",
                              "--output", str(tmp_path / "r.json")], capsys)  # fmt: skip
        assert rc == 0 and out.splitlines()[0].split()[:3] == ["rank", "score", "path"]
        result = json.loads((tmp_path / "r.json").read_text())
        assert result["query"] == {"text": text} and len(result["results"]) == 10
        scores = brute_force(clip_index, text_model, text)
        expected = np.argsort(-scores, kind="stable")[:10]
        got = [r["id"] for r in result["results"]]
        assert np.allclose([r["score"] for r in result["results"]], scores[expected], atol=1e-5)
        gaps = np.diff(np.sort(scores)[::-1][:11])  # ranks whose scores differ are in the same order as brute force
        assert all(g == e for g, e, gap in zip(got, expected, gaps) if abs(gap) > 1e-5)
        meta = search.Searcher(clip_index).collection
        assert [r["path"] for r in result["results"]] == [row["path"] for row in meta.rows(got)]


@pytest.mark.parametrize("key", ["HNSW8", "IVF16,Flat"])
def test_approximate_index_recalls_the_exact_top_10(key, trained_tiny_clip, tiny_image_folder, clip_index, text_model,
                                                    capsys, tmp_path):
    out = tmp_path / "approx"
    rc, printed, _ = run_cli(index_args(tiny_image_folder, trained_tiny_clip.run_dir, out, "--index-key", key), capsys)
    infos = json.loads(printed)
    assert rc == 0 and infos["index_key"] == key and not infos["exact"] and infos["index_param"]
    assert infos["recall@10"] >= ann.RECALL_TARGET  # measured at build time against exact search
    searcher = search.Searcher(out)
    recalls = []
    for text in QUERIES:
        scores = brute_force(clip_index, text_model, text)
        tenth = np.sort(scores)[::-1][9]
        found = searcher.search_text(text, 10)["results"]
        recalls.append(np.mean([scores[r["id"]] >= tenth - 1e-5 for r in found]) * len(found) / 10)
    assert np.mean(recalls) >= 0.95, recalls
    first = str(tiny_image_folder / "green_triangle" / "005.jpg")
    assert searcher.search_image(first, 3)["results"][0]["path"] == str(Path(first).resolve())


def test_an_indexed_image_finds_itself_first(clip_index, tiny_image_folder, capsys, tmp_path):
    for rel in ("red_circle/000.jpg", "blue_square/007.jpg", "yellow_triangle/015.jpg"):
        rc, _, _ = run_cli(["search", "--index", str(clip_index), "--image", str(tiny_image_folder / rel), "--k", "5",
                            "--output", str(tmp_path / "r.json")], capsys)  # fmt: skip
        top = json.loads((tmp_path / "r.json").read_text())["results"][0]
        assert rc == 0 and top["path"] == str((tiny_image_folder / rel).resolve()) and top["score"] == pytest.approx(1.0, abs=1e-4)


def test_shards_index_keys_captions_and_caption_embeddings_and_the_html_is_self_contained(
        trained_tiny_clip, tiny_shards, capsys, tmp_path):
    out = tmp_path / "shards_index"
    rc, printed, _ = run_cli(["index", "--shards", str(tiny_shards), "--checkpoint", str(trained_tiny_clip.run_dir),
                              "--output-dir", str(out), "--workers", "0", "--quiet"], capsys)  # fmt: skip
    infos = json.loads(printed)
    assert rc == 0 and infos["kind"] == "shards" and infos["parts"] == 4 and infos["n_indexed"] == 192
    assert np.load(out / "text_emb" / "text_emb_00000.npy").shape == (48, 64)
    rc, _, _ = run_cli(["search", "--index", str(out), "--text", "a red circle", "--k", "6", "--output", str(tmp_path / "r.html")],
                       capsys)
    page = (tmp_path / "r.html").read_text()
    assert rc == 0 and page.count('src="data:image/jpeg;base64,') == 6
    assert not re.search(r'(src|href)="(?!data:)', page), "the contact sheet must not reference anything outside itself"
    result = search.Searcher(out).search_text("a red circle", 3)
    assert all(set(r) >= {"id", "key", "shard", "caption", "score"} for r in result["results"])


def test_unreadable_images_are_skipped_and_counted(trained_tiny_clip, tiny_image_folder, capsys, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_image_folder / "red_circle", folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes((folder / "000.jpg").read_bytes()[:100])
    rc, printed, _ = run_cli(index_args(folder, trained_tiny_clip.run_dir, tmp_path / "idx"), capsys)
    infos = json.loads(printed)
    assert rc == 0 and infos["n_items"] == 18 and infos["n_indexed"] == 16 and infos["n_skipped"] == 2
    assert sum(infos["skipped_reasons"].values()) == 2


def test_bad_queries_and_arguments_are_one_line_and_exit_2(clip_index, trained_tiny_clip, tiny_image_folder, capsys, tmp_path):
    bad = [["search", "--index", str(clip_index), "--text", ""],
           ["search", "--index", str(clip_index), "--text", "   "],
           ["search", "--index", str(clip_index), "--image", str(tmp_path / "missing.jpg")],
           ["search", "--index", str(clip_index), "--text", "a red circle", "--k", "0"],
           ["search", "--index", str(clip_index), "--text", "a red circle", "--k", "-3"],
           ["search", "--index", str(tmp_path / "nothing"), "--text", "a red circle"],
           index_args(tiny_image_folder, trained_tiny_clip.run_dir, clip_index),  # holds an index: --resume or --overwrite
           index_args(tiny_image_folder, trained_tiny_clip.run_dir, tmp_path / "x", "--index-key", "Nonsense12"),
           ["dedup", "--images", str(tiny_image_folder), "--output", str(tmp_path / "d.csv")]]  # fmt: skip
    for args in bad:
        rc, _, err = run_cli(args, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)
        assert "Traceback" not in err


def test_embed_texts_writes_the_text_embeddings(trained_tiny_clip, text_model, capsys, tmp_path):
    from mmcontrast.evaluate import encode_texts

    (tmp_path / "texts.txt").write_text("a red circle\n\na blue square\n")
    rc, printed, _ = run_cli(["embed", "--texts", str(tmp_path / "texts.txt"), "--checkpoint", str(trained_tiny_clip.run_dir),
                              "--output", str(tmp_path / "t.npy"), "--precision", "fp32"], capsys)  # fmt: skip
    assert rc == 0 and json.loads(printed)["n_texts"] == 2
    model, _, tokenizer = text_model
    expected = encode_texts(model, tokenizer, ["a red circle", "a blue square"]).numpy()
    assert np.allclose(np.load(tmp_path / "t.npy"), expected, atol=1e-6)
    assert (tmp_path / "t.texts.txt").read_text().splitlines() == ["a red circle", "a blue square"]


def test_the_index_chosen_by_size_follows_autofaiss():
    assert ann.choose_index_key(9_999, 512) == "Flat"
    assert ann.choose_index_key(100_000, 512) == "HNSW32"  # default budget: a quarter of the vectors, at least 256M
    assert ann.choose_index_key(200_000, 512) == "IVF2048,PQ128x8"
    assert ann.choose_index_key(200_000, 512, max_memory=2**30) == "HNSW32"
    assert ann.choose_index_key(5_000_000, 512, max_memory=2**30) == "IVF8192,PQ128x8"
    assert ann.choose_index_key(500_000, 512, max_memory=1_040_000_000) == "IVF2048,Flat"  # no room for HNSW links
    assert ann.choose_index_key(2_000_000, 256) == "IVF4096,PQ64x8"  # 512M by default: PQ, re-ranked exactly
    for n, dim, budget in [(200_000, 512, None), (2_000_000, 256, None), (5_000_000, 512, 2**30), (500_000, 512, 10**9)]:
        key = ann.choose_index_key(n, dim, budget)
        assert ann.index_memory(key, n, dim) <= (budget or ann.default_index_memory(n, dim))
    assert ann.parse_memory("4G") == 4 * 2**30 and ann.parse_memory("512M") == 2**29 and ann.parse_memory("1.5g") == 3 * 2**29


def test_an_index_of_the_same_vectors_written_by_another_tool_answers_the_same(clip_index, capsys, tmp_path):
    """clip_index's vectors and paths, written the way clip-retrieval writes them (pandas parquet, image_path, parts
    numbered without padding, float16), indexed with --embeddings: the same ids, scores and paths for every query."""
    import pandas as pd

    vectors = search.load_embeddings(clip_index)
    paths = [row["path"] for row in search.Searcher(clip_index).collection.rows(range(len(vectors)))]
    folder = tmp_path / "clip_retrieval"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for i, start in enumerate(range(0, len(vectors), 50)):  # other part sizes than the index's 64
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", vectors[start : start + 50])
        pd.DataFrame({"image_path": paths[start : start + 50]}).to_parquet(folder / "metadata" / f"metadata_{i}.parquet")
    rc, _, _ = run_cli(["index", "--embeddings", str(folder), "--output-dir", str(tmp_path / "idx"), "--quiet"], capsys)
    assert rc == 0
    queries = np.random.default_rng(0).standard_normal((12, vectors.shape[1])).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    answers = {}
    for name, index in (("ours", clip_index), ("theirs", tmp_path / "idx")):
        rc, _, _ = run_cli(["search", "--index", str(index), "--vectors", str(tmp_path / "q.npy"), "--k", "8",
                            "--output", str(tmp_path / f"{name}.json")], capsys)  # fmt: skip
        assert rc == 0
        answers[name] = json.loads((tmp_path / f"{name}.json").read_text())["queries"]
    for ours, theirs in zip(answers["ours"], answers["theirs"]):
        assert [(r["id"], r["path"]) for r in ours["results"]] == [(r["id"], r["path"]) for r in theirs["results"]]
        assert np.allclose([r["score"] for r in ours["results"]], [r["score"] for r in theirs["results"]], atol=1e-6)


def test_a_clip_index_measures_recall_on_held_out_images_and_captions(trained_tiny_clip, tiny_shards, capsys, tmp_path):
    rc, printed, _ = run_cli(["index", "--shards", str(tiny_shards), "--checkpoint", str(trained_tiny_clip.run_dir),
                              "--output-dir", str(tmp_path / "idx"), "--workers", "0", "--quiet", "--index-key", "HNSW8"],
                             capsys)  # fmt: skip
    infos = json.loads(printed)
    assert rc == 0 and set(infos["recall"]) == {"image", "text"} and "captions as text queries" in infos["recall_measured_on"]
    assert infos["recall@10"] == infos["recall"]["image"]["recall@10"]


def test_machines_each_embedding_a_part_then_one_merge_equal_one_run(trained_tiny_clip, tiny_image_folder, clip_index,
                                                                     capsys, tmp_path):
    out = tmp_path / "parts"
    for part in ("1/2", "0/2"):
        rc, printed, err = run_cli(index_args(tiny_image_folder, trained_tiny_clip.run_dir, out, "--part-size", "64",
                                              "--part", part), capsys)  # fmt: skip
        assert rc == 0 and printed == "" and "--resume" in err and not (out / search.INFOS_FILE).exists()
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part_00000.json", "part_00001.json", "part_00002.json"]
    rc, printed, _ = run_cli(index_args(tiny_image_folder, trained_tiny_clip.run_dir, out, "--part-size", "64", "--resume"),
                             capsys)
    assert rc == 0 and json.loads(printed)["parts_embedded"] == 0
    _same_index(out, clip_index, atol=1e-5)


# ---------------------------------------------------------------- processes: two equal one; a killed run resumes


def _index_command(images, run_dir, out, *extra) -> list[str]:
    return ["-m", "mmcontrast.cli", *index_args(images, run_dir, out, *extra)]


def _same_index(a: Path, b: Path, atol: float = 0.0, fields=("index_key", "n_items", "n_indexed", "dim", "parts", "rows_per_part")) -> None:
    infos_a, infos_b = (json.loads((d / search.INFOS_FILE).read_text()) for d in (a, b))
    for field in fields:
        assert infos_a[field] == infos_b[field], field
    assert np.allclose(search.load_embeddings(a), search.load_embeddings(b), atol=atol, rtol=0)
    everything = range(infos_a["n_indexed"])
    columns = ("path", "key", "shard", "caption", "bytes", "width", "height")
    assert search.Searcher(a).collection.rows(everything, columns) == search.Searcher(b).collection.rows(everything, columns)


@pytest.mark.slow  # two launched processes: ~20 s
def test_index_on_two_processes_equals_one_process(trained_tiny_clip, tiny_image_folder, clip_index, tmp_path):
    """The same 3 parts of 64 as ``clip_index`` (one process), the first process embedding parts 0 and 2, the second part 1."""
    launch = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # fmt: skip
    r = subprocess.run([*launch, *_index_command(tiny_image_folder, trained_tiny_clip.run_dir, tmp_path / "two", "--part-size", "64")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["processes"] == 2  # one JSON object: the second process printed nothing
    _same_index(clip_index, tmp_path / "two")


def test_a_killed_index_resumes_without_embedding_finished_parts_again(trained_tiny_clip, tiny_image_folder, clip_index, capsys,
                                                                      tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, *_index_command(tiny_image_folder, trained_tiny_clip.run_dir, out, "--part-size", "8",
                                               "--batch-size", "4")]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = out / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("part_*.json"))) < 3:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("part_*.json")}
    embeddings = {p.name: p.stat().st_mtime_ns for p in (out / "img_emb").glob("*.npy")}
    assert 3 <= len(finished) < 24 and not (out / search.INFOS_FILE).exists()
    rc, printed, _ = run_cli([*command[3:], "--resume"], capsys)  # the same command, in this process
    infos = json.loads(printed)
    assert rc == 0
    assert infos["parts_reused"] == len(finished) and infos["parts_embedded"] == 24 - len(finished)
    for name, mtime in finished.items():
        assert (parts / name).stat().st_mtime_ns == mtime  # not written again
        npy = f"img_emb_{name[len('part_'):-len('.json')]}.npy"
        assert (out / "img_emb" / npy).stat().st_mtime_ns == embeddings[npy]
    _same_index(out, clip_index, atol=1e-5, fields=("n_items", "n_indexed"))  # batches of 4, not 64: equal to rounding


# ---------------------------------------------------------------- near-duplicates


def _picture(rng: np.random.Generator, size: int = 64):
    """A distinct picture: a random 6 x 6 grid of colours, smoothly interpolated."""
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def _planted_collection(folder: Path, n: int, seed: int) -> dict[str, str]:
    """``n`` pictures (JPEG q95), every third with one copy — resized, recompressed (q75) or cropped in turn;
    returns ``{path: path of its original}``."""
    from mmcontrast.dedup import COPY_KINDS, plant_copy

    rng = np.random.default_rng(seed)
    folder.mkdir()
    truth = {}
    for i in range(n):
        scene, original = _picture(rng), str(folder / f"{i:03d}.jpg")
        scene.save(original, quality=95)
        truth[original] = original
        if i % 3 == 0:
            kind = COPY_KINDS[(i // 3) % 3]
            copy = plant_copy(scene, kind, rng)
            copy.save(folder / f"{i:03d}_{kind}.jpg", quality=95 if kind != "recompressed" else 75)
            truth[str(folder / f"{i:03d}_{kind}.jpg")] = original
    return truth


def _groups_of(csv_path: Path) -> list[list[str]]:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row["path"])
    return list(groups.values())


def test_dedup_with_its_defaults_finds_planted_copies_whatever_the_checkpoint_learned(trained_tiny_clip, capsys, tmp_path):
    """The tiny CLIP knows coloured shapes, not these pictures: the defaults (both methods, the embedding side only
    where its calibration separates copies) still find resized, recompressed and cropped copies."""
    from mmcontrast.dedup import pair_precision_recall

    truth = _planted_collection(tmp_path / "photos", 150, seed=7)
    rc, printed, err = run_cli(["dedup", "--images", str(tmp_path / "photos"), "--checkpoint", str(trained_tiny_clip.run_dir),
                                "--workers", "0", "--quiet", "--output", str(tmp_path / "d.csv")], capsys)  # fmt: skip
    assert rc == 0 and json.loads(printed)["method"] == "both"
    measured = pair_precision_recall(_groups_of(tmp_path / "d.csv"), truth)
    assert measured["recall"] >= 0.95 and measured["precision"] >= 0.9, (measured, printed, err)


@pytest.fixture(scope="module")
def copy_detector(tmp_path_factory) -> Path:
    """A copy detector in the way of SSCD (Pizzi et al. 2022), trained by the trainer as a user would:
    configs/copy_detector_cpu.yaml (mmc-tiny's image tower, NT-Xent over two copies of each of 256 pictures, not those
    the test plants) on image-only shards; an image-only run dir."""
    from data_tools import make_shards

    root = tmp_path_factory.mktemp("copy_detector")
    rng = np.random.default_rng(1)
    (root / "pictures").mkdir()
    for i in range(256):
        _picture(rng).save(root / "pictures" / f"{i:03d}.png")
    assert make_shards.main([str(root / "pictures"), str(root / "shards"), "--layout", "images", "--workers", "1"]) == 0
    r = subprocess.run([sys.executable, "-m", "mmcontrast.train", "--config", str(ROOT / "configs" / "copy_detector_cpu.yaml"),
                        "--train-shards", str(root / "shards"), "--output-dir", str(root / "run"), "--seed", "0"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


def test_dedup_finds_planted_near_duplicates(copy_detector, capsys, tmp_path):
    from mmcontrast.dedup import pair_precision_recall

    folder = tmp_path / "photos"
    truth = _planted_collection(folder, 150, seed=0)  # 50 originals get a copy each: resized, recompressed or cropped
    rc, printed, _ = run_cli(["dedup", "--images", str(folder), "--checkpoint", str(copy_detector), "--workers", "0", "--quiet",
                              "--output", str(tmp_path / "dups.csv"), "--html", str(tmp_path / "dups.html")], capsys)  # fmt: skip
    result = json.loads(printed)
    calibration = result["calibration"]  # on the collection's own copies and distinct pairs: this detector separates them
    assert rc == 0 and calibration["separable"] and result["threshold"] == calibration["threshold"], json.dumps(result)
    with open(tmp_path / "dups.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["group", "path", "score"]
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row["path"])
    measured = pair_precision_recall(list(groups.values()), truth)
    assert measured["recall"] >= 0.95 and measured["precision"] >= 0.9, measured
    kept_originals = [members[0] == truth[members[0]] for members in groups.values()]
    assert np.mean(kept_originals) >= 0.9  # the one kept is the original: the most pixels, then the largest file
    page = (tmp_path / "dups.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') == len(rows) and not re.search(r'(src|href)="(?!data:)', page)


# ---------------------------------------------------------------- the server and the browser


@pytest.fixture(scope="module")
def server(clip_index):
    """``mmcontrast serve`` on a free port, as a user starts it: ``(base URL, process)``."""
    proc = subprocess.Popen([sys.executable, "-m", "mmcontrast.cli", "serve", "--index", str(clip_index), "--port", "0"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    assert match, f"serve printed {line!r}"
    yield f"http://127.0.0.1:{match.group(1)}", proc
    proc.terminate()
    proc.wait(timeout=30)


def fetch(url: str) -> tuple[int, str, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to 127.0.0.1, whatever the proxy settings
    try:
        with opener.open(url, timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_the_server_answers_search_json_and_serves_only_indexed_images(server, clip_index):
    base, _ = server
    status, kind, body = fetch(f"{base}/api/search?q=a+red+circle&k=5")
    assert status == 200 and kind.startswith("application/json")
    got, expected = json.loads(body), search.Searcher(clip_index).search_text("a red circle", 5)
    root = json.loads((clip_index / search.INFOS_FILE).read_text())["source"]["images"]
    assert [(r["id"], r["score"]) for r in got["results"]] == [(r["id"], r["score"]) for r in expected["results"]]
    # paths relative to the indexed folder: a page on a network does not tell where the collection lives
    assert [r["path"] for r in got["results"]] == [str(Path(r["path"]).relative_to(root)) for r in expected["results"]]
    status, kind, body = fetch(f"{base}/?q=a+red+circle&k=4")
    page = body.decode()
    assert status == 200 and page.count('<img src="/image/') == 4 and 'href="/?similar=' in page and 'name="q"' in page
    first = json.loads(fetch(f"{base}/api/search?q=a+red+circle&k=1")[2])["results"][0]["id"]
    status, kind, body = fetch(f"{base}/api/search?similar={first}&k=3")
    assert status == 200 and json.loads(body)["results"][0]["id"] == first
    status, kind, body = fetch(f"{base}/image/{first}")
    assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8"
    for path in ("/image/100000", "/image/..%2f..%2fetc%2fpasswd", "/../../etc/passwd", "/image/-1", "/captions.jsonl"):
        status, _, body = fetch(base + path)
        assert status == 404 and b"root:" not in body, path


@pytest.mark.parametrize("query", ["/api/search?q=&k=5", "/api/search?q=a+red+circle&k=0", "/api/search?q=a+red+circle&k=-2",
                                   "/api/search?q=a+red+circle&k=ten", "/api/search?k=5", "/api/search?similar=x",
                                   "/api/search?similar=100000", "/api/search?q=a&similar=1", "/api/search?q=a&q=b",
                                   "/?q=&k=5", "/?q=a+red+circle&k=0", "/?similar=../../etc/passwd"])
def test_a_malformed_query_is_400_with_one_line_and_no_traceback(server, query):
    status, kind, body = fetch(server[0] + query)
    text = body.decode()
    assert status == 400 and "Traceback" not in text
    if kind.startswith("application/json"):
        assert len(json.loads(text)["error"].splitlines()) == 1
    else:
        assert 'class="error"' in text


def test_serve_binds_to_this_machine_only_by_default():
    from mmcontrast.web import DEFAULT_HOST

    args = cli.build_parser().parse_args(["serve", "--index", "x"])
    assert args.host == DEFAULT_HOST == "127.0.0.1"


def test_serving_to_a_network_is_said_and_this_machine_is_not():
    """A bind beyond this machine serves every indexed image to whoever can reach it: one warning line on stderr."""
    from mmcontrast.web import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")


def test_serve_on_every_interface_warns_before_it_serves(clip_index):
    proc = subprocess.Popen([sys.executable, "-m", "mmcontrast.cli", "serve", "--index", str(clip_index), "--host", "0.0.0.0",
                             "--port", "0"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()  # the warning was said before it
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    warnings = [line for line in err.splitlines() if line.startswith("warning: --host")]
    assert len(warnings) == 1 and "0.0.0.0 serves the" in warnings[0] and "127.0.0.1" in warnings[0], err


def chromium_dom(url: str, profile: Path) -> str:
    """The DOM headless Chromium ends with after loading ``url`` (and whatever the page does within 5 s)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url]  # fmt: skip
    r = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run does it)")
def test_a_real_browser_loads_the_page_and_sees_the_result_images(server, tmp_path):
    base, _ = server
    dom = chromium_dom(f"{base}/?q=a+blue+square&k=6", tmp_path / "profile")
    images = re.findall(r'<img src="/image/(\d+)"', dom)
    assert len(images) == 6, dom[:2000]
    assert re.search(r'<input[^>]*name="q"[^>]*value="a blue square"', dom)
    assert all(f'href="/?similar={i}&amp;k=6"' in dom for i in images)  # clicking an image searches for ones like it
    similar = chromium_dom(f"{base}/?similar={images[0]}&k=6", tmp_path / "profile")  # where that click leads
    assert re.findall(r'<img src="/image/(\d+)"', similar)[0] == images[0]
    # a query typed into a form and submitted by the browser (the page's own form sends q and k the same way)
    form = tmp_path / "submit.html"
    form.write_text(f'<form action="{base}/" method="get"><input name="q" value="a green triangle"><input name="k" value="5">'
                    "</form><script>document.forms[0].submit()</script>")
    submitted = chromium_dom(form.as_uri(), tmp_path / "profile")
    assert len(re.findall(r'<img src="/image/\d+"', submitted)) == 5 and "a green triangle" in submitted


@pytest.mark.parametrize("command", ["index", "search", "dedup", "serve", "embed"])
def test_help_answers(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0 and "--" in capsys.readouterr().out


def test_dedup_says_when_the_checkpoint_cannot_tell_copies_from_look_alikes(trained_tiny_clip, tiny_image_folder, capsys,
                                                                           tmp_path):
    """The tiny CLIP learned colour and shape: 16 look-alike pictures of each score as high as copies do."""
    args = ["dedup", "--images", str(tiny_image_folder), "--checkpoint", str(trained_tiny_clip.run_dir), "--workers", "0",
            "--quiet", "--output", str(tmp_path / "d.csv")]  # fmt: skip
    rc, printed, err = run_cli([*args, "--method", "embedding"], capsys)
    result = json.loads(printed)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert rc == 0 and not result["calibration"]["separable"] and len(warnings) == 1 and "--method phash" in warnings[0]
    rc, printed, err = run_cli(args, capsys)  # both (the default): the embedding side is left out, and it says so
    result = json.loads(printed)
    assert rc == 0 and result["threshold"] is None and "using pHash alone" in err and "embedding_pairs" not in result
