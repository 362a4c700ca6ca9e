"""The store mirrored to S3 (or any S3-compatible server): push, pull, and SQL over the mirror.

Layout under `s3://bucket/prefix/`:
    parquet/<table>/part-<uuid>[-L<k>].parquet   the local shards, same names, same bytes
    rlaif-mirror.json                            the manifest: the shards readers go by

Shards never change once written (a compaction writes a new shard and deletes its sources),
so a shard's name and size identify it. The mirror's rows are the manifest's shards, never
a listing of the prefix: a compaction leaves both the merged shard and its sources on the
server for a while, and a listing would read their rows twice.

`push` uploads the local shards the server lacks (or holds at another size: a killed
upload), then writes the manifest of the local set in one PUT, so a reader sees the old
mirror or the new one, never half of one. A rerun uploads nothing, an interrupted push
rerun uploads only what is missing. Shards the new manifest drops are kept RETIRED_GRACE_S
for readers of the old one, then deleted by a later push, as are uploads no manifest lists.

`pull` downloads the manifest's shards the local store lacks into a staging folder and
swaps each table's folder for the result in one atomic step (storage/shards.py), removing
local shards whose rows the mirror holds in a merged shard; local rows the mirror lacks are
kept. It then rebuilds the DuckDB views. `sql` reads the mirror in the sandbox of local SQL,
limited to the prefix.

Credentials come from the environment: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and
AWS_SESSION_TOKEN, if any); AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (http(s)://host:port)
for a server other than AWS; AWS_REGION or AWS_DEFAULT_REGION (default us-east-1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from storage.errors import StoreError, StoreNotFound
from storage.sandbox import fetch, remote_sandbox
from storage.schemas import TABLES, table_spec
from storage.shards import ExchangeUnsupported, Staging, list_table, read_keys, replacing
from storage.store import Store
from storage.views import DB_NAME, Views, literal

MANIFEST = "rlaif-mirror.json"
FORMAT = 1
RETIRED_GRACE_S = 3600.0  # how long a push keeps the shards the manifest no longer lists
PUSH_TRIES = 3  # a shard merged away locally mid-push: list the store again
CHUNK = 8 << 20
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SEGMENT = re.compile(r"[A-Za-z0-9!_.*'()=+-]+")
_SHARD = re.compile(r"parquet/([a-z_]+)/(part-[0-9a-f]+(?:-L\d+)?\.parquet)")

Shards = dict[str, dict[str, int]]  # table -> shard file name -> bytes


class MirrorError(StoreError):
    """A bad s3:// URL, no credentials, an unreachable server, a missing bucket or mirror."""


class Progress:
    """What push and pull report as they move files; this one reports nothing."""

    def start(self, files: int, nbytes: int) -> None:
        """`files` files, `nbytes` in all, are about to move."""

    def advance(self, nbytes: int) -> None:
        """One file of `nbytes` moved."""


@dataclass(frozen=True)
class PushResult:
    url: str
    uploaded: int  # shards
    uploaded_bytes: int
    present: int  # shards already on the server
    shards: int  # in the new manifest
    deleted: int  # retired or unlisted shards deleted from the server


@dataclass(frozen=True)
class PullResult:
    url: str
    root: Path
    downloaded: int
    downloaded_bytes: int
    present: int  # manifest shards already in the local store
    removed: int  # local shards whose rows the mirror holds merged


@dataclass(frozen=True)
class Location:
    """`s3://bucket/prefix` parsed."""

    bucket: str
    prefix: str  # no leading or trailing slash; "" for the whole bucket

    @classmethod
    def parse(cls, url: str) -> Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or parts.query or parts.fragment or "#" in url:
            raise MirrorError(f"{url!r} is not an s3://bucket/prefix URL")
        prefix = parts.path.strip("/")
        segments = prefix.split("/") if prefix else []
        if not _BUCKET.fullmatch(parts.netloc) or ".." in parts.netloc:
            raise MirrorError(
                f"{url!r}: {parts.netloc!r} is not a bucket name (3-63 of a-z 0-9 . -)"
            )
        if any(s in ("", ".", "..") or not _SEGMENT.fullmatch(s) for s in segments):
            raise MirrorError(
                f"{url!r}: the prefix may hold only letters, digits and ! _ . * ' ( ) = + - "
                "between single slashes"
            )
        return cls(parts.netloc, prefix)

    def key(self, relative: str = "") -> str:
        """The object's path as pyarrow names it: bucket/prefix/relative."""
        return "/".join(p for p in (self.bucket, self.prefix, relative) if p)

    def url(self, relative: str = "") -> str:
        return f"s3://{self.key(relative)}"


@dataclass(frozen=True)
class Manifest:
    tables: Shards
    retired: dict[str, float] = field(default_factory=dict)  # relative path -> retired at

    def files(self) -> dict[str, int]:
        """Relative path -> bytes of every shard listed."""
        return {
            f"parquet/{table}/{name}": size
            for table, shards in self.tables.items()
            for name, size in shards.items()
        }

    def to_json(self) -> bytes:
        body = {"format": FORMAT, "tables": self.tables, "retired": self.retired}
        return json.dumps(body, indent=1, sort_keys=True).encode()


def push(
    root: str | Path,
    url: str,
    progress: Progress | None = None,
    *,
    env: Mapping[str, str] | None = None,
    retired_grace_s: float = RETIRED_GRACE_S,
) -> PushResult:
    """Mirror the store at `root` to `url` (see module). Raises StoreNotFound, MirrorError,
    StoreBusy when another push of this store runs."""
    location = Location.parse(url)
    store_root = Path(root).expanduser().resolve()
    if not (store_root / DB_NAME).is_file():
        raise StoreNotFound(store_root / DB_NAME)
    return Mirror(location, env).push(store_root, progress or Progress(), retired_grace_s)


def pull(
    url: str,
    root: str | Path,
    progress: Progress | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> PullResult:
    """Bring the store at `root` (created if need be) up to the mirror at `url` (see
    module). Raises MirrorError, StoreBusy when another pull into it runs."""
    mirror = Mirror(Location.parse(url), env)
    return mirror.pull(Path(root).expanduser().resolve(), progress or Progress())


def sql(
    url: str, query: str, *, env: Mapping[str, str] | None = None
) -> tuple[list[str], list[tuple]]:
    """Run read-only SQL over the mirror at `url`, in the sandbox of local SQL; column names
    and rows. Raises MirrorError, QueryError or SandboxRefused."""
    return Mirror(Location.parse(url), env).sql(query)


class Mirror:
    """One mirror on one S3 server; the bucket is checked on creation."""

    def __init__(self, location: Location, env: Mapping[str, str] | None = None) -> None:
        self.location = location
        self.url = location.url()
        self.fs, self.endpoint = _s3_filesystem(os.environ if env is None else env)
        with self._s3_errors():
            found = self.fs.get_file_info(location.bucket)
        if found.type == pafs.FileType.NotFound:
            raise MirrorError(
                f"no bucket {location.bucket!r} at {self.endpoint}", "Create it first"
            )

    def manifest(self) -> Manifest | None:
        """The mirror's manifest; None when nothing was pushed there yet."""
        with self._s3_errors():
            try:
                with self.fs.open_input_stream(self.location.key(MANIFEST)) as fh:
                    raw = fh.read()
            except FileNotFoundError:
                return None
        try:
            body = json.loads(raw)
            if body.get("format") != FORMAT:
                raise ValueError(f"format {body.get('format')!r}, not {FORMAT}")
            tables = {
                t: {n: int(s) for n, s in shards.items()} for t, shards in body["tables"].items()
            }
            return Manifest(tables, {p: float(t) for p, t in body.get("retired", {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MirrorError(f"{self.location.url(MANIFEST)} is not an rlaif manifest: {e}") from e

    def push(self, root: Path, progress: Progress, retired_grace_s: float) -> PushResult:
        with Store(root).claim("mirror-push", f"pid {os.getpid()} -> {self.url}"):
            for attempt in range(PUSH_TRIES):
                local = _local_shards(root)
                files = Manifest(local).files()
                remote = self._remote_files()
                missing = {p: n for p, n in files.items() if remote.get(p) != n}
                progress.start(len(missing), sum(missing.values()))
                try:
                    for path, size in sorted(missing.items()):
                        self._upload(root / path, path)
                        progress.advance(size)
                    break
                except FileNotFoundError:  # a merge swapped it away: the listing is stale
                    if attempt == PUSH_TRIES - 1:
                        raise MirrorError(f"{root} kept changing during the push") from None
            old = self.manifest()
            manifest = _next_manifest(old, local, time.time(), retired_grace_s)
            if manifest != old:
                self._put(MANIFEST, manifest.to_json())  # one PUT: readers switch at once
            kept = files.keys() | manifest.retired.keys()
            stale = [p for p in remote if p not in kept and _SHARD.fullmatch(p)]
            with self._s3_errors():
                for path in stale:
                    self.fs.delete_file(self.location.key(path))
        return PushResult(
            self.url, len(missing), sum(missing.values()), len(files) - len(missing), len(files),
            len(stale),
        )  # fmt: skip

    def pull(self, root: Path, progress: Progress) -> PullResult:
        manifest = self._manifest_or_raise()
        unknown = sorted(set(manifest.tables) - set(TABLES))
        if unknown:
            raise MirrorError(
                f"{self.url} holds tables this rlaif does not know: {', '.join(unknown)}",
                "Upgrade rlaif",
            )
        store = Store(root)
        with store.claim("mirror-pull", f"pid {os.getpid()} <- {self.url}"):
            local = _local_shards(root)
            missing = {
                table: {n: s for n, s in shards.items() if n not in local.get(table, {})}
                for table, shards in manifest.tables.items()
            }
            sizes = [s for shards in missing.values() for s in shards.values()]
            progress.start(len(sizes), sum(sizes))
            removed = 0
            for table in TABLES:
                wanted = manifest.tables.get(table, {})
                if missing.get(table) or set(local.get(table, {})) - set(wanted):
                    removed += self._pull_table(
                        store, table, wanted, missing.get(table, {}), progress
                    )
            store.ensure()  # the db file and its views, over the shards now here
        present = len(manifest.files()) - len(sizes)
        return PullResult(self.url, root, len(sizes), sum(sizes), present, removed)

    def sql(self, query: str) -> tuple[list[str], list[tuple]]:
        tables = self._manifest_or_raise().tables

        def scan(table: str) -> str | None:
            urls = [
                self.location.url(f"parquet/{table}/{n}") for n in sorted(tables.get(table, {}))
            ]
            if not urls:
                return None
            listed = ", ".join(literal(u) for u in urls)
            return f"read_parquet([{listed}], hive_partitioning = false, union_by_name = true)"

        views = Views(Path(self.url), scan).wanted()  # the local views' SQL over these shards
        with remote_sandbox(self.fs, self.location.url() + "/", views) as con:
            return fetch(con, query, None)

    # -- transfers ------------------------------------------------------------------------

    def _pull_table(
        self, store: Store, table: str, wanted: dict[str, int], missing: dict[str, int],
        progress: Progress,
    ) -> int:  # fmt: skip
        """Download `missing` beside the table's folder, then swap the folder for the
        mirror's set plus the local rows it lacks; the number of local shards removed."""
        folder = store.root / "parquet" / table
        folder.mkdir(parents=True, exist_ok=True)
        staging = Staging(folder)
        try:
            for name, size in sorted(missing.items()):
                self._download(f"parquet/{table}/{name}", staging.path / name, size)
                progress.advance(size)
            with store._lock():  # the store's write lock: no write or merge meanwhile
                shards = list_table(folder).shards
                here = {os.path.basename(p): p for p in shards}
                extras = [p for name, p in here.items() if name not in wanted]
                mirrored = [here.get(n, str(staging.path / n)) for n in wanted]
                replaced = _covered(table, extras, mirrored, self.url)
                try:
                    staging.swap(replaced)
                except ExchangeUnsupported as e:
                    raise MirrorError(
                        f"Cannot pull into {folder}: {e.strerror}",
                        "Pull into a local Linux file system (ext4, xfs, btrfs, tmpfs)",
                    ) from e
        finally:
            staging.close()
        return len(replaced)

    def _upload(self, local: Path, path: str) -> None:
        # The local file is opened first: a shard merged away raises before any upload.
        key = self.location.key(path)
        with open(local, "rb") as src, self._s3_errors(), self.fs.open_output_stream(key) as dst:
            shutil.copyfileobj(src, dst, CHUNK)

    def _download(self, path: str, target: Path, size: int) -> None:
        with replacing(target) as tmp, self._s3_errors():
            try:
                with (
                    self.fs.open_input_stream(self.location.key(path)) as src,
                    open(tmp, "wb") as dst,
                ):
                    shutil.copyfileobj(src, dst, CHUNK)
                    dst.flush()
                    os.fsync(dst.fileno())
            except FileNotFoundError:
                raise MirrorError(
                    f"{self.location.url(path)} is listed but gone: a push replaced it",
                    "Run the pull again",
                ) from None
            if tmp.stat().st_size != size:
                raise MirrorError(
                    f"{self.location.url(path)} holds {tmp.stat().st_size} bytes, the manifest "
                    f"says {size}",
                    "Push the store again",
                )

    def _put(self, path: str, data: bytes) -> None:
        with self._s3_errors(), self.fs.open_output_stream(self.location.key(path)) as dst:
            dst.write(data)  # one write: a failure before it uploads nothing

    def _remote_files(self) -> dict[str, int]:
        """Relative path -> bytes of every object under the mirror's `parquet/`."""
        start = len(self.location.key()) + 1
        selector = pafs.FileSelector(
            self.location.key("parquet"), recursive=True, allow_not_found=True
        )
        with self._s3_errors():
            found = self.fs.get_file_info(selector)
        return {f.path[start:]: f.size for f in found if f.type == pafs.FileType.File}

    def _manifest_or_raise(self) -> Manifest:
        manifest = self.manifest()
        if manifest is None:
            raise MirrorError(
                f"no rlaif mirror at {self.url} (no {MANIFEST})",
                f"Push one first: rlaif store push {self.url}",
            )
        return manifest

    @contextmanager
    def _s3_errors(self) -> Iterator[None]:
        """The server's errors as one MirrorError line that names the fix."""
        try:
            yield
        except (MirrorError, FileNotFoundError):
            raise
        except OSError as e:
            message = " ".join(str(e).split())
            if "NETWORK_CONNECTION" in message or "curlCode" in message:
                raise MirrorError(
                    f"cannot reach the S3 server {self.endpoint} ({message})",
                    "Check AWS_ENDPOINT_URL and that the server is up",
                ) from e
            if any(m in message for m in ("ACCESS_DENIED", "InvalidAccessKeyId", "Signature")):
                raise MirrorError(
                    f"{self.url}: access denied by {self.endpoint}",
                    "Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                ) from e
            raise MirrorError(f"{self.url}: {message}") from e


def _s3_filesystem(env: Mapping[str, str]) -> tuple[pafs.S3FileSystem, str]:
    """The S3 filesystem the environment describes, and the endpoint in words."""
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise MirrorError(
            "no S3 credentials",
            "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a "
            "server other than AWS)",
        )
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    options: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            parts = parts._replace(scheme="")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            raise MirrorError(f"AWS_ENDPOINT_URL {endpoint!r} is not an http(s)://host[:port] URL")
        options = {"endpoint_override": parts.netloc, "scheme": parts.scheme}
    fs = pafs.S3FileSystem(
        access_key=key,
        secret_key=secret,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
        region=region,
        connect_timeout=5,
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        allow_bucket_creation=False,
        allow_bucket_deletion=False,
        **options,
    )
    return fs, endpoint or f"AWS S3 ({region})"


def _local_shards(root: Path) -> Shards:
    """Every table's shards under `root`, one listing per table (each a consistent set)."""
    local: Shards = {}
    for table in TABLES:
        shards = list_table(root / "parquet" / table).shards
        if shards:
            local[table] = {os.path.basename(p): os.path.getsize(p) for p in shards}
    return local


def _next_manifest(old: Manifest | None, local: Shards, now: float, grace_s: float) -> Manifest:
    """The manifest of `local`, retiring what `old` listed and `local` lacks; shards retired
    more than `grace_s` ago are dropped (and deleted by the push)."""
    files = Manifest(local).files()
    retired = {p: t for p, t in (old.retired if old else {}).items() if now - t < grace_s}
    if old is not None:
        gone = old.files().keys() - files.keys()
        retired.update({p: now for p in gone if grace_s > 0 and p not in retired})
    retired = {p: t for p, t in retired.items() if p not in files}
    if old is not None and old.tables == local and old.retired.keys() == retired.keys():
        return old  # unchanged: no new PUT
    return Manifest(local, retired)


def _covered(table: str, extras: list[str], mirrored: list[str], url: str) -> list[str]:
    """Of the local shards `extras`, those whose rows the `mirrored` shards all hold (merged
    there); one holding some of those rows and some others is refused (it would show them
    twice)."""
    if not extras:
        return []
    key = table_spec(table).key
    in_mirror: set[str] = set()
    for path in mirrored:
        in_mirror.update(read_keys(path, key))
    replaced = []
    for path in extras:
        keys = set(read_keys(path, key))
        if keys <= in_mirror:
            replaced.append(path)
        elif keys & in_mirror:
            raise MirrorError(
                f"{path} holds {table} rows that {url} holds and rows that it lacks",
                f"Push this store first (rlaif store push {url}), or pull into an empty folder",
            )
    return replaced
