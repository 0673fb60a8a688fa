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

``health`` bundles them; ``collapse_warnings`` turns them into warning lines. Does not own where the
embeddings come from (the trainer's fixed batch, or ``mmcontrast diagnose`` over shards).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """E‖x_i − y_i‖^alpha over positive pairs; x, y: (n, d) L2-normalised."""
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """log E_{i<j} exp(−t‖x_i − x_j‖²); x: (n, d) L2-normalised, n ≥ 2."""
    return float(torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log())


def effective_rank(x: torch.Tensor) -> float:
    """exp(H(p)) with p the singular values of x (n, d) normalised to sum 1 (Roy & Vetterli)."""
    s = torch.linalg.svdvals(x.double())
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


def _positive_ranks(x: torch.Tensor, y: torch.Tensor, views: bool) -> torch.Tensor:
    """1-based rank of each anchor's positive among its candidates.

    ``views=False`` (CLIP): candidates of x_i are all y_j. ``views=True`` (SimCLR): the 2n−1 other
    views, the positive of view i being its twin.
    """
    if not views:
        sim = x @ y.T  # (n, n)
        pos = sim.diagonal()[:, None]
        return (sim > pos).sum(dim=1) + 1
    n = x.shape[0]
    z = torch.cat([x, y])  # (2n, d)
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))
    idx = torch.arange(2 * n, device=z.device)
    pos = sim[idx, (idx + n) % (2 * n)][:, None]
    return (sim > pos).sum(dim=1) + 1


def positive_accuracy(x: torch.Tensor, y: torch.Tensor, views: bool) -> float:
    return float((_positive_ranks(x, y, views) == 1).float().mean())


def positive_rank(x: torch.Tensor, y: torch.Tensor, views: bool) -> float:
    return float(_positive_ranks(x, y, views).float().mean())


def batch_monitor(x: torch.Tensor, y: torch.Tensor, views: bool) -> dict[str, float]:
    """The two cheap numbers logged at every log step from the step's own embeddings."""
    x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    return {"positive_accuracy": positive_accuracy(x, y, views), "embedding_std": embedding_std(torch.cat([x, y]))}


def health(x: torch.Tensor, y: torch.Tensor, views: bool, top_k: int = 10) -> dict[str, float]:
    """All metrics for paired embeddings x, y (n, d) (normalised here); ``views`` as in ``positive_accuracy``.

    Keys: alignment, uniformity, effective_rank (and its fraction of d), top_k_variance_share,
    embedding_std (and its ratio to 1/√d), positive_accuracy, positive_rank, and in CLIP mode
    modality_gap plus per-modality uniformity and effective rank.
    """
    x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    both = torch.cat([x, y])
    d = x.shape[1]
    erank = effective_rank(both)
    std = embedding_std(both)
    out = {
        "alignment": alignment(x, y),
        "uniformity": uniformity(both),
        "effective_rank": erank,
        "effective_rank_fraction": erank / min(d, both.shape[0]),
        f"top{top_k}_variance_share": top_k_variance_share(both, top_k),
        "embedding_std": std,
        "embedding_std_ratio": std * math.sqrt(d),
        "positive_accuracy": positive_accuracy(x, y, views),
        "positive_rank": positive_rank(x, y, views),
    }
    if not views:
        out.update(
            modality_gap=modality_gap(x, y),
            image_uniformity=uniformity(x),
            text_uniformity=uniformity(y),
            image_effective_rank=effective_rank(x),
            text_effective_rank=effective_rank(y),
        )
    return out


def collapse_warnings(metrics: dict[str, float], min_rank_fraction: float, min_std_ratio: float) -> list[str]:
    """Warning lines when the effective rank or the embedding std fall below their thresholds."""
    lines = []
    frac = metrics.get("effective_rank_fraction")
    if frac is not None and frac < min_rank_fraction:
        lines.append(
            f"dimensional collapse: effective rank {metrics['effective_rank']:.1f} is {frac:.1%} of the dimension "
            f"(threshold {min_rank_fraction:.0%}); try a lower learning rate, a larger batch, or a higher temperature"
        )
    ratio = metrics.get("embedding_std_ratio")
    if ratio is not None and ratio < min_std_ratio:
        lines.append(
            f"embedding collapse: per-dimension std is {ratio:.2f}/sqrt(d) (threshold {min_std_ratio:.2f}/sqrt(d)); "
            "embeddings are converging to a point"
        )
    return lines
