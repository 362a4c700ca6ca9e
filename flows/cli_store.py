"""`rlaif sql` and `rlaif store ...`, defined beside flows/cli.py (which adds them to `rlaif`).

A store is a local folder or, for `sql`, `store push` and `store pull`, a mirror at
s3://bucket/prefix (storage/mirror.py). S3 credentials come from the environment:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_ENDPOINT_URL for a server
other than AWS, AWS_REGION.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from flows import cli_calls as calls
from flows import cli_output as output
from flows.cli_options import format_option, store_option, user_errors
from storage.mirror import Progress

MIRROR_ENV = (
    "S3 credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the server from "
    "AWS_ENDPOINT_URL (e.g. http://127.0.0.1:8333; default AWS), the region from AWS_REGION."
)


@click.command("sql")
@click.argument("query")
@store_option
@format_option("table", "csv", "json")
@click.option(
    "--allow-external",
    is_flag=True,
    help="Let the SQL read and write files outside the store (COPY, read_csv, ATTACH...).",
)
@user_errors
def sql_command(query: str, store: str, fmt: str, allow_external: bool) -> None:
    """Run read-only SQL over the store's DuckDB views.

    The SQL may read only the store's files and writes nothing, unless --allow-external.
    --store s3://bucket/prefix reads a mirror made by `rlaif store push`, with the same
    views and the same sandbox, limited to that prefix.

    Example: rlaif sql "SELECT status, count(*) FROM judgments GROUP BY 1"
    """
    if "://" in store:
        from storage import mirror

        if allow_external:
            output.fail("error: --allow-external works only on a local store, not on a mirror")
        columns, rows = mirror.sql(store, query)
    else:
        from storage import sql

        columns, rows = sql(Path(store) / "rlaif.duckdb", query, allow_external=allow_external)
    click.echo(output.format_rows(columns, rows, fmt), nl=False)


@click.group("store")
def store_group() -> None:
    """Look after the store's files: compact them, mirror them to S3 and back.

    Example: rlaif store compact --store rlaif-data
    """


@store_group.command("compact")
@store_option
@click.option("--table", default=None, help="Only this table (default: every table).")
@user_errors
def store_compact(store: str, table: str | None) -> None:
    """Merge each table's shards into one file; rows, ids and run_ids are unchanged.

    Safe to run while others read or write, and to kill: a table's folder is swapped for
    its merged copy in one atomic step. write() also compacts on its own past a shard count.

    Example: rlaif store compact --store rlaif-data --table preference_pairs
    """
    for result in calls.existing_store(store).compact(table):
        click.echo(f"{result.table}: {result.shards_before} -> {result.shards_after} shards")


@store_group.command(
    "push",
    help=f"""Mirror the store to URL (s3://bucket/prefix).

    Uploads only the shards the mirror lacks, then the list of the store's shards that
    readers go by, in one step: a reader never sees half a push, a rerun uploads nothing,
    an interrupted push rerun uploads the rest. {MIRROR_ENV}

    Example: rlaif store push s3://my-bucket/rlaif --store rlaif-data""",
)
@click.argument("url")
@store_option
@user_errors
def store_push(url: str, store: str) -> None:
    from storage import mirror

    with _transfers("uploading") as progress:
        result = mirror.push(store, url, progress)
    line = (
        f"{result.url}: uploaded {_count(result.uploaded)} ({_size(result.uploaded_bytes)}), "
        f"{result.present} already there; the mirror lists {_count(result.shards)}"
    )
    click.echo(line + (f"; deleted {_count(result.deleted)} retired" if result.deleted else ""))


@store_group.command(
    "pull",
    help=f"""Bring the store up to the mirror at URL (s3://bucket/prefix).

    Downloads only the shards the store lacks, then rebuilds its views: `rlaif sql` then
    answers as over the mirror. Local rows the mirror lacks are kept. {MIRROR_ENV}

    Example: rlaif store pull s3://my-bucket/rlaif --store rlaif-data""",
)
@click.argument("url")
@store_option
@user_errors
def store_pull(url: str, store: str) -> None:
    from storage import mirror

    with _transfers("downloading") as progress:
        result = mirror.pull(url, store, progress)
    line = (
        f"{result.root}: downloaded {_count(result.downloaded)} "
        f"({_size(result.downloaded_bytes)}) from {result.url}, {result.present} already here"
    )
    removed = f"; removed {_count(result.removed)} merged in the mirror" if result.removed else ""
    click.echo(line + removed)


class _Bar(Progress):
    """A push's or pull's progress on a rich bar (stderr, shown only on a terminal)."""

    def __init__(self, progress: Any, verb: str) -> None:
        self._progress = progress
        self._verb = verb
        self._task: Any = None

    def start(self, files: int, nbytes: int) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(f"{self._verb} {_count(files)}", total=nbytes)

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)


@contextmanager
def _transfers(verb: str) -> Iterator[_Bar]:
    from rich.console import Console
    from rich.progress import DownloadColumn, TextColumn, TransferSpeedColumn
    from rich.progress import Progress as RichProgress

    columns = (TextColumn("{task.description}"), DownloadColumn(), TransferSpeedColumn())
    console = Console(stderr=True)
    bar = RichProgress(*columns, console=console, transient=True, disable=not console.is_terminal)
    with bar as progress:
        yield _Bar(progress, verb)


def _count(shards: int) -> str:
    return f"{shards} shard{'' if shards == 1 else 's'}"


def _size(nbytes: int) -> str:
    from rich.filesize import decimal

    return decimal(nbytes)
