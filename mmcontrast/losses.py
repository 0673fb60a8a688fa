"""Contrastive losses: CLIP InfoNCE (plain, local, chunked), SigLIP, NT-Xent and SupCon.

Owns the loss arithmetic and its memory-efficient forms. Every function gathers the global batch
across processes with gradients (``mmcontrast.distributed``) when ``torch.distributed`` is
initialised; the gradient convention is the one described there (DDP's averaging makes the
parameter gradients equal the single-process ones). Does not own the learnable temperature: the
model holds ``logit_scale`` (log(1/τ), initialised to log(1/0.07)) and the trainer clamps it.

Modes of ``clip_loss`` (all give the same value and parameter gradients):

* ``plain``   — the full (N, N) logits on every process, as open_clip's ``ClipLoss`` with
  ``gather_with_grad=True``.
* ``local``   — each process computes only its own rows against all columns (open_clip's
  ``local_loss``): 1/world of the compute; the returned value is this rank's share and the mean
  over ranks is the global loss.
* ``chunked`` — never materialises the (N, N) logits: the similarity matrix is tiled in row
  blocks, log-sum-exps are accumulated online, and the backward pass recomputes each tile (a
  custom autograd Function). Peak memory is O(block · N) instead of O(N²). Distributed, it is
  also local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcontrast.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size

CLIP_LOSS_MODES = ("plain", "local", "chunked")

# Elements of one logits tile in the chunked mode: 4M floats = 16 MiB in float32. Small enough
# to be negligible next to a model's activations, large enough that each matmul stays efficient.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _block_rows(n_rows: int, n_cols: int, chunk_elements: int) -> int:
    return max(1, min(n_rows, chunk_elements // max(n_cols, 1)))


class _ChunkedSymmetricInfoNCE(torch.autograd.Function):
    """Symmetric InfoNCE over all N pairs, tiled in row blocks.

    Forward keeps only the row and column log-sum-exps (two vectors of N); backward recomputes
    every tile, so peak extra memory is a few (block, N) tiles.
    """

    @staticmethod
    def forward(ctx, a, b, scale, block):  # type: ignore[override]
        # a, b: (N, d) L2-normalised; scale: 0-dim multiplier
        n = a.shape[0]
        row_lse = a.new_empty(n)
        col_max = a.new_full((n,), float("-inf"))
        col_sum = a.new_zeros(n)
        for i0 in range(0, n, block):
            logits = (a[i0 : i0 + block] @ b.T).mul_(scale)  # (c, N)
            row_lse[i0 : i0 + block] = torch.logsumexp(logits, dim=1)
            new_max = torch.maximum(col_max, logits.amax(dim=0))
            col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(logits - new_max).sum(dim=0)
            col_max = new_max
        col_lse = col_max + torch.log(col_sum)
        diag = (a * b).sum(dim=1) * scale
        loss = ((row_lse - diag).mean() + (col_lse - diag).mean()) / 2
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.block = block
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        n, block = a.shape[0], ctx.block
        grad_a = torch.empty_like(a)
        grad_b = torch.zeros_like(b)
        grad_s = torch.zeros((), dtype=a.dtype, device=a.device)
        coef = grad_out / (2 * n)
        for i0 in range(0, n, block):
            a_blk = a[i0 : i0 + block]
            c = a_blk.shape[0]
            sim = a_blk @ b.T  # (c, N)
            logits = sim * scale
            # dL/dlogits = (softmax over the row + softmax over the column - 2·identity) / 2N
            g = torch.exp(logits - row_lse[i0 : i0 + c, None]).add_(torch.exp(logits - col_lse[None, :]))
            idx = torch.arange(c, device=a.device)
            g[idx, idx + i0] -= 2
            g.mul_(coef)
            grad_a[i0 : i0 + c] = (g @ b).mul_(scale)
            grad_b.addmm_(g.T, a_blk)
            grad_s += (g * sim).sum()
        grad_b.mul_(scale)
        return grad_a, grad_b, grad_s.reshape(scale.shape).to(scale.dtype), None


class _ChunkedRowCrossEntropy(torch.autograd.Function):
    """mean_i [ logsumexp_j(s·q_i·k_j) − s·q_i·k_{offset+i} ], tiled in row blocks.

    The one-directional building block of the distributed chunked mode: q holds this rank's rows,
    k every rank's columns, and the positives sit at ``offset + i``.
    """

    @staticmethod
    def forward(ctx, q, k, scale, offset, block):  # type: ignore[override]
        m = q.shape[0]
        lse = q.new_empty(m)
        for i0 in range(0, m, block):
            lse[i0 : i0 + block] = torch.logsumexp((q[i0 : i0 + block] @ k.T).mul_(scale), dim=1)
        pos = (q * k[offset : offset + m]).sum(dim=1) * scale
        ctx.save_for_backward(q, k, scale, lse)
        ctx.offset, ctx.block = offset, block
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, scale, lse = ctx.saved_tensors
        m, offset, block = q.shape[0], ctx.offset, ctx.block
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_s = torch.zeros((), dtype=q.dtype, device=q.device)
        coef = grad_out / m
        for i0 in range(0, m, block):
            q_blk = q[i0 : i0 + block]
            c = q_blk.shape[0]
            sim = q_blk @ k.T  # (c, N)
            g = torch.exp(sim * scale - lse[i0 : i0 + c, None])
            idx = torch.arange(c, device=q.device)
            g[idx, idx + offset + i0] -= 1
            g.mul_(coef)
            grad_q[i0 : i0 + c] = (g @ k).mul_(scale)
            grad_k.addmm_(g.T, q_blk)
            grad_s += (g * sim).sum()
        grad_k.mul_(scale)
        return grad_q, grad_k, grad_s.reshape(scale.shape).to(scale.dtype), None, None


def _as_scalar_tensor(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x):
        x = torch.tensor(float(x))
    return x.to(device=like.device, dtype=like.dtype).reshape(())


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    mode: str = "plain",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP: the mean of the image→text and text→image cross-entropies.

    Args:
        image_features: (n, d) L2-normalised, this process's batch.
        text_features: (n, d) L2-normalised; row i is the caption of image i.
        logit_scale: the multiplier 1/τ, already exponentiated (scalar tensor), as open_clip passes it.
        mode: ``plain``, ``local`` or ``chunked`` (see the module docstring).
        chunk_elements: size of one logits tile in the chunked mode.

    Returns:
        The scalar loss (this rank's share in the local and distributed-chunked modes).

    Example:
        >>> img = F.normalize(torch.randn(8, 32), dim=-1); txt = F.normalize(torch.randn(8, 32), dim=-1)
        >>> clip_loss(img, txt, torch.tensor(1 / 0.07)).shape
        torch.Size([])
    """
    if mode not in CLIP_LOSS_MODES:
        raise ValueError(f"clip_loss mode must be one of {CLIP_LOSS_MODES}, got {mode!r}")
    scale = _as_scalar_tensor(logit_scale, image_features)
    n = image_features.shape[0]
    all_img = all_gather_with_grad(image_features)  # (N, d)
    all_txt = all_gather_with_grad(text_features)
    offset = rank() * n
    if mode == "chunked":
        if world_size() == 1:
            block = _block_rows(n, n, chunk_elements)
            return _ChunkedSymmetricInfoNCE.apply(image_features, text_features, scale, block)
        block = _block_rows(n, all_img.shape[0], chunk_elements)
        i2t = _ChunkedRowCrossEntropy.apply(image_features, all_txt, scale, offset, block)
        t2i = _ChunkedRowCrossEntropy.apply(text_features, all_img, scale, offset, block)
        return (i2t + t2i) / 2
    if mode == "local":
        labels = torch.arange(n, device=image_features.device) + offset
        logits_per_image = scale * image_features @ all_txt.T  # (n, N)
        logits_per_text = scale * text_features @ all_img.T
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    logits = scale * all_img @ all_txt.T  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al., 2023), equal to open_clip's ``SigLipLoss``.

    Each process scores its own images against every process's captions; the sum over pairs is
    divided by the local batch, so the mean over ranks is the single-process loss.
    """
    scale = _as_scalar_tensor(logit_scale, image_features)
    bias = _as_scalar_tensor(logit_bias, image_features)
    n = image_features.shape[0]
    all_txt = all_gather_with_grad(text_features)  # (N, d)
    logits = scale * image_features @ all_txt.T + bias  # (n, N)
    labels = -torch.ones_like(logits)
    idx = torch.arange(n, device=logits.device)
    labels[idx, idx + rank() * n] = 1
    return -F.logsigmoid(labels * logits).sum() / n


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent of SimCLR over the 2N views of the global batch.

    Args:
        z1, z2: (n, d) projections of the two views; ``z1[i]`` and ``z2[i]`` are the same sample.
            Normalised here.
        temperature: τ; logits are cosine similarities / τ.

    Each view's positive is its twin; the other 2N − 2 views are negatives and its own similarity
    is masked out. Returns the mean over all 2N anchors (this rank's share when distributed).
    """
    n = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2n, d): views 1 then views 2
    everyone = all_gather_with_grad(local)  # (2N, d), rank-major blocks of 2n
    logits = local @ everyone.T / temperature  # (2n, 2N)
    base = rank() * 2 * n
    idx = torch.arange(2 * n, device=logits.device)
    logits[idx, base + idx] = float("-inf")
    positives = base + (idx + n) % (2 * n)
    return F.cross_entropy(logits, positives)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, L_out): every same-label sample is a positive.

    Args:
        features: (m, d) or (n, views, d); normalised here.
        labels: (m,) or (n,) integer labels (repeated across views for the 3-D form).
        temperature: τ.

    Anchors without any positive are left out of the mean. With two views per sample and each
    label shared only by a view pair, this equals ``nt_xent_loss``.
    """
    if features.dim() == 3:
        views = features.shape[1]
        features = features.transpose(0, 1).reshape(-1, features.shape[-1])  # view-major (views·n, d)
        labels = labels.repeat(views)
    local = F.normalize(features, dim=-1)
    m = local.shape[0]
    everyone = all_gather_with_grad(local)  # (M, d)
    all_labels = all_gather_no_grad(labels.to(local.device))
    logits = local @ everyone.T / temperature  # (m, M)
    idx = torch.arange(m, device=logits.device)
    self_cols = rank() * m + idx
    logits[idx, self_cols] = float("-inf")
    log_prob = torch.log_softmax(logits, dim=1)
    positive = labels.to(local.device)[:, None] == all_labels[None, :]
    positive[idx, self_cols] = False
    n_pos = positive.sum(dim=1)
    per_anchor = -log_prob.masked_fill(~positive, 0).sum(dim=1) / n_pos.clamp(min=1)
    # Normalise by the global number of anchors with a positive, so ranks' shares average exactly.
    global_pos = (all_labels[:, None] == all_labels[None, :]).sum(dim=1) > 1
    valid = n_pos > 0
    return per_anchor[valid].sum() * world_size() / global_pos.sum().clamp(min=1)
