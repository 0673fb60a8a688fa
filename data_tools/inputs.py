"""Finding the samples of INPUT, streamed in a fixed order: make_shards' listing.

Owns: the four layouts of INPUT (``sidecar``, ``captions``, ``classes``, and ``images``: image-only, no
captions), the order of the samples (sorted relative path; a captions file's row order), their keys
(``make_key``), which folders the walk enters (symlinks included), and how labels become integer
``label_index`` values (``Labels``). Does not own reading or checking the files themselves (``samples``),
where the listing is stored (``manifest``) or how it is spread over the shards (``shuffle``).

The walk never holds the whole listing: it visits folders depth first, each folder's entries sorted with
``name/`` as a folder's sort key, which yields every file in the order of its sorted relative path. Memory is
bounded by the largest single folder. A captions file is read row by row; only a count per distinct path is
kept (to give a file listed twice two different keys).

Symlinks: a symlinked file is listed like any file (``samples`` skips it as ``symlink_outside_input`` when it
points outside INPUT, unless ``--follow-symlinks``). A symlinked folder that points outside INPUT is entered
and its images listed, so that they are counted (and read with ``--follow-symlinks``), never passed over in
silence; one that points inside INPUT is not entered (its files are listed under their own path already),
nor is a folder the walk is already inside (a symlink loop).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_tools.formats import IMAGE_EXTENSIONS, is_image_file

DEFAULT_CLASS_TEMPLATE = "a photo of a {}."
LAYOUTS = ("auto", "sidecar", "captions", "classes", "images")
# --layout auto decides on the images seen so far once this many are undecided (sidecar needs one image
# with a same-stem .txt among them); below it, it looks at every image, as a full listing would.
AUTO_LAYOUT_LOOKAHEAD = 100_000


class ArgumentError(Exception):
    """An unusable argument or INPUT; ``make_shards.main`` prints it as one line and exits 2."""


@dataclass
class Item:
    """One input sample, before its files are read; one row of the manifest."""

    relpath: str  # POSIX path of the image relative to INPUT
    key: str
    caption: str | None = None  # known caption (captions file, class template)
    caption_path: str | None = None  # sidecar caption file, relative to INPUT
    meta_path: str | None = None  # sidecar JSON file, relative to INPUT
    label: str | int | None = None  # as listed; ``Labels.resolve`` gives the stored label and its index
    extra: dict = field(default_factory=dict)  # other fields of the captions row, kept in KEY.json
    reason: str | None = None  # already known to be skipped

    def to_row(self) -> dict:
        """The fields that are set, for one compact manifest line."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}


def make_key(relpath: str, occurrence: int = 0) -> str:
    """A webdataset key for ``relpath``: readable, unique, stable, without dots or slashes.

    The readable part keeps the end of the path (the file name says most); the hash of the whole path
    (and of the occurrence, for a file listed twice in a captions file) makes it unique.

    >>> make_key("dogs/Rex 1.jpg")
    'dogs_Rex_1-049da35135'
    """
    stem = posixpath.splitext(relpath)[0]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[-60:].strip("_-") or "sample"
    digest = hashlib.sha1(f"{relpath}#{occurrence}".encode()).hexdigest()[:10]
    return f"{readable}-{digest}"


class Labels:
    """Collects the labels of a listing, then maps each to (stored label, ``label_index``).

    Labels are names (strings, whatever they look like: folders ``1``, ``2``, ``10`` are the classes ``"1"``,
    ``"10"``, ``"2"``); ``label_index`` is the label's position in ``classes`` — the sorted unique names, or the
    ``order`` a user gave (``--classes a,b,c``) — which is stored in stats.json, so every reader indexes the same way.
    """

    def __init__(self, classes: list[str] | None = None, order: list[str] | None = None):
        self.classes = classes
        self.order = list(order) if order else None
        self._names: set[str] = set()
        self._index = {name: i for i, name in enumerate(classes)} if classes is not None else None

    def add(self, label) -> None:
        if label is not None:
            self._names.add(str(label))

    def finish(self) -> list[str] | None:
        """The class names (None when there are no labels), once every label was added. An ``order`` that leaves out
        a label found is an ``ArgumentError`` naming both lists."""
        if self.order is not None and self._names:
            missing = sorted(self._names - set(self.order))
            if missing:
                raise ArgumentError(f"--classes {','.join(self.order)} leaves out the class(es) {', '.join(missing)} found in "
                                    f"INPUT (its classes: {', '.join(sorted(self._names))}); list every class")
        self.classes = None if not self._names else (self.order or sorted(self._names))
        self._index = None
        return self.classes

    def resolve(self, label) -> tuple[str | None, int | None]:
        if label is None:
            return None, None
        if self._index is None:
            self._index = {name: i for i, name in enumerate(self.classes or [])}
        return str(label), self._index[str(label)]


# ---------------------------------------------------------------- the walk


def is_inside(real: str, root_real: str) -> bool:
    """Whether the resolved path ``real`` is ``root_real`` or lies under it (both ``os.path.realpath``-ed)."""
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _scan(folder: str, root_real: str, walked: frozenset[str]) -> list[tuple[str, str | None]]:
    """Sorted non-hidden entries of ``folder``: (name, None) for a file, (name, real path) for a folder to enter.

    Left out: a symlinked folder that points inside INPUT (listed under its own path), and a folder the walk
    is already inside (``walked``: the real paths from INPUT down to here; a symlink loop)."""
    entries = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    entries.append((entry.name, None))
                    continue
                real = os.path.realpath(entry.path)
                if real not in walked and not (entry.is_symlink() and is_inside(real, root_real)):
                    entries.append((entry.name, real))
    except OSError:  # an unreadable folder is passed over, as os.walk does
        return []
    # "name/" as a folder's key: the walk then lists relative paths in plain sorted-string order
    return sorted(entries, key=lambda e: e[0] + "/" if e[1] else e[0])


def walk_files(root: str, on_folder: Callable[[int], None] = lambda n: None) -> Iterator[tuple[str, list[str], set[str]]]:
    """Runs of files under ``root`` in sorted relative-path order: (folder relative to root, POSIX; a run of
    its file names; all file names of that folder, for finding siblings). ``on_folder(n)`` is called with each
    folder's entry count (listing progress)."""
    root_real = os.path.realpath(root)
    yield from _walk(root, on_folder, "", root_real, frozenset([root_real]))


def _walk(root: str, on_folder: Callable[[int], None], rel: str, root_real: str, walked: frozenset[str]):
    entries = _scan(os.path.join(root, rel) if rel else root, root_real, walked)
    on_folder(len(entries))
    names = {name for name, real in entries if real is None}
    run: list[str] = []
    for name, real in entries:
        if real is None:
            run.append(name)
            continue
        if run:
            yield rel, run, names
            run = []
        yield from _walk(root, on_folder, posixpath.join(rel, name) if rel else name, root_real, walked | {real})
    if run:
        yield rel, run, names


# ---------------------------------------------------------------- the layouts


class Listing:
    """The samples of INPUT in a fixed order, streamed: iterate ``items()`` once; afterwards ``layout`` is
    the layout used and ``labels.classes`` the class names (or None).

    >>> listing = Listing("photos/")            # doctest: +SKIP
    >>> rows = [item.to_row() for item in listing.items()]
    """

    def __init__(
        self,
        root: str,
        layout: str = "auto",
        captions: str | None = None,
        class_template: str = DEFAULT_CLASS_TEMPLATE,
        on_folder: Callable[[int], None] = lambda n: None,
        classes: list[str] | None = None,
    ):
        if layout not in LAYOUTS:
            raise ArgumentError(f"unknown --layout {layout!r}; use {', '.join(LAYOUTS)}")
        if layout == "captions" and not captions:
            raise ArgumentError("--layout captions needs --captions FILE")
        if layout == "images" and captions:
            raise ArgumentError("--layout images writes image-only shards and reads no --captions FILE; drop one of the two")
        self.root, self.captions, self.class_template, self.on_folder = root, captions, class_template, on_folder
        self.layout = "captions" if captions else layout
        self.labels = Labels(order=classes)
        if self.layout == "classes":
            self._check_template()

    def items(self) -> Iterator[Item]:
        found = self._caption_file_items() if self.layout == "captions" else self._folder_items()
        for item in found:
            self.labels.add(item.label)
            yield item
        self.labels.finish()

    def _check_template(self) -> None:
        try:
            self.class_template.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ArgumentError(f"--class-template {self.class_template!r} must contain one {{}}: {e}") from e
        if "{}" not in self.class_template:
            raise ArgumentError(f"--class-template {self.class_template!r} must contain {{}} for the class name")

    def _folder_items(self) -> Iterator[Item]:
        files = images = 0
        pending: list[tuple[str, str, set[str]]] = []  # images seen while --layout auto is undecided
        for rel, run, names in walk_files(self.root, self.on_folder):
            files += len(run)
            for name in run:
                if not is_image_file(name):
                    continue
                images += 1
                if self.layout != "auto":
                    yield self._folder_item(rel, name, names)
                    continue
                pending.append((rel, name, names))
                if posixpath.splitext(name)[0] + ".txt" in names:
                    self.layout = "sidecar"
                elif len(pending) >= AUTO_LAYOUT_LOOKAHEAD:
                    self._decide_without_captions(pending)
                if self.layout != "auto":
                    yield from (self._folder_item(*p) for p in pending)
                    pending = []
        if not images:
            what = "is empty" if not files else f"has {files} files but no images ({', '.join(IMAGE_EXTENSIONS)})"
            raise ArgumentError(f"INPUT {self.root} {what}; point it at a folder of images")
        if pending:
            self._decide_without_captions(pending)
            yield from (self._folder_item(*p) for p in pending)

    def _decide_without_captions(self, images: list[tuple[str, str, set[str]]]) -> None:
        """No image has a caption file: class folders if images sit in subfolders, else nothing to go on."""
        if not any(rel for rel, _, _ in images):
            raise ArgumentError(
                f"INPUT {self.root} has images but no captions: put a .txt beside each image, pass --captions FILE, "
                "sort the images into class subfolders, or pass --layout images for image-only shards (--mode simclr)"
            )
        self.layout = "classes"
        self._check_template()

    def _folder_item(self, rel: str, name: str, names: set[str]) -> Item:
        path = posixpath.join(rel, name) if rel else name
        if self.layout in ("sidecar", "images"):
            stem = posixpath.splitext(name)[0]
            sibling = {ext: posixpath.join(rel, stem + ext) if stem + ext in names else None for ext in (".txt", ".json")}
            caption_path = sibling[".txt"] if self.layout == "sidecar" else None
            return Item(path, make_key(path), caption_path=caption_path, meta_path=sibling[".json"])
        if not rel:
            return Item(path, make_key(path), reason="no_class_folder")
        folder = rel.split("/", 1)[0]
        caption = self.class_template.format(folder.replace("_", " "))
        return Item(path, make_key(path), caption=caption, label=folder)

    def _caption_file_items(self) -> Iterator[Item]:
        seen: Counter = Counter()  # occurrences of each path: a file listed twice gets two keys
        for row in caption_rows(self.captions):
            path = str(row.get("filepath") or "")
            rel = _relative_inside(self.root, path) if path else None
            extra = {str(k): v for k, v in row.items() if k not in ("filepath", "caption", "label") and k is not None}
            label = row.get("label")
            label = None if label is None or (isinstance(label, str) and not label.strip()) else label
            if rel is None:
                reason = "missing_file" if not path else "path_outside_input"
                yield Item(path, make_key(path or "missing", seen[path]), reason=reason)
                seen[path] += 1
                continue
            caption = row.get("caption")
            yield Item(rel, make_key(rel, seen[rel]), caption=caption if isinstance(caption, str) else "", label=label, extra=extra)
            seen[rel] += 1


def caption_rows(path: str) -> Iterator[dict]:
    """Rows of a CSV/TSV (header row) or JSONL captions file, streamed; the file must offer ``filepath`` and
    ``caption`` columns (a CSV's header says so at once, a JSONL file by its end)."""
    if not os.path.isfile(path):
        raise ArgumentError(f"--captions {path} does not exist")
    columns: set = set()
    count = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.lower().endswith((".jsonl", ".json", ".ndjson")):
                rows = (json.loads(line) for line in f if line.strip())
            else:
                first = f.readline()
                f.seek(0)
                tab = path.lower().endswith(".tsv") or ("\t" in first and "," not in first)
                rows = csv.DictReader(f, delimiter="\t" if tab else ",")
                _check_columns(path, set(rows.fieldnames or ()))
            for row in rows:
                if not isinstance(row, dict):
                    raise ArgumentError(f"--captions {path}: every JSONL line must be an object with filepath and caption")
                columns.update(row)
                count += 1
                yield row
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise ArgumentError(f"--captions {path} cannot be parsed: {e}") from e
    if not count:
        raise ArgumentError(f"--captions {path} has no rows")
    _check_columns(path, columns)


def _check_columns(path: str, columns: set) -> None:
    if columns and not {"filepath", "caption"} <= columns:
        names = ",".join(sorted(str(c) for c in columns if c is not None))
        raise ArgumentError(f"--captions {path} has columns {names}; it needs filepath and caption")


def _relative_inside(root: str, path: str) -> str | None:
    """``path`` (relative to root, or absolute) as a normalised relative POSIX path; None if it leaves root."""
    path = path.strip()
    rel = os.path.relpath(path, root) if os.path.isabs(path) else path
    rel = posixpath.normpath(rel.replace(os.sep, "/"))
    return None if rel == ".." or rel.startswith("../") else rel


def identical_files(first: Sequence[Path], second: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Pairs ``(a, b)`` of byte-identical files, ``a`` from ``first`` and ``b`` from ``second`` (the same image in a
    training and a test folder inflates every score). Only files of equal size are read and hashed."""
    def sizes(paths: Sequence[Path]) -> dict[int, list[Path]]:
        out: dict[int, list[Path]] = {}
        for path in paths:
            with contextlib.suppress(OSError):
                out.setdefault(os.path.getsize(path), []).append(Path(path))
        return out

    def digest(path: Path) -> bytes | None:
        try:
            return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
        except OSError:
            return None

    a_sizes, b_sizes = sizes(first), sizes(second)
    pairs = []
    for size in a_sizes.keys() & b_sizes.keys():
        seen = {}
        for path in a_sizes[size]:
            seen.setdefault(digest(path), path)
        seen.pop(None, None)
        pairs += [(seen[d], path) for path in b_sizes[size] if (d := digest(path)) in seen]
    return sorted(pairs)
