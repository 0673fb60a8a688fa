"""The manifest ``OUTPUT_DIR/_manifest.jsonl.gz``: INPUT's listing, written once, read by every executor.

Owns: writing the listing (streamed, atomically, byte-identical for the same INPUT and settings) in shard
order, its header (what the command asked for, ``--seed`` included, the layout found, the class names, the
row count and a fingerprint of the sorted listing), and reading it back a shard's rows at a time. Shard *i*
is rows ``[i*S, (i+1)*S)`` of the file. Does not own finding the inputs (``inputs``), the seeded order of
the rows (``shuffle``) or writing shards (``output``).

The file is gzip-compressed JSON lines: the header line, then one ``Item`` row per input. It is two gzip
members (header, rows): the listing is streamed to a temporary file first (its count and fingerprint, which
the header needs, are known at the end), then rearranged into shard order behind the header; ``gzip``,
``zcat`` and ``pandas.read_json(lines=True)`` read it as one stream.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterator

from data_tools.formats import MANIFEST_FILE
from data_tools.inputs import ArgumentError, Listing
from data_tools.output import crash_for_tests
from data_tools.shuffle import shard_order

MANIFEST_FORMAT = "make_shards manifest 2"  # 2: rows in the seeded shard order


def _gzip_writer(f):
    # no file name and no time in the gzip header: the same listing gives the same bytes
    return gzip.GzipFile(fileobj=f, mode="wb", filename="", mtime=0, compresslevel=1)


def _json_line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


def _temporary(output_dir: str, what: str) -> str:
    # unique across processes and machines: --part runs on several nodes may list at the same time
    return os.path.join(output_dir, f"_manifest.{what}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_manifest(output_dir: str, request: dict, listing: Listing, exclusive: bool = False) -> dict:
    """Stream ``listing`` into OUTPUT_DIR's manifest, its rows in the order of ``request["seed"]``; returns
    its header.

    ``request`` is what the command asked for (INPUT, layout, settings): a resume must ask for the same.
    With ``exclusive`` (``--part`` runs, which may list at the same time), a manifest another run published
    meanwhile is kept if it has the same rows and request, and is an error if not.
    """
    rows_path, final_tmp = _temporary(output_dir, "rows"), _temporary(output_dir, "jsonl.gz")
    buckets: list[str] = []  # shard_order's temporary files: removed here if it stops half way
    digest, count = hashlib.sha1(), 0
    try:
        with open(rows_path, "xb") as raw, _gzip_writer(raw) as rows:
            for item in listing.items():
                line = _json_line(item.to_row())
                rows.write(line)
                digest.update(line)
                count += 1
                crash_for_tests("manifest", count)
        header = {
            "format": MANIFEST_FORMAT, "request": request, "layout": listing.layout,
            "classes": listing.labels.classes, "rows": count, "fingerprint": digest.hexdigest(),
        }  # fmt: skip
        def bucket(name: str) -> str:
            buckets.append(_temporary(output_dir, name))
            return buckets[-1]

        with open(final_tmp, "xb") as out:
            with _gzip_writer(out) as head:
                head.write(_json_line(header))
            with gzip.open(rows_path, "rb") as listed, _gzip_writer(out) as rows:
                for line in shard_order(listed, count, request["seed"], bucket):
                    rows.write(line)
        _publish(final_tmp, os.path.join(output_dir, MANIFEST_FILE), header, exclusive)
    finally:
        for path in (rows_path, final_tmp, *buckets):
            if os.path.exists(path):
                os.remove(path)
    return header


def _publish(tmp: str, final: str, header: dict, exclusive: bool) -> None:
    if not exclusive:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # atomic, and fails if another run published first
    except FileExistsError:
        theirs = read_header(final)
        if theirs is None or (theirs["fingerprint"], theirs["request"]) != (header["fingerprint"], header["request"]):
            raise ArgumentError(
                f"{final} was written meanwhile by another run from a different listing of INPUT or other settings "
                "(did INPUT change?); write the manifest once with --manifest-only before starting the --part runs"
            ) from None
    except OSError:  # a file system without hard links
        os.replace(tmp, final)


def read_header(path: str) -> dict | None:
    """The manifest's header, or None when there is no readable manifest."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            header = json.loads(f.readline())
    except (OSError, ValueError, EOFError):
        return None
    return header if isinstance(header, dict) and header.get("format") == MANIFEST_FORMAT else None


def shard_rows(path: str, shard_size: int) -> Iterator[tuple[int, list[str]]]:
    """(shard index, its rows as JSON lines) for every shard, streamed; one empty shard 0 for no rows."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        f.readline()  # the header
        shard, lines = 0, []
        for line in f:
            lines.append(line)
            if len(lines) == shard_size:
                yield shard, lines
                shard, lines = shard + 1, []
        if lines or shard == 0:
            yield shard, lines
