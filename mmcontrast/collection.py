"""A folder of embeddings in clip-retrieval's layout, read a part at a time: what an index is built over and reads back.

    DIR/img_emb/img_emb_{N}.npy          (n_N, d) float32 or float16, a row per item
    DIR/metadata/metadata_{N}.parquet    n_N rows: path (or clip-retrieval's image_path), caption, key, url, ...
    DIR/text_emb/text_emb_{N}.npy        optional, (n_N, d): the items' captions embedded (zero rows: no caption)

Parts are taken in the order of their number N (clip-retrieval writes ``img_emb_0.npy``, ``mmcontrast index``
``img_emb_00000.npy``); an item's id is its row over the parts in that order, part 0's rows first.

Owns checking such a folder (every part 2-D, one dimension, as many metadata rows as vectors), reading it in
sequential chunks and by id, and seeded samples. Memory stays bounded whatever the collection's size: vectors are
memory-mapped a window of rows at a time and the window is unmapped after it is read (pages of a mapping that stays
open count as the process's resident memory), and metadata is read by parquet row group, a few groups cached.
Vectors come back L2-normalised float32, since every index here is cosine. Knows nothing of faiss (``ann.py``) or
of embedding images (``search.py``).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcontrast.errors import UsageError

IMG_EMB, TEXT_EMB, METADATA = "img_emb", "text_emb", "metadata"
WINDOW = 65_536  # rows mapped at once: the bound on what a sequential pass or a gather holds
CACHED_GROUPS = 8  # parquet row groups kept decoded (the pages a server shows come from few of them)
PATH_COLUMNS = ("path", "image_path")  # mmcontrast's name, clip-retrieval's
SHOWN = ("path", "key", "shard", "caption", "url")  # the metadata a search result carries (sizes stay behind)
_NUMBER = re.compile(r"_(\d+)$")


@dataclass
class Part:
    """One ``.npy`` part: where its rows start in the file, their type and number, and its metadata file."""

    emb: Path
    offset: int  # bytes before the first row (the .npy header)
    dtype: np.dtype
    rows: int
    dim: int
    meta: Path | None
    text: Path | None


def _numbered(folder: Path, suffix: str) -> dict[int, Path]:
    found = {}
    for path in sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []:
        match = _NUMBER.search(path.name[: -len(suffix)])
        if match:
            found[int(match.group(1))] = path
    return found


def _npy_header(path: Path, root: Path) -> tuple[int, np.dtype, tuple[int, ...]]:
    """``(offset, dtype, shape)`` of a ``.npy`` file, reading its header only."""
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise UsageError(f"{path.relative_to(root)} is not a readable .npy array ({str(err).splitlines()[0][:120]})") from None
    shape, dtype, offset = array.shape, array.dtype, int(array.offset)
    if len(shape) != 2 or dtype.kind != "f" or not array.flags.c_contiguous:
        raise UsageError(f"{path.relative_to(root)} is a {dtype} array of shape {shape}; parts must be (rows, dim) float arrays")
    del array
    return offset, dtype, shape


def _parquet_rows(path: Path, root: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UsageError(f"{path.relative_to(root)} is not a readable parquet file ({str(err).splitlines()[0][:120]})") from None


def _check_parts(root: Path) -> list[Part]:
    """The parts of ``root`` in order, with a UsageError naming the first part that disagrees with the others."""
    embs, metas = _numbered(root / IMG_EMB, ".npy"), _numbered(root / METADATA, ".parquet")
    texts = _numbered(root / TEXT_EMB, ".npy")
    if not embs:
        raise UsageError(f"{root} has no {IMG_EMB}/*.npy parts; give a folder in clip-retrieval's layout "
                         f"({IMG_EMB}/img_emb_0.npy, {METADATA}/metadata_0.parquet, ...)")
    stray = sorted(set(metas) - set(embs))
    if stray:
        raise UsageError(f"{metas[stray[0]].relative_to(root)} has no {IMG_EMB} part beside it")
    parts, dim = [], None
    for number, emb in sorted(embs.items()):
        offset, dtype, (rows, d) = _npy_header(emb, root)
        if rows and dim is not None and d != dim[0]:
            raise UsageError(f"{emb.relative_to(root)} has {d} dimensions but {dim[1]} has {dim[0]}; every part needs the same")
        if rows and dim is None:
            dim = (d, emb.relative_to(root))
        meta = metas.get(number)
        if metas and meta is None:
            raise UsageError(f"{emb.relative_to(root)} has no {METADATA}/{METADATA}_{number}.parquet (the other parts have one)")
        if meta is not None and _parquet_rows(meta, root) != rows:
            raise UsageError(f"{meta.relative_to(root)} has {_parquet_rows(meta, root)} rows but {emb.relative_to(root)} "
                             f"has {rows} vectors; a part's metadata needs a row per vector")
        text = texts.get(number)
        if text is not None and _npy_header(text, root)[2] != (rows, d):
            raise UsageError(f"{text.relative_to(root)} is not shaped like {emb.relative_to(root)} ({rows}, {d})")
        parts.append(Part(emb, offset, dtype, rows, d, meta, text))
    if dim is None:
        raise UsageError(f"every {IMG_EMB} part of {root} is empty; nothing to index")
    return parts


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class Collection:
    """The parts of one folder, opened for reading (headers only are read here).

    ``len(c)`` items of ``c.dim`` dimensions; ``c.starts[p]`` is part p's first id. Thread-safe for reading.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"{root}: no such folder of embeddings")
        self.parts = _check_parts(self.root)
        self.dim = next(p.dim for p in self.parts if p.rows)
        self.starts = np.cumsum([0, *(p.rows for p in self.parts)])  # (P + 1,)
        self.has_text = any(p.text is not None for p in self.parts)
        self._groups: OrderedDict[tuple, dict[str, list]] = OrderedDict()
        self._group_starts: dict[int, np.ndarray] = {}  # part -> first row of each of its parquet row groups
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def rows_per_part(self) -> list[int]:
        return [p.rows for p in self.parts]

    # ------------------------------------------------------------ vectors

    def _window(self, part: Part, start: int, stop: int, kind: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of a part (or only ``rows`` of them, counted from ``start``), copied out of a mapping
        that is closed again: ``(m, d)`` float32. Only the pages holding those rows are read."""
        path = part.emb if kind == IMG_EMB else part.text
        offset = part.offset if kind == IMG_EMB else _npy_header(path, self.root)[0]
        mapped = np.memmap(path, dtype=part.dtype, mode="r", offset=offset + start * part.dim * part.dtype.itemsize,
                           shape=(stop - start, part.dim))
        out = np.array(mapped if rows is None else mapped[rows], dtype=np.float32)
        del mapped
        return out

    def chunks(self, size: int = WINDOW, kind: str = IMG_EMB) -> Iterator[tuple[int, np.ndarray]]:
        """``(first id, (m, d) normalised vectors)`` over the whole collection in id order, ``size`` rows at most."""
        for p, part in enumerate(self.parts):
            if kind == TEXT_EMB and part.text is None:
                continue
            for start in range(0, part.rows, size):
                stop = min(start + size, part.rows)
                yield int(self.starts[p]) + start, normalize(self._window(part, start, stop, kind))

    def vectors(self, ids: Sequence[int] | np.ndarray, kind: str = IMG_EMB) -> np.ndarray:
        """``(len(ids), d)`` normalised vectors of the items ``ids`` (any order, repeats allowed)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise UsageError(f"no item {int(ids.max() if ids.max() >= len(self) else ids.min())} in this collection "
                             f"(it holds {len(self)})")
        out = np.zeros((len(ids), self.dim), np.float32)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        part_of = np.searchsorted(self.starts, sorted_ids, side="right") - 1
        for p in np.unique(part_of):
            part = self.parts[p]
            if kind == TEXT_EMB and part.text is None:
                continue
            take = np.flatnonzero(part_of == p)
            local = sorted_ids[take] - self.starts[p]
            for w in np.unique(local // WINDOW):  # one mapping per window of rows touched
                sel = take[local // WINDOW == w]
                rows = sorted_ids[sel] - self.starts[p] - w * WINDOW
                out[order[sel]] = self._window(part, int(w * WINDOW), int(min((w + 1) * WINDOW, part.rows)), kind, rows)
        return normalize(out)

    def sample_ids(self, n: int, seed: int = 0, exclude: np.ndarray | None = None) -> np.ndarray:
        """``n`` distinct ids (fewer when the collection is smaller), sorted; a seeded draw, none of ``exclude``."""
        rng = np.random.default_rng(seed)
        pool = len(self) - (0 if exclude is None else len(exclude))
        n = min(n, pool)
        if exclude is None or not len(exclude):
            return np.sort(rng.choice(len(self), n, replace=False))
        drawn = np.sort(rng.choice(pool, n, replace=False))  # ranks among the ids not excluded
        excluded = np.sort(exclude)
        # the r-th id not excluded is r + (number of excluded ids <= it): solved by a merge
        shift = np.searchsorted(excluded - np.arange(len(excluded)), drawn, side="right")
        return drawn + shift

    # ------------------------------------------------------------ metadata

    def _group_columns(self, p: int, group: int, columns: tuple[str, ...]) -> dict[str, list]:
        import pyarrow.parquet as pq

        key = (p, group, columns)
        with self._lock:
            if key in self._groups:
                self._groups.move_to_end(key)
                return self._groups[key]
        file = pq.ParquetFile(self.parts[p].meta)
        present = [c for c in columns if c in file.schema_arrow.names]
        table = file.read_row_group(group, columns=present).to_pydict()
        with self._lock:
            self._groups[key] = table
            while len(self._groups) > CACHED_GROUPS:
                self._groups.popitem(last=False)
        return table

    def rows(self, ids: Sequence[int], columns: Sequence[str] = SHOWN) -> list[dict]:
        """The metadata of items ``ids``: one dict per id with the ``columns`` it has (None values left out);
        clip-retrieval's ``image_path`` is returned as ``path``. Reads only the row groups that hold them."""
        import pyarrow.parquet as pq

        wanted = tuple(dict.fromkeys([*columns, *(PATH_COLUMNS if "path" in columns else ())]))
        out: list[dict] = []
        for i in ids:
            if not 0 <= i < len(self):
                raise UsageError(f"no item {i} in this index (it holds {len(self)})")
            p = int(np.searchsorted(self.starts, i, side="right") - 1)
            part, row = self.parts[p], int(i - self.starts[p])
            if part.meta is None:
                out.append({})
                continue
            if p not in self._group_starts:
                meta = pq.ParquetFile(part.meta).metadata
                self._group_starts[p] = np.cumsum([0, *(meta.row_group(g).num_rows for g in range(meta.num_row_groups))])
            starts = self._group_starts[p]
            group = int(np.searchsorted(starts, row, side="right") - 1)
            row -= int(starts[group])
            table = self._group_columns(p, group, wanted)
            item = {name: values[row] for name, values in table.items() if values[row] is not None}
            if "image_path" in item and "path" not in item:
                item["path"] = item.pop("image_path")
            out.append({name: item[name] for name in columns if name in item})
        return out
