"""Search over an embedding space: indexing a collection and querying it.

Owns the index folder and everything done with it:

* ``build_index``: embed a folder of images or a set of shards in parts (under ``accelerate launch`` every
  process embeds its share of the parts; with ``--part I/N`` one machine of N embeds its share into a shared
  folder), each part written atomically, so a killed run resumes without embedding a finished part again;
* ``index_collection``: one faiss index over a folder of parts (``collection.Collection``, read a window at a time):
  exact (``Flat``) for a small collection, for a large one the approximate index that fits the memory budget, its
  recall measured on held-out queries and its search parameter tuned on them (the faiss side is ``ann.py``'s);
  ``index_embeddings`` does the same for embeddings computed elsewhere, in clip-retrieval's layout, left where
  they are;
* ``Searcher``: an index opened for queries (texts, image files, indexed items, batches of vectors), the faiss
  index memory-mapped and metadata read by id.

Near-duplicates are ``dedup.py``'s. Embedding goes through ``evaluate.py``'s encoding path (``encode_images``,
``iter_caption_samples``, ``encode_image_batch``, ``encode_texts``). Does not parse arguments, print, or render
pages (``cli/search.py``, ``web.py``).

The folder: clip-retrieval's layout of embeddings and metadata, with the faiss index and its infos beside them.

    INDEX/plan.json                         what is indexed, with which checkpoint, cut into which parts
    INDEX/img_emb/img_emb_NNNNN.npy         (n, d) float32 L2-normalised image embeddings of part NNNNN
    INDEX/text_emb/text_emb_NNNNN.npy       (n, d) the captions' embeddings (shards with captions, CLIP checkpoints)
    INDEX/metadata/metadata_NNNNN.parquet   a row per item: path (or key, shard, caption), bytes, width, height
    INDEX/parts/part_NNNNN.json             written last: the part is finished (its counts, what was skipped and why)
    INDEX/image.index                       the faiss index (inner product = cosine); id i = item i in part order
    INDEX/index_infos.json                  index key, search parameter, held-out recall, counts, checkpoint
                                            (and ``embeddings``: the folder of parts, when it is not INDEX itself)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmcontrast import ann
from mmcontrast.collection import IMG_EMB, METADATA, TEXT_EMB, Collection, normalize
from mmcontrast.errors import UsageError

PLAN_FILE = "plan.json"
INFOS_FILE = "index_infos.json"
FAISS_FILE = "image.index"
PARTS = "parts"
OUR_ENTRIES = (PLAN_FILE, INFOS_FILE, FAISS_FILE, IMG_EMB, TEXT_EMB, METADATA, PARTS)

DEFAULT_PART_SIZE = 4096  # images per part: the unit of resuming and of sharing work between processes
THUMBNAIL_SIDE = 256


def _part_name(kind: str, part: int, suffix: str) -> str:
    return f"{kind}/{kind}_{part:05d}{suffix}" if kind != PARTS else f"{PARTS}/part_{part:05d}{suffix}"


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename: a file of ours is whole or absent, whenever the process is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- what is indexed


@dataclass
class Plan:
    """What an index holds: the source, the checkpoint, and the items of each part (paths, or one shard each)."""

    source: dict  # {"images": absolute folder} or {"shards": the pattern as given}
    checkpoint: str
    pretrained: str | None
    precision: str
    part_size: int
    parts: list[list[str]]

    @property
    def kind(self) -> str:
        return "images" if "images" in self.source else "shards"

    def identity(self) -> dict:
        """What a resume must match (a listing that changed would shift every part after the change)."""
        listing = hashlib.sha256("\n".join(item for part in self.parts for item in part).encode()).hexdigest()
        return {"source": self.source, "checkpoint": self.checkpoint, "pretrained": self.pretrained,
                "precision": self.precision, "part_size": self.part_size, "n_parts": len(self.parts),
                "n_items": sum(len(p) for p in self.parts), "listing_sha256": listing}


def _checkpoint_id(checkpoint: str) -> str:
    """A run dir or weights file by its absolute path (so the index opens from any folder); a model name as it is."""
    return str(Path(checkpoint).resolve()) if Path(checkpoint).exists() else checkpoint


def make_plan(images: str | None, shards: str | None, checkpoint: str, pretrained: str | None = None,
              precision: str = "auto", part_size: int = DEFAULT_PART_SIZE) -> Plan:
    """The parts of a folder of images (``part_size`` images each, in sorted order) or of shards (one per shard)."""
    from mmcontrast.evaluate import discover_images
    from mmcontrast.shards import expand_shards

    if (images is None) == (shards is None):
        raise UsageError("give what to index: --images DIR or --shards PATTERN (one of them)")
    if part_size < 1:
        raise UsageError("--part-size must be at least 1")
    pretrained = str(Path(pretrained).resolve()) if pretrained and Path(pretrained).exists() else pretrained
    if images is not None:
        paths = [str(p.resolve()) for p in discover_images(images)]
        parts = [paths[i : i + part_size] for i in range(0, len(paths), part_size)]
        source = {"images": str(Path(images).resolve())}
    else:
        parts = [[url] for url in expand_shards(shards)]
        source = {"shards": shards}
    return Plan(source, _checkpoint_id(checkpoint), pretrained, precision, part_size, parts)


def check_folder(index_dir: str | Path, plan: Plan, resume: bool, overwrite: bool) -> None:
    """UsageError unless ``index_dir`` can take ``plan``: new or empty, or ``resume`` with the same plan, or ``overwrite``.

    A folder that holds files is refused unless one of the two is given, a folder that is not an index always, and
    a resume whose plan differs names the fields that differ. Reads only.
    """
    out = Path(index_dir)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; give one")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file; give a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return
    if not (out / PLAN_FILE).is_file():
        raise UsageError(f"--output-dir {out} holds other files ({', '.join(present[:3])}); give a new or empty folder")
    if not resume and not overwrite:
        raise UsageError(f"{out} already holds an index; pass --resume to finish it or --overwrite to replace it")
    if resume:
        before = _read_json(out / PLAN_FILE)
        changed = [k for k, v in plan.identity().items() if before.get(k) != v]
        if changed:
            raise UsageError(f"--resume: {', '.join(changed)} differ from the index in {out} "
                             "(the images or settings changed); pass --overwrite to index again")


def prepare_folder(index_dir: str | Path, plan: Plan, resume: bool, overwrite: bool) -> Path:
    """``check_folder``, then make ``index_dir`` ready for ``plan`` (``overwrite`` removes our own files, and only
    those) and write the plan. Only the first process calls this."""
    check_folder(index_dir, plan, resume, overwrite)
    out = Path(index_dir)
    if overwrite:
        for name in OUR_ENTRIES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --output-dir {out}: {err.strerror}") from None
    (out / INFOS_FILE).unlink(missing_ok=True)  # the index is rebuilt from the parts at the end
    _write_json(out / PLAN_FILE, plan.identity())
    return out


def part_done(index_dir: Path, part: int) -> bool:
    return (index_dir / _part_name(PARTS, part, ".json")).is_file()


# ---------------------------------------------------------------- embedding the parts


@dataclass
class Processes:
    """This process's place in a job: rank ``rank`` of ``world``, its device, and a barrier for them all."""

    rank: int
    world: int
    device: str
    barrier: Callable[[], None]


def join_processes(device: str | None) -> Processes:
    """One process, or this one's place in an ``accelerate launch`` / ``torchrun`` job (Accelerate forms the group:
    gloo on CPUs, NCCL on GPUs; each rank takes its own GPU)."""
    from mmcontrast import launch
    from mmcontrast.evaluate import resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(0, 1, str(resolve_device(device)), lambda: None)
    launch.watch_parent()
    launch.use_gloo_without_cuda()
    from accelerate import PartialState

    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1"))
    return Processes(state.process_index, state.num_processes, device or str(state.device), state.wait_for_everyone)


@dataclass
class EmbeddedPart:
    image: np.ndarray  # (n, d) float32, L2-normalised
    text: np.ndarray | None  # (n, d) the captions' embeddings (zeros where a sample has none), or None
    metadata: dict[str, list]  # columns, n rows
    seen: int
    skipped: list[dict]  # {"item", "error"}


def _embed_image_part(model, preprocess, paths: Sequence[str], loader: dict, bar) -> EmbeddedPart:
    from mmcontrast.evaluate import encode_images

    encoded = encode_images(model, preprocess, [Path(p) for p in paths], bar=bar, **loader)
    ok = [paths[i] for i in encoded.ok]
    skipped = [{"item": paths[i], "error": e} for i, e in sorted(encoded.errors.items())]
    metadata = {"path": ok, "bytes": [os.path.getsize(p) if os.path.exists(p) else 0 for p in ok], "width": [], "height": []}
    for path in ok:  # the header only: what dedup keeps is the largest image
        width, height = _image_size(path)
        metadata["width"].append(width)
        metadata["height"].append(height)
    return EmbeddedPart(encoded.features.numpy().astype(np.float32), None, metadata, len(paths), skipped)


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # read fine a moment ago; a size of 0 only makes it the last choice to keep
        return 0, 0


def _embed_shard_part(model, preprocess, tokenizer, url: str, loader: dict, bar) -> EmbeddedPart:
    import torch

    from mmcontrast.evaluate import encode_image_batch, encode_texts, iter_caption_samples

    chunks, rows, skipped, seen = [], [], [], 0
    for batch in iter_caption_samples([url], preprocess, loader["batch_size"], loader["workers"], need_caption=False):
        seen += len(batch)
        skipped += [{"item": f"{url}#{s['key']}", "error": s["error"]} for s in batch if s["image"] is None]
        good = [s for s in batch if s["image"] is not None]
        if good:
            chunks.append(encode_image_batch(model, torch.stack([s["image"] for s in good])).numpy())
            rows += [(s["key"], s["captions"][0] if s["captions"] else None, s["nbytes"], *s["size"]) for s in good]
        bar.update(len(batch))
    dim = chunks[0].shape[1] if chunks else 0
    image = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, dim), np.float32)
    text = None
    captioned = [i for i, row in enumerate(rows) if row[1]]
    if captioned and tokenizer is not None and hasattr(model, "encode_text"):
        text = np.zeros_like(image)
        text[captioned] = encode_texts(model, tokenizer, [rows[i][1] for i in captioned], loader["batch_size"]).numpy()
    metadata = {"key": [r[0] for r in rows], "shard": [url] * len(rows), "caption": [r[1] for r in rows],
                "bytes": [r[2] for r in rows], "width": [r[3] for r in rows], "height": [r[4] for r in rows]}
    return EmbeddedPart(image, text, metadata, seen, skipped)


def _write_part(index_dir: Path, part: int, embedded: EmbeddedPart) -> None:
    """Embeddings and metadata first, the part's marker last: a part with a marker is whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def save_npy(array: np.ndarray) -> Callable[[str], None]:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, array)

        return write

    _write_atomic(index_dir / _part_name(IMG_EMB, part, ".npy"), save_npy(embedded.image))
    if embedded.text is not None:
        _write_atomic(index_dir / _part_name(TEXT_EMB, part, ".npy"), save_npy(embedded.text))
    table = pa.table(embedded.metadata)
    _write_atomic(index_dir / _part_name(METADATA, part, ".parquet"), lambda tmp: pq.write_table(table, tmp))
    reasons: dict[str, int] = {}
    for entry in embedded.skipped:
        reason = entry["error"].split(":")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    _write_json(index_dir / _part_name(PARTS, part, ".json"),
                {"part": part, "seen": embedded.seen, "embedded": len(embedded.image), "skipped": len(embedded.skipped),
                 "skipped_reasons": reasons, "skipped_items": embedded.skipped})


def embed_parts(index_dir: Path, plan: Plan, todo: Sequence[int], model, preprocess, tokenizer, loader: dict,
                progress: bool = False, position: int = 0) -> int:
    """Embed and write the parts ``todo`` of ``plan``; returns the items embedded. ``loader``: ``batch_size``,
    ``workers`` (and ``on_batch``) for ``evaluate``'s image loaders."""
    from tqdm import tqdm

    total = sum(len(plan.parts[i]) for i in todo) if plan.kind == "images" else None
    embedded = 0
    with tqdm(total=total, desc=f"index [{position}]", unit="img", disable=not progress, position=position) as bar:
        for part in todo:
            if plan.kind == "images":
                result = _embed_image_part(model, preprocess, plan.parts[part], loader, bar)
            else:
                result = _embed_shard_part(model, preprocess, tokenizer, plan.parts[part][0], loader, bar)
            _write_part(index_dir, part, result)
            embedded += len(result.image)
    return embedded


def build_index(plan: Plan, index_dir: str | Path, processes: Processes, load_model: Callable[[], tuple], loader: dict,
                resume: bool = False, overwrite: bool = False, index_key: str = "auto",
                recall_target: float = ann.RECALL_TARGET, max_memory: int | None = None,
                progress: bool = False, slice_: tuple[int, int] | None = None) -> dict | None:
    """Embed ``plan``'s unfinished parts (this process's share) and, on the first process, build the faiss index.

    ``load_model() -> (model, preprocess, tokenizer)`` is called only when this process has parts to embed.
    ``slice_ = (i, n)`` embeds only the parts whose number is i modulo n (one machine of n sharing a folder) and
    builds no faiss index: a last run with ``resume`` embeds what is missing and builds it.
    Returns the index infos on the first process (also written to ``index_infos.json``), None on the others and
    for a slice.
    """
    ann.check_index_key(index_key)
    out = Path(index_dir)
    resume = resume or (slice_ is not None and (out / PLAN_FILE).is_file())  # another slice started the folder
    if processes.rank == 0:
        prepare_folder(out, plan, resume, overwrite)
    processes.barrier()
    todo = [i for i in range(len(plan.parts)) if not part_done(out, i) and (slice_ is None or i % slice_[1] == slice_[0])]
    processes.barrier()  # every process has read the same finished parts before any writes a new one
    mine = todo[processes.rank :: processes.world]
    embedded, elapsed = 0, 0.0
    if mine:
        model, preprocess, tokenizer = load_model()
        start = time.perf_counter()
        embedded = embed_parts(out, plan, mine, model, preprocess, tokenizer, loader, progress, processes.rank)
        elapsed = time.perf_counter() - start
    processes.barrier()
    if processes.rank != 0 or slice_ is not None:
        return None
    run = {"parts_embedded": len(todo), "parts_reused": len(plan.parts) - len(todo),
           "items_per_s": round(embedded * processes.world / elapsed, 2) if embedded else None, "processes": processes.world}
    return finish_index(out, plan, index_key, recall_target, max_memory, run, progress)


# ---------------------------------------------------------------- the index over all parts


def _part_counts(index_dir: Path, n_parts: int) -> list[dict]:
    return [_read_json(index_dir / _part_name(PARTS, i, ".json")) for i in range(n_parts)]


def load_embeddings(index_dir: str | Path) -> np.ndarray:
    """Every stored image embedding, ``(N, d)`` float32 in id order: for small collections and tests only (an index of
    any size is read through ``Collection``, a window at a time)."""
    collection = Collection(index_dir)
    return collection.vectors(np.arange(len(collection)))


def _held_out_queries(collection: Collection, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Held-out ids (a seeded draw) and their vectors as queries: their images, and their captions where the
    collection has caption embeddings (text -> image queries, as a CLIP index is searched)."""
    held = collection.sample_ids(n)
    queries = {"image": collection.vectors(held)}
    if collection.has_text:
        text = collection.vectors(held, TEXT_EMB)
        queries["text"] = text[np.linalg.norm(text, axis=1) > 0.5]  # rows of zeros: items without a caption
    return held, queries


def index_collection(collection: Collection, index_dir: Path, index_key: str = "auto",
                     recall_target: float = ann.RECALL_TARGET, max_memory: int | None = None, progress: bool = False) -> dict:
    """Build, tune and write the faiss index over ``collection``; returns what ``index_infos.json`` says of it.

    An approximate index is trained on a sample and filled a chunk at a time; up to ``ann.RECALL_QUERIES`` items (a
    tenth at most) are held out while its recall@1/@10 is measured against exact search and its search parameter
    tuned to ``recall_target``, then added. The index is written for ``Searcher`` to memory-map.
    """
    from tqdm import tqdm

    n, dim = len(collection), collection.dim
    budget = ann.default_index_memory(n, dim) if max_memory is None else max_memory
    key = ann.choose_index_key(n, dim, budget) if index_key == "auto" else index_key
    start = time.perf_counter()
    held, queries = (None, None) if key == "Flat" else _held_out_queries(collection, min(ann.RECALL_QUERIES, n // 10))
    rerank = ann.rerank_factor(key)
    with tqdm(total=n, desc="faiss", unit="vec", disable=not progress) as bar:
        index, measured = ann.build(collection, key, queries, held, on_chunk=bar.update)
    if measured is None:
        param, recall = "", {"image": {"recall@1": 1.0, f"recall@{ann.RECALL_K}": 1.0}}
    else:
        param, recall, rerank = ann.tune(index, key, measured, rerank, collection.vectors, recall_target)
        ann.add_held(index, collection, held)
    _write_atomic(index_dir / FAISS_FILE, lambda tmp: ann.write(index, tmp))
    on = ("exact by construction" if measured is None else
          f"{len(held)} held-out items (kept out of the index while measured) as image queries"
          + (f" and {len(queries['text'])} of their captions as text queries" if "text" in recall else "")
          + ", against exact search over the others")
    return {"index_key": key, "index_param": param, "rerank": rerank, "exact": key == "Flat", **recall["image"],
            "recall": recall, "recall_measured_on": on, "max_index_memory": budget,
            "index_bytes": (index_dir / FAISS_FILE).stat().st_size, "faiss_build_s": round(time.perf_counter() - start, 2),
            "n_indexed": n, "dim": dim, "parts": len(collection.parts), "rows_per_part": collection.rows_per_part}


def finish_index(index_dir: Path, plan: Plan, index_key: str, recall_target: float, max_memory: int | None, run: dict,
                 progress: bool = False) -> dict:
    """The faiss index over every embedded part of ``plan``; write and return ``index_infos.json``."""
    counts = _part_counts(index_dir, len(plan.parts))
    if not sum(c["embedded"] for c in counts):
        raise UsageError(f"none of the {sum(c['seen'] for c in counts)} items could be read; nothing to index")
    built = index_collection(Collection(index_dir), index_dir, index_key, recall_target, max_memory, progress)
    reasons: dict[str, int] = {}
    for c in counts:
        for reason, n in c["skipped_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    infos = {**built, "n_items": sum(c["seen"] for c in counts), "n_skipped": sum(c["skipped"] for c in counts),
             "skipped_reasons": reasons, "kind": plan.kind, "source": plan.source, "checkpoint": plan.checkpoint,
             "pretrained": plan.pretrained, "precision": plan.precision, **run}
    _write_json(index_dir / INFOS_FILE, infos)
    return infos


def index_embeddings(embeddings: str | Path, index_dir: str | Path, index_key: str = "auto",
                     recall_target: float = ann.RECALL_TARGET, max_memory: int | None = None, overwrite: bool = False,
                     progress: bool = False) -> dict:
    """An index over embeddings computed elsewhere: a clip-retrieval-layout folder (``collection.py``), read where it
    is (the index folder holds the faiss index and its infos, which point at it). Returns the infos."""
    collection = Collection(embeddings)  # checks every part before anything is written
    out = Path(index_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file; give a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not ((out / INFOS_FILE).is_file() and overwrite):
        raise UsageError(f"--output-dir {out} already holds files ({', '.join(present[:3])}); give a new folder"
                         + (" or pass --overwrite" if (out / INFOS_FILE).is_file() else ""))
    if present and out.resolve() == collection.root.resolve():
        raise UsageError("--output-dir is the --embeddings folder; give another folder for the index")
    out.mkdir(parents=True, exist_ok=True)
    (out / INFOS_FILE).unlink(missing_ok=True)
    built = index_collection(collection, out, index_key, recall_target, max_memory, progress)
    infos = {**built, "n_items": len(collection), "kind": "embeddings", "embeddings": str(collection.root.resolve()),
             "source": {"embeddings": str(collection.root.resolve())}, "checkpoint": None}
    _write_json(out / INFOS_FILE, infos)
    return infos


# ---------------------------------------------------------------- querying


def check_k(k: int) -> int:
    if not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a positive number of results, not {k}")
    return k


class Searcher:
    """An index opened for queries: the faiss index (memory-mapped), the collection it was built over (vectors and
    metadata read by id), and (loaded on first use) the checkpoint's encoders.

    Results are ``{"query": {...}, "k": k, "results": [{"id", "path" | "key", "score", "caption"?}, ...]}``, best first.
    Queries are answered one at a time (a lock), so one Searcher can serve several threads.
    """

    def __init__(self, index_dir: str | Path, device: str = "cpu", precision: str | None = None):
        self.dir = Path(index_dir)
        if not (self.dir / INFOS_FILE).is_file():
            raise UsageError(f"{index_dir} is not a finished index (no {INFOS_FILE}); build it with `mmcontrast index`"
                             + (" --resume" if (self.dir / PLAN_FILE).is_file() else ""))
        self.infos = _read_json(self.dir / INFOS_FILE)
        self.collection = Collection(self.infos.get("embeddings") or self.dir)
        self.index = ann.read(str(self.dir / FAISS_FILE), self.infos["index_key"], self.infos["index_param"])
        if len(self.collection) != self.index.ntotal:
            raise UsageError(f"{self.collection.root} holds {len(self.collection)} vectors but the index "
                             f"{self.index.ntotal}: the embeddings changed since; build the index again")
        self.rerank = int(self.infos.get("rerank", 1))
        self.device, self.precision = device, precision or self.infos.get("precision") or "auto"
        self._model: tuple | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def model(self) -> tuple:
        """``(model, preprocess, tokenizer)`` of the checkpoint the index was built with."""
        if self._model is None:
            if not self.infos.get("checkpoint"):
                raise UsageError(f"{self.dir} was built from embeddings with no checkpoint to encode a text or an image; "
                                 "search it with --vectors Q.npy")
            from mmcontrast.evaluate import encoders_in_precision
            from mmcontrast.loading import load

            self._model = load(self.infos["checkpoint"], pretrained=self.infos.get("pretrained"), device=self.device)
            encoders_in_precision(self._model[0], self.precision)
        return self._model

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """``(len(ids), d)`` stored embeddings of indexed items (read from their parts, memory-mapped)."""
        return self.collection.vectors(ids)

    def item(self, i: int) -> dict:
        """What the index knows of item ``i``: ``path`` (or ``key`` and ``shard``), ``caption`` when there is one."""
        return self.collection.rows([i])[0]

    def search_batch(self, queries: np.ndarray, k: int) -> list[list[dict]]:
        """The ``k`` nearest items of each row of ``(q, d)`` queries (L2-normalised here): a list per query, best first."""
        check_k(k)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise UsageError(f"queries of shape {tuple(queries.shape)}: this index takes (n, {self.dim}) vectors")
        if not np.isfinite(queries).all():
            raise UsageError("the query vectors hold NaN or infinite values")
        with self._lock:
            scores, ids = ann.search(self.index, normalize(queries), k, self.rerank, self.collection.vectors)
        found = ids[ids >= 0]
        rows = dict(zip(found.tolist(), self.collection.rows(found.tolist())))
        return [[{"id": int(i), **rows[int(i)], "score": round(float(s), 6)} for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def search_vectors(self, queries: np.ndarray, k: int, query: dict) -> dict:
        """The ``k`` nearest items of one ``(1, d)`` query."""
        return {"query": query, "k": k, "results": self.search_batch(queries, k)[0]}

    def search_text(self, text: str, k: int = 10) -> dict:
        from mmcontrast.evaluate import encode_texts

        if not isinstance(text, str) or not text.strip():
            raise UsageError("the text query is empty; give some words to search for")
        check_k(k)
        model, _, tokenizer = self.model
        if tokenizer is None or not hasattr(model, "encode_text"):
            raise UsageError("this index was built with an image-only encoder: search it with an image, not a text")
        with self._lock:
            q = encode_texts(model, tokenizer, [text.strip()]).numpy()
        return self.search_vectors(q, k, {"text": text.strip()})

    def search_image(self, path: str | Path, k: int = 10) -> dict:
        from mmcontrast.evaluate import encode_images

        check_k(k)
        if not Path(path).is_file():
            raise UsageError(f"image {path} does not exist" if not Path(path).exists() else f"{path} is not an image file")
        model, preprocess, _ = self.model
        with self._lock:
            encoded = encode_images(model, preprocess, [Path(path)], batch_size=1, workers=0)
        if not encoded.ok:
            raise UsageError(f"cannot read image {path}: {encoded.errors[0]}")
        return self.search_vectors(encoded.features.numpy(), k, {"image": str(path)})

    def search_similar(self, i: int, k: int = 10) -> dict:
        """The items nearest to indexed item ``i`` (its stored embedding: no model needed)."""
        self.item(i)
        return self.search_vectors(self.vectors([i]), k, {"similar_to": i, **self.item(i)})

    def image_bytes(self, i: int) -> bytes:
        """The encoded image of item ``i``, from its file or its (local) shard. Never a path from anywhere else."""
        row = self.item(i)
        if "path" in row:
            return Path(row["path"]).read_bytes()
        return _shard_member(row["shard"], row["key"])

    def thumbnail(self, i: int, side: int = THUMBNAIL_SIDE) -> bytes:
        """Item ``i`` as a JPEG at most ``side`` pixels on its longer side."""
        from data_tools.formats import decode_image

        image = decode_image(self.image_bytes(i))
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        return buffer.getvalue()


@lru_cache(maxsize=8)
def _shard_members(shard: str) -> dict[str, tarfile.TarInfo]:
    from data_tools.formats import IMAGE_FIELDS
    from mmcontrast.shards import is_remote

    if is_remote(shard):
        raise UsageError(f"{shard} is a remote shard; its images are not served (index local shards to see them)")
    with tarfile.open(shard) as tar:
        return {m.name.rsplit(".", 1)[0]: m for m in tar.getmembers() if m.name.rsplit(".", 1)[-1].lower() in IMAGE_FIELDS}


def _shard_member(shard: str, key: str) -> bytes:
    member = _shard_members(shard).get(key)
    if member is None:
        raise UsageError(f"{shard} has no image for {key}")
    with open(shard, "rb") as f:
        f.seek(member.offset_data)
        return f.read(member.size)
