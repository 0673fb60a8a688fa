"""The user-facing commands: zero-shot, eval …, embed. Outputs parse, accuracy is reported, bad arguments
end with exit code 2 and one stderr line, and --help never imports torch.

Most cases call ``mmcontrast.cli.main`` in-process (importing torch per subprocess costs seconds); the
console entry point itself runs in a few subprocess tests.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmcontrast.cli import main

LABELS = "red_square,green_square,blue_square,yellow_square"


def auto_precision() -> str:
    """What ``--precision auto`` (the default) resolves to on this machine's CPU."""
    from mmcontrast.evaluate import resolve_precision

    return resolve_precision("auto", torch.device("cpu"))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mmcontrast.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def image_only_checkpoint(tmp_path_factory):
    """A SimCLR-style image encoder run dir (random init, no text tower)."""
    from mmcontrast.models import ImageEncoder, image_encoder_spec, save_image_encoder_files

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("simclr_run")
    save_image_encoder_files(ImageEncoder(image_encoder_spec("mmc-tiny", {}, cifar_stem=False)), out)
    return out


# ---------------------------------------------------------------- commands that work


def test_zero_shot_prints_table_and_accuracy_and_writes_jsonl(trained_tiny_clip, capsys, tmp_path):
    out_file = tmp_path / "preds.jsonl"
    rc, out, err = run_main(capsys, "zero-shot", "--images", str(trained_tiny_clip.test_dir), "--labels", LABELS,
                            "--checkpoint", str(trained_tiny_clip.run_dir), "--top-k", "2", "--workers", "0",
                            "--output", str(out_file), "--plot", str(tmp_path / "cm.png"))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["image", "label", "probability"]
    assert lines[1].startswith("blue_square/000.png")
    accuracy = next(line for line in lines if line.startswith("accuracy"))
    assert float(accuracy.split("top-1 ")[1].split(",")[0]) >= 0.9
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 40 and {"path", "label", "score", "true_label", "top_k"} <= set(rows[0])
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_zero_shot_uses_class_folders_and_prints_one_json(trained_tiny_clip, capsys, tmp_path):
    rc, out, err = run_main(capsys, "eval", "zero-shot", "--images", str(trained_tiny_clip.test_dir), "--checkpoint",
                            str(trained_tiny_clip.run_dir), "--workers", "0", "--batch-size", "16",
                            "--output", str(tmp_path / "r.json"))
    assert rc == 0, err
    result = json.loads(out)
    assert result["top1"] >= 0.9 and result["top5"] == 1.0 and result["n_classes"] == 4 and result["n_errors"] == 0
    assert result["precision"] == auto_precision()  # what the number was computed in, not "auto"
    assert json.loads((tmp_path / "r.json").read_text()) == result


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_records_the_precision_it_computed_in(trained_tiny_clip, capsys, precision):
    """bf16 and fp32 can differ by a few images: a reported number says which one it is, so it can be reproduced."""
    rc, out, err = run_main(capsys, "eval", "zero-shot", "--images", str(trained_tiny_clip.test_dir), "--checkpoint",
                            str(trained_tiny_clip.run_dir), "--workers", "0", "--precision", precision)
    assert rc == 0, err
    assert json.loads(out)["precision"] == precision


@pytest.mark.parametrize("evaluation", ["knn", "linear-probe"])
def test_knn_and_linear_probe_commands(trained_tiny_clip, capsys, evaluation):
    rc, out, err = run_main(capsys, "eval", evaluation, "--train", str(trained_tiny_clip.train_dir), "--test",
                            str(trained_tiny_clip.test_dir), "--checkpoint", str(trained_tiny_clip.run_dir), "--workers", "0")
    assert rc == 0, err
    result = json.loads(out)
    assert result["top1"] >= 0.9 and result["n_train"] == 80 and result["n_test"] == 40
    assert result["precision"] == auto_precision()


def test_embed_and_knn_work_with_an_image_only_encoder(image_only_checkpoint, trained_tiny_clip, capsys, tmp_path):
    rc, out, err = run_main(capsys, "embed", "--images", str(trained_tiny_clip.test_dir), "--checkpoint",
                            str(image_only_checkpoint), "--output", str(tmp_path / "e" / "emb.npy"), "--workers", "0")
    assert rc == 0, err
    result = json.loads(out)
    emb = np.load(tmp_path / "e" / "emb.npy")
    paths = (tmp_path / "e" / "emb.paths.txt").read_text().splitlines()
    assert emb.shape == (40, 64) and len(paths) == 40 and result["n_embedded"] == 40
    assert result["precision"] == auto_precision()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert paths[0].endswith("blue_square/000.png")
    rc, out, err = run_main(capsys, "eval", "knn", "--train", str(trained_tiny_clip.train_dir), "--test",
                            str(trained_tiny_clip.test_dir), "--checkpoint", str(image_only_checkpoint), "--workers", "0")
    assert rc == 0, err
    assert 0.0 <= json.loads(out)["top1"] <= 1.0


def test_eval_retrieval_on_made_shards(trained_tiny_clip, tiny_shards, capsys):
    rc, out, err = run_main(capsys, "eval", "retrieval", "--shards", str(tiny_shards), "--checkpoint",
                            str(trained_tiny_clip.run_dir), "--workers", "0")
    assert rc == 0, err
    result = json.loads(out)
    assert result["n_images"] == 192 and result["n_captions"] == 192 and result["precision"] == auto_precision()
    for direction in ("image_to_text", "text_to_image"):
        recall = result[direction]
        assert 0 <= recall["R@1"] <= recall["R@5"] <= recall["R@10"] <= 1


# ---------------------------------------------------------------- user mistakes: exit 2, one line, no traceback


BAD_ARGUMENTS = {
    "missing images dir": ["zero-shot", "--images", "{tmp}/nope", "--labels", "a,b", "--checkpoint", "{run}"],
    "empty label list": ["zero-shot", "--images", "{test}", "--labels", "", "--checkpoint", "{run}"],
    "label list of commas": ["zero-shot", "--images", "{test}", "--labels", ",,", "--checkpoint", "{run}"],
    "no labels at all": ["zero-shot", "--images", "{test}", "--checkpoint", "{run}"],
    "unknown model name": ["zero-shot", "--images", "{test}", "--labels", "a,b", "--checkpoint", "no-such-model"],
    "text file as checkpoint": ["zero-shot", "--images", "{test}", "--labels", "a,b", "--checkpoint", "{tmp}/notes.txt"],
    "missing checkpoint file": ["eval", "zero-shot", "--images", "{test}", "--checkpoint", "{tmp}/gone/model.safetensors"],
    "missing pretrained file": ["embed", "--images", "{test}", "--checkpoint", "mmc-tiny", "--pretrained", "{tmp}/w.pt",
                                "--output", "{tmp}/e.npy"],
    "image-only checkpoint for zero-shot": ["zero-shot", "--images", "{test}", "--labels", "a,b", "--checkpoint", "{simclr}"],
    "bad templates file": ["eval", "zero-shot", "--images", "{test}", "--checkpoint", "{run}", "--templates", "{tmp}/notes.txt"],
    "predictions file type": ["zero-shot", "--images", "{test}", "--labels", "a,b", "--checkpoint", "{run}", "--output", "p.xlsx"],
    "plot without labelled folders": ["zero-shot", "--images", "{test}", "--labels", "cat,dog", "--checkpoint", "{run}",
                                      "--plot", "{tmp}/cm.png"],
    "probe without class folders": ["eval", "linear-probe", "--train", "{tmp}", "--test", "{test}", "--checkpoint", "{run}"],
    "malformed shard pattern": ["eval", "retrieval", "--shards", "{tmp}/{{00000..00003.tar", "--checkpoint", "{run}"],
    "embeddings not .npy": ["embed", "--images", "{test}", "--checkpoint", "{run}", "--output", "{tmp}/emb.csv"],
    "a config open_clip cannot build": ["zero-shot", "--images", "{test}", "--labels", "a,b", "--checkpoint", "{tmp}/odd_run"],
    "the same without open_clip's own config": ["zero-shot", "--images", "{test}", "--labels", "a,b", "--checkpoint",
                                                "{tmp}/odd_bare_run"],
    "--image-size for a CLIP run": ["embed", "--images", "{test}", "--checkpoint", "{run}", "--image-size", "64",
                                    "--output", "{tmp}/e.npy"],
}
if not torch.cuda.is_available():
    BAD_ARGUMENTS["cuda without a GPU"] = ["eval", "knn", "--train", "{test}", "--test", "{test}", "--checkpoint", "{run}",
                                           "--device", "cuda"]


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_user_mistakes_exit_2_with_one_line(case, trained_tiny_clip, image_only_checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    (tmp_path / "loose.png").write_bytes((trained_tiny_clip.test_dir / "red_square" / "000.png").read_bytes())
    odd = tmp_path / "odd_run"  # the run's files, its configs naming an option the model does not take (was a TypeError)
    shutil.copytree(trained_tiny_clip.run_dir, odd)
    for name, inner in (("model_config.json", None), ("open_clip_config.json", "model_cfg")):
        config = json.loads((odd / name).read_text())
        (config[inner] if inner else config)["no_such_option"] = 1
        (odd / name).write_text(json.dumps(config))
    shutil.copytree(odd, tmp_path / "odd_bare_run")  # read through model_config.json alone (models.register_config)
    (tmp_path / "odd_bare_run" / "open_clip_config.json").unlink()
    places = {"tmp": tmp_path, "run": trained_tiny_clip.run_dir, "test": trained_tiny_clip.test_dir,
              "simclr": image_only_checkpoint}
    rc, out, err = run_main(capsys, *[arg.format(**places) for arg in BAD_ARGUMENTS[case]])
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and out == ""


# ---------------------------------------------------------------- the console entry point itself


def test_help_does_not_import_torch():
    probe = (
        "import sys\nfrom mmcontrast.cli import main\n"
        "for argv in (['--help'], ['zero-shot', '--help'], ['eval', 'knn', '--help'], ['embed', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("LIGHT")
    assert "--templates" in done.stdout and "--top-k" in done.stdout


@pytest.mark.parametrize("case", ["empty label list", "missing images dir", "text file as checkpoint"])
def test_entry_point_bad_arguments(case, trained_tiny_clip, tmp_path):
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    args = [a.format(tmp=tmp_path, run=trained_tiny_clip.run_dir, test=trained_tiny_clip.test_dir) for a in BAD_ARGUMENTS[case]]
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr


def test_entry_point_zero_shot_with_decode_workers_writes_csv(trained_tiny_clip, tmp_path):
    done = run_cli("zero-shot", "--images", str(trained_tiny_clip.test_dir), "--labels", LABELS, "--checkpoint",
                   str(trained_tiny_clip.run_dir), "--workers", "2", "--batch-size", "8", "--output", str(tmp_path / "p.csv"))
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 40 and all(r["label"] for r in rows)
    assert np.mean([r["label"] == r["true_label"] for r in rows]) >= 0.9
    assert "top-1" in done.stdout
