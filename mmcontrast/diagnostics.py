"""Representation health: is a contrastive run learning, or collapsing? Answered from the embeddings.

Owns the metrics, computed on L2-normalised embeddings of positive pairs (image/text in CLIP mode,
two views in SimCLR mode):

* ``alignment``  — E‖f(x) − f(x⁺)‖² (Wang & Isola, 2020): 0 when positives coincide, lower is better.
* ``uniformity`` — log E exp(−2‖f(x) − f(y)‖²) over all pairs: lower means more spread on the sphere.
* ``effective_rank`` — exp of the entropy of the normalised singular values (Roy & Vetterli, 2007):
  1 for identical vectors, d for an orthonormal basis; a falling value is dimensional collapse
  (Hua et al., 2021). ``top_k_variance_share`` is the share of variance in the top k directions.
* ``embedding_std`` — mean per-dimension std of normalised embeddings: → 0 on complete collapse,
  ≈ 1/√d when embeddings spread over the sphere (SimSiam's monitor).
* ``modality_gap`` — distance between the image and text centroids (Liang et al., 2022), CLIP mode.
* ``positive_accuracy`` / ``positive_rank`` — is the positive the nearest of all candidates in the batch.

Chance: ``chance_level`` is what guessing scores at global batch N (the loss of uniform logits and the
positive accuracy of a random pick), ``at_chance`` says whether a run is still there (the loss within
``CHANCE_TOLERANCE`` of guessing and positives found less than twice as often as by chance): a run can
sit at chance for its whole length with every other monitor looking healthy, and its loss curve,
auto-scaled, still seems to fall. ``Alarm`` says such a condition aloud once, and once more if it
outlasts a quarter of the run.

``health`` bundles them; ``collapse_warnings`` turns them into warning lines; ``fixed_batch`` and
``batch_health`` measure them during training on a batch drawn once; ``embed_shard_pairs`` embeds positive
pairs from shards for any checkpoint (``mmcontrast diagnose``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmcontrast.errors import UsageError


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """E‖x_i − y_i‖^alpha over positive pairs; x, y: (n, d) L2-normalised."""
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """log E_{i<j} exp(−t‖x_i − x_j‖²); x: (n, d) L2-normalised, n ≥ 2."""
    return float(torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log())


def effective_rank(x: torch.Tensor) -> float:
    """exp(H(p)) with p the singular values of x (n, d) normalised to sum 1 (Roy & Vetterli)."""
    s = torch.linalg.svdvals(x.double())
    if s.sum() <= 0:  # all-zero embeddings: nothing is spanned
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def top_k_variance_share(x: torch.Tensor, k: int) -> float:
    """Share of the variance of x (n, d) in its top ``k`` principal directions (1.0 when there is none)."""
    centred = x.double() - x.double().mean(dim=0)
    var = torch.linalg.svdvals(centred).pow(2)
    total = var.sum()
    return 1.0 if total <= 0 else float(var[:k].sum() / total)


def embedding_std(x: torch.Tensor) -> float:
    """Mean over dimensions of the std of L2-normalised x (n, d); healthy ≈ 1/√d, collapsed → 0."""
    return float(F.normalize(x, dim=1).std(dim=0).mean())


def modality_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖mean(x) − mean(y)‖ for two modalities' normalised embeddings."""
    return float((x.mean(dim=0) - y.mean(dim=0)).norm())


TIE_TOLERANCE = 1e-6  # cosine similarities closer than this count as equal (collapsed embeddings tie everywhere)


def _positive_ranks(x: torch.Tensor, y: torch.Tensor, views: bool, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor: (candidates more similar than its positive, candidates tied with it), both (m,).

    ``views=False`` (CLIP): candidates of x_i are all y_j. ``views=True`` (SimCLR): the 2n−1 other
    views, the positive of view i being its twin. Anchors go ``rows`` at a time, so a global batch of
    32k costs a (4096, 32k) block, not the whole similarity matrix.
    """
    n = x.shape[0]
    anchors, candidates = (torch.cat([x, y]), torch.cat([x, y])) if views else (x, y)
    m = anchors.shape[0]
    twin = (torch.arange(m, device=x.device) + n) % m if views else torch.arange(m, device=x.device)
    greater, ties = [], []
    for start in range(0, m, rows):
        idx = torch.arange(start, min(start + rows, m), device=x.device)
        sim = anchors[idx] @ candidates.T  # (r, candidates)
        if views:
            sim[torch.arange(len(idx), device=x.device), idx] = float("-inf")  # a view is not its own candidate
        pos = sim.gather(1, twin[idx, None])
        greater.append((sim > pos + TIE_TOLERANCE).sum(dim=1))
        ties.append(((sim - pos).abs() <= TIE_TOLERANCE).sum(dim=1) - 1)  # the positive itself is not a tie
    return torch.cat(greater), torch.cat(ties)


def positive_accuracy(x: torch.Tensor, y: torch.Tensor, views: bool) -> float:
    """Share of anchors whose positive is the most similar candidate; x, y (n, d) L2-normalised.

    Ties are broken at random, in expectation: a positive tied with t others counts 1/(t+1), so
    collapsed embeddings score chance (1/n in CLIP mode), not 1.
    """
    greater, ties = _positive_ranks(x, y, views)
    return float(((greater == 0).double() / (ties + 1)).mean())


def positive_rank(x: torch.Tensor, y: torch.Tensor, views: bool) -> float:
    """Mean 1-based rank of the positive among the candidates (ties share the mean of their ranks); 1 is best."""
    greater, ties = _positive_ranks(x, y, views)
    return float((1 + greater + ties / 2).double().mean())


def batch_monitor(x: torch.Tensor, y: torch.Tensor, views: bool) -> dict[str, float]:
    """The two cheap numbers logged at every log step from the step's own embeddings."""
    x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    return {"positive_accuracy": positive_accuracy(x, y, views), "embedding_std": embedding_std(torch.cat([x, y]))}


def _spread(x: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Uniformity, effective rank and std of one set of normalised embeddings x (m, d), with their ratios."""
    d = x.shape[1]
    erank, std = effective_rank(x), embedding_std(x)
    return {
        f"{prefix}uniformity": uniformity(x),
        f"{prefix}effective_rank": erank,
        f"{prefix}effective_rank_fraction": erank / min(d, x.shape[0]),
        f"{prefix}embedding_std": std,
        f"{prefix}embedding_std_ratio": std * math.sqrt(d),
    }


def health(x: torch.Tensor, y: torch.Tensor, views: bool, top_k: int = 10) -> dict[str, float]:
    """All metrics for paired embeddings x, y (n, d), n ≥ 2 (normalised here); ``views`` as in ``positive_accuracy``.

    Keys: alignment, uniformity, effective_rank (and its fraction of min(d, 2n)), top{k}_variance_share,
    embedding_std (and its ratio to 1/√d), positive_accuracy, positive_rank — all over x and y pooled —
    and in CLIP mode modality_gap plus ``image_``/``text_`` uniformity, effective rank (fraction),
    embedding std (ratio) per tower: pooled numbers hide a collapsed tower behind the modality gap.
    """
    x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    both = torch.cat([x, y])  # (2n, d)
    out = {
        "alignment": alignment(x, y),
        **_spread(both),
        f"top{top_k}_variance_share": top_k_variance_share(both, top_k),
        "positive_accuracy": positive_accuracy(x, y, views),
        "positive_rank": positive_rank(x, y, views),
    }
    if not views:
        out["modality_gap"] = modality_gap(x, y)
        out.update(_spread(x, "image_"))
        out.update(_spread(y, "text_"))
    return out


def collapse_warnings(metrics: dict[str, float], min_rank_fraction: float, min_std_ratio: float) -> list[str]:
    """Warning lines when the effective rank or the embedding std fall below their thresholds.

    ``metrics`` is ``health()``'s dict. In CLIP mode each tower is checked on its own (``image_``/``text_``
    keys); otherwise the pooled embeddings are.
    """
    prefixes = [p for p in ("image_", "text_") if f"{p}effective_rank_fraction" in metrics] or [""]
    lines = []
    for prefix in prefixes:
        what = f"{prefix[:-1]} embeddings" if prefix else "embeddings"
        frac = metrics.get(f"{prefix}effective_rank_fraction")
        if frac is not None and frac < min_rank_fraction:
            lines.append(
                f"dimensional collapse of the {what}: effective rank {metrics[f'{prefix}effective_rank']:.1f} is {frac:.1%} "
                f"of the dimension (threshold {min_rank_fraction:.0%}); try a lower learning rate, a larger batch, "
                "or a higher temperature"
            )
        ratio = metrics.get(f"{prefix}embedding_std_ratio")
        if ratio is not None and ratio < min_std_ratio:
            lines.append(
                f"collapse of the {what}: per-dimension std is {ratio:.2f}/sqrt(d) (threshold {min_std_ratio:.2f}/sqrt(d)); "
                "they are converging to a point"
            )
    return lines


def dimensionally_collapsed(metrics: dict[str, float], min_rank_fraction: float) -> bool:
    """Whether ``health()``'s effective rank fraction (of any tower in CLIP mode) is below ``min_rank_fraction``."""
    fractions = [v for k, v in metrics.items() if k.endswith("effective_rank_fraction")]
    return any(f < min_rank_fraction for f in fractions)


# ---------------------------------------------------------------- chance


CHANCE_TOLERANCE = 0.05  # a loss within 5% of guessing's, with positives found under twice chance, is "at chance"


def chance_level(loss_name: str, n: int) -> tuple[float, float]:
    """(loss, positive accuracy) of guessing at global batch ``n``: every logit equal, the positive picked at random.

    ``nt_xent``/``supcon`` (two views of n images): each of the 2n anchors has 2n − 1 candidates,
    loss ln(2n − 1), accuracy 1/(2n − 1). ``clip``: n captions per image, ln n and 1/n. ``siglip``: the
    best constant logit (σ(b) = 1/n) gives −ln(1/n) − (n − 1)·ln(1 − 1/n) per image, accuracy 1/n.
    """
    if n < 2:
        raise ValueError(f"chance needs a batch of at least 2, got {n}")
    if loss_name in ("nt_xent", "supcon"):
        return math.log(2 * n - 1), 1.0 / (2 * n - 1)
    if loss_name == "siglip":
        return math.log(n) - (n - 1) * math.log1p(-1.0 / n), 1.0 / n
    if loss_name == "clip":
        return math.log(n), 1.0 / n
    raise ValueError(f"no chance level for loss {loss_name!r}")


def at_chance(loss: float, positive_accuracy: float, chance: tuple[float, float],
              tolerance: float = CHANCE_TOLERANCE) -> bool:
    """Whether a run is guessing: its loss at least (1 − ``tolerance``)·chance loss and its positive accuracy
    below twice chance's. ``chance`` is ``chance_level``'s pair."""
    chance_loss, chance_accuracy = chance
    return loss >= (1.0 - tolerance) * chance_loss and positive_accuracy < 2.0 * chance_accuracy


def chance_warning(step: int, loss: float, positive_accuracy: float, chance: tuple[float, float], advice: str) -> str:
    """The warning line for a run at chance at ``step``, with what to try (``advice``, the mode's)."""
    return (f"training is at chance at step {step}: loss {loss:.3f} against {chance[0]:.3f} for guessing, positives found "
            f"{positive_accuracy:.1%} of the time (chance {chance[1]:.1%}); the encoder is not learning to tell samples "
            f"apart. Try {advice}")


def judge(metrics: dict[str, float], n: int, views: bool, min_rank_fraction: float) -> dict:
    """Verdicts on ``health()``'s metrics of ``n`` pairs with no loss at hand (``mmcontrast diagnose``).

    ``at_chance``: positives found less than twice as often as a random pick would (1/n, or 1/(2n − 1)
    among two views); ``dimensional_collapse``: ``dimensionally_collapsed``.
    """
    chance_accuracy = 1.0 / (2 * n - 1) if views else 1.0 / n
    return {"chance_positive_accuracy": chance_accuracy, "at_chance": metrics["positive_accuracy"] < 2 * chance_accuracy,
            "dimensional_collapse": dimensionally_collapsed(metrics, min_rank_fraction)}


class Alarm:
    """Says a condition aloud: the first step it holds, and once more if it first held before a quarter of the run
    and still holds past it (a warning early in a run can be the run finding its feet; past a quarter it is not)."""

    def __init__(self, total_steps: int):
        self.quarter = total_steps / 4
        self.first: int | None = None  # the step it was first said
        self.said_again = False

    def due(self, step: int, holds: bool) -> bool:
        """Whether to warn at ``step`` (``holds``: the condition's value there)."""
        if not holds or self.said_again:
            return False
        if self.first is None:
            self.first = step
            return True
        if self.first < self.quarter <= step:
            self.said_again = True
            return True
        return False


# ---------------------------------------------------------------- the trainer's fixed batch


def fixed_batch(shards: list[str], transform: Callable, tokenizer: Callable | None, views: int, samples: int,
                seed: int, shuffle_buffer: int) -> dict:
    """One batch of up to ``samples`` samples for representation health, drawn once with its own seed.

    The same samples (and, for views, the same augmentations) every time it is measured, so the curve
    shows the model changing, not the batch. Raises ``UsageError`` when the shards yield fewer than 2 samples.
    """
    from mmcontrast.data import make_loader

    loader = make_loader(shards, image_transform=transform, tokenizer=tokenizer, views=views, batch_size=samples, workers=0,
                         seed=seed, shuffle_buffer=shuffle_buffer, drop_last=False)
    batch = next(iter(loader), None)  # all of the data when it holds fewer than `samples`
    if batch is None or len(batch["__key__"]) < 2:
        raise UsageError("representation health needs at least 2 usable samples in the shards")
    return batch


def batch_health(embed_pair: Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]], model: nn.Module,
                 batch: dict, views: bool) -> dict[str, float]:
    """``health`` of the pair ``embed_pair(model, batch)`` computes, with the model in eval mode. Inside
    ``distributed.shared_work`` each process embeds its part of the batch and the parts are gathered."""
    from mmcontrast.distributed import gather_parts, sharing, work_share
    from mmcontrast.models import evaluating

    device = next(model.parameters()).device
    part = work_share(len(batch["__key__"]))
    batch = {k: v[part].to(device) if torch.is_tensor(v) else v[part] if isinstance(v, list) else v for k, v in batch.items()}
    with evaluating(model):
        x, y = embed_pair(model, batch)
    if sharing()[1] > 1:
        pairs = gather_parts((x.float().cpu(), y.float().cpu()))
        x, y = (torch.cat([p[i] for p in pairs]) for i in (0, 1))
    return health(x, y, views=views)


# ---------------------------------------------------------------- embeddings of any checkpoint over shards


def preprocess_geometry(preprocess: Callable) -> tuple[int, list[float], list[float]]:
    """(image size, mean, std) of a torchvision ``Compose`` preprocess (open_clip's, or an image encoder's)."""
    size, mean, std = None, None, None
    for t in getattr(preprocess, "transforms", []):
        name = type(t).__name__
        if name == "Normalize":
            mean, std = list(t.mean), list(t.std)
        elif name == "CenterCrop" or (name == "Resize" and size is None):
            size = t.size if isinstance(t.size, int) else t.size[0]
    if size is None or mean is None:
        raise UsageError(f"cannot read the image size and normalisation from this checkpoint's preprocess: {preprocess}")
    return int(size), mean, std


@torch.inference_mode()
def embed_shard_pairs(model: nn.Module, preprocess: Callable, tokenizer: Callable | None, shards: list[str],
                      samples: int = 512, views: bool = False, batch_size: int = 128, workers: int = 0,
                      seed: int = 0, preset: str = "natural") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Embed up to ``samples`` positive pairs from image–caption (or image-only) shards.

    Pairs are (image, caption) through the model's two towers, or with ``views`` (and always for an
    image-only encoder, ``tokenizer=None``) two SimCLR views of each image (``augment.view_transform`` of the preset,
    at the preprocess's size and normalisation), seeded by ``seed``. Samples are a seeded shuffle of
    the shards. Returns x, y: (n, d) float32 on CPU, not normalised, and whether they are two views
    (``health``'s ``views``). ``preset``: the views' recipe (``config.AUGMENT_PRESETS``) — with a strong encoder,
    how often positives are found says whether a recipe's two views still share enough to be matched.
    """
    from mmcontrast import data
    from mmcontrast.shards import check_fields

    views = views or tokenizer is None or not hasattr(model, "encode_text")
    check_fields(shards, need_text=not views)
    if views:
        from mmcontrast.augment import view_transform
        from mmcontrast.config import AugmentConfig, resolve_augment

        aug = AugmentConfig(preset=preset)
        resolve_augment(aug)
        transform, tokenizer = view_transform(aug, *preprocess_geometry(preprocess)), None
    else:
        transform = preprocess
    loader = data.make_loader(shards, image_transform=transform, tokenizer=tokenizer, views=2 if views else 1,
                              batch_size=min(batch_size, samples), workers=workers, seed=seed, drop_last=False)
    device = next(model.parameters()).device
    xs, ys, n = [], [], 0
    for batch in loader:
        take = min(samples - n, len(batch["__key__"]))
        if views:
            x = model.encode_image(batch["view1"][:take].to(device))
            y = model.encode_image(batch["view2"][:take].to(device))
        else:
            x = model.encode_image(batch["image"][:take].to(device))
            y = model.encode_text(batch["text"][:take].to(device))
        xs.append(x.float().cpu())
        ys.append(y.float().cpu())
        n += take
        if n >= samples:
            break
    if n < 2:
        raise UsageError(f"the shards gave {n} usable sample(s); representation health needs at least 2")
    return torch.cat(xs), torch.cat(ys), views
