"""WiSE-FT (Wortsman et al., 2022): the weights of a zero-shot CLIP and of its fine-tuned copy, interpolated.

Owns reading the two endpoints (a run dir, a weights file with its ``model_config.json``, or for the zero-shot
end an open_clip model name plus a local ``pretrained`` file), checking they are one architecture,
``θ = (1 − α)·θ₀ + α·θ₁`` over every tensor, writing the result as a run dir like any other, and a sweep over
α that scores each interpolant on the evaluations given (zero-shot accuracy on class folders, retrieval on
caption shards). Does not parse arguments or print (``cli.py``) or draw (``plots.py``).

Fine-tuning moves the weights a short way from a good zero-shot model, and along that line the accuracy on the
fine-tuning domain rises fast while the accuracy elsewhere falls slowly at first: a point between the two
often beats both ends on the mean over domains. The temperature is interpolated like every other tensor (the
model holds its logarithm, ``logit_scale``), and tensors equal at both ends stay bit for bit as they are
(frozen towers, a causal mask of -inf).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmcontrast import loading, models
from mmcontrast.errors import UsageError

PROVENANCE_FILE = "wise_ft.json"  # in an interpolated run dir: the endpoints and α it was made from
EVAL_KINDS = ("zero-shot", "retrieval")  # what a sweep can score: zero-shot on class folders, retrieval on shards


@dataclass
class Endpoints:
    """The two ends of the line: their weights (CPU), and the fine-tuned model to write and evaluate through."""

    zero_shot: dict[str, torch.Tensor]
    finetuned: dict[str, torch.Tensor]
    model: nn.Module  # the fine-tuned model (its architecture, preprocessing and config)
    preprocess: object
    tokenizer: object
    model_cfg: dict


def _model_cfg(spec: str) -> dict:
    """The open_clip model config of a run dir, a weights file (its ``model_config.json`` beside it) or a name."""
    path = Path(spec)
    config = (path if path.is_dir() else path.parent) / models.MODEL_CONFIG_FILE
    if path.exists():
        cfg = json.loads(config.read_text())
        return cfg.get("model_cfg", cfg)
    return models.resolve_model(spec)[1]


def load_endpoints(zero_shot: str, finetuned: str, pretrained: str | None = None, device: str = "cpu") -> Endpoints:
    """Read both ends (``pretrained``: the zero-shot end's weights when it is an open_clip model name) and check that
    they are one CLIP architecture; a UsageError names the first tensor that differs."""
    model, preprocess, tokenizer = loading.load(finetuned, device=device)
    if tokenizer is None or not hasattr(model, "encode_text"):
        raise UsageError(f"{finetuned} is not a CLIP model (image and text towers); wise-ft interpolates CLIP runs")
    if not Path(zero_shot).exists() and not pretrained:
        raise UsageError(f"{zero_shot} is an open_clip model name: give its weights with --pretrained LOCAL_FILE")
    start = loading.load(zero_shot, pretrained=pretrained)[0]
    # copies: the model's own tensors are overwritten with each interpolant
    ends = [{k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for m in (start, model)]
    difference = models.first_difference(ends[0], ends[1], names=(zero_shot, finetuned))
    if difference is not None:
        raise UsageError(f"{zero_shot} and {finetuned} are different architectures: {difference}")
    return Endpoints(ends[0], ends[1], model, preprocess, tokenizer, _model_cfg(finetuned))


def interpolate(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 − alpha)·theta0 + alpha·theta1`` for every floating-point tensor, computed in float32 and given
    ``theta1``'s dtype; tensors equal at both ends (and integer ones: ``theta1``'s) unchanged. ``alpha`` 0 and 1
    give the ends exactly."""
    out = {}
    for name, b in theta1.items():
        a = theta0[name]
        if not b.is_floating_point() or torch.equal(a, b):
            out[name] = b.clone()
        else:
            mixed = (1.0 - alpha) * a.float() + alpha * b.float()
            out[name] = mixed.to(b.dtype)
    return out


def check_output_dir(output_dir: str | Path) -> Path:
    """``output_dir`` as a Path; a UsageError when it already holds a model (checked before a sweep, not after it)."""
    out = Path(output_dir)
    if (out / models.WEIGHTS_FILE).exists():
        raise UsageError(f"{out} already holds a model; choose another --output-dir")
    return out


def write_run(ends: Endpoints, alpha: float, output_dir: str | Path, sources: tuple[str, str]) -> Path:
    """The interpolant at ``alpha`` as a run dir (``model.safetensors`` in open_clip's layout, its configs and
    tokenizer, ``wise_ft.json``): ``open_clip``'s ``local-dir:`` and every mmcontrast command load it."""
    out = check_output_dir(output_dir)
    models.save_clip_run_files(ends.model, ends.model_cfg, out, ends.tokenizer, state_dict=interpolate(ends.zero_shot, ends.finetuned, alpha))
    (out / PROVENANCE_FILE).write_text(json.dumps({"zero_shot": sources[0], "finetuned": sources[1], "alpha": alpha}, indent=2))
    return out


def _score(kind: str, target: str, ends: Endpoints, workers: int) -> dict:
    from mmcontrast import evaluate as ev

    if kind == "zero-shot":
        return ev.zero_shot_top1_top5(ends.model, ends.tokenizer, ends.preprocess, target, workers=workers)
    result = ev.evaluate_retrieval(ends.model, ends.preprocess, ends.tokenizer, target, workers=workers)
    return {"image_to_text": result["image_to_text"], "text_to_image": result["text_to_image"]}


def sweep(ends: Endpoints, alphas: Sequence[float], evaluations: Sequence[tuple[str, str]], workers: int = 0,
          choose_on: Sequence[str] = ()) -> list[dict]:
    """Score the interpolant at each of ``alphas`` on each of ``evaluations`` (``(kind, target)``, kind in
    ``EVAL_KINDS``) and on the ``choose_on`` class folders (zero-shot top-1: what picks alpha, held out from the
    evaluations). One row per alpha: ``{"alpha", "KIND=TARGET": metrics, ..., "mean_zero_shot_top1"}`` (the mean top-1
    over the zero-shot evaluations, when there are any), plus ``"choose-on zero-shot=DIR": metrics`` and
    ``"choose_on_mean_top1"`` with ``choose_on``."""
    unknown = [kind for kind, _ in evaluations if kind not in EVAL_KINDS]
    if unknown:
        raise UsageError(f"wise-ft evaluates {' or '.join(EVAL_KINDS)}, not {unknown[0]!r}")
    rows = []
    for alpha in alphas:
        ends.model.load_state_dict(interpolate(ends.zero_shot, ends.finetuned, alpha))
        ends.model.eval()
        row: dict = {"alpha": float(alpha)}
        for kind, target in evaluations:
            row[f"{kind}={target}"] = _score(kind, target, ends, workers)
        top1 = [row[f"{kind}={target}"]["top1"] for kind, target in evaluations if kind == "zero-shot"]
        if top1:
            row["mean_zero_shot_top1"] = sum(top1) / len(top1)
        if choose_on:
            chosen = [_score("zero-shot", target, ends, workers) for target in choose_on]
            row.update({f"choose-on zero-shot={t}": c for t, c in zip(choose_on, chosen)})
            row["choose_on_mean_top1"] = sum(c["top1"] for c in chosen) / len(chosen)
        rows.append(row)
    return rows


def best_alpha(rows: Sequence[dict]) -> float | None:
    """The alpha with the highest mean zero-shot top-1 on the ``choose_on`` folders (the first of equals); None
    without them — a best alpha read off the folders whose accuracy is reported would flatter it."""
    scored = [row for row in rows if "choose_on_mean_top1" in row]
    return max(scored, key=lambda row: row["choose_on_mean_top1"])["alpha"] if scored else None
