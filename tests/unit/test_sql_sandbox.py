"""User SQL cannot leave the store: no reads outside its files, no writes anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from flows.cli import main
from storage import TABLES, QueryError, SandboxRefused, Store, sql
from tests.unit.test_store import RUN, SAMPLES


def make_store(base: Path) -> Store:
    db = Store(base / "store")
    for table, row in SAMPLES.items():
        db.write(table, [row], RUN)
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("secret\n42\n")
    pq.write_table(pa.table({"secret": [42]}), outside / "secret.parquet")
    return db


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return make_store(tmp_path_factory.mktemp("sandbox"))


@pytest.fixture
def store(shared: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """The shared store, which a test must leave as it found it; cwd is an empty folder."""
    monkeypatch.chdir(tmp_path)
    return shared


@pytest.fixture
def own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store this test may change."""
    monkeypatch.chdir(tmp_path)
    return make_store(tmp_path)


def files(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


# Each tries to read or write outside the store, write inside it, or lift the sandbox.
ESCAPES = [
    "COPY (SELECT 1) TO 'escape.csv'",
    "COPY (SELECT 1) TO '{out}/escape.csv'",
    "COPY (SELECT * FROM prompts) TO '{root}/parquet/prompts/run_id=x/evil.parquet'",
    "COPY FROM DATABASE rlaif TO memory",
    "EXPORT DATABASE '{out}/export'",
    "ATTACH '{out}/other.duckdb' AS other",
    "ATTACH '{root}/parquet/other.duckdb' AS other",
    "ATTACH ':memory:' AS m",
    "DETACH rlaif",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv('{out}/secret.csv')",
    "SELECT * FROM read_csv('{root}/parquet/../../outside/secret.csv')",
    "SELECT * FROM read_parquet('{out}/secret.parquet')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM read_json('{out}/secret.csv')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM glob('{root}/*')",
    "SELECT * FROM read_text('{root}/.lock')",
    "CALL read_csv('/etc/passwd')",
    "PRAGMA import_database('{out}')",
    "SET enable_external_access = true",
    "RESET enable_external_access",
    "PRAGMA enable_external_access = true",
    "SELECT current_setting('threads'); SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "SET lock_configuration = false",
    "PRAGMA enable_profiling",
    "PRAGMA profiling_output = '{out}/profile.json'",
    "SET temp_directory = '{out}/tmp'",
    "USE memory",
    "CREATE TABLE t (a INT)",
    "CREATE VIEW v AS SELECT 1",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE MACRO m() AS 1",
    "INSERT INTO prompts (prompt_id) VALUES ('x')",
    "DROP VIEW prompts",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO 'escape.csv'",
    "/* hidden */ EXPLAIN ANALYZE COPY (SELECT 1) TO 'escape.csv'",
    "EXPLAIN COPY (SELECT 1) TO 'escape.csv'",
    "PREPARE p AS COPY (SELECT 1) TO 'escape.csv'",
    "SELECT 1; COPY (SELECT 1) TO 'escape.csv'",
    "BEGIN TRANSACTION",
    "CHECKPOINT rlaif",
]


@pytest.mark.parametrize("statement", ESCAPES)
def test_escapes_are_refused_and_leave_no_file(store: Store, statement: str) -> None:
    query = statement.format(root=store.root, out=store.root.parent / "outside")
    before = files(store.root.parent, Path.cwd())
    with pytest.raises(SandboxRefused, match="^the SQL sandbox refused .*--allow-external"):
        sql(store.root, query)
    with pytest.raises(SandboxRefused):
        store.query(query)
    assert files(store.root.parent, Path.cwd()) == before
    assert store.count("prompts") == 1


@pytest.mark.parametrize("statement", ["COPY (SELECT 1) TO 'escape.csv'", "SET threads = 1"])
def test_query_arrow_is_sandboxed_too(store: Store, statement: str) -> None:
    with pytest.raises(SandboxRefused):
        store.query_arrow(statement)
    with pytest.raises(SandboxRefused, match="access to /etc/passwd"):
        store.query_arrow("SELECT * FROM read_csv('/etc/passwd')")
    assert not Path("escape.csv").exists()


def test_a_query_inside_query_is_still_a_select(store: Store) -> None:
    with pytest.raises(QueryError, match="Expected a single SELECT statement"):
        sql(store.root, "SELECT * FROM query('COPY (SELECT 1) TO ''escape.csv''')")
    assert not Path("escape.csv").exists()


@pytest.mark.parametrize(
    "statement",
    ["COPY (SELECT 1) TO 'escape.csv'", "SELECT * FROM read_csv('/etc/passwd')"],
)
def test_cli_refusal_is_one_line_exit_2(store: Store, statement: str) -> None:
    result = CliRunner().invoke(main, ["sql", "--store", str(store.root), statement])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith("error: the SQL sandbox refused ")
    assert result.stderr.endswith("need --allow-external (allow_external=True in Python)\n")
    assert result.stderr.count("\n") == 1
    assert not Path("escape.csv").exists()


def test_allow_external_lifts_the_sandbox(store: Store) -> None:
    out = Path.cwd()
    copy = f"COPY (SELECT count(*) AS n FROM prompts) TO '{out}/n.csv'"
    result = CliRunner().invoke(main, ["sql", "--store", str(store.root), "--allow-external", copy])
    assert result.exit_code == 0, result.output
    assert (out / "n.csv").read_text() == "n\n1\n"
    secret = f"SELECT * FROM read_csv('{store.root.parent}/outside/secret.csv')"
    assert sql(store.root, secret, allow_external=True) == (["secret"], [(42,)])
    assert store.query(secret, allow_external=True) == [{"secret": 42}]
    assert store.query_arrow(secret, allow_external=True).num_rows == 1


def test_every_view_and_join_still_reads(store: Store) -> None:
    for table in TABLES:
        assert store.count(table) == 1, table
        assert store.query_arrow(f"SELECT * FROM {table}").num_rows == 1
    assert sql(store.root, "SELECT count(*) FROM run_events") == (["count_star()"], [(1,)])
    joined = store.query(
        "SELECT p.prompt_id, r.response_id, j.judgment_id FROM prompts p "
        "JOIN responses r USING (prompt_id) JOIN judgments j USING (prompt_id)"
    )
    assert joined == [{"prompt_id": "p1", "response_id": "r1", "judgment_id": "j1"}]
    assert store.query("SELECT prompt_id FROM prompts WHERE text = ?", ["Hi?"]) == [
        {"prompt_id": "p1"}
    ]
    for statement in (
        "DESCRIBE prompts",
        "SUMMARIZE prompts",
        "SHOW TABLES",
        "PRAGMA table_info('prompts')",
        "CALL duckdb_views()",
        "EXPLAIN SELECT * FROM prompts",
        "EXPLAIN ANALYZE SELECT * FROM prompts",
        "-- a comment\nEXPLAIN ANALYZE (FORMAT json) SELECT * FROM prompts",
        "FROM prompts; SELECT 1",
        "SELECT * FROM rlaif.main.prompts",
    ):
        assert sql(store.root, statement)[1], statement
    assert store.existing_keys("prompts", ["p1", "p2"]) == {"p1"}


def test_the_sandbox_does_not_leak_into_other_connections(store: Store) -> None:
    store.query("SELECT 1")
    con = duckdb.connect(str(store.db_path), read_only=True)
    try:
        secret = store.root.parent / "outside" / "secret.csv"
        assert con.execute(f"SELECT * FROM read_csv('{secret}')").fetchall() == [(42,)]
    finally:
        con.close()


def test_symlinks_out_of_the_store_are_refused(own_store: Store) -> None:
    """DuckDB resolves symlinks before checking allowed_directories (measured on 2.0.1)."""
    out = own_store.root.parent / "outside"
    parquet = own_store.root / "parquet"
    (parquet / "to_outside").symlink_to(out)
    (parquet / "secret.csv").symlink_to(out / "secret.csv")
    for path in ("to_outside/secret.csv", "secret.csv"):
        with pytest.raises(SandboxRefused, match="access to"):
            sql(own_store.root, f"SELECT * FROM read_csv('{parquet / path}')")
    # A shard symlinked to a file outside: the view refuses it rather than read it.
    (parquet / "prompts" / "part-evil.parquet").symlink_to(out / "secret.parquet")
    with pytest.raises(SandboxRefused, match="part-evil.parquet"):
        own_store.query("SELECT * FROM prompts")


def test_symlinks_inside_the_store_still_read(own_store: Store) -> None:
    """A `parquet/` folder on another disk, linked in, reads as before."""
    elsewhere = own_store.root.parent / "disk"
    (own_store.root / "parquet").rename(elsewhere)
    (own_store.root / "parquet").symlink_to(elsewhere)
    assert own_store.count("prompts") == 1


def test_a_moved_store_still_reads(own_store: Store) -> None:
    moved = own_store.root.parent / "moved"
    own_store.root.rename(moved)
    assert Store(moved).count("prompts") == 1
    assert not os.path.exists(own_store.root)
