"""The store under faults: kill -9 mid-write, a full disk, readers during writes, lock errors."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import click
import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from flows.cli import user_errors
from storage import Store, StoreError, StoreFull, sql
from storage import views as views_module
from storage.shards import STAGING_PREFIX, Staging
from storage.store import TMP_GLOB
from storage.views import is_lock_conflict
from tests.unit.test_store import RUN, SAMPLES

PROJECT = Path(__file__).resolve().parents[2]

# Writes BATCHES shards of ROWS incompressible prompts, each batch its own keys; a rerun
# skips the batches already stored. Prints a line before each write.
WRITER = textwrap.dedent(
    """
    import os, random, sys
    from storage import Store
    store, batches, rows = Store(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for b in range(batches):
        random.seed(b)  # the same text on a rerun, so ids and rows match
        batch = [
            {"prompt_id": f"p{b}-{i}", "text": random.randbytes(1000).hex(), "source": "seed"}
            for i in range(rows)
        ]
        print("writing", b, flush=True)
        store.write("prompts", batch, "kill")
    """
)


def writer(root: Path, batches: int, rows: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(batches), str(rows)],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        text=True,
    )


def tmp_files(store: Store, table: str = "prompts") -> list[Path]:
    return list((store.root / "parquet" / table).glob(TMP_GLOB))


def test_kill_9_mid_write_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    store, batches, rows = Store(tmp_path / "store"), 40, 1500
    rng = random.Random(0)
    kills, mid_write = 0, 0
    for attempt in range(8):
        child = writer(store.root, batches, rows)
        assert child.stdout is not None
        child.stdout.readline()  # it is about to write
        if attempt % 2:  # at a random moment
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # while a shard's temp file exists: mid-write
            deadline = time.monotonic() + 10
            while not tmp_files(store) and child.poll() is None and time.monotonic() < deadline:
                pass
        child.kill()
        kills += child.wait() == -9  # not when it had finished already
        mid_write += bool(tmp_files(store))
        # What queries see: whole batches only, each key once, every shard readable.
        if store.db_path.exists():
            n, distinct = sql(
                store.root, "SELECT count(*), count(DISTINCT prompt_id) FROM prompts"
            )[1][0]
            assert n == distinct and n % rows == 0
        for shard in (store.root / "parquet" / "prompts").rglob("*.parquet"):
            assert pq.read_metadata(shard).num_rows == rows
    assert kills >= 4 and mid_write >= 2, (kills, mid_write)
    # The rerun finishes the work: nothing lost, nothing twice, no temp file left.
    child = writer(store.root, batches, rows)
    child.communicate(timeout=120)
    assert child.returncode == 0
    n, distinct = sql(store.root, "SELECT count(*), count(DISTINCT prompt_id) FROM prompts")[1][0]
    assert (n, distinct) == (batches * rows, batches * rows)
    assert tmp_files(store) == []
    print(json.dumps({"kills": kills, "kills_mid_write": mid_write, "rows": n, "tmp_left": 0}))


def test_next_write_removes_only_this_tables_temp_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.write("prompts", [SAMPLES["prompts"]], RUN)
    store.write("evals", [SAMPLES["evals"]], RUN)
    parquet = store.root / "parquet"
    stale = parquet / "prompts" / ".part-dead.parquet.tmp"
    other = parquet / "evals" / ".part-dead.parquet.tmp"
    for path in (stale, other):
        path.write_bytes(b"PAR1 half a shard")
    dead = parquet / f"{STAGING_PREFIX}prompts-dead"  # a killed merge's staging folder
    dead.mkdir()
    (dead / "part-x-L1.parquet").write_bytes(b"PAR1")
    live = Staging(parquet / "prompts")  # a merge going on (in another thread or process)
    store.write("prompts", [SAMPLES["prompts"]], RUN)  # skipped, but still cleans up
    assert not stale.exists() and other.exists()
    assert not dead.exists() and live.path.is_dir()
    assert store.count("prompts") == 1
    live.close()
    assert not live.path.exists()


# --- full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_is_one_clear_error_and_the_store_stays_readable(small_disk: Path) -> None:
    store = Store(small_disk / "store")
    store.write("prompts", [SAMPLES["prompts"]], RUN)
    rng = random.Random(0)
    big = [
        {"prompt_id": f"big{i}", "text": rng.randbytes(1000).hex(), "source": "seed"}
        for i in range(2000)
    ]  # about 2 MB compressed: more than the disk has left
    with pytest.raises(StoreFull, match="^no space left on device while writing a prompts shard"):
        store.write("prompts", big, RUN)
    assert tmp_files(store) == []
    assert store.count("prompts") == 1
    assert sql(store.root, "SELECT prompt_id FROM prompts")[1] == [("p1",)]

    @click.command()
    @user_errors
    def write() -> None:
        store.write("prompts", big, RUN)

    result = CliRunner().invoke(write)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no space left on device while writing a prompts")
    assert "nothing was written" in result.stderr
    assert result.stderr.count("\n") == 1
    assert store.write("prompts", big[:10], RUN).written == 10  # fits: the store still works


# --- readers during writes -------------------------------------------------------------

# Reads in a loop until the stop file exists; prints one JSON line {"ok": n, "errors": [...]}.
RAW_READER = textwrap.dedent(
    """
    import json, os, sys, duckdb
    db, stop, ok, errors = sys.argv[1], sys.argv[2], 0, []
    while not os.path.exists(stop):
        try:
            con = duckdb.connect(db, read_only=True)
            try:
                con.execute("SELECT count(*) FROM prompts").fetchall()
            finally:
                con.close()
            ok += 1
        except duckdb.Error as e:
            errors.append(str(e).splitlines()[0])
    print(json.dumps({"ok": ok, "errors": errors}))
    """
)
# One write per step; the first shard of each table changes the views.
LOOP_WRITER = textwrap.dedent(
    """
    import sys
    from storage import TABLES, Store
    from tests.unit.test_store import RUN, SAMPLES
    store = Store(sys.argv[1])
    for i in range(int(sys.argv[2])):
        table = list(SAMPLES)[i % len(SAMPLES)]
        key = TABLES[table].key
        store.write(table, [{**SAMPLES[table], key: f"{SAMPLES[table][key]}-{i}"}], RUN)
    """
)


@pytest.mark.parametrize("views_change", [True, False], ids=["first-shards", "steady"])
def test_readers_keep_working_while_another_process_writes(
    tmp_path: Path, views_change: bool
) -> None:
    """With `views_change`, the writes include every table's first shard, which (re)creates
    the views; otherwise every table has shards already and no write opens the db read-write."""
    store, writes = Store(tmp_path / "store"), 2 * len(SAMPLES)
    for table in ["prompts"] if views_change else SAMPLES:
        store.write(table, [SAMPLES[table]], RUN)
    stop = tmp_path / "stop"
    raw = subprocess.Popen(
        [sys.executable, "-c", RAW_READER, str(store.db_path), str(stop)],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        text=True,
    )
    loop = subprocess.Popen([sys.executable, "-c", LOOP_WRITER, str(store.root), str(writes)])
    cli = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or shutil.which("duckdb")
    reads = {"store": [0, []], "rlaif sql": [0, []], "duckdb cli": [0, []]}
    while loop.poll() is None:
        try:
            sql(store.root, "SELECT count(*) FROM prompts JOIN runs USING (run_id)")
            reads["store"][0] += 1
        except StoreError as e:
            reads["store"][1].append(str(e))
        shell = [sys.executable, "-m", "flows.cli", "sql", "--store", str(store.root)]
        for name, command in (
            ("rlaif sql", [*shell, "SELECT count(*) FROM run_events"]),
            ("duckdb cli", [cli, "-readonly", str(store.db_path), "-c", "FROM prompts"]),
        ):
            if name == "duckdb cli" and cli is None:
                continue
            done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
            if done.returncode == 0:
                reads[name][0] += 1
            else:
                reads[name][1].append(done.stderr.strip().splitlines()[-1])
    stop.touch()
    out, _ = raw.communicate(timeout=60)
    raw_reads = json.loads(out)
    reads["python read-only"] = [raw_reads["ok"], raw_reads["errors"]]
    figures = {k: {"ok": n, "failed": len(e)} for k, (n, e) in reads.items()}
    print(json.dumps({"views_change": views_change, "writes": writes, **figures}))
    assert loop.returncode == 0
    assert store.count("prompts") == 3
    assert reads["store"][1] == [] and reads["store"][0] > 0
    assert reads["rlaif sql"][1] == [] and reads["rlaif sql"][0] > 0
    # Plain DuckDB clients do not retry: a read that lands while a write changes a view
    # fails with DuckDB's lock conflict, and with nothing else.
    for name in ("python read-only", "duckdb cli"):
        assert all("Could not set lock" in e for e in reads[name][1]), reads[name][1]
        assert views_change or reads[name][1] == []
    assert raw_reads["ok"] > 0


# --- lock conflicts --------------------------------------------------------------------


def duckdb_error(call: object) -> Exception:
    try:
        call()  # type: ignore[operator]
    except (duckdb.Error, OSError) as e:
        return e
    raise AssertionError("no error")


def sandboxed() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET enable_external_access = false")
    return con


def test_is_lock_conflict_matches_duckdbs_real_conflicts_only(tmp_path: Path) -> None:
    db = tmp_path / "blocked.duckdb"  # "lock" in the name must not make every error a conflict
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
            "sys.stdin.read()",
            str(db),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        other_process = [
            duckdb_error(lambda: duckdb.connect(str(db))),
            duckdb_error(lambda: duckdb.connect(str(db), read_only=True)),
            duckdb_error(lambda: duckdb.connect().execute(f"ATTACH '{db}' (READ_ONLY)")),
        ]
    finally:
        holder.communicate("")
    con = duckdb.connect(str(db), read_only=True)
    try:
        this_process = [
            duckdb_error(lambda: duckdb.connect(str(db))),
            duckdb_error(lambda: duckdb.connect().execute(f"ATTACH '{db}' AS other")),
        ]
    finally:
        con.close()
    for error in other_process + this_process:
        assert is_lock_conflict(error), str(error)
    (tmp_path / "garbage").mkdir()
    garbage = tmp_path / "garbage" / "blocked.duckdb"
    garbage.write_text("not a database " * 100)
    not_conflicts = [
        duckdb_error(lambda: duckdb.connect(str(garbage), read_only=True)),
        duckdb_error(lambda: duckdb.connect(str(tmp_path / "no" / "blocked.duckdb"), True)),
        duckdb_error(
            lambda: duckdb.connect().execute(f"ATTACH '{tmp_path}/b.duckdb' (BLOCK_SIZE 1000)")
        ),
        duckdb_error(lambda: sandboxed().execute("SELECT * FROM read_csv('/etc/passwd')")),
    ]
    for error in not_conflicts:
        assert not is_lock_conflict(error), str(error)
    assert is_lock_conflict(BlockingIOError())


def test_a_broken_db_file_fails_at_once_not_after_the_lock_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views_module, "OPEN_RETRY_S", 30.0)
    (tmp_path / "rlaif.duckdb").write_text("not a database, and blocked " * 100)
    started = time.monotonic()
    with pytest.raises(StoreError, match="not a valid DuckDB database"):
        sql(tmp_path, "SELECT 1")
    assert time.monotonic() - started < 5
