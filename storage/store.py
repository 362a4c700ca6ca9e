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

User SQL (`Store.query`, `Store.query_arrow`, `sql`) runs in a sandbox: a private in-memory
DuckDB that may read only `<root>/parquet/` (DuckDB resolves symlinks before checking),
never spills to disk, runs only SELECT, EXPLAIN, PRAGMA and CALL, and has its configuration
locked. `allow_external=True` lifts it. Store.query's sandbox holds the same views as the
database, made from the same code, so a query neither opens nor locks the db file; `sql()`
(the CLI) attaches the db file read-only instead.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from storage.errors import (
    QueryError,
    SandboxRefused,
    SchemaMismatch,
    StoreBusy,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreNotFound,
)
from storage.schemas import DERIVED_VIEWS, TABLES, shard_view, table_spec, to_arrow
from storage.shards import (
    SMALL_CODEC,
    ExchangeUnsupported,
    KeyIndex,
    Listing,
    Staging,
    compact,
    fsync_dir,
    list_table,
    migrate,
    remove_orphans,
    write_durably,
)

T = TypeVar("T")
_log = logging.getLogger(__name__)

DB_NAME = "rlaif.duckdb"
LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 120.0  # how long write() waits for another writer
OPEN_RETRY_S = 5.0  # how long we retry opening a DuckDB file another process holds
STORAGE_VERSION = "v1.0.0"  # the db file format DuckDB writes (see _connect)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")
TMP_GLOB = ".part-*.parquet.tmp"  # a shard being written (see _write_shard)
COMPACT_AT = 64  # write() merges a table's small shards once it has this many
FANOUT = 32  # ... and the merged shards of one level once it has this many
RECENT_BYTES = 32 << 20  # shards just written, kept in memory for the next merge
READ_RETRIES = 3  # a query that lost a shard to a concurrent compaction is run again
# What sandboxed SQL may run: SELECT; CALL and PRAGMA only when spelled so (DuckDB parses
# COPY FROM DATABASE and CHECKPOINT as those); EXPLAIN only of a SELECT, since EXPLAIN
# ANALYZE runs its statement. PRAGMA import_database would run SQL read from files.
_COMMENTS = r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
_SPELLED = {
    "SELECT": re.compile(""),
    "CALL": re.compile(_COMMENTS + r"CALL\b", re.IGNORECASE | re.DOTALL),
    "PRAGMA": re.compile(_COMMENTS + r"PRAGMA\s+(?!import_database\b)", re.IGNORECASE | re.DOTALL),
    "EXPLAIN": re.compile(
        _COMMENTS + r"EXPLAIN\b\s*(?:ANALY[SZ]E\b\s*)?(?:\([^)]*\)\s*)?",
        re.IGNORECASE | re.DOTALL,
    ),
}
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_LOCK_CONFLICTS = (
    "Could not set lock on file",  # another process holds a conflicting lock
    # this process already has the file open read-only and asks for read-write
    "Can't open a connection to same database file with a different configuration",
    "Unique file handle conflict",  # this process already attached it in another database
)
_LOCK_ERRORS = tuple(
    getattr(duckdb, name)
    for name in ("IOException", "ConnectionException", "ResourceInUseException")
    if hasattr(duckdb, name)
)
_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
    pa.list_(pa.string()): "VARCHAR[]",
}


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
        self._views_seen: tuple[dict[str, str], tuple[int, ...]] | None = None
        self._recent: OrderedDict[str, pa.Table] = OrderedDict()  # by shard path
        self._recent_bytes = 0
        self._upgraded = False  # no table is in the run-folder layout (checked once)
        self._merger: threading.Thread | None = None  # merges the tables in _to_merge
        self._to_merge: set[str] = set()
        self._merger_mutex = threading.Lock()
        self._cannot_swap: set[str] = set()  # tables on a file system without renameat2
        # This store's sandbox for query(), kept between calls with its views: opening a
        # DuckDB instance costs 20-40 ms, more than most of the pipeline's queries.
        self._reader: duckdb.DuckDBPyConnection | None = None
        self._reader_views: dict[str, str] = {}
        self._reader_mutex = threading.Lock()

    def tables(self) -> list[str]:
        """Tables you can write to. The database also has a `run_events` view (all run rows)."""
        return list(TABLES)

    def ensure(self) -> None:
        """Create the folders and the database with every view. Idempotent."""
        with self._lock():
            for table in TABLES:
                self._table_dir(table).mkdir(parents=True, exist_ok=True)
            self._sync_views()

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
            if not (had_shards and self._synced_as_now()):
                self._sync_views()
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
        self._upgrade_once()
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
                return _run(self._db_or_raise(), sql, params, allow_external)
            with self._sandboxed() as con:
                return _fetch(con, sql, params)

        names, rows = self._with_current_views(read)
        return [dict(zip(names, row, strict=True)) for row in rows]

    def query_arrow(
        self, sql: str, params: Sequence[Any] | None = None, *, allow_external: bool = False
    ) -> pa.Table:
        """Like query(), as an Arrow table."""

        def read() -> pa.Table:
            connection = (
                _query_connection(self._db_or_raise(), allow_external)
                if allow_external
                else self._sandboxed()
            )
            with connection as con:
                try:
                    relation = con.sql(sql, params=params)
                    return relation.to_arrow_table() if relation is not None else pa.table({})
                except duckdb.Error as e:
                    raise _query_error(e) from e

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
            if not stale or self._views_current():
                raise
            self.ensure()
            return read()

    @contextmanager
    def _sandboxed(self) -> Iterator[_SandboxedConnection]:
        """This store's sandbox (see `_sandbox`) holding the views the shards need now."""
        db_path = self._db_or_raise().resolve()
        self._upgrade_once()
        with self._reader_mutex:
            if self._reader is None:
                self._reader = _sandbox_instance(db_path)
                self._reader_views = {}
            views = self._views()
            try:
                for name, view_sql in views.items():
                    if self._reader_views.get(name) == view_sql:
                        continue
                    try:
                        self._reader.execute(view_sql)  # DuckDB binds it now: reads schemas
                        self._reader_views[name] = view_sql
                    except duckdb.Error as e:  # unreadable shards fail their own table only
                        if name in DERIVED_VIEWS:
                            raise _query_error(e) from e
                        self._reader.execute(_failing_view_sql(name, str(e).splitlines()[0]))
                        self._reader_views.pop(name, None)  # tried again on the next query
            except BaseException:
                self._reader.close()  # a catalog we cannot vouch for: start afresh
                self._reader = None
                raise
            yield _SandboxedConnection(self._reader)

    def count(self, table: str) -> int:
        """Rows in the table's view; for `runs` that is the number of runs, not of events."""
        table_spec(table)
        return self.query(f"SELECT count(*) AS n FROM {_ident(table)}")[0]["n"]

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

    def _glob(self, table: str) -> str:
        return str(self._table_dir(table) / "*.parquet")

    def _has_shards(self, table: str) -> bool:
        if table not in self._with_shards:
            if not list_table(self._table_dir(table)).shards:
                return False
            self._with_shards.add(table)
        return True

    def _listed(self, table: str) -> Listing:
        """The table's shards, after deleting orphans and moving shards of the run-folder
        layout up. Call with `.lock` held."""
        folder = self._table_dir(table)
        listing = list_table(folder)
        remove_orphans(folder, listing)
        if listing.legacy:
            try:
                migrate(folder, listing)
            except ExchangeUnsupported as e:
                raise _no_exchange(table, self.root, e) from e
            listing = list_table(folder)
        return listing

    def _upgrade_once(self) -> None:
        """Move every table's shards out of the run folders of older stores (once per Store)."""
        if self._upgraded:
            return
        tables = [t for t in TABLES if list_table(self._table_dir(t)).legacy]
        if tables:
            with self._lock():
                for table in tables:
                    self._listed(table)
                self._sync_views()
        self._upgraded = True

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
            if not _is_no_space(e):
                raise
            raise StoreFull(folder, f"a compacted {table} shard", "nothing changed") from e
        self._merged(table, shards, merged)
        return CompactResult(table, 1, len(shards), len(list_table(folder).shards))

    def _scan(self, table: str) -> str:
        return (
            f"read_parquet({_literal(self._glob(table))}, hive_partitioning = false, "
            "union_by_name = true)"
        )

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
        tmp = folder / f".{path.name}.tmp"  # must not match the views' *.parquet glob
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_durably(data, tmp)
            os.replace(tmp, path)
        except OSError as e:
            if not _is_no_space(e):
                raise
            raise StoreFull(folder, f"a {table} shard", "nothing was written") from e
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # -- database -------------------------------------------------------------------------

    def _db_or_raise(self) -> Path:
        if not self.db_path.is_file():
            raise StoreNotFound(self.db_path)
        return self.db_path

    def _views(self) -> dict[str, str]:
        """The CREATE VIEW statement of every view, in creation order."""
        views = {}
        for table, spec in TABLES.items():
            scan = self._scan(table) if self._has_shards(table) else None
            views[shard_view(table)] = _table_view_sql(shard_view(table), spec.schema, scan)
        for name, body in DERIVED_VIEWS.items():
            views[name] = f"CREATE OR REPLACE VIEW {_ident(name)} AS\n{body}"
        return views

    def _sync_views(self) -> None:
        """(Re)create the views when they differ from what the shards and schemas need.

        Each view's comment holds a fingerprint of its SQL, so an unchanged catalog costs
        one read-only open and the read-write open (which blocks CLI readers) is rare.
        """
        views = self._views()
        wanted = {name: _fingerprint(sql) for name, sql in views.items()}
        if self._views_seen == (wanted, _file_id(self.db_path)):
            return  # installed when the db file was last seen as it is now
        if self._installed_fingerprints(wanted) == wanted:
            self._views_seen = (wanted, _file_id(self.db_path))
            return
        # A new db is built under a temp name and renamed into place, so that a writer
        # killed mid-creation never leaves a db without views.
        fresh = not self.db_path.is_file()
        target = self.db_path.with_name(f".{DB_NAME}.tmp") if fresh else self.db_path
        try:
            if fresh:
                for stale in (target, target.with_name(target.name + ".wal")):
                    stale.unlink(missing_ok=True)
            with _connect(target, read_only=False) as con:
                con.execute("BEGIN")
                for name, sql in views.items():
                    con.execute(sql)
                    con.execute(f"COMMENT ON VIEW {_ident(name)} IS {_literal(wanted[name])}")
                con.execute("COMMIT")
                con.execute("CHECKPOINT")  # leave no WAL behind for read-only openers
            if fresh:
                os.replace(target, self.db_path)
                fsync_dir(self.root)
            self._views_seen = (wanted, _file_id(self.db_path))
        except (OSError, duckdb.Error) as e:
            if not _is_no_space(e):
                raise
            raise StoreFull(
                self.db_path,
                "the views",
                "shards already written are kept and appear in the "
                "views on the next write() or ensure()",
            ) from e

    def _synced_as_now(self) -> bool:
        return self._views_seen is not None and self._views_seen[1] == _file_id(self.db_path)

    def _views_current(self) -> bool:
        wanted = {name: _fingerprint(sql) for name, sql in self._views().items()}
        return self._installed_fingerprints(wanted) == wanted

    def _installed_fingerprints(self, names: Iterable[str]) -> dict[str, str | None]:
        if not self.db_path.is_file():
            return {}
        with _connect(self.db_path, read_only=True) as con:
            rows = con.execute(
                "SELECT view_name, comment FROM duckdb_views() WHERE NOT internal"
            ).fetchall()
        installed = dict(rows)
        return {name: installed.get(name) for name in names}

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive cross-process (and cross-thread) lock on `<root>/.lock`."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        with open(path, "a") as fh:
            _retry(lambda: fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB), path, LOCK_TIMEOUT_S)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def sql(
    db_path: str | Path, query: str, *, allow_external: bool = False
) -> tuple[list[str], list[tuple]]:
    """Run `query` on the database read-only; return column names and rows.

    `db_path` is the .duckdb file or the store root. The query may read only the store's
    files and writes nothing, unless `allow_external`. Raises StoreNotFound, QueryError or
    SandboxRefused.
    """
    path = Path(db_path)
    if path.is_dir():
        path = path / DB_NAME
    if not path.is_file():
        raise StoreNotFound(path)
    Store(path.parent)._upgrade_once()
    return _run(path, query, None, allow_external)


def _run(
    db_path: Path, query: str, params: Sequence[Any] | None, allow_external: bool
) -> tuple[list[str], list[tuple]]:
    with _query_connection(db_path, allow_external) as con:
        return _fetch(con, query, params)


def _fetch(
    con: duckdb.DuckDBPyConnection | _SandboxedConnection,
    query: str,
    params: Sequence[Any] | None,
) -> tuple[list[str], list[tuple]]:
    try:
        cursor = con.execute(query, params)
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], cursor.fetchall()
    except duckdb.Error as e:
        raise _query_error(e) from e


@contextmanager
def _query_connection(db_path: Path, allow_external: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection for user SQL: sandboxed unless `allow_external`."""
    if allow_external:
        with _connect(db_path, read_only=True) as con:
            yield con
        return
    with _sandbox(db_path) as con:
        yield _SandboxedConnection(con)


@contextmanager
def _sandbox(db_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A private in-memory DuckDB with `db_path` attached read-only as the default catalog,
    file access limited to the store's `parquet/` folder and the db file, and its
    configuration locked.

    Private, so the locked settings never reach another connection of this process
    (DuckDB shares one instance between connections to the same file).
    """
    db_path = db_path.resolve()
    con = _sandbox_instance(db_path)
    try:
        with _attached(con, db_path):
            yield con
    finally:
        con.close()


def _sandbox_instance(db_path: Path) -> duckdb.DuckDBPyConnection:
    """The locked-down in-memory DuckDB of `_sandbox`, with nothing attached yet."""
    con = duckdb.connect(config={"temp_directory": ""})  # "": never spill to disk
    try:
        files = [str(db_path), f"{db_path}.wal"]  # only ATTACH opens them (users may not)
        con.execute(
            f"SET allowed_directories = [{_literal(str(db_path.parent / 'parquet') + os.sep)}]"
        )
        con.execute(f"SET allowed_paths = [{', '.join(_literal(f) for f in files)}]")
        con.execute("SET enable_external_access = false")  # after the allowed lists
        con.execute("SET lock_configuration = true")  # no SET/RESET/PRAGMA can undo the above
    except BaseException:
        con.close()
        raise
    return con


@contextmanager
def _attached(con: duckdb.DuckDBPyConnection, db_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """`db_path` attached read-only as `con`'s default catalog for the block."""
    attach = f"ATTACH {_literal(str(db_path))} AS {_ident(db_path.stem)} (READ_ONLY)"
    _retry(lambda: con.execute(attach), db_path, OPEN_RETRY_S)
    con.execute(f"USE {_ident(db_path.stem)}")
    yield con
    if not _detached(con, db_path):
        raise StoreError(f"Could not detach {db_path} from the query sandbox")


def _detached(con: duckdb.DuckDBPyConnection, db_path: Path) -> bool:
    """Detach `db_path` if attached; whether `con` is left with nothing attached."""
    try:
        con.execute("USE memory")
        con.execute(f"DETACH DATABASE IF EXISTS {_ident(db_path.stem)}")
        return True
    except duckdb.Error:
        return False


class _SandboxedConnection:
    """Checks each statement's type before DuckDB runs it: the file sandbox alone would let
    COPY, EXPORT or ATTACH write inside `parquet/`, where a new file changes the views."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con

    def execute(self, query: str, params: Sequence[Any] | None = None) -> Any:
        _check_statements(self._con, query)
        return self._con.execute(query, params)

    def sql(self, query: str, params: Sequence[Any] | None = None) -> Any:
        _check_statements(self._con, query)
        return self._con.sql(query, params=params)


def _check_statements(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Raise SandboxRefused unless every statement in `query` only reads."""
    for statement in con.extract_statements(query):
        kind = statement.type.name
        spelled = _SPELLED.get(kind)
        prefix = spelled.match(statement.query) if spelled else None
        if prefix is None or (kind == "EXPLAIN" and not _selects(con, statement.query, prefix)):
            raise SandboxRefused(
                f"a {kind} statement (the store is read-only; only SELECT, EXPLAIN of a SELECT, "
                "PRAGMA and CALL run)"
            )


def _selects(con: duckdb.DuckDBPyConnection, query: str, prefix: re.Match) -> bool:
    """Whether what follows `prefix` in `query` is only SELECT statements."""
    try:
        inner = con.extract_statements(query[prefix.end() :])
    except duckdb.Error:
        return False
    return bool(inner) and all(s.type.name == "SELECT" for s in inner)


def _query_error(error: duckdb.Error) -> QueryError:
    """DuckDB's error as QueryError; the sandbox's refusals as SandboxRefused."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    access = re.search(r'Cannot access (?:file|directory) "([^"]*)"', message)
    setting = re.search(r'Cannot change configuration option "([^"]*)"', message)
    if access:
        return SandboxRefused(f"access to {access.group(1)}", path=access.group(1))
    if setting and "locked" in message:
        return SandboxRefused(f"a change of the setting {setting.group(1)}")
    if isinstance(error, duckdb.PermissionException):
        return SandboxRefused(message.removeprefix("Permission Error: "))
    return QueryError(str(error))


@contextmanager
def _connect(db_path: Path, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the db, retrying while another connection holds a conflicting lock."""
    # An old storage format, so older DuckDB clients (the `duckdb` CLI lags the library)
    # can open the file too; it holds only views, so nothing is lost.
    config = {} if read_only else {"storage_compatibility_version": STORAGE_VERSION}
    con = _retry(
        lambda: duckdb.connect(str(db_path), read_only=read_only, config=config),
        db_path,
        OPEN_RETRY_S,
    )
    try:
        yield con
    finally:
        con.close()


def _retry(attempt: Callable[[], T], path: Path, timeout_s: float) -> T:
    """Call `attempt` until it does not fail with a lock conflict, or raise StoreLocked."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            return attempt()
        except (BlockingIOError, *_LOCK_ERRORS) as e:
            if not _is_lock_conflict(e):
                raise StoreError(f"Could not open {path}: {e}") from e
            if time.monotonic() >= deadline:
                raise StoreLocked(path, timeout_s, str(e).splitlines()[0]) from e
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _is_lock_conflict(error: Exception) -> bool:
    """Whether `error` is a lock conflict worth retrying: flock's, or one of DuckDB's."""
    message = str(error)
    return isinstance(error, BlockingIOError) or any(m in message for m in _LOCK_CONFLICTS)


def _is_no_space(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised by Python, pyarrow (no errno) or DuckDB (an IOException)."""
    return getattr(error, "errno", None) in _NO_SPACE or any(
        os.strerror(code) in str(error) for code in _NO_SPACE
    )


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


def _table_view_sql(name: str, schema: pa.Schema, scan: str | None) -> str:
    """A view with the schema's typed columns, over the shards when there are any.

    The zero-row typed SELECT fixes column names and types even before the first shard;
    UNION ALL BY NAME adds the shards' rows (and any columns only old shards have).
    """
    body = f"SELECT {_typed_nulls(schema)} WHERE false"
    if scan:
        body += f"\nUNION ALL BY NAME\nSELECT * FROM {scan}"
    return f"CREATE OR REPLACE VIEW {_ident(name)} AS\n{body}"


def _typed_nulls(schema: pa.Schema) -> str:
    return ", ".join(f"CAST(NULL AS {_duckdb_type(f.type)}) AS {_ident(f.name)}" for f in schema)


def _failing_view_sql(name: str, message: str) -> str:
    """A view with the table's columns whose every read fails with `message`."""
    [schema] = [spec.schema for table, spec in TABLES.items() if shard_view(table) == name]
    return (
        f"CREATE OR REPLACE VIEW {_ident(name)} AS SELECT {_typed_nulls(schema)} "
        f"FROM (SELECT error({_literal(message)}) AS e) WHERE e IS NULL"
    )


def _duckdb_type(type_: pa.DataType) -> str:
    try:
        return _DUCKDB_TYPES[type_]
    except KeyError:
        raise StoreError(f"No DuckDB type for {type_}; add it to _DUCKDB_TYPES") from None


def _fingerprint(view_sql: str) -> str:
    return "rlaif view " + hashlib.sha256(view_sql.encode()).hexdigest()[:16]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _file_id(path: Path) -> tuple[int, ...]:
    """What changes when a file is rewritten or replaced: inode, size, mtime, ctime."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
