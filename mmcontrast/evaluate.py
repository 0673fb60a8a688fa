"""Evaluating encoders: image pipelines, embeddings, zero-shot, retrieval, linear probe and kNN.

Owns finding images on disk, decoding them in DataLoader worker processes (an unreadable image
becomes an error entry, never a crash), running an encoder over them, and the metrics:

* zero-shot top-1/top-5 (and mean per-class recall) from a ``ZeroShotClassifier``;
* image→text and text→image recall@K over image–caption shards, several captions per image;
* a linear probe (scikit-learn logistic regression on frozen features, C chosen on a validation
  split of the training set, then refit on all of it);
* a weighted kNN classifier (cosine, k=20, votes weighted by exp(sim/τ), τ=0.07: the protocol
  of Wu et al. 2018 "InstDisc" and DINO).

Every function works with CLIP models and image-only (SimCLR) encoders alike unless it needs
text. Does not parse arguments or print: the CLI does that. Does not own the prompt ensemble
(``zeroshot.py``) or shard writing (``data_tools``).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data_tools.formats import IMAGE_EXTENSIONS, IMAGE_FIELDS, TEXT_FIELD, ImageDecodeError, decode_image
from mmcontrast.errors import UsageError
from mmcontrast.shards import expand_shards
from mmcontrast.threads import available_cpus
from mmcontrast.zeroshot import ZeroShotClassifier

DEFAULT_BATCH_SIZE = 128
DEFAULT_WORKERS = min(4, available_cpus())
RECALL_KS = (1, 5, 10)
KNN_K = 20
KNN_TEMPERATURE = 0.07
_ROWS_PER_CHUNK = 1024  # rows of a similarity matrix held at once (retrieval, kNN)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): autocast to bf16 is then faster, not slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no way to tell, so no
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where the hardware runs it fast (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else ``fp32``."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def encoders_in_precision(model: nn.Module, precision: str = "auto") -> str:
    """Make ``model``'s encoders (``encode_image``, ``encode_text``) run in ``precision`` (``auto``: see
    ``resolve_precision``); returns the precision resolved. Changes this model object only.

    The weights are cast once (autocast alone would cast every weight again on every batch: on this
    project's CPU that made ViT-B/32 slower than float32, cast once it is 2.1x faster) and the encoders run
    under autocast, which keeps its float32 operations (norms, softmax) in float32. The 0-dim parameters
    (``logit_scale``, ``logit_bias``) stay float32, and every function here turns the encoders' features to
    float32 before it normalises them: similarities, logits and the temperature are float32.
    """
    device = next(model.parameters()).device
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return resolved
    model.to(_DTYPES[resolved])
    for p in model.parameters():
        if p.dim() == 0:
            p.data = p.data.float()
    for name in ("encode_image", "encode_text"):
        encode = getattr(model, name, None)
        if encode is not None:
            setattr(model, name, _autocast_call(encode, device.type, _DTYPES[resolved]))
    return resolved


def _autocast_call(fn: Callable, device_type: str, dtype: torch.dtype) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return fn(*args, **kwargs)

    return call


def resolve_device(device: str | None) -> torch.device:
    """``None`` → CUDA when available, else CPU; asking for CUDA without it is a UsageError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu or cuda (cuda:N for a given GPU)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    return resolved


# ---------------------------------------------------------------- images on disk


def discover_images(root: str | Path) -> list[Path]:
    """Every image under ``root`` (recursive; jpg, jpeg, png, webp, bmp; any case), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"image folder {root} does not exist" if not root.exists() else f"{root} is not a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return paths


def folder_names(root: str | Path, paths: Sequence[Path]) -> list[str | None]:
    """The first folder under ``root`` of each image (its class folder), ``None`` for images directly in root."""
    root = Path(root)
    names: list[str | None] = []
    for path in paths:
        parts = path.relative_to(root).parts
        names.append(parts[0] if len(parts) > 1 else None)
    return names


def prompt_name(label: str) -> str:
    """A folder or label name as it goes into prompts: underscores become spaces."""
    return label.replace("_", " ").strip()


def match_labels(names: Sequence[str | None], labels: Sequence[str]) -> list[int]:
    """Index into ``labels`` of each folder name, -1 when it names none (underscores = spaces, any case)."""
    index = {prompt_name(label).casefold(): i for i, label in enumerate(labels)}
    return [index.get(prompt_name(name).casefold(), -1) if name else -1 for name in names]


def class_folders(root: str | Path) -> tuple[list[Path], list[str]]:
    """Images of a folder of class subfolders → (paths, class name per image). UsageError without subfolders."""
    paths = discover_images(root)
    names = folder_names(root, paths)
    loose = [p for p, n in zip(paths, names) if n is None]
    if loose:
        raise UsageError(f"{root} must hold one subfolder per class; {len(loose)} images sit directly in it (e.g. {loose[0].name})")
    return paths, [str(n) for n in names]


class _ImageFiles(Dataset):
    """Decodes and preprocesses one image; a failure is returned as a message, not raised."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, float]:
        start = time.perf_counter()
        try:
            image = decode_image(self.paths[i])
        except ImageDecodeError as err:  # any unreadable file (zero bytes, truncated, not an image) is reported
            return i, None, str(err), time.perf_counter() - start
        return i, self.preprocess(image), None, time.perf_counter() - start


class ImageBatch(NamedTuple):
    indices: list[int]  # index into the path list of each row of images
    images: torch.Tensor | None  # (b, 3, H, W) preprocessed; None when no image of the batch was readable
    errors: dict[int, str]  # index -> why it could not be read
    decode_seconds: float  # time the decoding worker spent on this batch


def _collate_images(batch: list) -> ImageBatch:
    ok = [(i, x) for i, x, _, _ in batch if x is not None]
    errors = {i: e for i, x, e, _ in batch if x is None}
    images = torch.stack([x for _, x in ok]) if ok else None
    return ImageBatch([i for i, _ in ok], images, errors, sum(t for *_, t in batch))


def image_batches(paths: Sequence[Path], preprocess: Callable, batch_size: int = DEFAULT_BATCH_SIZE,
                  workers: int = DEFAULT_WORKERS, pin_memory: bool = False) -> DataLoader:
    """``ImageBatch``es in path order, decoded and preprocessed in ``workers`` processes (0: in this one)."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    n_batches = -(-len(paths) // batch_size)
    workers = max(0, min(workers, n_batches))  # a worker per batch at most: spawning idle ones costs time
    return DataLoader(
        _ImageFiles(paths, preprocess), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate_images, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
    )


@dataclass
class EncodedImages:
    """Features of the readable images among ``paths``."""

    paths: list[Path]  # every image asked for, in order
    features: torch.Tensor  # (len(ok), d) float32 on CPU, L2-normalised unless asked otherwise
    ok: list[int]  # index into paths of each row of features
    errors: dict[int, str] = field(default_factory=dict)  # index into paths -> why it could not be read


BatchTimes = Callable[[float, float], None]  # (seconds decoding a batch, seconds encoding it), e.g. to balance CPU threads


@torch.inference_mode()
def encode_image_batch(model: nn.Module, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``(b, d)`` float32 features on CPU of a batch of preprocessed images ``(b, 3, H, W)``, L2-normalised unless asked
    otherwise: the one place an image batch meets ``model.encode_image``."""
    device = next(model.parameters()).device
    features = model.encode_image(images.to(device, non_blocking=True)).float()
    return (nn.functional.normalize(features, dim=-1) if normalize else features).cpu()


def encode_images(model: nn.Module, preprocess: Callable, paths: Sequence[Path], batch_size: int = DEFAULT_BATCH_SIZE,
                  workers: int = DEFAULT_WORKERS, normalize: bool = True, progress: bool = False,
                  desc: str = "images", on_batch: BatchTimes | None = None, bar: tqdm | None = None) -> EncodedImages:
    """Run ``model.encode_image`` over image files (CLIP or image-only encoders).

    ``on_batch(decode_seconds, encode_seconds)`` is called after each batch (the CLI balances CPU threads with it).
    ``bar``: a progress bar of the caller's to advance instead of one of its own (one bar over several calls).
    Inside ``distributed.shared_work`` (the trainer's in-loop evaluation) each process decodes and encodes its part
    of ``paths`` and every process returns the features of all of them, in order.
    """
    from mmcontrast.distributed import gather_parts, work_share

    paths = list(paths)
    part = work_share(len(paths))
    mine = _encode_images_here(model, preprocess, paths[part], batch_size, workers, normalize, progress, desc, on_batch, bar)
    if part == slice(0, len(paths)):
        return mine
    ok: list[int] = []
    errors: dict[int, str] = {}
    chunks: list[torch.Tensor] = []
    for start, features, their_ok, their_errors in gather_parts((part.start, mine.features, mine.ok, mine.errors)):
        ok.extend(start + i for i in their_ok)
        errors.update({start + i: e for i, e in their_errors.items()})
        chunks.extend([features] if their_ok else [])
    return EncodedImages(paths, torch.cat(chunks) if chunks else torch.empty(0, 0), ok, errors)


@torch.inference_mode()
def _encode_images_here(model: nn.Module, preprocess: Callable, paths: list[Path], batch_size: int, workers: int,
                        normalize: bool, progress: bool, desc: str, on_batch: BatchTimes | None, bar: tqdm | None) -> EncodedImages:
    """``encode_images`` of every one of ``paths`` in this process."""
    device = next(model.parameters()).device
    ok: list[int] = []
    errors: dict[int, str] = {}
    chunks: list[torch.Tensor] = []
    loader = image_batches(paths, preprocess, batch_size, workers, pin_memory=device.type == "cuda")
    own_bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) if bar is None else None
    for batch in loader:
        errors.update(batch.errors)
        if batch.images is not None:
            start = time.perf_counter()
            chunks.append(encode_image_batch(model, batch.images, normalize))
            if on_batch is not None:
                on_batch(batch.decode_seconds, time.perf_counter() - start)
            ok.extend(batch.indices)
        (bar or own_bar).update(len(batch.indices) + len(batch.errors))
    if own_bar is not None:
        own_bar.close()
    features = torch.cat(chunks) if chunks else torch.empty(0, 0)
    return EncodedImages(list(paths), features, ok, errors)


# ---------------------------------------------------------------- zero-shot


def zero_shot_classify(classifier: ZeroShotClassifier, preprocess: Callable, paths: Sequence[Path],
                       batch_size: int = DEFAULT_BATCH_SIZE, workers: int = DEFAULT_WORKERS,
                       progress: bool = False, on_batch: BatchTimes | None = None) -> tuple[EncodedImages, torch.Tensor]:
    """Classify image files: (their features, ``(len(ok), n_labels)`` probabilities)."""
    encoded = encode_images(classifier.model, preprocess, paths, batch_size, workers, progress=progress, desc="zero-shot",
                            on_batch=on_batch)
    if not encoded.ok:
        return encoded, torch.empty(0, len(classifier.labels))
    return encoded, classifier.logits(encoded.features).softmax(dim=-1)


def log_loss(probabilities: torch.Tensor | np.ndarray, targets: Sequence[int]) -> float:
    """Mean negative log-likelihood of the true classes under ``(N, C)`` class probabilities (each at least 1e-12: a
    sure wrong answer costs 27.6, not infinity)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    return float(-np.log(np.clip(probabilities[np.arange(len(targets)), targets], 1e-12, None)).mean())


def classification_metrics(scores: torch.Tensor | np.ndarray, targets: Sequence[int], classnames: Sequence[str]) -> dict:
    """Accuracy of ``(N, C)`` class scores against targets (-1 = unlabelled, ignored).

    Returns ``top1``, ``top5`` (top-min(5, C)), ``mean_per_class_recall``, ``per_class`` (top-1 per
    class) and ``n_labelled``.
    """
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    targets_t = torch.as_tensor(list(targets), dtype=torch.long)
    keep = targets_t >= 0
    scores, targets_t = scores[keep], targets_t[keep]
    if len(targets_t) == 0:
        return {"top1": None, "top5": None, "mean_per_class_recall": None, "per_class": {}, "n_labelled": 0}
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (N, ≤5)
    correct1 = ranked[:, 0] == targets_t
    correct5 = (ranked == targets_t[:, None]).any(dim=1)
    per_class = {classnames[c]: float(correct1[targets_t == c].float().mean()) for c in targets_t.unique().tolist()}
    return {
        "top1": float(correct1.float().mean()),
        "top5": float(correct5.float().mean()),
        "mean_per_class_recall": float(np.mean(list(per_class.values()))),
        "per_class": per_class,
        "n_labelled": int(len(targets_t)),
    }


def zero_shot_rows(encoded: EncodedImages, probs: torch.Tensor, labels: Sequence[str], top_k: int = 1,
                   targets: Sequence[int] | None = None) -> list[dict]:
    """One dict per image, in order: ``path, label, score`` (+ ``top_k``, ``true_label``), or ``path, error``.

    ``labels`` are the names to report (row order of ``probs``' columns); ``targets`` the index of
    each image's true label or -1.
    """
    values, indices = probs.topk(min(top_k, len(labels)), dim=1)
    best = {i: (values[row].tolist(), indices[row].tolist()) for row, i in enumerate(encoded.ok)}
    rows = []
    for i, path in enumerate(encoded.paths):
        row: dict = {"path": str(path)}
        if i in best:
            scores, classes = best[i]
            row.update(label=labels[classes[0]], score=round(scores[0], 6))
            if top_k > 1:
                row["top_k"] = [{"label": labels[c], "score": round(v, 6)} for v, c in zip(scores, classes)]
        else:
            row.update(label=None, score=None, error=encoded.errors[i])
        if targets is not None and targets[i] >= 0:
            row["true_label"] = labels[targets[i]]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- retrieval


@torch.inference_mode()
def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: Sequence[int] | torch.Tensor,
                     ks: Sequence[int] = RECALL_KS) -> dict[str, dict[str, float]]:
    """Recall@K both ways between N images and M captions, ``text_to_image[j]`` the image of caption j.

    An image counts as found for image→text when any of its captions ranks in the top K; a caption
    counts for text→image when its image ranks in the top K. Features: L2-normalised ``(N, d)``, ``(M, d)``.

    Returns ``{"image_to_text": {"R@1": …}, "text_to_image": {"R@1": …}}``.
    """
    owner = torch.as_tensor(text_to_image, dtype=torch.long)
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    i2t_hits = {k: 0 for k in ks}
    for start in range(0, n_images, _ROWS_PER_CHUNK):
        sims = image_features[start : start + _ROWS_PER_CHUNK] @ text_features.T  # (c, M)
        top = sims.topk(min(max(ks), n_texts), dim=1).indices
        is_own = owner[top] == torch.arange(start, start + len(sims))[:, None]  # (c, k) caption belongs to the image
        for k in ks:
            i2t_hits[k] += int(is_own[:, :k].any(dim=1).sum())
    t2i_hits = {k: 0 for k in ks}
    for start in range(0, n_texts, _ROWS_PER_CHUNK):
        sims = text_features[start : start + _ROWS_PER_CHUNK] @ image_features.T  # (c, N)
        top = sims.topk(min(max(ks), n_images), dim=1).indices
        is_own = top == owner[start : start + len(sims), None]
        for k in ks:
            t2i_hits[k] += int(is_own[:, :k].any(dim=1).sum())
    return {
        "image_to_text": {f"R@{k}": i2t_hits[k] / n_images for k in ks},
        "text_to_image": {f"R@{k}": t2i_hits[k] / n_texts for k in ks},
    }


def sample_captions(sample: dict) -> list[str]:
    """Captions of a webdataset sample: the json ``captions`` list when present, else each line of ``txt``."""
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
            return [str(c).strip() for c in meta["captions"] if str(c).strip()]
    if TEXT_FIELD in sample:
        text = sample[TEXT_FIELD]
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        return [line.strip() for line in text.splitlines() if line.strip()]
    return []


def _decode_retrieval_sample(sample: dict, preprocess: Callable, need_caption: bool = True) -> dict:
    image_key = next((k for k in IMAGE_FIELDS if k in sample), None)
    captions = sample_captions(sample)
    out = {"key": sample.get("__key__", ""), "image": None, "captions": captions, "error": None,
           "fields": sorted(k for k in sample if not k.startswith("__")),
           "nbytes": len(sample[image_key]) if image_key else 0, "size": (0, 0)}
    if image_key is None or (need_caption and not captions):
        out["error"] = "no image field" if image_key is None else "no caption"
        return out
    try:
        image = decode_image(sample[image_key])
        out["image"], out["size"] = preprocess(image), image.size
    except ImageDecodeError as err:  # a corrupt image is counted, not fatal
        out["error"] = str(err)
    return out


def _collate_samples(batch: list[dict]) -> list[dict]:
    return batch


def iter_caption_samples(urls: Sequence[str], preprocess: Callable, batch_size: int = DEFAULT_BATCH_SIZE,
                         workers: int = DEFAULT_WORKERS, need_caption: bool = True) -> Iterator[list[dict]]:
    """Batches of decoded shard samples (dicts with key, image tensor or None, captions, error, fields, nbytes of
    the encoded image, its (width, height)). A sample without a caption is an error entry unless ``need_caption`` is False."""
    import webdataset as wds

    decode = partial(_decode_retrieval_sample, preprocess=preprocess, need_caption=need_caption)
    dataset = wds.WebDataset(list(urls), shardshuffle=False, nodesplitter=None, empty_check=False,
                             handler=wds.warn_and_continue).map(decode)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=min(workers, len(urls)), collate_fn=_collate_samples)
    yield from loader


@torch.inference_mode()
def evaluate_retrieval(model: nn.Module, preprocess: Callable, tokenizer: Callable | None, shards: str,
                       batch_size: int = DEFAULT_BATCH_SIZE, workers: int = DEFAULT_WORKERS,
                       ks: Sequence[int] = RECALL_KS, progress: bool = False) -> dict:
    """Image↔text recall@K of a CLIP model over image–caption shards (every caption of every image).

    Returns the ``retrieval_recall`` dict plus ``n_images``, ``n_captions``, ``n_skipped`` and
    ``skipped_reasons``. Shards where no sample has both an image and a caption are a UsageError
    naming the fields found.
    """
    if tokenizer is None or not hasattr(model, "encode_text"):
        raise UsageError("retrieval needs a text tower; this checkpoint is an image-only encoder")
    image_chunks: list[torch.Tensor] = []
    captions: list[str] = []
    owner: list[int] = []  # image index of each caption
    skipped: dict[str, int] = {}
    fields_seen: set[str] = set()
    n_images = 0
    with tqdm(desc="retrieval", unit="img", disable=not progress) as bar:
        for batch in iter_caption_samples(expand_shards(shards), preprocess, batch_size, workers):
            for sample in batch:
                fields_seen.update(sample["fields"])
                if sample["error"]:
                    reason = sample["error"].split(":")[0]
                    skipped[reason] = skipped.get(reason, 0) + 1
            good = [sample for sample in batch if sample["image"] is not None]
            if good:
                image_chunks.append(encode_image_batch(model, torch.stack([sample["image"] for sample in good])))
                for sample in good:
                    captions.extend(sample["captions"])
                    owner.extend([n_images] * len(sample["captions"]))
                    n_images += 1
            bar.update(len(batch))
    if n_images == 0:
        raise UsageError(
            f"no sample in {shards} has both an image ({'/'.join(IMAGE_FIELDS)}) and a caption (txt, or json 'captions'); "
            f"fields found: {', '.join(sorted(fields_seen)) or 'none'}"
        )
    text_features = encode_texts(model, tokenizer, captions, batch_size)
    result = retrieval_recall(torch.cat(image_chunks), text_features, owner, ks)
    return {**result, "n_images": n_images, "n_captions": len(captions), "n_skipped": sum(skipped.values()),
            "skipped_reasons": skipped}


@torch.inference_mode()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """``(M, d)`` L2-normalised text features on CPU."""
    device = next(model.parameters()).device
    chunks = [
        nn.functional.normalize(model.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device)).float(), dim=-1).cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks)


# ---------------------------------------------------------------- linear probe and kNN


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, classnames: Sequence[str],
                 seed: int = 0) -> dict:
    """The probe every command fits (``probe.fit_probe``) on frozen training features, scored on the test features.

    ``train_x``: ``(N, d)`` raw features, ``train_y``: ``(N,)`` class indices into ``classnames``. Returns
    ``classification_metrics`` of the test set plus the ``C`` cross-validation chose.
    """
    from mmcontrast.probe import fit_probe

    probe = fit_probe(train_x, train_y, seed)
    scores = probe.scores(test_x, len(classnames))
    return {**classification_metrics(scores, test_y.tolist(), classnames), "C": probe.C}


@torch.inference_mode()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
               k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Weighted kNN votes ``(n_test, num_classes)``: the k most cosine-similar training features each vote exp(sim/τ).

    Features L2-normalised ``(N, d)``; ``train_y`` class indices ``(N,)``. As DINO's ``knn_classifier``.
    """
    k = min(k, len(train_x))
    votes = []
    for start in range(0, len(test_x), _ROWS_PER_CHUNK):
        sims, neighbours = (test_x[start : start + _ROWS_PER_CHUNK] @ train_x.T).topk(k, dim=1)  # (c, k)
        weights = (sims / temperature).exp()
        one_hot = torch.zeros(len(sims), k, num_classes).scatter_(2, train_y[neighbours][..., None], 1.0)  # (c, k, C)
        votes.append((one_hot * weights[..., None]).sum(dim=1))
    return torch.cat(votes)


@dataclass
class LabelledFeatures:
    """Features of a folder of class subfolders (rows = readable images)."""

    features: torch.Tensor  # (n, d), L2-normalised unless asked otherwise
    labels: torch.Tensor  # (n,) index into the class list
    errors: list[dict]  # [{"path", "error"}] of unreadable images


def encode_class_folders(model: nn.Module, preprocess: Callable, train_dir: str | Path, test_dir: str | Path,
                         batch_size: int = DEFAULT_BATCH_SIZE, workers: int = DEFAULT_WORKERS,
                         progress: bool = False, on_batch: BatchTimes | None = None, normalize: bool = True
                         ) -> tuple[LabelledFeatures, LabelledFeatures, list[str]]:
    """Encode train and test class folders; classes are the train folders' names (sorted as strings). Features are
    L2-normalised unless ``normalize`` is False (the probes' raw features)."""
    train_paths, train_names = class_folders(train_dir)
    test_paths, test_names = class_folders(test_dir)
    classnames = sorted(set(train_names))
    unknown = sorted(set(test_names) - set(classnames))
    if unknown:
        raise UsageError(f"test classes {', '.join(unknown)} have no folder in {train_dir}; both need the same class subfolders")
    index = {name: i for i, name in enumerate(classnames)}

    def encode(paths: list[Path], names: list[str], root: str | Path, desc: str) -> LabelledFeatures:
        encoded = encode_images(model, preprocess, paths, batch_size, workers, normalize=normalize, progress=progress, desc=desc,
                                on_batch=on_batch)
        if not encoded.ok:
            raise UsageError(f"none of the {len(paths)} images under {root} could be read")
        labels = torch.tensor([index[names[i]] for i in encoded.ok])
        errors = [{"path": str(paths[i]), "error": e} for i, e in sorted(encoded.errors.items())]
        return LabelledFeatures(encoded.features, labels, errors)

    train = encode(train_paths, train_names, train_dir, "train")
    return train, encode(test_paths, test_names, test_dir, "test"), classnames


# ---------------------------------------------------------------- during training (small folders, no worker processes)


def zero_shot_top1_top5(model: nn.Module, tokenizer: Callable, preprocess: Callable, folder: str | Path,
                        workers: int = 0) -> dict[str, float]:
    """Zero-shot top-1/top-5 of a CLIP model on a folder of class subfolders (folder names are the labels)."""
    paths, names = class_folders(folder)
    classes = sorted(set(names))
    classifier = ZeroShotClassifier(model, tokenizer, [prompt_name(c) for c in classes])
    encoded, probs = zero_shot_classify(classifier, preprocess, paths, workers=workers)
    result = classification_metrics(probs, [classes.index(names[i]) for i in encoded.ok], classes)
    return {"top1": result["top1"], "top5": result["top5"]}


def knn_top1(encoder: nn.Module, preprocess: Callable, train_dir: str | Path, test_dir: str | Path, workers: int = 0) -> float:
    """Weighted-kNN top-1 of an image encoder: ``train_dir`` class folders vote for ``test_dir``'s images."""
    train, test, classes = encode_class_folders(encoder, preprocess, train_dir, test_dir, workers=workers)
    scores = knn_scores(train.features, train.labels, test.features, len(classes))
    return float((scores.argmax(dim=1) == test.labels).float().mean())
