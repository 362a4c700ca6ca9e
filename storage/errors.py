"""Typed errors of the store. Each message says what went wrong and, where there is one, the fix."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path


class StoreError(Exception):
    """Base class of every error the store raises on purpose: what went wrong, then the fix
    where there is one."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}. {fix}" if fix else problem)


class UnknownTable(StoreError):
    def __init__(self, table: str, known: Iterable[str]) -> None:
        self.table = table
        super().__init__(f"Unknown table {table!r}; tables are: {', '.join(known)}")


class SchemaMismatch(StoreError):
    """Rows that do not fit a table's schema; `column` is '*' when no single column is at fault."""

    def __init__(self, table: str, column: str, problem: str) -> None:
        self.table = table
        self.column = column
        self.problem = problem
        super().__init__(f"{table}.{column}: {problem}")


class StoreNotFound(StoreError):
    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"No rlaif database at {path}",
            fix="Run `rlaif run` or `rlaif demo` first to create it.",
        )


class StoreLocked(StoreError):
    """Another process held the write lock or the DuckDB file for longer than we wait."""

    def __init__(self, path: Path, waited_s: float, detail: str = "") -> None:
        self.path = path
        suffix = f" ({detail})" if detail else ""
        super().__init__(
            f"{path} stayed locked for {waited_s:.0f}s{suffix}",
            fix="Another process is writing to the store or holds the database open; "
            "retry when it is done.",
        )


class StoreBusy(StoreError):
    """Another process holds a claim on the store (e.g. a running self-improvement loop)."""

    def __init__(self, root: Path, purpose: str, holder: str) -> None:
        self.root = root
        self.purpose = purpose
        self.holder = holder
        super().__init__(
            f"a {purpose} is already running on the store {root} ({holder or 'holder unknown'}); "
            "only one may run per store at a time",
            fix="Wait for it to finish, or stop it.",
        )


class QueryError(StoreError):
    """A SQL statement failed; the message is DuckDB's."""


class SandboxRefused(QueryError):
    """User SQL tried to leave the store: read or write files outside it, or write at all."""

    def __init__(self, what: str, path: str | None = None) -> None:
        self.what = what
        self.path = path  # the file it would not read or write, when that was the refusal
        super().__init__(
            f"the SQL sandbox refused {what}: reads and writes outside the store need "
            "--allow-external (allow_external=True in Python)"
        )


class StoreFull(StoreError):
    """The disk filled up while the store was writing."""

    def __init__(self, path: Path, what: str, outcome: str) -> None:
        self.path = path
        super().__init__(
            f"no space left on device while writing {what} under {path}; {outcome}",
            fix="Free some space and run it again.",
        )


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised by Python, pyarrow (no errno) or DuckDB (an IOException)."""
    return getattr(error, "errno", None) in _NO_SPACE or any(
        os.strerror(code) in str(error) for code in _NO_SPACE
    )
