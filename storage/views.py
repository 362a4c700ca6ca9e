"""The store's DuckDB file, `<root>/rlaif.duckdb`: opening it, and the views it holds.

It holds only views: one per table over the table's shards (typed even before the first
shard), plus the derived views of storage/schemas.py. Each view's comment holds a
fingerprint of its SQL, so checking that the file is up to date costs one read-only open,
and the read-write open (which blocks CLI readers) happens only when a view must change:
a table's first shard, a schema change, a moved root.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

import duckdb
import pyarrow as pa

from storage.errors import StoreError, StoreFull, StoreLocked, is_no_space
from storage.schemas import DERIVED_VIEWS, TABLES, shard_view
from storage.shards import fsync_dir, replacing

T = TypeVar("T")

DB_NAME = "rlaif.duckdb"
OPEN_RETRY_S = 5.0  # how long we retry opening a DuckDB file another process holds
STORAGE_VERSION = "v1.0.0"  # the db file format DuckDB writes (see connect)
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


class Views:
    """The views of the db file under `root`: the ones the shards need now, and the file
    brought up to date with them. `scan(table)` is the SQL that reads a table's shards,
    None while it has none."""

    def __init__(self, root: Path, scan: Callable[[str], str | None]) -> None:
        self.root = root
        self.db_path = root / DB_NAME
        self._scan = scan
        self._seen: tuple[dict[str, str], tuple[int, ...]] | None = None

    def wanted(self) -> dict[str, str]:
        """The CREATE VIEW statement of every view, in creation order."""
        views = {}
        for table, spec in TABLES.items():
            name = shard_view(table)
            views[name] = table_view_sql(name, spec.schema, self._scan(table))
        for name, body in DERIVED_VIEWS.items():
            views[name] = f"CREATE OR REPLACE VIEW {ident(name)} AS\n{body}"
        return views

    def sync(self) -> None:
        """(Re)create the views when they differ from what the shards and schemas need.
        Call with the store's write lock held."""
        views = self.wanted()
        wanted = {name: _fingerprint(sql) for name, sql in views.items()}
        if self._seen == (wanted, _file_id(self.db_path)):
            return  # installed when the db file was last seen as it is now
        if self._installed(wanted) == wanted:
            self._seen = (wanted, _file_id(self.db_path))
            return
        # A new db is built under a temp name and renamed into place, so that a writer
        # killed mid-creation never leaves a db without views.
        fresh = not self.db_path.is_file()
        try:
            with replacing(self.db_path) if fresh else nullcontext(self.db_path) as target:
                if fresh:
                    for stale in (target, target.with_name(target.name + ".wal")):
                        stale.unlink(missing_ok=True)
                with connect(target, read_only=False) as con:
                    con.execute("BEGIN")
                    for name, sql in views.items():
                        con.execute(sql)
                        con.execute(f"COMMENT ON VIEW {ident(name)} IS {literal(wanted[name])}")
                    con.execute("COMMIT")
                    con.execute("CHECKPOINT")  # leave no WAL behind for read-only openers
            if fresh:
                fsync_dir(self.root)
            self._seen = (wanted, _file_id(self.db_path))
        except (OSError, duckdb.Error) as e:
            if not is_no_space(e):
                raise
            raise StoreFull(
                self.db_path,
                "the views",
                "shards already written are kept and appear in the "
                "views on the next write() or ensure()",
            ) from e

    def synced_as_now(self) -> bool:
        """Whether this process synced the db file as it is now (no one replaced it since)."""
        return self._seen is not None and self._seen[1] == _file_id(self.db_path)

    def current(self) -> bool:
        """Whether the db file holds the views the shards need now."""
        wanted = {name: _fingerprint(sql) for name, sql in self.wanted().items()}
        return self._installed(wanted) == wanted

    def _installed(self, names: Iterable[str]) -> dict[str, str | None]:
        if not self.db_path.is_file():
            return {}
        with connect(self.db_path, read_only=True) as con:
            rows = con.execute(
                "SELECT view_name, comment FROM duckdb_views() WHERE NOT internal"
            ).fetchall()
        installed = dict(rows)
        return {name: installed.get(name) for name in names}


def scan_sql(folder: Path) -> str:
    """The SQL that reads every shard in `folder`."""
    glob = str(folder / "*.parquet")
    return f"read_parquet({literal(glob)}, hive_partitioning = false, union_by_name = true)"


def table_view_sql(name: str, schema: pa.Schema, scan: str | None) -> str:
    """A view with the schema's typed columns, over the shards when there are any.

    The zero-row typed SELECT fixes column names and types even before the first shard;
    UNION ALL BY NAME adds the shards' rows (and any columns only old shards have).
    """
    body = f"SELECT {_typed_nulls(schema)} WHERE false"
    if scan:
        body += f"\nUNION ALL BY NAME\nSELECT * FROM {scan}"
    return f"CREATE OR REPLACE VIEW {ident(name)} AS\n{body}"


def failing_view_sql(name: str, message: str) -> str:
    """A view with the table's columns whose every read fails with `message`."""
    [schema] = [spec.schema for table, spec in TABLES.items() if shard_view(table) == name]
    return (
        f"CREATE OR REPLACE VIEW {ident(name)} AS SELECT {_typed_nulls(schema)} "
        f"FROM (SELECT error({literal(message)}) AS e) WHERE e IS NULL"
    )


def _typed_nulls(schema: pa.Schema) -> str:
    return ", ".join(f"CAST(NULL AS {_duckdb_type(f.type)}) AS {ident(f.name)}" for f in schema)


def _duckdb_type(type_: pa.DataType) -> str:
    try:
        return _DUCKDB_TYPES[type_]
    except KeyError:
        raise StoreError(f"No DuckDB type for {type_}; add it to _DUCKDB_TYPES") from None


def _fingerprint(view_sql: str) -> str:
    return "rlaif view " + hashlib.sha256(view_sql.encode()).hexdigest()[:16]


def _file_id(path: Path) -> tuple[int, ...]:
    """What changes when a file is rewritten or replaced: inode, size, mtime, ctime."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# -- opening the file ---------------------------------------------------------------------


@contextmanager
def connect(db_path: Path, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the db, retrying while another connection holds a conflicting lock."""
    # An old storage format, so older DuckDB clients (the `duckdb` CLI lags the library)
    # can open the file too; it holds only views, so nothing is lost.
    config = {} if read_only else {"storage_compatibility_version": STORAGE_VERSION}
    con = retry(lambda: duckdb.connect(str(db_path), read_only=read_only, config=config), db_path)
    try:
        yield con
    finally:
        con.close()


def retry(attempt: Callable[[], T], path: Path, timeout_s: float | None = None) -> T:
    """Call `attempt` until it does not fail with a lock conflict, or raise StoreLocked after
    `timeout_s` (default OPEN_RETRY_S)."""
    timeout_s = OPEN_RETRY_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            return attempt()
        except (BlockingIOError, *_LOCK_ERRORS) as e:
            if not is_lock_conflict(e):
                raise StoreError(f"Could not open {path}: {e}") from e
            if time.monotonic() >= deadline:
                raise StoreLocked(path, timeout_s, str(e).splitlines()[0]) from e
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def is_lock_conflict(error: Exception) -> bool:
    """Whether `error` is a lock conflict worth retrying: flock's, or one of DuckDB's."""
    message = str(error)
    return isinstance(error, BlockingIOError) or any(m in message for m in _LOCK_CONFLICTS)
