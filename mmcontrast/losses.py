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

import math

import torch
import torch.nn.functional as F

from mmcontrast.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size

CLIP_LOSS_MODES = ("plain", "local", "chunked")

# Elements of one logits tile in the chunked mode: 4M floats = 16 MiB in float32. Small enough
# to be negligible next to a model's activations, large enough that each matmul stays efficient.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _block_rows(n_rows: int, n_cols: int, chunk_elements: int) -> int:
    return max(1, min(n_rows, chunk_elements // max(n_cols, 1)))


def _scaled_logits(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """scale · rows @ colsᵀ written into ``out`` (c, N); scaling the (c, d) side saves a pass over (c, N)."""
    return torch.mm(rows * scale, cols.T, out=out)


def _exp_floor(x: torch.Tensor, scale: torch.Tensor, n_cols: int) -> float | None:
    """The exponent to clamp at before ``exp_`` on the CPU, or None to leave exponents alone.

    The CPU's exp is about 5x slower for arguments whose result is below the smallest normal
    number, and a large logit_scale puts most of a tile there. Every exponent in this module is
    taken relative to a maximum or a log-sum-exp, so each sum also holds a term of at least 1/N:
    raising the tiny terms to e·``finfo.tiny`` moves a sum by at most 3·N·tiny, far below rounding
    (which rules out float16, whose tiny is large). Unit-norm features keep every exponent above
    −(2·scale + log N), so at ordinary scales there is nothing to clamp and no extra pass.
    """
    if x.device.type != "cpu":
        return None
    info = torch.finfo(x.dtype)
    floor = math.log(info.tiny) + 1  # one nat of margin: exp(float32(log tiny)) is already subnormal
    if n_cols * info.tiny > 1e-6 * info.eps or 2 * abs(float(scale)) + math.log(n_cols) < -floor:
        return None
    return floor


def _exp_(x: torch.Tensor, floor: float | None) -> torch.Tensor:
    return (x if floor is None else x.clamp_min_(floor)).exp_()


def _logsumexp_rows(logits: torch.Tensor, work: torch.Tensor, floor: float | None) -> torch.Tensor:
    """Row log-sum-exp of ``logits`` (c, N), using ``work`` (c, N) as scratch; ``logits`` is kept."""
    row_max = logits.amax(dim=1, keepdim=True)
    total = _exp_(torch.sub(logits, row_max, out=work), floor).sum(dim=1)
    return total.log_().add_(row_max.squeeze(1))


def _tiles(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, block: int):
    """Yield ``(i0, logits)`` for each block of rows: ``logits`` (c, N) = scale · rows[i0:i0+c] @ colsᵀ.

    One (block, N) buffer serves every tile; a tile is valid until the next one is requested and may be
    overwritten in place by the caller.
    """
    buffer = rows.new_empty(block, cols.shape[0])
    for i0 in range(0, rows.shape[0], block):
        c = min(block, rows.shape[0] - i0)
        yield i0, _scaled_logits(rows[i0 : i0 + c], cols, scale, out=buffer[:c])


def _tiled_backward(rows, cols, scale, block, tile_grad, coef, need_cols_grad: bool):
    """Gradients of a loss of ``logits = scale · rows @ colsᵀ`` w.r.t. rows, cols and scale, tile by tile.

    ``tile_grad(i0, logits)`` turns a tile of logits (c, N) into ``dL/dlogits / coef`` for those rows (it may
    work in place); nothing of size (N, N) is ever held. Returns ``(grad_rows, grad_cols, grad_scale)``.
    """
    grad_rows = torch.empty_like(rows)
    grad_cols = torch.zeros_like(cols)
    grad_s = torch.zeros((), dtype=rows.dtype, device=rows.device)
    for i0, logits in _tiles(rows, cols, scale, block):
        blk = rows[i0 : i0 + logits.shape[0]]
        g = tile_grad(i0, logits)  # (c, N)
        g_cols = g @ cols  # (c, d)
        grad_rows[i0 : i0 + len(blk)] = g_cols
        grad_s += (blk * g_cols).sum()  # Σ g ∘ (rows colsᵀ) without another (c, N) pass
        if need_cols_grad:
            grad_cols.addmm_(g.T, blk)
    grad_rows.mul_(coef * scale)
    grad_cols.mul_(coef * scale)
    return grad_rows, grad_cols, (grad_s * coef).reshape(scale.shape).to(scale.dtype)


class _ChunkedSymmetricInfoNCE(torch.autograd.Function):
    """Symmetric InfoNCE over all N pairs, tiled in row blocks.

    Forward keeps only the row and column log-sum-exps (two vectors of N); backward recomputes
    every tile. Two (block, N) buffers are allocated once and reused by every tile, and the
    exponentials are taken in place, so peak extra memory is 2 · block · N elements.
    """

    @staticmethod
    def forward(ctx, a, b, scale, block):  # type: ignore[override]
        # a, b: (N, d) L2-normalised; scale: 0-dim multiplier
        n = a.shape[0]
        row_lse = a.new_empty(n)
        col_max = a.new_full((n,), float("-inf"))
        col_sum = a.new_zeros(n)  # Σ_i exp(logits[i, j] − col_max[j]) over the tiles seen so far
        work = a.new_empty(block, n)
        floor = _exp_floor(a, scale, n)
        for i0, logits in _tiles(a, b, scale, block):
            c = logits.shape[0]
            row_lse[i0 : i0 + c] = _logsumexp_rows(logits, work[:c], floor)
            new_max = torch.maximum(col_max, logits.amax(dim=0))
            col_sum.mul_(torch.exp(col_max - new_max)).add_(_exp_(logits.sub_(new_max), floor).sum(dim=0))
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
        work = a.new_empty(block, n)
        floor = _exp_floor(a, scale, n)

        def tile_grad(i0: int, logits: torch.Tensor) -> torch.Tensor:
            # 2N · dL/dlogits = softmax over the row + softmax over the column − 2·identity
            c = logits.shape[0]
            row_softmax = _exp_(torch.sub(logits, row_lse[i0 : i0 + c, None], out=work[:c]), floor)
            g = _exp_(logits.sub_(col_lse), floor).add_(row_softmax)
            g.diagonal(i0).sub_(2)
            return g

        grads = _tiled_backward(a, b, scale, block, tile_grad, grad_out / (2 * n), ctx.needs_input_grad[1])
        return *grads, None


class _ChunkedRowCrossEntropy(torch.autograd.Function):
    """mean_i [ logsumexp_j(s·q_i·k_j) − s·q_i·k_{offset+i} ], tiled in row blocks.

    The one-directional building block of the distributed chunked mode: q holds this rank's rows,
    k every rank's columns, and the positives sit at ``offset + i``.
    """

    @staticmethod
    def forward(ctx, q, k, scale, offset, block):  # type: ignore[override]
        m, n_cols = q.shape[0], k.shape[0]
        lse = q.new_empty(m)
        work = q.new_empty(block, n_cols)
        floor = _exp_floor(q, scale, n_cols)
        for i0, logits in _tiles(q, k, scale, block):
            lse[i0 : i0 + logits.shape[0]] = _logsumexp_rows(logits, work[: logits.shape[0]], floor)
        pos = (q * k[offset : offset + m]).sum(dim=1) * scale
        ctx.save_for_backward(q, k, scale, lse)
        ctx.offset, ctx.block = offset, block
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, scale, lse = ctx.saved_tensors
        m, offset = q.shape[0], ctx.offset
        floor = _exp_floor(q, scale, k.shape[0])

        def tile_grad(i0: int, logits: torch.Tensor) -> torch.Tensor:
            g = _exp_(logits.sub_(lse[i0 : i0 + logits.shape[0], None]), floor)  # m · dL/dlogits = softmax − identity
            g.diagonal(offset + i0).sub_(1)
            return g

        grads = _tiled_backward(q, k, scale, ctx.block, tile_grad, grad_out / m, ctx.needs_input_grad[1])
        return *grads, None, None


def _check_pairs(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{names} must be paired (n, d) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


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
    _check_pairs(image_features, text_features, "image_features and text_features")
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
    _check_pairs(image_features, text_features, "image_features and text_features")
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
    _check_pairs(z1, z2, "z1 and z2")
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
