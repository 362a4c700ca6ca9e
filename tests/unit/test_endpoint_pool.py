"""The endpoint pool's balancing, failover and recovery against in-process fake servers."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from alignment.backends import OpenAIBackend, SamplingConfig, placement
from alignment.backends.endpoint_pool import EndpointPool, EndpointsDown

A, B = "http://a:8000/v1", "http://b:8000/v1"


class FakeServers:
    """Two vLLM-like servers: each answers chat, /tokenize and /health, or is down (every
    request refused) or failing (chat answers 500), and can hold its chat replies."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.failing: set[str] = set()
        self.held: dict[str, threading.Event] = {}
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        self.paths.append(f"{host}{request.url.path}")
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [1, 2, 3]})
        if request.url.path != "/v1/chat/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        if host in self.failing:
            return httpx.Response(500, text="engine dead")
        if host in self.held:
            self.held[host].wait(timeout=5)
        reply = {"index": 0, "message": {"content": f"from {host}"}, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [reply], "usage": {"completion_tokens": 2}})


def make_pool(servers: FakeServers, **kwargs) -> EndpointPool:
    settings = {"cooldown_s": 0.05, "down_after_s": 0.3} | kwargs
    return EndpointPool([A, B], transport=httpx.MockTransport(servers), **settings)


def chat(pool: EndpointPool, recorder: placement.Recorder | None = None) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    return pool.post("/chat/completions", body, recorder)["choices"][0]["message"]["content"]


def test_requests_go_to_the_endpoint_with_fewest_outstanding() -> None:
    servers = FakeServers()
    pool = make_pool(servers)
    # with nothing outstanding the two take turns
    assert [chat(pool) for _ in range(4)] == ["from a", "from b", "from a", "from b"]
    servers.held["a"] = threading.Event()
    slow = threading.Thread(target=chat, args=(pool,))
    slow.start()  # a's turn: it stays outstanding there
    deadline = time.monotonic() + 5
    while pool.counts()[A]["outstanding"] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert [chat(pool) for _ in range(3)] == ["from b"] * 3
    servers.held["a"].set()
    slow.join()
    assert {url: c["ok"] for url, c in pool.counts().items()} == {A: 3, B: 5}


def test_a_failed_request_is_retried_on_the_other_endpoint() -> None:
    servers = FakeServers()
    servers.failing.add("a")
    pool = make_pool(servers, cooldown_s=60)
    with placement.recording() as recorder:
        assert [chat(pool, recorder) for _ in range(4)] == ["from b"] * 4
    noted = [(p.where, p.node, p.ok) for p in recorder.placements]
    # a failed once, was marked down and then skipped
    assert noted == [(A, "a", False)] + [(B, "b", True)] * 4
    assert pool.counts() == {
        A: {"ok": 0, "failed": 1, "outstanding": 0, "healthy": False},
        B: {"ok": 4, "failed": 0, "outstanding": 0, "healthy": True},
    }


def test_a_dead_endpoint_is_skipped_then_used_again_once_it_recovers() -> None:
    servers = FakeServers()
    servers.down.add("a")
    pool = make_pool(servers)
    assert [chat(pool) for _ in range(3)] == ["from b"] * 3
    time.sleep(0.1)  # past a's cool-down: the next request probes it, still down
    assert chat(pool) == "from b"
    assert pool.counts()[A] == {"ok": 0, "failed": 1, "outstanding": 0, "healthy": False}
    servers.down.clear()
    time.sleep(0.25)  # past the doubled cool-down
    assert chat(pool) == "from a"  # up again, and the one that has served fewer
    assert pool.counts()[A]["healthy"]
    assert servers.paths.count("a/health") == 1


def test_every_endpoint_down_is_one_error_naming_them() -> None:
    servers = FakeServers()
    servers.down.update({"a", "b"})
    pool = make_pool(servers)
    with pytest.raises(EndpointsDown, match="every endpoint has been down") as raised:
        chat(pool)
    assert A in str(raised.value) and B in str(raised.value)
    assert "ConnectError" in str(raised.value)


def test_an_endpoint_that_comes_back_ends_the_wait() -> None:
    servers = FakeServers()
    servers.down.update({"a", "b"})
    pool = make_pool(servers, down_after_s=30)
    threading.Timer(0.2, servers.down.clear).start()
    assert chat(pool) in {"from a", "from b"}


def test_a_request_the_servers_reject_is_not_retried() -> None:
    servers = FakeServers()
    pool = make_pool(servers)
    with pytest.raises(httpx.HTTPStatusError, match="404"):
        pool.post("/no-such-route", {})
    assert sum(c["failed"] for c in pool.counts().values()) == 1
    assert all(c["healthy"] for c in pool.counts().values())


def test_a_request_failing_everywhere_raises_its_error_after_max_retries() -> None:
    servers = FakeServers()
    servers.failing.update({"a", "b"})
    pool = make_pool(servers, max_retries=2, cooldown_s=0.01, down_after_s=30)
    with pytest.raises(httpx.HTTPStatusError, match="500"):
        chat(pool)
    assert sum(c["failed"] for c in pool.counts().values()) == 3


def test_backend_over_a_pool_tokenizes_at_the_root_and_notes_each_request() -> None:
    servers = FakeServers()
    backend = OpenAIBackend([A, B], "tiny", max_concurrency=2)
    backend.pool = make_pool(servers)
    with placement.recording() as recorder:
        replies = backend.generate([[{"role": "user", "content": "hi"}]] * 4, SamplingConfig())
        tokens = backend._map_tokenize([{"prompt": "hi"}] * 2)
    assert {r[0].text for r in replies} <= {"from a", "from b"}
    assert tokens == [[1, 2, 3]] * 2
    tokenized = [p for p in servers.paths if "tokenize" in p]
    assert len(tokenized) == 2 and set(tokenized) <= {"a/tokenize", "b/tokenize"}
    assert len(recorder.placements) == 6
    assert {p.where for p in recorder.placements} <= {A, B}


def test_a_single_url_is_a_pool_of_one() -> None:
    backend = OpenAIBackend("http://a:8000/v1/", "tiny")
    assert list(backend.pool.counts()) == ["http://a:8000/v1"]
