"""Held-out pairs and labelled samples measured while training: ``val/*`` metrics from ``data.val_shards``.

``validation`` builds, once at start-up, the function the loop's monitor calls at ``log.val_every``: each process
reads and encodes its part of the held-out shards (``distributed.shared_work``), the embeddings are gathered and
ordered by sample key, and ``held_out_metrics`` gives the loss, retrieval recall (pairs) or classification scores
(labels) over all of them. Owns no model and no loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from mmcontrast.errors import UsageError
from mmcontrast.evaluate import RECALL_KS, retrieval_recall


@torch.inference_mode()
def held_out_metrics(model: nn.Module, batches: Iterator[dict], inputs: Callable[[dict], tuple],
                     loss: Callable[[Sequence[torch.Tensor], torch.Tensor | None], torch.Tensor], block: int,
                     names: tuple[str, str], n_embeddings: int = 2, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """The training loss and retrieval recall@K between a model's two embeddings of held-out samples.

    ``inputs``/``loss`` are the task's (``mmcontrast.tasks``): the loss is averaged over blocks of ``block``
    samples (the training global batch, so the number compares with the training loss; a shorter last
    block is left out unless it is the only one). Recall: ``names[0]`` → ``names[1]`` and back, over all
    samples, as ``retrieval_recall`` (pairs (i, i)). The model's outputs are ``n_embeddings`` per-sample
    embeddings, then scalars (logit scale, bias). The loss gathers nothing inside ``distributed.local_only``:
    every process that calls it computes the same numbers on its own. Inside ``distributed.shared_work`` each
    process passes the batches of its part of the samples; the outputs are gathered and ordered by sample key, as
    they are in one process, so the numbers do not depend on how many processes read them.
    """
    device = next(model.parameters()).device
    a, b, scalars, labels = _held_out_outputs(model, batches, inputs, n_embeddings)
    if a is None:
        raise UsageError("the validation shards gave no full batch; give more held-out samples or lower the batch size")
    a, b, scalars = a.to(device), b.to(device), [s.to(device) for s in scalars]
    starts = range(0, max(1, len(a) - block + 1), block) if len(a) >= block else [0]
    label = torch.tensor(labels, device=device) if labels else None  # (N,) for a loss on labels (SupCon)
    losses = [float(loss([a[s : s + block], b[s : s + block], *scalars], None if label is None else label[s : s + block]))
              for s in starts]
    a, b = nn.functional.normalize(a, dim=-1), nn.functional.normalize(b, dim=-1)
    recall = retrieval_recall(a, b, torch.arange(len(a)), ks)
    out = {"val/loss": float(np.mean(losses)), "val/samples": float(len(a))}
    for direction, (x, y) in zip(("image_to_text", "text_to_image"), (names, names[::-1])):
        out.update({f"val/{x}_to_{y}_{k}": v for k, v in recall[direction].items()})
    return out


def _held_out_outputs(model: nn.Module, batches: Iterator[dict], inputs: Callable[[dict], tuple],
                      n_embeddings: int) -> tuple[torch.Tensor | None, torch.Tensor | None, list, list]:
    """The model's two embeddings ``(N, d)`` float32 on the CPU, its scalars and the labels of every process's
    ``batches`` (``distributed.gather_parts``), ordered by sample key; ``(None, None, [], [])`` without samples."""
    from mmcontrast.distributed import gather_parts

    device = next(model.parameters()).device
    keys, a, b, labels, scalars = [], [], [], [], []
    for batch in batches:
        out = model(*(x.to(device) for x in inputs(batch)))
        keys.extend(batch["__key__"])
        a.append(out[0].float().cpu())
        b.append(out[1].float().cpu())
        labels.extend(batch["label"].tolist() if "label" in batch else [])
        scalars = scalars or [s.float().cpu() for s in out[n_embeddings:]]
    parts = [p for p in gather_parts((keys, a, b, labels, scalars)) if p[0]]
    if not parts:
        return None, None, [], []
    keys = [k for p in parts for k in p[0]]
    order = sorted(range(len(keys)), key=keys.__getitem__)  # stable: one order however the samples were split
    a_all, b_all = (torch.cat([t for p in parts for t in p[i]])[order] for i in (1, 2))
    labels = [label for p in parts for label in p[3]]
    return a_all, b_all, parts[0][4], [labels[i] for i in order] if labels else []


def validation(cfg, task, global_batch: int, accelerator) -> Callable | None:
    """``model -> val/* metrics`` on ``data.val_shards`` (checked now, at start-up, by the first process, which
    counts their samples once for all when several readers split them), or None without them. Inside
    ``distributed.shared_work`` each process reads and encodes its part of the samples (split by sample)."""
    if not cfg.data.val_shards:
        return None
    from mmcontrast.data import make_loader
    from mmcontrast.distributed import on_first_process, sharing
    from mmcontrast.shards import check_fields, expand_shards, shard_sample_counts

    shards = expand_shards(cfg.data.val_shards)
    several_readers = accelerator.num_processes * max(cfg.data.workers, 1) > 1  # one reader needs no split by sample

    def counted() -> list | None:  # once, not per validation nor per process (64 processes, one object store)
        check_fields(shards, need_text=task.tokenizer is not None)
        return shard_sample_counts(shards, cfg.data.read_timeout) if several_readers else None

    counts = on_first_process(accelerator, counted)

    def validate(model) -> dict:
        part, parts = sharing()
        loader = make_loader(shards, image_transform=task.health_transform, tokenizer=task.tokenizer, views=task.views,
                             batch_size=min(global_batch, 256), workers=cfg.data.workers, seed=cfg.train.seed, counts=counts,
                             rank=part, world_size=parts,
                             shuffle=False, drop_last=False, with_labels=task.with_labels, classes=task.classes,
                             read_timeout=cfg.data.read_timeout)
        return held_out_metrics(model, iter(loader), task.inputs, task.loss, global_batch, task.pair_names, task.n_embeddings)

    return validate
