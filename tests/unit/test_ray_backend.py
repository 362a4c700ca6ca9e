"""The engine actors' dispatch with fake actors: batches in order, least-loaded first, a
dead actor's batch retried on another, a restarted actor back in the pool."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from alignment.backends import placement, ray_backend
from alignment.backends.ray_backend import ActorSettings, EnginePool, Slot


class FakeRef:
    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call


class FakeMethod:
    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call

    def remote(self, *args: Any) -> FakeRef:
        return FakeRef(lambda: self.call(*args))


class FakeActor:
    """Echoes each batch; dies on its ``dies_on``-th call (1-based), then is restarted."""

    def __init__(self, dies_on: int | None = None) -> None:
        self.dies_on, self.calls, self.lock = dies_on, 0, threading.Lock()
        self.echo = FakeMethod(self._echo)
        self.where = FakeMethod(lambda: {"node": "fake-node", "ip": "127.0.0.1", "pid": 1})

    def _echo(self, tag: str, batch: list[int]) -> list[tuple[str, int]]:
        with self.lock:
            self.calls += 1
            if self.calls == self.dies_on:
                raise ActorDiedError()
        return [(tag, item) for item in batch]


@pytest.fixture(autouse=True)
def fake_ray(monkeypatch):
    monkeypatch.setattr(ray_backend, "resolve", lambda ref: ref.call())
    monkeypatch.setattr(ray_backend, "is_ready", lambda ref: True)


def pool_of(*actors: FakeActor, max_restarts: int = 1) -> EnginePool:
    slots = [Slot(i, actor, node="fake-node") for i, actor in enumerate(actors)]
    return EnginePool(ActorSettings(actors=len(actors), max_restarts=max_restarts), slots, None)


def test_batches_come_back_in_order_from_both_actors():
    second_called = threading.Event()
    busy, idle = FakeActor(), FakeActor()
    first_echo = busy.echo.call

    def held(tag: str, batch: list[int]) -> list[tuple[str, int]]:
        second_called.wait(timeout=5)  # busy while the next batch is sent
        return first_echo(tag, batch)

    def noted(tag: str, batch: list[int], echo: Callable = idle.echo.call) -> list:
        second_called.set()
        return echo(tag, batch)

    busy.echo, idle.echo = FakeMethod(held), FakeMethod(noted)
    pool = pool_of(busy, idle)
    with placement.recording() as recorder:
        rows = pool.run("echo", ("t",), list(range(10)), size=3)
    assert rows == [("t", i) for i in range(10)]
    notes = recorder.placements
    assert sorted(p.requests for p in notes) == [1, 3, 3, 3]
    assert {p.where for p in notes} == {"actor-0", "actor-1"}
    assert all(p.ok and p.kind == "actor" and p.node == "fake-node" for p in notes)


def test_a_dead_actors_batch_runs_elsewhere_and_the_actor_comes_back():
    pool = pool_of(FakeActor(dies_on=1), FakeActor())
    with placement.recording() as recorder:
        rows = pool.run("echo", ("t",), list(range(12)), size=2)
    assert rows == [("t", i) for i in range(12)]  # nothing lost, nothing twice
    failed = [p for p in recorder.placements if not p.ok]
    assert len(failed) == 1 and failed[0].where == "actor-0"
    assert "ActorDiedError" in (failed[0].error or "")
    assert sum(p.requests for p in recorder.placements if p.ok) == 12
    assert pool.slots[0].deaths == 1
    # its probe answered (Ray restarted it): it takes batches again
    pool.run("echo", ("t",), list(range(4)), size=2)
    assert pool.slots[0].live


def test_no_actor_left_is_an_error():
    pool = pool_of(FakeActor(dies_on=1), max_restarts=0)
    with pytest.raises(RuntimeError, match="every engine actor died"):
        pool.run("echo", ("t",), [1, 2], size=2)


def test_an_empty_call_sends_nothing():
    actor = FakeActor()
    assert pool_of(actor).run("echo", ("t",), [], size=4) == []
    assert actor.calls == 0


def test_an_actor_that_never_comes_back_is_given_up(monkeypatch):
    monkeypatch.setattr(ray_backend, "PROBE_WAIT_S", 0.01)
    gone = FakeActor(dies_on=1)

    def dead() -> None:
        raise ActorDiedError()

    gone.where = FakeMethod(dead)
    pool = pool_of(gone, max_restarts=3)
    with pytest.raises(RuntimeError, match="every engine actor died"):
        pool.run("echo", ("t",), [1, 2], size=2)
    assert pool.slots[0].probe is None and not pool.slots[0].live


def test_core_bindings_name_each_core():
    assert ray_backend.core_ids("1") == [1]
    assert ray_backend.core_ids("2-3") == [2, 3]
    assert ray_backend.core_ids("0, 4-5") == [0, 4, 5]


def test_an_actor_pins_every_thread_to_its_cores(monkeypatch):
    import torch

    pinned: dict[int, list[int]] = {}
    monkeypatch.setattr(os, "sched_setaffinity", lambda tid, cores: pinned.update({tid: cores}))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pinned.update({-1: n}))
    monkeypatch.setenv(ray_backend.CORES_ENV, "2-3")
    ray_backend.EngineActor({}, "uni")
    threads = {int(t) for t in os.listdir("/proc/self/task")}
    assert threads <= set(pinned) and all(pinned[t] == [2, 3] for t in threads)
    assert pinned[-1] == 2
    pinned.clear()
    monkeypatch.setenv(ray_backend.CORES_ENV, "auto")  # vLLM's own choice: left alone
    ray_backend.EngineActor({}, "uni")
    assert not pinned


def test_a_driver_setting_wins_but_not_its_cores(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    monkeypatch.setenv(ray_backend.CORES_ENV, "0-1")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", ray_backend.CORES_ENV: "1"}
    assert ray_backend._explicit_env(env) == {"VLLM_CPU_KVCACHE_SPACE": "2"}
