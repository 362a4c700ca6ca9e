"""A real Ray cluster on 127.0.0.1 for the tests that need one, stopped by its own pid.

``ray start --head --block`` stays in the foreground as the leader of its own process
group (GCS, raylet and the workers are its children), so stopping the group stops
exactly this cluster, never another one on the machine. Every Ray listener is on
loopback only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, set for ``ray start`` and for
the driver (this test process).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int = 2, start_timeout_s: float = 90) -> Iterator[str]:
    """Start a one-node Ray cluster on 127.0.0.1; yields its address ("127.0.0.1:PORT")."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    # Ray's socket paths must stay short: a temp dir directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rlaif-ray-", dir="/tmp")
    env = {**os.environ, **LOOPBACK_ENV}
    command = [
        str(ray_bin), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
        "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=false",
        "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    previous = {key: os.environ.get(key) for key in [*LOOPBACK_ENV, "RAY_ADDRESS"]}
    os.environ.update(LOOPBACK_ENV)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(
                    f"ray start did not come up: {(Path(temp_dir) / 'ray-start.log').read_text()}"
                )
            time.sleep(0.5)
        time.sleep(2)  # the raylet registers just after the GCS port opens
        yield address
    finally:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        stop_group(process)
        log.close()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group led by ``process`` (ray start's own clean-up), then
    SIGKILL to what is left."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
            if sig == signal.SIGTERM:
                # the leader is gone; its children may linger a moment in the group
                time.sleep(1)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            return
