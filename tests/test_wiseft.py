"""WiSE-FT (mmcontrast wise-ft): the interpolation, the run dir it writes, the sweep, and refused pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmcontrast import cli, loading, models, wiseft


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two mmc-tiny run dirs with different weights (seeds 0 and 1) and temperatures."""
    root = tmp_path_factory.mktemp("wiseft")
    for seed, name in ((0, "zero"), (1, "fine")):
        torch.manual_seed(seed)
        bundle = models.create_clip("mmc-tiny")
        with torch.no_grad():
            bundle.model.logit_scale.fill_(2.0 + seed)
        models.save_clip_run_files(bundle.model, bundle.model_cfg, root / name, bundle.tokenizer)
    return root / "zero", root / "fine"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return models.load_weights_file(run / models.WEIGHTS_FILE)


def test_interpolation_gives_the_ends_exactly_and_mixes_every_tensor_between():
    a = {"w": torch.tensor([0.0, 1.0]), "logit_scale": torch.tensor(2.0), "mask": torch.tensor([float("-inf"), 0.0]),
         "steps": torch.tensor(3), "half": torch.tensor([1.0], dtype=torch.float16)}  # fmt: skip
    b = {"w": torch.tensor([1.0, 3.0]), "logit_scale": torch.tensor(3.0), "mask": torch.tensor([float("-inf"), 0.0]),
         "steps": torch.tensor(5), "half": torch.tensor([2.0], dtype=torch.float16)}  # fmt: skip
    assert all(torch.equal(wiseft.interpolate(a, b, 0.0)[k], a[k]) for k in ("w", "logit_scale", "half"))
    assert all(torch.equal(wiseft.interpolate(a, b, 1.0)[k], b[k]) for k in a)
    mid = wiseft.interpolate(a, b, 0.25)
    assert torch.equal(mid["w"], torch.tensor([0.25, 1.5])) and mid["logit_scale"] == 2.25  # the temperature too
    assert torch.equal(mid["mask"], a["mask"]) and mid["steps"] == 5 and mid["half"].dtype == torch.float16


def test_one_alpha_is_a_run_dir_open_clip_and_every_command_load(two_runs, tmp_path, capsys):
    import open_clip

    zero, fine = two_runs
    assert cli.main(["wise-ft", str(zero), str(fine), "--alpha", "0.5", "--output-dir", str(tmp_path / "mid")]) == 0
    assert "alpha 0.5" in capsys.readouterr().out
    a, b, mid = _weights(zero), _weights(fine), _weights(tmp_path / "mid")
    assert mid.keys() == b.keys()
    assert all(torch.allclose(mid[k], (a[k] + b[k]) / 2, atol=1e-7) for k in mid if mid[k].is_floating_point())
    assert mid["logit_scale"] == pytest.approx(2.5)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'mid'}", weights_only=True)
    assert torch.equal(model.state_dict()["visual.proj"], mid["visual.proj"])
    assert loading.load(tmp_path / "mid")[2] is not None  # mmcontrast commands: a CLIP run with its tokenizer
    assert json.loads((tmp_path / "mid" / wiseft.PROVENANCE_FILE).read_text())["alpha"] == 0.5


def test_the_zero_shot_end_may_be_an_open_clip_name_with_local_weights(two_runs, tmp_path):
    zero, fine = two_runs
    torch.save(_weights(zero), tmp_path / "zero.pt")
    assert cli.main(["wise-ft", "mmc-tiny", str(fine), "--pretrained", str(tmp_path / "zero.pt"), "--alpha", "0.3",
                     "--output-dir", str(tmp_path / "by_name")]) == 0  # fmt: skip
    assert cli.main(["wise-ft", str(zero), str(fine), "--alpha", "0.3", "--output-dir", str(tmp_path / "by_run")]) == 0
    by_name, by_run = _weights(tmp_path / "by_name"), _weights(tmp_path / "by_run")
    assert all(torch.equal(by_name[k], by_run[k]) for k in by_run)


def test_two_architectures_are_refused_naming_the_first_tensor_that_differs(two_runs, tmp_path, capsys):
    zero, fine = two_runs
    torch.manual_seed(0)
    cfg = {**json.loads((zero / models.MODEL_CONFIG_FILE).read_text()), "embed_dim": 32}
    other = models.create_clip(str(_write(tmp_path / "narrow.json", cfg)))
    models.save_clip_run_files(other.model, cfg, tmp_path / "narrow", other.tokenizer)
    assert cli.main(["wise-ft", str(tmp_path / "narrow"), str(fine), "--alpha", "0.5", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "different architectures" in err and "text_projection has shape [64, 32]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert cli.main(["wise-ft", str(zero), str(fine), "--alphas", "0,1"]) == 2  # a sweep needs something to score
    assert "--eval" in capsys.readouterr().err


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def test_a_sweep_scores_each_alpha_plots_and_writes_the_one_chosen_on_held_out_folders(trained_tiny_clip, two_runs,
                                                                                       tiny_val_shards, tmp_path, capsys):
    """From a random start (α = 0) to a trained tiny CLIP (α = 1): α = 1 scores what eval zero-shot gives the trained
    run, α = 0 about chance; the JSON has each α's metrics, the PNG is drawn, and --output-dir gets the α that
    --choose-on's folders (not the --eval ones) chose. Without --choose-on no α is called best."""
    from mmcontrast.evaluate import zero_shot_top1_top5

    zero, _ = two_runs
    folder, held_out = str(trained_tiny_clip.test_dir), str(trained_tiny_clip.train_dir)
    sweep = ["wise-ft", str(zero), str(trained_tiny_clip.run_dir), "--alphas", "0,0.5,1", "--eval", f"zero-shot={folder}",
             "--precision", "fp32"]  # fmt: skip
    assert cli.main([*sweep, "--output-dir", str(tmp_path / "x")]) == 2
    assert "--choose-on" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main([*sweep, "--choose-on", f"zero-shot={folder}"]) == 2  # chosen on the folder it is scored on
    assert "also an --eval folder" in capsys.readouterr().err
    assert cli.main([*sweep, "--output", str(tmp_path / "plain.json")]) == 0
    assert "chosen_alpha" not in json.loads((tmp_path / "plain.json").read_text()) and "held out" not in capsys.readouterr().out
    args = [*sweep, "--eval", f"retrieval={tiny_val_shards}", "--choose-on", f"zero-shot={held_out}",
            "--plot", str(tmp_path / "curve.png"), "--output", str(tmp_path / "sweep.json"), "--output-dir", str(tmp_path / "best")]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "mean zero-shot top-1" in table and len(table.strip().splitlines()) >= 4
    result = json.loads((tmp_path / "sweep.json").read_text())
    rows = result["results"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    model, preprocess, tokenizer = loading.load(trained_tiny_clip.run_dir)
    assert rows[-1][f"zero-shot={folder}"]["top1"] == pytest.approx(zero_shot_top1_top5(model, tokenizer, preprocess, folder)["top1"])
    assert rows[-1]["mean_zero_shot_top1"] > rows[0]["mean_zero_shot_top1"]
    assert 0 <= rows[1][f"retrieval={tiny_val_shards}"]["text_to_image"]["R@5"] <= 1
    assert (tmp_path / "curve.png").stat().st_size > 0
    chosen = max(rows, key=lambda r: r["choose_on_mean_top1"])["alpha"]
    assert result["chosen_alpha"] == chosen and result["chosen_on"] == [held_out]
    assert json.loads((tmp_path / "best" / wiseft.PROVENANCE_FILE).read_text())["alpha"] == chosen
