"""Where each batch of requests ran and how long it took, for the run's records.

A backend calls ``note(...)`` once per batch it sends (a local engine per call, an engine
actor per actor call, an endpoint pool per request); a stage collects the notes of its
compute with ``recording()`` and stores them (the ``batches`` table). Backends spread a
call over threads, so the collector is found in the calling thread (``current()``) and
handed to the worker threads, which append under a lock.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Placement:
    """One batch: what ran it (``kind`` engine | actor | endpoint, ``where`` its name), on
    which node, how many requests, when it started and how long it took, and whether it
    failed (a failed batch is retried elsewhere and noted again there)."""

    kind: str
    where: str
    node: str
    requests: int
    started_at: float  # epoch seconds
    seconds: float
    ok: bool = True
    error: str | None = None


@dataclass
class Recorder:
    placements: list[Placement] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, placement: Placement) -> None:
        with self._lock:
            self.placements.append(placement)


class _Discard(Recorder):
    def add(self, placement: Placement) -> None:
        pass


_DISCARD = _Discard()
_CURRENT: contextvars.ContextVar[Recorder] = contextvars.ContextVar(
    "rlaif_placements", default=_DISCARD
)


def current() -> Recorder:
    """The recorder of the calling thread's stage (one that keeps nothing outside one)."""
    return _CURRENT.get()


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Collect the placements of every batch run inside the block (this thread's)."""
    recorder = Recorder()
    token = _CURRENT.set(recorder)
    try:
        yield recorder
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def timed(recorder: Recorder, kind: str, where: str, node: str, requests: int) -> Iterator[None]:
    """Note one batch on ``recorder``: its time, and whether it raised (re-raised)."""
    started, clock = time.time(), time.perf_counter()
    try:
        yield
    except BaseException as error:
        seconds = time.perf_counter() - clock
        message = f"{type(error).__name__}: {error}"[:300]
        recorder.add(Placement(kind, where, node, requests, started, seconds, False, message))
        raise
    recorder.add(Placement(kind, where, node, requests, started, time.perf_counter() - clock))


def this_node() -> str:
    return socket.gethostname()
