"""Losses equal their definitions: naive loop references, open_clip's ClipLoss/SigLipLoss, and each other.

Single process, float64 unless a test is about float32 overflow. The two-process checks live in
``test_distributed.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mmcontrast.losses import CLIP_LOSS_MODES, clip_loss, nt_xent_loss, siglip_loss, supcon_loss

# Float64 throughout, so any disagreement beyond round-off is a bug, not noise.
TOL = {"rtol": 1e-5, "atol": 1e-9}


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def unit_leaf(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, d) L2-normalised rows, a leaf that records its gradient."""
    return F.normalize(randn(n, d, seed=seed, dtype=dtype), dim=-1).requires_grad_()


def scale_leaf(tau: float) -> torch.Tensor:
    return torch.tensor(1 / tau, dtype=torch.float64, requires_grad=True)


def value_and_grads(loss_fn, *inputs: torch.Tensor, upstream: float = 1.7):
    """The loss and the gradient of ``upstream * loss`` w.r.t. every input (fresh leaves each call)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    (upstream * loss).backward()
    return loss.detach(), [x.grad for x in leaves]


def naive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's definition, one row and one column at a time, with an unstabilised softmax."""
    n = img.shape[0]
    image_to_text = []
    text_to_image = []
    for i in range(n):
        row = torch.exp(scale * (txt @ img[i]))  # image i against every caption
        image_to_text.append(-torch.log(row[i] / row.sum()))
        col = torch.exp(scale * (img @ txt[i]))  # caption i against every image
        text_to_image.append(-torch.log(col[i] / col.sum()))
    return (torch.stack(image_to_text).mean() + torch.stack(text_to_image).mean()) / 2


# (N, d, τ): N=1, N not divisible by the 3-row tile, N below and above d, cold and hot τ.
CLIP_CASES = [(1, 8, 0.07), (2, 3, 1.0), (13, 32, 0.01), (37, 5, 0.5), (64, 16, 0.07)]


@pytest.mark.parametrize("mode", CLIP_LOSS_MODES)
@pytest.mark.parametrize(("n", "d", "tau"), CLIP_CASES)
def test_clip_loss_matches_naive_reference_and_open_clip(mode: str, n: int, d: int, tau: float) -> None:
    img, txt, scale = unit_leaf(n, d, seed=n), unit_leaf(n, d, seed=1000 + n), scale_leaf(tau)
    # 3·n elements per tile = 3 rows: the chunked mode really tiles, with a ragged last tile.
    ours = value_and_grads(lambda a, b, s: clip_loss(a, b, s, mode=mode, chunk_elements=3 * n), img, txt, scale)
    naive = value_and_grads(naive_clip_loss, img, txt, scale)
    theirs = value_and_grads(ClipLoss(), img, txt, scale)
    for reference in (naive, theirs):
        torch.testing.assert_close(ours[0], reference[0], **TOL)
        for got, want in zip(ours[1], reference[1]):  # d/dimage, d/dtext, d/dlogit_scale
            torch.testing.assert_close(got, want, **TOL)


def test_chunked_with_one_row_tiles_and_a_float_scale_matches_plain() -> None:
    img, txt = unit_leaf(9, 4, seed=1), unit_leaf(9, 4, seed=2)
    chunked = value_and_grads(lambda a, b: clip_loss(a, b, 14.3, mode="chunked", chunk_elements=1), img, txt)
    plain = value_and_grads(lambda a, b: clip_loss(a, b, 14.3, mode="plain"), img, txt)
    torch.testing.assert_close(chunked[0], plain[0], **TOL)
    for got, want in zip(chunked[1], plain[1]):
        torch.testing.assert_close(got, want, **TOL)


def test_chunked_clip_loss_passes_gradcheck() -> None:
    img, txt, scale = unit_leaf(7, 3, seed=3), unit_leaf(7, 3, seed=4), scale_leaf(0.2)
    assert torch.autograd.gradcheck(
        lambda a, b, s: clip_loss(a, b, s, mode="chunked", chunk_elements=6), (img, txt, scale)
    )


def test_chunked_matches_plain_in_float32_at_tau_001() -> None:
    img, txt = unit_leaf(1024, 32, seed=5, dtype=torch.float32), unit_leaf(1024, 32, seed=6, dtype=torch.float32)
    scale = torch.tensor(100.0, requires_grad=True)
    chunked = value_and_grads(lambda a, b, s: clip_loss(a, b, s, mode="chunked", chunk_elements=1 << 16), img, txt, scale)
    plain = value_and_grads(lambda a, b, s: clip_loss(a, b, s, mode="plain"), img, txt, scale)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(chunked[1], plain[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # a 32768 x 32768 tiled loss on the CPU: ~30 s quiet; the fp32 tau 0.01 test covers chunking in CI
def test_chunked_no_overflow_at_tau_001_and_n_32768() -> None:
    # float32 exp overflows above 88.7; logits here reach 100 (τ = 0.01, cosines near 1 for d = 8).
    n, d = 32768, 8
    img = unit_leaf(n, d, seed=7, dtype=torch.float32)
    txt = F.normalize(img.detach() + 0.3 * randn(n, d, seed=8, dtype=torch.float32), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    loss = clip_loss(img, txt, scale, mode="chunked")
    loss.backward()
    # lse_i − positive_i ≤ (scale + log N) − (−scale) for unit vectors
    assert torch.isfinite(loss) and 0 < loss.item() < 2 * 100 + math.log(n)
    for grad in (img.grad, txt.grad, scale.grad):
        assert torch.isfinite(grad).all()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


def log_mean_exp_cosine(d: int) -> float:
    """log E[exp(u·v)] for independent uniform unit vectors in R^d: log ₀F₁(; d/2; 1/4) = 1/(2d) + O(1/d²)."""
    return math.log(sum(0.25**k / (math.gamma(d / 2 + k) / math.gamma(d / 2) * math.factorial(k)) for k in range(30)))


@pytest.mark.parametrize(("mode", "n"), [("plain", 2048), ("chunked", 8192)])
def test_random_features_at_scale_one_give_log_n(mode: str, n: int) -> None:
    # Each cross-entropy is mean_i [lse_j(u_i·v_j) − u_i·v_i]. For independent unit vectors
    # lse_j = log N + log mean_j exp(u_i·v_j) → log N + log E exp(u·v) = log N + 1/(2d) + O(1/d²),
    # and the cosines have variance 1/d, so both the lse and the positive term average N values
    # with standard deviation ≤ 1/√(dN) each: the loss sits within 6·√2/√(dN) of its expectation.
    d = 8
    img = F.normalize(randn(n, d, seed=9, dtype=torch.float32), dim=-1)
    txt = F.normalize(randn(n, d, seed=10, dtype=torch.float32), dim=-1)
    loss = clip_loss(img, txt, torch.tensor(1.0), mode=mode).item()
    expected = math.log(n) + log_mean_exp_cosine(d)
    assert abs(loss - expected) < 6 * math.sqrt(2 / (d * n))
    assert abs(loss - math.log(n)) < 1 / (2 * d) + 6 * math.sqrt(2 / (d * n))


def test_siglip_loss_matches_open_clip() -> None:
    img, txt = unit_leaf(11, 6, seed=11), unit_leaf(11, 6, seed=12)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-10.0, dtype=torch.float64)
    ours = value_and_grads(siglip_loss, img, txt, scale, bias)
    theirs = value_and_grads(SigLipLoss(), img, txt, scale, bias)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    for got, want in zip(ours[1], theirs[1]):  # image, text, scale, bias
        torch.testing.assert_close(got, want, **TOL)


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's ℓ(i, j) = −log exp(sim(i,j)/τ) / Σ_{k≠i} exp(sim(i,k)/τ), averaged over all 2n anchors."""
    views = torch.cat([z1, z2])
    n2 = views.shape[0]
    terms = []
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sims = [F.cosine_similarity(views[i], views[k], dim=0) / tau for k in range(n2)]
        denominator = sum(torch.exp(sims[k]) for k in range(n2) if k != i)
        terms.append(-torch.log(torch.exp(sims[j]) / denominator))
    return torch.stack(terms).mean()


def test_nt_xent_matches_naive_loop() -> None:
    z1, z2 = randn(6, 5, seed=13), randn(6, 5, seed=14)  # unnormalised: the loss normalises
    ours = value_and_grads(lambda a, b: nt_xent_loss(a, b, temperature=0.2), z1, z2)
    naive = value_and_grads(lambda a, b: naive_nt_xent(a, b, 0.2), z1, z2)
    torch.testing.assert_close(ours[0], naive[0], **TOL)
    for got, want in zip(ours[1], naive[1]):
        torch.testing.assert_close(got, want, **TOL)


def test_supcon_equals_nt_xent_when_labels_mark_view_pairs() -> None:
    n, tau = 8, 0.1
    z1, z2 = randn(n, 16, seed=15), randn(n, 16, seed=16)
    expected = value_and_grads(lambda a, b: nt_xent_loss(a, b, temperature=tau), z1, z2)

    stacked = value_and_grads(
        lambda a, b: supcon_loss(torch.stack([a, b], dim=1), torch.arange(n), temperature=tau), z1, z2
    )  # the (n, views, d) form
    order = torch.randperm(2 * n, generator=torch.Generator().manual_seed(0))
    shuffled = value_and_grads(  # the (2n, d) form, rows in any order
        lambda a, b: supcon_loss(torch.cat([a, b])[order], torch.arange(n).repeat(2)[order], temperature=tau),
        z1,
        z2,
    )
    for got in (stacked, shuffled):
        torch.testing.assert_close(got[0], expected[0], **TOL)
        for g, want in zip(got[1], expected[1]):
            torch.testing.assert_close(g, want, **TOL)


def naive_supcon(features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Khosla et al. eq. 2 (L_out), one anchor at a time; anchors without a positive are skipped."""
    z = F.normalize(features, dim=-1)
    m = z.shape[0]
    per_anchor = []
    for i in range(m):
        others = [a for a in range(m) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(z[i] @ z[a] / tau) for a in others)
        log_probs = [torch.log(torch.exp(z[i] @ z[p] / tau) / denominator) for p in positives]
        per_anchor.append(-torch.stack(log_probs).mean())
    return torch.stack(per_anchor).mean()


def test_supcon_matches_naive_loop_with_several_positives() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 2, 3, 0, 1, 2, 2])  # classes of 4, 3, 4 and one loner
    features = randn(12, 5, seed=17)
    ours = value_and_grads(lambda f: supcon_loss(f, labels, temperature=0.3), features)
    naive = value_and_grads(lambda f: naive_supcon(f, labels, 0.3), features)
    torch.testing.assert_close(ours[0], naive[0], **TOL)
    torch.testing.assert_close(ours[1][0], naive[1][0], **TOL)


def test_mismatched_or_unknown_inputs_are_rejected() -> None:
    a, b = unit_leaf(4, 3, seed=0), unit_leaf(5, 3, seed=1)
    with pytest.raises(ValueError, match="mode"):
        clip_loss(a, a, 1.0, mode="tiled")
    for mode in CLIP_LOSS_MODES:
        with pytest.raises(ValueError, match="same shape"):
            clip_loss(a, b, 1.0, mode=mode)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(a, b)
