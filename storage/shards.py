"""A table's shards on disk: listing them, an in-memory index of their keys, and compaction.

Every shard of a table lies directly in its folder, `parquet/<table>/`, and holds its rows'
run_id as a column:

    part-<uuid>.parquet        the rows of one write() (a small shard)
    part-<uuid>-L<k>.parquet   a compacted shard: rows of any runs, merged k levels deep

One flat folder, because one directory listing (what DuckDB's glob does) is then one
consistent snapshot, and because compaction can merge the shards of many runs: a store
that ran nightly for a year holds a few large files per table, not one per run.

Compaction merges shards into one and swaps the table's folder for the new one in a single
atomic step (renameat2 RENAME_EXCHANGE):

1. build `parquet/.compact-<table>-<uuid>/`, beside the folder the views read, with the
   merged shard (temp + fsync + rename) and hard links to every file it keeps;
2. exchange that folder with `parquet/<table>/`: a reader lists the old folder or the new
   one, and each holds every row once with its key and run_id; a reader that listed the
   old folder and opens a merged-away shard after the swap fails, and is run again;
3. delete the staging folder, which now holds the old shards.

Step 1 may run without the write lock (write() has its merges built on a background thread);
step 2 takes it and first checks that every source is still there. A merge in progress
holds an flock on its staging folder. A kill -9 before step 2 leaves only an orphan staging
folder, after it only the old shards in one; either is deleted by the next write or
compaction, which deletes the staging folders no one holds.

Levels keep the cost of a write flat: write() merges the small shards into one of level 1
once there are COMPACT_AT of them, and FANOUT shards of a level into one of the next
(storage/store.py), so a row is rewritten about log_FANOUT(writes / COMPACT_AT) times.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STAGING_PREFIX = ".compact-"  # a table being compacted; never matches the views' glob
TMP_SUFFIX = ".parquet.tmp"  # a shard being written; never matches the views' glob
# write() and its merges favour speed: LZ4 writes 100 rows 2x faster than zstd and reads
# back 5-10x faster; a full compaction (by hand) favours size: zstd files are 1.5-2.5x smaller.
FAST_CODEC, SMALL_CODEC = "lz4", "zstd"
ROW_GROUP_ROWS = 65_536  # rows per row group of a merged shard
ROW_GROUP_BYTES = 64 << 20  # ... or fewer, when they hold this much (long texts)
PLAIN_ROWS = 4_096  # a write()'s shard smaller than this has no dictionaries or statistics
_LEVEL = re.compile(r"-L(\d+)\.parquet$")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def level(shard: Path | str) -> int:
    """0 for a shard written by write(), k for one compacted k levels deep."""
    return _level_of(os.path.basename(shard))


def _level_of(name: str) -> int:
    found = _LEVEL.search(name) if "-L" in name else None
    return int(found.group(1)) if found else 0


@dataclass(frozen=True)
class Listing:
    """What one scan of a table's folder found."""

    shards: list[str]  # every `<table>/*.parquet`, what the views read (paths as text: fast)
    levels: dict[str, int]  # of each shard
    orphans: list[Path]  # temp files and staging folders a killed process left behind

    def small(self) -> list[str]:
        """Shards written by write() and not compacted yet."""
        return [p for p in self.shards if self.levels[p] == 0]

    def next_merge(self, compact_at: int, fanout: int) -> tuple[list[str], int] | None:
        """The shards to merge next and the merged shard's level, or None: the small shards
        once there are `compact_at`, then the shards of the lowest level with `fanout`."""
        small = self.small()
        if len(small) >= compact_at:
            return small, 1
        counts = Counter(self.levels.values())
        full_levels = sorted(k for k, n in counts.items() if k > 0 and n >= fanout)
        if not full_levels:
            return None
        return [p for p in self.shards if self.levels[p] == full_levels[0]], full_levels[0] + 1


def list_table(folder: Path) -> Listing:
    """Shards and orphans of the table stored in `folder` (one scandir; the staging folders
    beside it are `remove_orphans`' to find)."""
    levels: dict[str, int] = {}
    orphans: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        name = entry.name
        if name.endswith(".parquet") and not name.startswith("."):
            levels[entry.path] = _level_of(name)
        elif name.endswith(TMP_SUFFIX) or name.startswith(STAGING_PREFIX):
            orphans.append(Path(entry.path))
    return Listing(sorted(levels), levels, orphans)


def remove_orphans(folder: Path, listing: Listing) -> None:
    """Delete what killed writers and merges of the table in `folder` left: temp files, and
    staging folders no live `Staging` holds. Call with the write lock held."""
    staging = f"{STAGING_PREFIX}{folder.name}-"
    beside: list[Path] = []
    with suppress(FileNotFoundError):
        beside = [Path(e.path) for e in os.scandir(folder.parent) if e.name.startswith(staging)]
    for path in [*listing.orphans, *beside]:
        if not path.is_dir():
            path.unlink(missing_ok=True)
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a merge in progress, in this process or another
        finally:
            os.close(fd)  # closing drops the lock taken, if any
        shutil.rmtree(path, ignore_errors=True)


class KeyIndex:
    """The keys stored in one table, with the shards they were read from.

    `refresh` completes it from the shards on every use: shards it has not seen are read
    (their key column only); if a shard it has seen is gone and was not replaced by this
    process's own compaction, it is rebuilt from the shards, never trusted.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.shards: set[str] = set()
        self.keys: set[str] = set()

    def refresh(self, shards: Iterable[str]) -> None:
        names = set(shards)
        if self.shards - names:  # a shard vanished: another process compacted (or deleted)
            self.shards, self.keys = set(), set()
        for name in sorted(names - self.shards):
            self.add(name, read_keys(name, self.key))

    def add(self, shard: str, keys: Iterable[str]) -> None:
        self.shards.add(shard)
        self.keys.update(keys)

    def replace(self, sources: Iterable[str], merged: Path) -> None:
        """This process merged `sources` into `merged`: the keys are the same."""
        self.shards.difference_update(sources)
        self.shards.add(str(merged))


def read_keys(path: Path | str, key: str) -> list[str]:
    return pq.ParquetFile(path).read(columns=[key]).column(key).to_pylist()


class Staging:
    """A staging folder beside a table's folder, held by an flock on it for as long as it is
    in use, so that `remove_orphans` in any process or thread leaves it alone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder.parent / f"{STAGING_PREFIX}{folder.name}-{uuid.uuid4().hex}"
        self.path.mkdir()
        self._fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def merge(
        self,
        sources: list[str],
        merged_level: int,
        in_memory: Mapping[str, pa.Table],
        compression: str = FAST_CODEC,
    ) -> str:
        """Write the merge of `sources` into the staging folder; its file name. Needs no
        lock: shards never change, and `swap` checks that none is gone meanwhile."""
        name = f"part-{uuid.uuid4().hex}-L{merged_level}.parquet"
        with replacing(self.path / name) as tmp:
            _merge(sources, tmp, in_memory, compression)
        return name

    def swap(self, replaced: Iterable[str | Path]) -> None:
        """Hard-link every file of the table's folder but `replaced` into the staging folder,
        then exchange the two. Call with the write lock held."""
        _keep(self.folder, self.path, skip={Path(p) for p in replaced})
        fsync_dir(self.path)
        exchange(self.path, self.folder)
        fsync_dir(self.folder.parent)

    def close(self) -> None:
        """Delete the staging folder: the new files before a swap, the old ones after."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)


def compact(
    folder: Path,
    sources: list[str],
    merged_level: int,
    in_memory: Mapping[str, pa.Table],
    compression: str = FAST_CODEC,
) -> Path:
    """Merge the shards `sources` of the table in `folder` into one, atomically (see module).

    `in_memory` holds shards this process wrote, by path, so they are not read back.
    Returns the merged shard's path. Call with the write lock held.
    """
    staging = Staging(folder)
    try:
        name = staging.merge(sources, merged_level, in_memory, compression)
        staging.swap(sources)
    finally:
        staging.close()
    return folder / name


def _keep(folder: Path, staging: Path, skip: set[Path]) -> None:
    """Hard-link every file of `folder` but `skip` into `staging`; move its other folders
    (none of which the views read) there too."""
    for entry in os.scandir(folder):
        path = Path(entry.path)
        if path in skip or entry.name.endswith(TMP_SUFFIX):
            continue
        if entry.is_dir(follow_symlinks=False):
            os.rename(path, staging / entry.name)
        else:
            os.link(path, staging / entry.name, follow_symlinks=False)


def _merge(
    sources: list[str], target: Path, in_memory: Mapping[str, pa.Table], compression: str
) -> None:
    """Stream `sources` into one Parquet file of row groups of about ROW_GROUP_ROWS rows
    (DuckDB scans 1M pairs in row groups of 6,400 rows 2.4x slower than in 65,536), holding
    about one row group in memory. Shards of older schemas get null columns."""
    schemas = [in_memory[p].schema if p in in_memory else pq.read_schema(p) for p in sources]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    with open(target, "wb") as fh:
        with pq.ParquetWriter(fh, schema, compression=compression) as writer:
            gathered: list[pa.Table] = []
            rows = size = 0
            for piece in _pieces(sources, in_memory):
                gathered.append(_conform(piece, schema))
                rows, size = rows + piece.num_rows, size + piece.nbytes
                if rows >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
                    writer.write_table(pa.concat_tables(gathered), rows)
                    gathered, rows, size = [], 0, 0
            if gathered:
                writer.write_table(pa.concat_tables(gathered), rows)
        fh.flush()
        os.fsync(fh.fileno())


def _pieces(sources: list[str], in_memory: Mapping[str, pa.Table]) -> Iterator[pa.Table]:
    for path in sources:
        table = in_memory.get(path)
        if table is not None:
            yield table
            continue
        shard = pq.ParquetFile(path)
        for group in range(shard.num_row_groups):
            yield shard.read_row_group(group, use_threads=False)  # a core left for writes


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    if table.schema.equals(schema, check_metadata=False):
        return table
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def write_durably(table: pa.Table, path: Path) -> None:
    """Write a shard of level 0 and make it durable (not its name: fsync its folder).
    A small one without dictionaries or statistics: they do not pay in a shard that is
    merged soon (the merge writes both), while a large one may stay as it is for long, and
    without them DuckDB filters its strings several times slower."""
    small = table.num_rows < PLAIN_ROWS
    with open(path, "wb") as fh:
        pq.write_table(
            table, fh, compression=FAST_CODEC, use_dictionary=not small, write_statistics=not small
        )
        fh.flush()
        os.fsync(fh.fileno())


class ExchangeUnsupported(OSError):
    """The OS or file system cannot swap two folders atomically."""


def exchange(a: Path, b: Path) -> None:
    """Swap the folders `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise ExchangeUnsupported(errno.ENOSYS, "renameat2 is not available", str(a))
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise ExchangeUnsupported(code, "no atomic folder exchange here", str(a))
        raise OSError(code, os.strerror(code), str(a))


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """`.<name>.tmp` beside `path` for the block to write, renamed to `path` when the block
    ends, deleted if it raises. The block fsyncs what it writes (write_durably and merges
    do); the rename is durable once the folder is fsynced (fsync_dir), where that matters.
    alignment/atomic.py is the same shape for alignment/ and flows/, without fsync: storage/
    and alignment/ never import each other."""
    tmp = path.with_name(f".{path.name}.tmp")  # never matches the views' *.parquet glob
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
