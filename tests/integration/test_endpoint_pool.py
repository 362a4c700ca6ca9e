"""A pool of two real vLLM servers: one is killed mid-run and the run still stores
exactly the rows of a clean run, the rest served by the live one."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow

from alignment.backends import SamplingConfig
from flows.config import ModelConfig
from flows.stages import sample_stage
from storage import Store
from tests.integration.vllm_server import VLLMServer

PROMPTS = {f"p{i}": f"Tell me about the number {i}." for i in range(20)}
SAMPLING = SamplingConfig(n=2, temperature=1.0, max_tokens=16, seed=0)


@pytest.fixture(scope="module")
def two_servers(openai_server: str, pool_server: VLLMServer) -> Iterator[tuple]:
    """The session's vLLM server (kept up) and the pool's second one
    (killed mid-run; stopped when this module ends): the same model, dtype and seed."""
    try:
        yield openai_server, pool_server
    finally:
        pool_server.stop()


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
