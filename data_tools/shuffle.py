"""Which shard each input goes to: the listing in a seeded order, rearranged with bounded memory.

Owns: the order of the manifest's rows (``shard_order``): the sorted listing rearranged by ``sort_key``, a
seeded hash of each row's index in the listing. Shard *i* then holds rows ``[i*S, (i+1)*S)`` of that order.
Does not own the listing (``inputs``) or the manifest file around the rows (``manifest``).

Why: a listing sorted by path is sorted by class when the classes are folders (``cats/…``, then ``dogs/…``),
and shards cut from it would each hold one or two classes; a loader that reads a few shards at a time
would see a few classes at a time. In the seeded order every shard is a uniform sample of the whole
listing, so each holds every class in proportion. The order is a pure function of the listing and
``--seed``: every engine, part and resume sees the same rows in every shard.

``sort_key(index, seed)`` is splitmix64's output for the seeded state (a bijection of 64-bit integers, so
no two rows tie and the order is a permutation). Rows are rearranged as an external sort on that key,
because the listing may hold hundreds of millions of rows: up to ``BUCKET_ROWS`` rows are sorted in memory;
more are first spread over ``ceil(n / BUCKET_ROWS)`` temporary bucket files (at most ``MAX_BUCKETS``),
bucket *b* holding the keys in the *b*-th of equal ranges of [0, 2^64), then each bucket is read, sorted
and appended. The keys are uniform, so buckets are equal in size up to a few standard deviations: memory
is that of one bucket (~130 bytes a row: ~25 MB for 200,000 rows; ~50 MB per bucket at 100M rows) plus a
small compressor per bucket file; the files take about the manifest's compressed size on disk. The bucket
count changes where rows wait, never their order.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Callable, Iterable, Iterator

BUCKET_ROWS = 200_000  # rows sorted in memory at once (one bucket, on average)
MAX_BUCKETS = 256  # temporary files open at once while spreading rows over buckets
_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (odd: index -> state is a bijection)
_GZIP_WBITS, _ZLIB_MEMLEVEL = 16 + 12, 4  # small gzip compressors: ~24 KB each, MAX_BUCKETS of them at once


def seed_state(seed: int) -> int:
    """The 64-bit starting state for ``--seed``: seeds that differ by 1 give unrelated orders."""
    return int.from_bytes(hashlib.blake2b(f"make_shards order {seed}".encode(), digest_size=8).digest(), "little")


def sort_key(index: int, state: int) -> int:
    """Where listing row ``index`` goes: smaller keys come first. A bijection of 64-bit integers for a given
    ``state`` (``seed_state(seed)``), so distinct rows never tie."""
    z = (state + index * _GAMMA) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def shard_order(
    lines: Iterable[bytes], count: int, seed: int, temporary: Callable[[str], str], bucket_rows: int = BUCKET_ROWS
) -> Iterator[bytes]:
    """The ``count`` lines of ``lines`` (the listing, in order) in the seeded order, streamed.

    ``temporary(name)`` gives a path for a bucket file (the caller removes what is left there after an error);
    ``bucket_rows`` is how many rows are sorted in memory at once (the order does not depend on it).

    >>> list(shard_order([b"a\\n", b"b\\n", b"c\\n"], 3, seed=0, temporary=str))
    [b'c\\n', b'a\\n', b'b\\n']
    """
    state = seed_state(seed)
    keyed = ((sort_key(i, state), line) for i, line in enumerate(lines))
    if count <= bucket_rows:
        for row in sorted(b"%016x%s" % pair for pair in keyed):  # the key's text first: sorting text sorts by key
            yield row[16:]
        return
    buckets = min(MAX_BUCKETS, -(-count // bucket_rows))
    paths = [temporary(f"bucket{b}") for b in range(buckets)]
    _spread(keyed, paths)
    for path in paths:
        for row in _sorted_bucket(path):  # one bucket in memory at a time
            yield row[16:]


def _spread(keyed: Iterable[tuple[int, bytes]], paths: list[str]) -> None:
    """Write each (key, line) to the bucket file of its key's range, gzip-compressed, as ``%016x`` + line."""
    n = len(paths)
    files = [open(path, "xb") for path in paths]
    try:
        compressors = [zlib.compressobj(1, zlib.DEFLATED, _GZIP_WBITS, _ZLIB_MEMLEVEL) for _ in paths]
        for key, line in keyed:
            b = (key * n) >> 64
            files[b].write(compressors[b].compress(b"%016x%s" % (key, line)))
        for f, compressor in zip(files, compressors):
            f.write(compressor.flush())
    finally:
        for f in files:
            f.close()


def _sorted_bucket(path: str) -> list[bytes]:
    """The rows of one bucket file sorted by key (``%016x`` first: sorting the text sorts by key); removes it."""
    with gzip.open(path, "rb") as f:
        rows = f.readlines()
    os.remove(path)
    rows.sort()
    return rows
