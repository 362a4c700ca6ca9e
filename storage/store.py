"""The store: atomic Parquet shards per table and run, plus a DuckDB file of views over them.

Layout under `root`:
    parquet/<table>/part-<uuid>[-L<k>].parquet   immutable shards, run_id a column of each
    rlaif.duckdb                                 one view per table (and `runs`)
    .lock                                        serialises writers across processes

Writers hold `.lock` and open the DuckDB file read-write only when a view must change
(first shard of a table, schema change, moved root), so the `duckdb` CLI and other
readers can keep the file open read-only most of the time.

A write costs the same in a store of any size: the keys already stored come from an
in-memory index that each write completes from the shard listing (storage/shards.py), and
once a table has COMPACT_AT small shards, write() has them merged into one, and FANOUT
merged shards of a level into one of the next, atomically, with every row's key and run_id
unchanged. The merges run on a background thread, which holds the write lock only to
start one and to swap its result in, so writes go on meanwhile (on another core); the
shards just written are kept in memory for them. `settle()` waits for them.

The views are storage/views.py's; user SQL runs in storage/sandbox.py's sandbox.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from storage.errors import (
    QueryError,
    SchemaMismatch,
    StoreBusy,
    StoreError,
    StoreFull,
    StoreNotFound,
    is_no_space,
)
from storage.sandbox import Reader, SandboxedConnection, fetch, query_connection, query_error, run
from storage.schemas import TABLES, table_spec, to_arrow
from storage.shards import (
    SMALL_CODEC,
    ExchangeUnsupported,
    KeyIndex,
    Listing,
    Staging,
    compact,
    list_table,
    remove_orphans,
    replacing,
    write_durably,
)
from storage.views import DB_NAME, Views, ident, retry, scan_sql

T = TypeVar("T")
_log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 120.0  # how long write() waits for another writer
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")
TMP_GLOB = ".part-*.parquet.tmp"  # a shard being written (see _write_shard)
COMPACT_AT = 64  # write() merges a table's small shards once it has this many
FANOUT = 32  # ... and the merged shards of one level once it has this many
RECENT_BYTES = 32 << 20  # shards just written, kept in memory for the next merge
READ_RETRIES = 3  # a query that lost a shard to a concurrent compaction is run again


@dataclass(frozen=True)
class WriteResult:
    table: str
    path: Path | None  # the new shard, None when nothing was new
    written: int
    skipped: int  # rows already stored, or repeated within the batch


@dataclass(frozen=True)
class CompactResult:
    table: str
    merges: int  # merged shards written
    shards_before: int
    shards_after: int


class Store:
    """Parquet shards + DuckDB views under `root`. Nothing is created before the first write."""

    def __init__(self, root: str | Path = "rlaif-data", *, background: bool = True) -> None:
        """`background=False` merges shards inside write(), before it returns."""
        self.root = Path(root).expanduser().resolve()  # views hold absolute paths
        self.background = background
        self.db_path = self.root / DB_NAME
        self._indexes: dict[str, KeyIndex] = {}  # per table, completed from the shards
        self._index_mutex = threading.Lock()
        self._with_shards: set[str] = set()  # tables seen with shards (compaction keeps one)
        self._views = Views(self.root, self._scan)
        self._recent: OrderedDict[str, pa.Table] = OrderedDict()  # by shard path
        self._recent_bytes = 0
        self._merger: threading.Thread | None = None  # merges the tables in _to_merge
        self._to_merge: set[str] = set()
        self._merger_mutex = threading.Lock()
        self._cannot_swap: set[str] = set()  # tables on a file system without renameat2
        self._reader = Reader()  # this store's sandbox for query(), kept between calls

    def tables(self) -> list[str]:
        """Tables you can write to. The database also has a `run_events` view (all run rows)."""
        return list(TABLES)

    def ensure(self) -> None:
        """Create the folders and the database with every view. Idempotent."""
        with self._lock():
            for table in TABLES:
                self._table_dir(table).mkdir(parents=True, exist_ok=True)
            self._views.sync()

    def write(self, table: str, rows: Sequence[Mapping[str, Any]], run_id: str) -> WriteResult:
        """Append the rows whose key is not stored yet as one new shard, then refresh the views.

        Keys already in the table (any run), or repeated within `rows`, are skipped; when
        every row is skipped no file is written. Raises UnknownTable or SchemaMismatch,
        StoreFull when the disk is full, and StoreLocked when a view must change while another
        process holds the db open: the shard is then kept, and the views catch up on the next
        write() or ensure().
        """
        table_spec(table)
        _check_run_id(table, run_id)
        rows = list(rows)
        if not rows:
            return WriteResult(table, None, 0, 0)
        data = to_arrow(table, rows, run_id)
        with self._lock():
            listing = self._listed(table)
            with self._index_mutex:
                index = self._index(table, listing)
                new, new_keys = self._drop_stored(table, data, index.keys)
                path = self._write_shard(table, new) if new.num_rows else None
                had_shards = table in self._with_shards
                if path is not None:
                    index.add(str(path), new_keys)
                    self._with_shards.add(table)
                    self._remember(path, new)
            # The views change only with a table's first shard; a db file changed since
            # this store last synced it may lack a view another process needed.
            if not (had_shards and self._views.synced_as_now()):
                self._views.sync()
        if path is not None and len(listing.small()) + 1 >= COMPACT_AT:
            if self.background:
                self._merge_soon(table)
            else:
                self._merge_quietly(table)
        return WriteResult(table, path, new.num_rows, data.num_rows - new.num_rows)

    def settle(self) -> None:
        """Wait until this Store's background merges are done."""
        while True:
            with self._merger_mutex:
                merger = self._merger
            if merger is None or not merger.is_alive():
                return
            merger.join()

    def existing_keys(self, table: str, keys: Iterable[str]) -> set[str]:
        """Which of `keys` are stored in `table`, in any run. Reads the shards, not the db."""
        table_spec(table)
        wanted = list(keys)
        if not wanted:
            return set()
        for attempt in range(READ_RETRIES):
            try:
                with self._index_mutex:
                    stored = self._index(table, list_table(self._table_dir(table))).keys
                    return {k for k in wanted if k in stored}
            except FileNotFoundError:  # a merge swapped the folder while we read it
                if attempt == READ_RETRIES - 1:
                    raise
            except (OSError, pa.ArrowException) as e:
                raise StoreError(f"Could not read the {table} shards under {self.root}: {e}") from e
        raise AssertionError("unreachable")

    def compact(self, table: str | None = None) -> list[CompactResult]:
        """Merge all the shards of `table`, or of every table, into one file per table.

        Crash-safe: a table's folder is swapped for its merged copy in one atomic step, so a
        kill -9 loses and duplicates nothing and readers never see a half state; every row
        keeps its key and run_id. Raises StoreError where the file system cannot swap two
        folders atomically (renameat2 RENAME_EXCHANGE, Linux).
        """
        tables = [table] if table is not None else list(TABLES)
        for name in tables:
            table_spec(name)
        self.settle()
        with self._lock():
            return [self._compact(name) for name in tables]

    def query(
        self, sql: str, params: Sequence[Any] | None = None, *, allow_external: bool = False
    ) -> list[dict[str, Any]]:
        """Run read-only SQL against the views; one dict per row.

        Raises QueryError, or SandboxRefused when the SQL reads or writes outside the store
        (allowed only with `allow_external=True`).
        """

        def read() -> tuple[list[str], list[tuple]]:
            if allow_external:
                return run(self._db_or_raise(), sql, params, allow_external)
            with self._sandboxed() as con:
                return fetch(con, sql, params)

        names, rows = self._with_current_views(read)
        return [dict(zip(names, row, strict=True)) for row in rows]

    def query_arrow(
        self, sql: str, params: Sequence[Any] | None = None, *, allow_external: bool = False
    ) -> pa.Table:
        """Like query(), as an Arrow table."""

        def read() -> pa.Table:
            connection = (
                query_connection(self._db_or_raise(), allow_external)
                if allow_external
                else self._sandboxed()
            )
            with connection as con:
                try:
                    relation = con.sql(sql, params=params)
                    return relation.to_arrow_table() if relation is not None else pa.table({})
                except duckdb.Error as e:
                    raise query_error(e) from e

        return self._with_current_views(read)

    def _with_current_views(self, read: Callable[[], T]) -> T:
        """Run `read`; if it names a view this store's database lacks (a store made by an
        older version, before a table existed), bring the views up to date and run it again.

        A query whose shards a concurrent compaction swapped after DuckDB listed them fails
        with a missing file; it is run again (it then reads the merged shards)."""
        for attempt in range(READ_RETRIES):
            try:
                return self._read_current(read)
            except QueryError as error:
                lost = "No such file" in str(error) or "No files found" in str(error)
                if not lost or attempt == READ_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _read_current(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except QueryError as error:
            # A moved store's views read the old root, which the sandbox refuses.
            stale = "does not exist" in str(error) or getattr(error, "path", None) is not None
            if not stale or self._views.current():
                raise
            self.ensure()
            return read()

    def _sandboxed(self) -> AbstractContextManager[SandboxedConnection]:
        """This store's sandbox, holding the views the shards need now."""
        return self._reader.connection(self._db_or_raise().resolve(), self._views.wanted)

    def count(self, table: str) -> int:
        """Rows in the table's view; for `runs` that is the number of runs, not of events."""
        table_spec(table)
        return self.query(f"SELECT count(*) AS n FROM {ident(table)}")[0]["n"]

    @contextmanager
    def claim(self, purpose: str, holder: str, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the store for one `purpose` (e.g. "loop") until the block ends.

        Raises StoreBusy, naming the current holder, when another process holds it for
        longer than `wait_s`. The claim is an OS file lock, so a killed holder frees it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".{purpose}.claim"
        with open(path, "a+") as fh:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        fh.seek(0)
                        raise StoreBusy(self.root, purpose, fh.read().strip()) from None
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            try:
                fh.seek(0)
                fh.truncate()
                fh.write(holder)
                fh.flush()
                yield
            finally:
                fh.truncate(0)
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- shards ---------------------------------------------------------------------------

    def _table_dir(self, table: str) -> Path:
        return self.root / "parquet" / table

    def _has_shards(self, table: str) -> bool:
        if table not in self._with_shards:
            if not list_table(self._table_dir(table)).shards:
                return False
            self._with_shards.add(table)
        return True

    def _listed(self, table: str) -> Listing:
        """The table's shards, after deleting orphans. Call with `.lock` held."""
        folder = self._table_dir(table)
        listing = list_table(folder)
        remove_orphans(folder, listing)
        return listing

    def _remember(self, shard: Path, data: pa.Table) -> None:
        """Keep a shard just written in memory, so merging it does not read it back."""
        self._recent[str(shard)] = data
        self._recent_bytes += data.nbytes
        while self._recent_bytes > RECENT_BYTES:
            self._recent_bytes -= self._recent.popitem(last=False)[1].nbytes

    def _index(self, table: str, listing: Listing) -> KeyIndex:
        """The table's key index, completed from `listing`. Call with _index_mutex held."""
        index = self._indexes.get(table)
        if index is None:
            index = self._indexes[table] = KeyIndex(table_spec(table).key)
        index.refresh(listing.shards)
        return index

    def _merge_soon(self, table: str) -> None:
        """Have the background thread merge `table`'s shards by levels."""
        with self._merger_mutex:
            if table in self._cannot_swap:
                return
            self._to_merge.add(table)
            if self._merger is None or not self._merger.is_alive():
                # Not a daemon: an exiting interpreter finishes the merge rather than drop it.
                self._merger = threading.Thread(target=self._merge_backlog, name="rlaif-merge")
                self._merger.start()

    def _merge_backlog(self) -> None:
        while True:
            with self._merger_mutex:
                if not self._to_merge:
                    self._merger = None
                    return
                table = self._to_merge.pop()
            self._merge_quietly(table)

    def _merge_quietly(self, table: str) -> None:
        """`_merge_levels`; a failure is logged, as the rows are stored already and the
        next write that finds a merge due tries again."""
        try:
            self._merge_levels(table)
        except ExchangeUnsupported:
            with self._merger_mutex:
                self._cannot_swap.add(table)
        except Exception as e:
            _log.warning("Merging the %s shards under %s stopped: %s", table, self.root, e)

    def _merge_levels(self, table: str) -> None:
        """Merge by levels (see `Listing.next_merge`), each merge built outside the write
        lock and swapped in under it, unless another process merged a source meanwhile."""
        folder = self._table_dir(table)
        while True:
            with self._lock():
                step = self._listed(table).next_merge(COMPACT_AT, FANOUT)
                if step is None:
                    return
                staging = Staging(folder)
            try:
                sources, merged_level = step
                with self._index_mutex:
                    in_memory = {p: self._recent[p] for p in sources if p in self._recent}
                name = staging.merge(sources, merged_level, in_memory)
                with self._lock():
                    if all(os.path.exists(p) for p in sources):
                        staging.swap(sources)
                        self._merged(table, sources, folder / name)
            finally:
                staging.close()

    def _merged(self, table: str, sources: list[str], merged: Path) -> None:
        """This process merged `sources` into `merged`: its index and memory follow."""
        with self._index_mutex:
            for source in sources:
                self._recent_bytes -= self._recent.pop(source, pa.table({})).nbytes
            index = self._indexes.get(table)
            if index is not None:
                index.replace(sources, merged)

    def _compact(self, table: str) -> CompactResult:
        """Merge all of the table's shards into one, in zstd. Call with `.lock` held."""
        folder = self._table_dir(table)
        listing = self._listed(table)
        shards = listing.shards
        if len(shards) < 2:
            return CompactResult(table, 0, len(shards), len(shards))
        merged_level = max(listing.levels.values()) + 1
        try:
            merged = compact(folder, shards, merged_level, self._recent, SMALL_CODEC)
        except ExchangeUnsupported as e:
            raise _no_exchange(table, self.root, e) from e
        except OSError as e:
            if not is_no_space(e):
                raise
            raise StoreFull(folder, f"a compacted {table} shard", "nothing changed") from e
        self._merged(table, shards, merged)
        return CompactResult(table, 1, len(shards), len(list_table(folder).shards))

    def _scan(self, table: str) -> str | None:
        """The SQL that reads the table's shards; None while it has none."""
        return scan_sql(self._table_dir(table)) if self._has_shards(table) else None

    def _drop_stored(
        self, table: str, data: pa.Table, stored: set[str]
    ) -> tuple[pa.Table, list[str]]:
        """Rows of `data` whose key is neither in `stored` nor seen earlier in `data`, and
        their keys."""
        keys = data.column(table_spec(table).key).to_pylist()
        seen: set[str] = set()
        keep = []
        for i, key in enumerate(keys):
            if key not in stored and key not in seen:
                seen.add(key)
                keep.append(i)
        if len(keep) == len(keys):
            return data, keys
        return data.take(pa.array(keep, pa.int64())), [keys[i] for i in keep]

    def _write_shard(self, table: str, data: pa.Table) -> Path:
        """Write `data` as a new shard via temp file + fsync + rename: never seen half-written.

        The folder is not fsynced (a third of a small write's cost): the shard's bytes are on
        disk before its name appears, so it is never torn, and the rename is made durable by
        the next fsync on the file system (the next write's; ext4 commits its journal as one)
        or within seconds anyway. A power cut can thus drop the last writes, whole, which a
        rerun recomputes; kill -9 drops nothing. Compaction, which deletes shards, syncs."""
        folder = self._table_dir(table)
        path = folder / f"part-{uuid.uuid4().hex}.parquet"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with replacing(path) as tmp:  # `.<name>.tmp`: not in the views' *.parquet glob
                write_durably(data, tmp)
        except OSError as e:
            if not is_no_space(e):
                raise
            raise StoreFull(folder, f"a {table} shard", "nothing was written") from e
        return path

    # -- database -------------------------------------------------------------------------

    def _db_or_raise(self) -> Path:
        if not self.db_path.is_file():
            raise StoreNotFound(self.db_path)
        return self.db_path

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive cross-process (and cross-thread) lock on `<root>/.lock`."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        with open(path, "a") as fh:
            retry(lambda: fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB), path, LOCK_TIMEOUT_S)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _no_exchange(table: str, root: Path, error: OSError) -> StoreError:
    return StoreError(
        f"Cannot compact {table} under {root}: {error.strerror} (compaction swaps folders "
        "with renameat2 RENAME_EXCHANGE, which needs Linux and a local file system such as "
        "ext4, xfs, btrfs or tmpfs)"
    )


def _check_run_id(table: str, run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise SchemaMismatch(
            table, "run_id", f"{run_id!r} is not a valid run id (letters, digits, . _ : + -)"
        )
