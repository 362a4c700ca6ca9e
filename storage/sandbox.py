"""User SQL (`Store.query`, `Store.query_arrow`, `sql`) runs in a sandbox.

A private in-memory DuckDB that may read only `<root>/parquet/` (DuckDB resolves symlinks
before checking), never spills to disk, runs only SELECT, EXPLAIN, PRAGMA and CALL, and has
its configuration locked. `allow_external=True` lifts it. Store.query's sandbox (`Reader`)
holds the same views as the database, made from the same code, so a query neither opens
nor locks the db file; `sql()` (the CLI) attaches the db file read-only instead.
`remote_sandbox` is the same sandbox over a store mirrored to S3 (storage/mirror.py),
limited to the mirror's prefix and reading through a filesystem registered with DuckDB.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from storage.errors import QueryError, SandboxRefused, StoreError, StoreNotFound
from storage.schemas import DERIVED_VIEWS
from storage.views import DB_NAME, connect, failing_view_sql, ident, literal, retry

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
    return run(path, query, None, allow_external)


def run(
    db_path: Path, query: str, params: Sequence[Any] | None, allow_external: bool
) -> tuple[list[str], list[tuple]]:
    with query_connection(db_path, allow_external) as con:
        return fetch(con, query, params)


def fetch(
    con: duckdb.DuckDBPyConnection | SandboxedConnection,
    query: str,
    params: Sequence[Any] | None,
) -> tuple[list[str], list[tuple]]:
    """Column names and rows of `query`."""
    try:
        cursor = con.execute(query, params)
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], cursor.fetchall()
    except duckdb.Error as e:
        raise query_error(e) from e


@contextmanager
def query_connection(db_path: Path, allow_external: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection for user SQL: sandboxed unless `allow_external`."""
    if allow_external:
        with connect(db_path, read_only=True) as con:
            yield con
        return
    with _sandbox(db_path) as con:
        yield SandboxedConnection(con)


class Reader:
    """A store's own sandbox for query(), kept between calls with its views: opening a
    DuckDB instance costs 20-40 ms, more than most of the pipeline's queries."""

    def __init__(self) -> None:
        self._con: duckdb.DuckDBPyConnection | None = None
        self._views: dict[str, str] = {}  # installed, by name
        self._mutex = threading.Lock()

    @contextmanager
    def connection(
        self, db_path: Path, views: Callable[[], dict[str, str]]
    ) -> Iterator[SandboxedConnection]:
        """The sandbox of the store whose db is `db_path`, holding `views()` (name -> SQL);
        one query at a time."""
        with self._mutex:
            if self._con is None:
                self._con = _sandbox_instance(db_path)
                self._views = {}
            try:
                for name, view_sql in views().items():
                    if self._views.get(name) == view_sql:
                        continue
                    try:
                        self._con.execute(view_sql)  # DuckDB binds it now: reads schemas
                        self._views[name] = view_sql
                    except duckdb.Error as e:  # unreadable shards fail their own table only
                        if name in DERIVED_VIEWS:
                            raise query_error(e) from e
                        self._con.execute(failing_view_sql(name, str(e).splitlines()[0]))
                        self._views.pop(name, None)  # tried again on the next query
            except BaseException:
                self._con.close()  # a catalog we cannot vouch for: start afresh
                self._con = None
                raise
            yield SandboxedConnection(self._con)


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
    files = [str(db_path), f"{db_path}.wal"]  # only ATTACH opens them (users may not)
    return _locked_instance([str(db_path.parent / "parquet") + os.sep], files)


def _locked_instance(
    directories: list[str], files: list[str], filesystem: Any = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that may read only `directories` and `files` (through
    `filesystem`, an fsspec filesystem, when given), never spills, configuration locked."""
    con = duckdb.connect(config={"temp_directory": ""})  # "": never spill to disk
    try:
        if filesystem is not None:
            con.register_filesystem(filesystem)
        con.execute(f"SET allowed_directories = [{', '.join(literal(d) for d in directories)}]")
        con.execute(f"SET allowed_paths = [{', '.join(literal(f) for f in files)}]")
        con.execute("SET enable_external_access = false")  # after the allowed lists
        con.execute("SET lock_configuration = true")  # no SET/RESET/PRAGMA can undo the above
    except BaseException:
        con.close()
        raise
    return con


@contextmanager
def remote_sandbox(
    filesystem: Any, prefix: str, views: dict[str, str]
) -> Iterator[SandboxedConnection]:
    """The sandbox over a store mirrored at `prefix` (`s3://bucket/prefix/`, read through
    `filesystem`, a pyarrow FileSystem): it may read only under `prefix`, and holds `views`
    (name -> CREATE VIEW statement)."""
    con = _locked_instance([prefix], [], read_only(filesystem))
    try:
        for view_sql in views.values():
            try:
                con.execute(view_sql)  # binds now: reads each listed shard's schema
            except duckdb.Error as e:
                raise query_error(e) from e
        yield SandboxedConnection(con)
    finally:
        con.close()


@contextmanager
def _attached(con: duckdb.DuckDBPyConnection, db_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """`db_path` attached read-only as `con`'s default catalog for the block."""
    attach = f"ATTACH {literal(str(db_path))} AS {ident(db_path.stem)} (READ_ONLY)"
    retry(lambda: con.execute(attach), db_path)
    con.execute(f"USE {ident(db_path.stem)}")
    yield con
    if not _detached(con, db_path):
        raise StoreError(f"Could not detach {db_path} from the query sandbox")


def _detached(con: duckdb.DuckDBPyConnection, db_path: Path) -> bool:
    """Detach `db_path` if attached; whether `con` is left with nothing attached."""
    try:
        con.execute("USE memory")
        con.execute(f"DETACH DATABASE IF EXISTS {ident(db_path.stem)}")
        return True
    except duckdb.Error:
        return False


def read_only(filesystem: Any) -> Any:
    """A pyarrow FileSystem as an fsspec filesystem that only reads, for DuckDB: a second
    guard beside the statement check."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    class ReadOnly(ArrowFSWrapper):
        cachable = False  # fsspec would otherwise share instances across credentials

        def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
            if mode != "rb":
                raise PermissionError(f"the store is read-only: {path}")
            return super()._open(path, mode, *args, **kwargs)

        def _refuse(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("the store is read-only")

        rm = rm_file = _rm = mkdir = makedirs = rmdir = mv = cp_file = _refuse  # type: ignore[assignment]

    return ReadOnly(filesystem)


class SandboxedConnection:
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


def query_error(error: duckdb.Error) -> QueryError:
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
