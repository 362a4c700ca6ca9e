"""Where batches ran: the recorder backends note on, the `batches` rows a stage stores,
and the table `rlaif status` / `rlaif summary` print from them."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from alignment.backends import placement
from flows import stages
from flows.cli_output import print_batches
from flows.summary import where_batches_ran
from storage import Store

RUN = "run-1"


@pytest.fixture(autouse=True)
def _plain_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "get_run_logger", lambda: logging.getLogger("test"))


def test_timed_notes_success_and_failure_and_reraises() -> None:
    with placement.recording() as recorder:
        with placement.timed(placement.current(), "actor", "actor-0", "n1", 4):
            pass
        with (
            pytest.raises(ValueError, match="boom"),
            placement.timed(placement.current(), "actor", "actor-1", "n1", 2),
        ):
            raise ValueError("boom")
    ok, failed = recorder.placements
    assert (ok.where, ok.requests, ok.ok, ok.error) == ("actor-0", 4, True, None)
    assert (failed.where, failed.ok, failed.error) == ("actor-1", False, "ValueError: boom")
    assert ok.seconds >= 0 and failed.seconds >= 0


def test_outside_a_recording_nothing_is_kept_and_recordings_do_not_mix() -> None:
    with placement.timed(placement.current(), "engine", "local", "n", 1):
        pass
    assert placement.current().placements == []
    with placement.recording() as outer:
        with (
            placement.recording() as inner,
            placement.timed(placement.current(), "engine", "local", "n", 1),
        ):
            pass
        assert len(inner.placements) == 1
    assert outer.placements == []


def test_worker_threads_note_on_the_callers_recorder() -> None:
    with placement.recording() as recorder:
        caller = placement.current()  # captured here: worker threads have no context

        def work(i: int) -> None:
            with placement.timed(caller, "endpoint", f"http://127.0.0.1:{8000 + i % 2}", "h", 1):
                pass

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert (
        sorted(p.where for p in recorder.placements)
        == ["http://127.0.0.1:8000"] * 4 + ["http://127.0.0.1:8001"] * 4
    )


def _compute_on(places: list[str], fail_on: str | None = None):
    def compute(missing: list[str]) -> list[dict[str, Any]]:
        recorder = placement.current()
        for where in places:
            with placement.timed(recorder, "actor", where, "node-a", len(missing)):
                if where == fail_on:
                    raise RuntimeError("actor died")
        return [{"prompt_id": key, "text": key, "source": "seed"} for key in missing]

    return compute


def test_a_stage_stores_one_batch_row_per_batch(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    stages.run_stage(store, RUN, "sample", "prompts", ["p1", "p2"], _compute_on(["a0", "a1"]))
    rows = store.query("SELECT * FROM batches ORDER BY ran_on")
    assert [(r["stage"], r["table_name"], r["ran_on"], r["requests"]) for r in rows] == [
        ("sample", "prompts", "a0", 2),
        ("sample", "prompts", "a1", 2),
    ]
    assert all(r["ok"] and r["node"] == "node-a" and r["seconds"] >= 0 for r in rows)
    assert len({r["batch_id"] for r in rows}) == 2
    # A rerun computes nothing, so it sends no batch and stores none.
    stages.run_stage(store, RUN, "sample", "prompts", ["p1", "p2"], _compute_on(["a0"]))
    assert store.count("batches") == 2


def test_a_crashed_stage_still_records_where_it_failed(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    compute = _compute_on(["a0", "a1"], fail_on="a1")
    with pytest.raises(RuntimeError, match="actor died"):
        stages.run_stage(store, RUN, "sample", "prompts", ["p1"], compute)
    rows = store.query("SELECT ran_on, ok, error FROM batches ORDER BY ran_on")
    assert [(r["ran_on"], r["ok"]) for r in rows] == [("a0", True), ("a1", False)]
    assert rows[1]["error"] == "RuntimeError: actor died"
    assert store.count("prompts") == 0  # nothing of the failed compute was written


def test_where_batches_ran_sums_per_place_and_status_prints_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    stages.run_stage(store, RUN, "sample", "prompts", ["p1", "p2"], _compute_on(["a0", "a1"]))
    stages.run_stage(store, "run-2", "judge", "prompts", ["p3"], _compute_on(["a0"]))
    placed = where_batches_ran(store, [RUN])
    assert {(r["stage"], r["ran_on"], r["batches"], r["requests"]) for r in placed} == {
        ("sample", "a0", 1, 2),
        ("sample", "a1", 1, 2),
    }
    assert len(where_batches_ran(store)) == 3  # every run
    out = io.StringIO()
    print_batches(Console(file=out, width=200), placed)
    text = out.getvalue()
    assert "where batches ran" in text and "a0" in text and "node-a" in text


def test_the_report_shows_where_batches_ran(tmp_path: Path) -> None:
    from flows.report import write_report

    store = Store(tmp_path / "data")
    stages.run_stage(store, RUN, "sample", "prompts", ["p1"], _compute_on(["actor-7"]))
    page = write_report(store, tmp_path / "report.html").read_text()
    assert "Where batches ran" in page and "<code>actor-7</code>" in page
