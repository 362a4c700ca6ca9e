"""The loop as deployments on a real Prefect server on loopback: served, and on a worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from storage import Store
from tests.integration.loop_helpers import RLAIF, write_tiny_loop
from tests.integration.ray_cluster import free_port

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).parent / "prefect")
DEPLOYMENT = "self-improve/e2e"


def _wait_for(check, what: str, timeout_s: float = 180, process=None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except httpx.TransportError:
            pass
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"{what}: the process ended ({process.returncode})\n{tail}")
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"{what}: not after {timeout_s} s\n{tail}")
        time.sleep(0.5)


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """`prefect server start` on 127.0.0.1, and the environment of a client of it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    server_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    server_env["PREFECT_HOME"] = str(home)
    log = home / "server.log"
    server = _start(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, server_env
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_for(
            lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200,
            "prefect server healthy", process=server, log=log,
        )  # fmt: skip
        client_home = tmp_path_factory.mktemp("prefect-client")
        yield api, {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(client_home)}
    finally:
        _stop(server)


def _deployment(api: str) -> dict | None:
    response = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=5)
    return response.json() if response.status_code == 200 else None


def _artifact_keys(api: str, keys: list[str]) -> set[str]:
    body = {"artifacts": {"key": {"any_": keys}}}
    found = httpx.post(f"{api}/artifacts/filter", json=body, timeout=10).json()
    return {a["key"] for a in found}


def _run_deployment(env: dict[str, str], *params: str) -> str:
    """`prefect deployment run` of the loop, watched until the run ends."""
    args = [PREFECT, "deployment", "run", DEPLOYMENT, *params, "--watch", "--watch-timeout", "500"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=560)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _flow_runs(api: str, deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()


def test_loop_deployment_served_then_on_a_process_worker(prefect_server, tmp_path: Path):
    # Each flow run's engine runs in its own process (the session's setting, conftest.py).
    api, env = prefect_server
    store = Store(tmp_path / "store")
    loop = ["name: e2e", "iterations: 1", 'cron: "0 3 * * *"']
    # 16 prompts: the tiny judge ties on about half its comparisons, and an iteration
    # with no train pairs would publish no metrics artifact.
    config = write_tiny_loop(tmp_path / "loop.yaml", store.root, "{limit: 16}", loop, 128)

    # 1. `rlaif serve`: the deployment exists with the config's schedule ...
    serve_log = tmp_path / "serve.log"
    served = _start([RLAIF, "serve", "--config", str(config)], serve_log,
                    {**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"})  # fmt: skip
    started = [served]  # stopped at the end, whatever happens
    try:
        # The work pool of part 2 and its worker start meanwhile: the worker only polls
        # the pool, which holds no deployment until `rlaif deploy`.
        pool = subprocess.run(
            [PREFECT, "work-pool", "create", "rlaif-test", "--type", "process"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert pool.returncode == 0, pool.stdout + pool.stderr
        worker_log = tmp_path / "worker.log"
        worker = _start(
            [PREFECT, "worker", "start", "--pool", "rlaif-test", "--prefetch-seconds", "1"],
            worker_log, {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
        )  # fmt: skip
        started.append(worker)
        deployment = _wait_for(lambda: _deployment(api), "deployment registered",
                               process=served, log=serve_log)  # fmt: skip
        crons = [s["schedule"].get("cron") for s in deployment["schedules"]]
        assert crons == ["0 3 * * *"]
        assert deployment["parameters"]["config_path"] == str(config)
        # ... and `prefect deployment run` runs one iteration in the served process.
        out = _run_deployment(env, "-p", "iterations=1")
        assert "Completed" in out, out
        _stop(served)
        rows = store.query("SELECT iteration, decision FROM iterations WHERE loop = 'e2e'")
        assert [r["iteration"] for r in rows] == [1]
        assert _artifact_keys(api, ["e2e-iteration-1", "e2e-iteration-1-metrics"]) == {
            "e2e-iteration-1",
            "e2e-iteration-1-metrics",
        }

        # 2. The process work pool's worker runs the same deployment.
        deployed = subprocess.run(
            [RLAIF, "deploy", "--config", str(config), "--pool", "rlaif-test"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        # Two runs at once: the deployment takes one at a time and cancels the newcomer.
        trigger = [PREFECT, "deployment", "run", DEPLOYMENT, "-p", "iterations=1"]
        triggers = [_start(trigger, tmp_path / f"run-{i}.log", env) for i in range(2)]
        started += triggers
        for i, triggered in enumerate(triggers):
            assert triggered.wait(timeout=120) == 0, (tmp_path / f"run-{i}.log").read_text()
        deployment_id = _deployment(api)["id"]

        def finished() -> list[dict] | None:
            runs = [r for r in _flow_runs(api, deployment_id) if r["state_type"] != "COMPLETED"
                    or r["parameters"].get("iterations") == 1]  # fmt: skip
            final = {"COMPLETED", "CANCELLED", "FAILED", "CRASHED", "CANCELLING"}
            pending = [r for r in runs if r["state_type"] not in final]
            return None if pending else runs

        runs = _wait_for(finished, "worker runs finished", timeout_s=500, process=worker,
                         log=worker_log)  # fmt: skip
    finally:
        for process in started:
            _stop(process)
    states = sorted(r["state_type"] for r in runs)
    assert states == ["CANCELLED", "COMPLETED", "COMPLETED"], (
        states,
        worker_log.read_text()[-3000:],
    )
    rows = store.query("SELECT iteration FROM iterations WHERE loop = 'e2e' ORDER BY 1")
    assert [r["iteration"] for r in rows] == [1, 2]  # the cancelled run wrote nothing
