"""storage/mirror.py without a server: URLs, the environment, the manifest's retired shards,
and which local shards a pull may drop. tests/integration/test_s3_store.py runs it on S3."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from storage.mirror import Location, Manifest, MirrorError, _covered, _next_manifest, _s3_filesystem
from storage.sandbox import read_only

ENV = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://my-bucket/rlaif", "my-bucket", "rlaif"),
        ("s3://my-bucket/a/b/", "my-bucket", "a/b"),
        ("s3://my.bucket", "my.bucket", ""),
    ],
)
def test_location_parses(url: str, bucket: str, prefix: str) -> None:
    location = Location.parse(url)
    assert (location.bucket, location.prefix) == (bucket, prefix)
    assert (
        location.url("rlaif-mirror.json")
        == f"s3://{'/'.join(filter(None, [bucket, prefix]))}/rlaif-mirror.json"
    )


@pytest.mark.parametrize(
    "url",
    ["my-bucket/p", "gs://my-bucket/p", "s3://", "s3://ab", "s3://My_Bucket/p", "s3://b..x/p",
     "s3://bucket/a//b", "s3://bucket/a/../b", "s3://bucket/p?x=1", "s3://bucket/p#x",
     "s3://bucket/a b"],
)  # fmt: skip
def test_location_refuses(url: str) -> None:
    with pytest.raises(MirrorError):
        Location.parse(url)


def test_credentials_and_endpoint_come_from_the_environment() -> None:
    with pytest.raises(MirrorError, match="no S3 credentials"):
        _s3_filesystem({"AWS_ACCESS_KEY_ID": "k"})
    _, endpoint = _s3_filesystem({**ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})
    assert endpoint == "http://127.0.0.1:9000"
    _, endpoint = _s3_filesystem({**ENV, "AWS_ENDPOINT_URL_S3": "https://s3.example.com"})
    assert endpoint == "https://s3.example.com"
    _, endpoint = _s3_filesystem({**ENV, "AWS_REGION": "eu-west-3"})
    assert endpoint == "AWS S3 (eu-west-3)"
    for bad in ["127.0.0.1:9000", "ftp://host", "http://host:port", "http://host/path"]:
        with pytest.raises(MirrorError, match="is not an http"):
            _s3_filesystem({**ENV, "AWS_ENDPOINT_URL": bad})


def test_manifest_retires_dropped_shards_for_a_while() -> None:
    old = Manifest({"prompts": {"part-a.parquet": 10, "part-b.parquet": 20}})
    merged = {"prompts": {"part-c-L1.parquet": 25}}
    assert _next_manifest(old, old.tables, 100.0, 60.0) is old  # unchanged: no new PUT
    new = _next_manifest(old, merged, 100.0, 60.0)
    assert new.tables == merged
    assert new.retired == {
        "parquet/prompts/part-a.parquet": 100.0,
        "parquet/prompts/part-b.parquet": 100.0,
    }
    assert _next_manifest(new, merged, 130.0, 60.0) is new  # still within the grace
    later = _next_manifest(new, merged, 161.0, 60.0)
    assert (later.tables, later.retired) == (merged, {})
    assert _next_manifest(old, merged, 100.0, 0.0).retired == {}
    assert Manifest(merged).files() == {"parquet/prompts/part-c-L1.parquet": 25}


def test_pull_drops_only_local_shards_the_mirror_holds_merged(tmp_path: Path) -> None:
    def shard(name: str, *keys: str) -> str:
        path = tmp_path / name
        pq.write_table(pa.table({"prompt_id": list(keys)}), path)
        return str(path)

    merged, a, b = shard("m", "p0", "p1", "p2"), shard("a", "p0", "p1"), shard("b", "p9")
    assert _covered("prompts", [], [merged], "s3://b/p") == []
    assert _covered("prompts", [a, b], [merged], "s3://b/p") == [a]  # a merged there, b kept
    with pytest.raises(MirrorError, match="Push this store first"):
        _covered("prompts", [shard("c", "p2", "p3")], [merged], "s3://b/p")


def test_duckdb_reads_the_mirror_through_a_filesystem_that_only_reads(tmp_path: Path) -> None:
    shard = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt_id": ["p0"]}), shard)
    fs = read_only(pafs.LocalFileSystem())
    with fs.open(str(shard), "rb") as fh:
        assert fh.read(4) == b"PAR1"
    for write in [
        lambda: fs.open(str(tmp_path / "b.parquet"), "wb"),
        lambda: fs.rm(str(shard)),
        lambda: fs.mkdir(str(tmp_path / "d")),
        lambda: fs.mv(str(shard), str(tmp_path / "c.parquet")),
    ]:
        with pytest.raises(PermissionError):
            write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]
