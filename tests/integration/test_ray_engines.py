"""vLLM engines in Ray actors on a real local Ray cluster: the collect-preferences flow
(sampling, critiques, logprob judging) through two CPU actors of the tiny model stores the
rows the local engine stores, also when one actor is killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from alignment.backends import placement, ray_backend, release_pools
from flows.config import ModelConfig, PipelineConfig, RayEnginesConfig
from flows.pipeline import collect_preferences
from storage import Store
from storage.schemas import table_spec
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

TABLES = ("responses", "critiques", "judgments", "preference_pairs")


def config_for(store: Path, policy: ModelConfig) -> PipelineConfig:
    return PipelineConfig(
        store=str(store),
        constitution=str(REPO / "constitutions" / "demo.yaml"),
        batch_size=4,
        prompts={"limit": 4},
        policy=policy,
        generation={"n": 2, "max_tokens": 16},
        critique={"max_tokens": 12},
        judge={"min_confidence": 0.5, "mode": "logprob"},
    )


def stored(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every row of the compared tables, in key order, less the clock's columns."""
    store = Store(root)
    tables = {}
    for table in TABLES:
        key = table_spec(table).key
        rows = store.query(f"SELECT * FROM {table} ORDER BY {key}")
        tables[table] = [
            {k: v for k, v in row.items() if not k.endswith("_at") and k != "seconds"}
            for row in rows
        ]
    return tables


@pytest.fixture(scope="module")
def ray_policy(policy_config: ModelConfig, ray_address: str):
    """The shared engine's settings, run by two one-CPU actors on the 2-CPU cluster."""
    ray = RayEnginesConfig(address=ray_address, actors=2, cpus_per_actor=1, batch_size=2)
    yield policy_config.model_copy(update={"ray": ray})
    release_pools()  # the cluster's CPUs go back to the session's other Ray tests


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory, prefect_harness, vllm_backend, policy_config):
    root = tmp_path_factory.mktemp("local")
    collect_preferences(config=config_for(root, policy_config))
    return stored(root)


def batches(root: Path) -> list[dict[str, Any]]:
    """The run's `batches` rows: where each batch of engine requests ran."""
    return Store(root).query("SELECT * FROM batches ORDER BY started_at")


def test_actors_store_the_rows_the_local_engine_stores(tmp_path, ray_policy, local_rows):
    collect_preferences(config=config_for(tmp_path, ray_policy))
    assert stored(tmp_path) == local_rows
    assert all(local_rows.values())  # every table has rows: each stage ran on the actors
    # Each batch names the actor that ran it and that actor's node.
    notes = batches(tmp_path)
    assert {p["ran_on"] for p in notes} == {"actor-0", "actor-1"}
    assert {p["kind"] for p in notes} == {"actor"}
    assert {p["node"] for p in notes} == {placement.this_node()}
    assert {p["stage"] for p in notes} >= {"sample", "critique", "judge"}
    assert all(p["ok"] and 1 <= p["requests"] <= 2 for p in notes)


def test_a_killed_actor_loses_no_row(tmp_path, monkeypatch, ray_policy, local_rows):
    """SIGKILL actor-0 while it holds a batch (once a first batch has come back): its
    batch runs on actor-1, Ray restarts actor-0, and the stored rows are the same."""
    pool = next(iter(ray_backend._POOLS.values()))
    victim = pool.slots[0]
    armed, lock, killed = threading.Event(), threading.Lock(), []
    held = threading.local()  # the slot this dispatch thread sent its batch to
    acquire, release, resolve = pool._acquire, pool._release, ray_backend.resolve

    def noting_acquire() -> ray_backend.Slot:
        held.slot = acquire()
        return held.slot

    def arming_release(slot: ray_backend.Slot) -> None:
        release(slot)
        armed.set()

    def killing_resolve(ref: Any) -> Any:
        with lock:
            if armed.is_set() and not killed and getattr(held, "slot", None) is victim:
                killed.append(victim.pid)
                os.kill(victim.pid, signal.SIGKILL)
        return resolve(ref)

    monkeypatch.setattr(pool, "_acquire", noting_acquire)
    monkeypatch.setattr(pool, "_release", arming_release)
    monkeypatch.setattr(ray_backend, "resolve", killing_resolve)
    collect_preferences(config=config_for(tmp_path, ray_policy))
    assert killed
    assert stored(tmp_path) == local_rows  # nothing lost, nothing twice
    failed = [p for p in batches(tmp_path) if not p["ok"]]
    assert failed and {p["ran_on"] for p in failed} == {victim.name}
    assert victim.deaths == 1
