"""Several identical OpenAI-compatible servers behind one client: least outstanding
requests first, a failed request retried on another endpoint, a dead endpoint skipped
until a health probe finds it back.

Every endpoint serves the same model (a pool is replicas, not a router), so any request,
``/tokenize`` included, may go to any of them. An endpoint is marked down by a request it
failed (transport error, 5xx, 429) and skipped for a cool-down (``cooldown_s``, doubled
after each failed probe up to ``max_cooldown_s``); the first request to want it after
that probes ``GET /health`` at the server's root (vLLM's; any answer below 500 but 429
counts as up, so servers without one recover too). The retry policy is tenacity's: a
request is retried at once on another endpoint, or after the next probe is due when none
is up; ``max_retries`` bounds the sends of one request that fail, ``down_after_s`` how
long every endpoint may be down before ``EndpointsDown``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception

from alignment.backends import placement


class EndpointsDown(RuntimeError):
    """Every endpoint of a pool has been down for longer than its bound."""


@dataclass
class _Endpoint:
    url: str  # the OpenAI base, e.g. http://10.0.0.5:8000/v1
    root: str  # the server's root, where /health and /tokenize are
    host: str
    outstanding: int = 0
    ok: int = 0
    failed: int = 0
    healthy: bool = True
    probing: bool = False
    probe_at: float = 0.0  # monotonic time after which a down endpoint is probed
    cooldown_s: float = 0.0
    last_error: str | None = None

    @property
    def sent(self) -> int:
        return self.ok + self.failed + self.outstanding


def retryable(error: BaseException) -> bool:
    """A failure another endpoint (or a later try) may not have: transport, 5xx, 429."""
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500 or error.response.status_code == 429
    return isinstance(error, httpx.TransportError | EndpointsDown)


class EndpointPool:
    """Identical OpenAI-compatible endpoints behind one ``post``; thread-safe."""

    def __init__(
        self,
        urls: str | list[str],
        *,
        api_key: str = "EMPTY",
        timeout_s: float = 120.0,
        max_retries: int = 4,
        down_after_s: float = 60.0,
        health_timeout_s: float = 2.0,
        cooldown_s: float = 0.5,
        max_cooldown_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("an endpoint pool needs at least one base_url")
        self.endpoints = [_endpoint(url) for url in dict.fromkeys(urls)]
        self.max_retries = max_retries
        self.down_after_s = down_after_s
        self.health_timeout_s = health_timeout_s
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s, transport=transport
        )
        self._lock = threading.Lock()
        self._all_down_since: float | None = None

    def post(
        self,
        path: str,
        body: dict,
        recorder: placement.Recorder | None = None,
        *,
        at_root: bool = False,
    ) -> dict:
        """POST ``body`` to ``path`` under an endpoint's OpenAI base (or its root) and return
        the JSON reply; each send is noted on ``recorder`` (kind "endpoint", where its url).

        Raises the last error once ``max_retries + 1`` sends failed, ``EndpointsDown`` once
        every endpoint has been down for ``down_after_s``, and a 4xx (but 429) at once.
        """
        recorder = placement.current() if recorder is None else recorder
        failed_sends = 0

        def send() -> dict:
            nonlocal failed_sends
            endpoint = self._acquire()
            try:
                reply = self._send(endpoint, path, body, recorder, at_root)
            except Exception as error:
                self._release(endpoint, error)
                failed_sends += retryable(error)
                raise
            self._release(endpoint, None)
            return reply

        def stop(state: RetryCallState) -> bool:
            assert state.outcome is not None
            if isinstance(state.outcome.exception(), EndpointsDown):
                return self._down_for() >= self.down_after_s
            return failed_sends > self.max_retries

        retrying = Retrying(
            retry=retry_if_exception(retryable), stop=stop, wait=self._wait, reraise=True
        )
        return retrying(send)

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per endpoint: requests ok, failed, outstanding, and whether it is up (for logs)."""
        with self._lock:
            return {
                e.url: {
                    "ok": e.ok,
                    "failed": e.failed,
                    "outstanding": e.outstanding,
                    "healthy": e.healthy,
                }
                for e in self.endpoints
            }

    def close(self) -> None:
        self.client.close()

    # --- choosing, probing, marking ---------------------------------------------------

    def _acquire(self) -> _Endpoint:
        """The up endpoint with the fewest outstanding requests (then the fewest sent),
        after probing any down one whose cool-down is over; ``EndpointsDown`` if none."""
        while True:
            with self._lock:
                now = time.monotonic()
                due = next(
                    (e for e in self.endpoints
                     if not e.healthy and not e.probing and e.probe_at <= now),
                    None,
                )  # fmt: skip
                if due is None:
                    up = [e for e in self.endpoints if e.healthy]
                    if not up:
                        raise EndpointsDown(self._down_message(now))
                    chosen = min(up, key=lambda e: (e.outstanding, e.sent))
                    chosen.outstanding += 1
                    return chosen
                due.probing = True
            self._probe(due)

    def _probe(self, endpoint: _Endpoint) -> None:
        try:
            reply = self.client.get(f"{endpoint.root}/health", timeout=self.health_timeout_s)
            up = reply.status_code < 500 and reply.status_code != 429
            error = None if up else f"health: HTTP {reply.status_code}"
        except httpx.TransportError as exc:
            up, error = False, f"health: {type(exc).__name__}: {exc}"
        with self._lock:
            endpoint.probing = False
            if up:
                self._mark_up(endpoint)
            else:
                endpoint.last_error = error
                endpoint.cooldown_s = min(endpoint.cooldown_s * 2, self.max_cooldown_s)
                endpoint.probe_at = time.monotonic() + endpoint.cooldown_s

    def _send(
        self,
        endpoint: _Endpoint,
        path: str,
        body: dict,
        recorder: placement.Recorder,
        at_root: bool,
    ) -> dict:
        url = f"{endpoint.root if at_root else endpoint.url}{path}"
        with placement.timed(recorder, "endpoint", endpoint.url, endpoint.host, 1):
            response = self.client.post(url, json=body)
            if response.status_code >= 400:
                raise httpx.HTTPStatusError(
                    f"{response.status_code} from {url}: {response.text[:200]}",
                    request=response.request,
                    response=response,
                )
            return response.json()

    def _release(self, endpoint: _Endpoint, error: Exception | None) -> None:
        with self._lock:
            endpoint.outstanding -= 1
            if error is None:
                endpoint.ok += 1
                self._mark_up(endpoint)
                return
            endpoint.failed += 1
            if retryable(error) and endpoint.healthy:
                endpoint.healthy = False
                endpoint.last_error = f"{type(error).__name__}: {error}"[:200]
                endpoint.cooldown_s = self.cooldown_s
                endpoint.probe_at = time.monotonic() + self.cooldown_s
                if not any(e.healthy for e in self.endpoints):
                    self._all_down_since = time.monotonic()

    def _mark_up(self, endpoint: _Endpoint) -> None:
        endpoint.healthy, endpoint.cooldown_s, endpoint.last_error = True, 0.0, None
        self._all_down_since = None

    def _down_for(self) -> float:
        with self._lock:
            since = self._all_down_since
        return 0.0 if since is None else time.monotonic() - since

    def _wait(self, state: RetryCallState) -> float:
        """None after a failed send while another endpoint is up; else until the next probe
        is due (polled at least every second, as another thread may probe first)."""
        with self._lock:
            if any(e.healthy for e in self.endpoints):
                return 0.0
            due = min(e.probe_at for e in self.endpoints)
        return min(max(due - time.monotonic(), 0.05), 1.0)

    def _down_message(self, now: float) -> str:
        down_for = 0.0 if self._all_down_since is None else now - self._all_down_since
        listed = "; ".join(f"{e.url} ({e.last_error})" for e in self.endpoints)
        return f"every endpoint has been down for {down_for:.1f} s: {listed}"


def _endpoint(url: str) -> _Endpoint:
    base = url.rstrip("/")
    return _Endpoint(base, base.removesuffix("/v1"), urlsplit(base).hostname or base)
