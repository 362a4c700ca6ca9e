"""A table's shards on disk: listing them, an in-memory index of their keys, and compaction.

Compaction merges the shards of one `run_id=<id>` partition into one file and swaps the
partition's folder for the merged one in a single atomic step (renameat2 RENAME_EXCHANGE):

1. build `<table>/.compact-<uuid>/` (a name the views' `run_id=*` glob never matches) with
   the merged shard (temp + fsync + rename) and hard links to the shards it keeps;
2. exchange that folder with `run_id=<id>`: readers see the old partition or the new one,
   never both and never neither, and each holds the same rows with the same keys and run_id;
3. delete the staging folder, which now holds the old shards.

A kill -9 before step 2 leaves only an orphan staging folder, after it only the old shards
in one; either is deleted by the next write or compaction (all of them hold the write lock,
so any staging folder found then is an orphan).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PARTITION_PREFIX = "run_id="
STAGING_PREFIX = ".compact-"  # a partition being compacted; never matches `run_id=*`
COMPACTED_SUFFIX = "-compacted.parquet"  # a shard made by compaction (not counted as small)
ROW_GROUP_ROWS = 65_536  # rows per row group of a merged shard (and what it buffers)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class Listing:
    """What one scan of a table's folder found."""

    shards: list[Path]  # every `run_id=*/*.parquet`, what the views read
    orphans: list[Path]  # temp files and staging folders a killed process left behind

    def mergeable(self) -> int:
        """Shards written by write() and not compacted yet, in partitions that hold two or
        more of them: what a compaction would merge. (A partition's lone small shard is not
        counted: with many runs, counting those would compact on every write.)"""
        small = Counter(p.parent for p in self.shards if not p.name.endswith(COMPACTED_SUFFIX))
        return sum(n for n in small.values() if n > 1)


def list_table(folder: Path) -> Listing:
    """Shards and orphans of the table stored in `folder`: one scandir per partition."""
    shards: list[Path] = []
    orphans: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return Listing([], [])
    for entry in entries:
        if entry.name.startswith(STAGING_PREFIX):
            orphans.append(Path(entry.path))
        elif entry.name.startswith(PARTITION_PREFIX) and entry.is_dir():
            try:
                files = list(os.scandir(entry.path))
            except FileNotFoundError:  # swapped by a compaction while we listed
                continue
            for file in files:
                if file.name.endswith(".parquet"):
                    shards.append(Path(file.path))
                elif file.name.endswith(".parquet.tmp"):
                    orphans.append(Path(file.path))
    return Listing(sorted(shards), orphans)


def remove_orphans(listing: Listing) -> None:
    """Delete what killed writers and compactions left. Call with the write lock held."""
    for path in listing.orphans:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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

    def refresh(self, shards: Iterable[Path]) -> None:
        names = {str(p) for p in shards}
        if self.shards - names:  # a shard vanished: another process compacted (or deleted)
            self.shards, self.keys = set(), set()
        for name in sorted(names - self.shards):
            self.add(name, read_keys(Path(name), self.key))

    def add(self, shard: str, keys: Iterable[str]) -> None:
        self.shards.add(shard)
        self.keys.update(keys)

    def replace(self, sources: Iterable[Path], merged: Path) -> None:
        """This process merged `sources` into `merged`: the keys are the same."""
        self.shards.difference_update(str(p) for p in sources)
        self.shards.add(str(merged))


def read_keys(path: Path, key: str) -> list[str]:
    return pq.read_table(path, columns=[key]).column(key).to_pylist()


def compact_partition(folder: Path, merge: list[Path], compression: str = "zstd") -> Path:
    """Merge the shards `merge` of the partition `folder` into one, atomically (see module).

    Returns the merged shard's path inside `folder`. Call with the write lock held.
    """
    run_id = folder.name.removeprefix(PARTITION_PREFIX)
    staging = folder.parent / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    name = f"part-{uuid.uuid4().hex}{COMPACTED_SUFFIX}"
    staging.mkdir()
    try:
        tmp = staging / f".{name}.tmp"
        _merge(merge, tmp, run_id, compression)
        os.replace(tmp, staging / name)
        merged = {p.name for p in merge}
        for shard in folder.iterdir():  # the shards it keeps, e.g. earlier merged ones
            if shard.name.endswith(".parquet") and shard.name not in merged:
                os.link(shard, staging / shard.name)
        fsync_dir(staging)
        exchange(staging, folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the new files before, the old ones after
    return folder / name


def _merge(sources: list[Path], target: Path, run_id: str, compression: str) -> None:
    """Stream `sources` into one Parquet file, about a row group in memory at a time. Shards of
    older schemas get null columns; a shard without a run_id column gets its partition's."""
    schemas = [pq.read_schema(p) for p in sources]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    if "run_id" not in schema.names:
        schema = schema.append(pa.field("run_id", pa.string()))
    with open(target, "wb") as fh:
        with pq.ParquetWriter(fh, schema, compression=compression) as writer:
            buffer: list[pa.Table] = []  # small shards make one row group, not one each
            for path in sources:
                buffer.append(_conform(pq.read_table(path), schema, run_id))
                if sum(t.num_rows for t in buffer) >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(buffer), ROW_GROUP_ROWS)
                    buffer = []
            if buffer:
                writer.write_table(pa.concat_tables(buffer), ROW_GROUP_ROWS)
        fh.flush()
        os.fsync(fh.fileno())


def _conform(table: pa.Table, schema: pa.Schema, run_id: str) -> pa.Table:
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.name == "run_id":
            columns.append(pa.array([run_id] * table.num_rows, field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


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


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
