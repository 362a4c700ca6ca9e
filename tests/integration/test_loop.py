"""The self-improvement loop in this process on the shared engine, and a kill -9 resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from alignment.backends import vllm_backend as backends
from flows.loop import current_incumbent, load_loop_config, self_improve
from storage import Store
from tests.integration.loop_helpers import (
    assert_same_run,
    run_until,
    shards,
    snapshot,
    write_loop_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def loop_store(tmp_path_factory, prefect_harness, vllm_backend):
    """Two iterations of loop `t` (two runs of one iteration), and the store after the first."""
    root = tmp_path_factory.mktemp("loop")
    config_path = write_loop_config(root / "loop.yaml", root / "store")
    self_improve(config_path=str(config_path))
    first = snapshot(Store(root / "store"))
    self_improve(config_path=str(config_path))
    return config_path, Store(root / "store"), first


def test_each_iteration_is_recorded_and_the_promoted_candidate_samples_next(loop_store):
    config_path, store, _ = loop_store
    rows = store.query("SELECT * FROM iterations ORDER BY iteration")
    assert [r["iteration"] for r in rows] == [1, 2]
    first, second = rows
    start = load_loop_config(str(config_path))
    assert first["incumbent_model_id"].startswith("tiny-")
    expected = first["candidate_model_id"] if first["promoted"] else first["incumbent_model_id"]
    assert second["incumbent_model_id"] == expected
    # The incumbent really sampled iteration 2's data, with its own weights.
    models = store.query(
        "SELECT DISTINCT model FROM responses WHERE run_id = ?", [second["data_run_id"]]
    )
    assert models == [{"model": expected}]
    for row in rows:
        assert row["decision"] in ("promoted", "rejected")
        assert row["pairs"] > 0 and row["eval_run_id"]
        assert (row["decision"] == "rejected") == bool(row["reasons"])
        gates = {g["gate"] for g in json.loads(row["gates"])}
        assert gates == {
            "promotion_alpha", "max_violation_increase", "max_length_growth",
            "max_length_shrink", "max_kl", "max_degenerate_increase", "max_no_stop_increase",
        }  # fmt: skip
        kl = store.query(
            "SELECT value FROM evals WHERE run_id = ? AND metric = 'kl'", [row["eval_run_id"]]
        )
        assert kl and kl[0]["value"] >= 0.0
    # The judge was audited on the gold set at the start of every iteration.
    audits = store.query(
        "SELECT DISTINCT iteration FROM judge_evals WHERE loop = 't' AND metric = 'accuracy' "
        "ORDER BY iteration"
    )
    assert [a["iteration"] for a in audits] == [1, 2]
    # A promoted candidate was measured against the starting policy too: its own eval
    # when the incumbent was the start, another one otherwise.
    for row in rows:
        from_start = row["incumbent_model_id"] == first["incumbent_model_id"]
        if row["promoted"]:
            assert row["start_eval_run_id"]
            assert (row["start_eval_run_id"] == row["eval_run_id"]) == from_start
    promoted = {r["model_id"] for r in store.query("SELECT model_id FROM models WHERE promoted")}
    assert promoted == {r["candidate_model_id"] for r in rows if r["promoted"]}
    # Each run is one session; both completed.
    sessions = store.query("SELECT run_id, status FROM runs WHERE run_id LIKE 'loop-t-%'")
    assert sorted((s["run_id"], s["status"]) for s in sessions) == [
        ("loop-t-0001", "completed"),
        ("loop-t-0002", "completed"),
    ]
    assert current_incumbent(start).name == (
        second["candidate_model_id"] if second["promoted"] else second["incumbent_model_id"]
    )


def test_checkpoints_share_one_engine(loop_store, tiny_model):
    """Every checkpoint of the loop (the tiny start and each candidate) ran on one engine;
    other architectures' engines (SmolLM2's, from other tests) do not count."""
    tiny = backends.architecture_signature(str(tiny_model))
    assert len([key for key in backends._ENGINES if key[0] == tiny]) == 1


def test_self_instruct_prompts_are_stored_per_iteration(loop_store):
    _, store, _ = loop_store
    synthetic = store.query(
        "SELECT p.split, count(*) AS n FROM prompts p WHERE source = 'synthetic' GROUP BY 1"
    )
    assert synthetic and all(r["split"] == "train" for r in synthetic)
    sampled = store.query(
        "SELECT count(DISTINCT r.prompt_id) AS n FROM responses r JOIN prompts p "
        "USING (prompt_id) WHERE p.source = 'synthetic'"
    )[0]["n"]
    assert sampled == synthetic[0]["n"]


def test_each_iteration_publishes_artifacts(loop_store):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["t-iteration-1", "t-iteration-1-metrics", "t-iteration-2", "t-iteration-2-metrics"]
    with get_client(sync_client=True) as client:
        wanted = ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        found = client.read_artifacts(artifact_filter=wanted)
    assert {a.key for a in found} == set(keys)
    summary = next(a for a in found if a.key == "t-iteration-1")
    assert "Loop `t`, iteration 1" in summary.data and "max_kl" in summary.data


def test_a_finished_loop_rerun_with_no_new_iterations_writes_nothing(loop_store):
    config_path, store, _ = loop_store
    files = sorted(p for p in (store.root / "parquet").rglob("*.parquet"))
    self_improve(config_path=str(config_path), iterations=0)
    assert sorted(p for p in (store.root / "parquet").rglob("*.parquet")) == files


def test_gates_reject_a_degraded_candidate_and_keep_the_incumbent(loop_store, tmp_path):
    """Loop `wrecked` trains with a learning rate of 1.0: its candidate is garbage.

    The collapse gates, which ask no judge, must refuse it on any CPU: the figures differ
    between machines, so only the verdicts and the sign of the KL are asserted.

    Its batches differ from loop `t`'s, so its data run has another id, but it expects the
    same samples, judgments and pairs as loop `t`'s first iteration (its self-instruct
    prompts are `t`'s too: the same policy writes the same ones), stored already: it must
    find them as its own rows and train on them all the same, with nothing recomputed."""
    _, store, _ = loop_store
    config_path = write_loop_config(
        tmp_path / "wrecked.yaml", store.root, name="wrecked", batch_size=3,
        train="{dpo: {learning_rate: 1.0, num_train_epochs: 2, max_length: 128}}",
    )  # fmt: skip
    self_improve(config_path=str(config_path))
    row = store.query("SELECT * FROM iterations WHERE loop = 'wrecked'")[0]
    first = store.query("SELECT * FROM iterations WHERE loop = 't' AND iteration = 1")[0]

    def run_pairs(run_id: str) -> set[str]:
        rows = store.query(
            "SELECT row_id FROM run_rows WHERE run_id = ? AND table_name = 'preference_pairs'",
            [run_id],
        )
        return {r["row_id"] for r in rows}

    assert row["data_run_id"] != first["data_run_id"]
    assert run_pairs(row["data_run_id"]) == run_pairs(first["data_run_id"])
    assert row["pairs"] == first["pairs"] > 0
    made_by_wrecked = store.query(
        "SELECT count(*) AS n FROM judgments WHERE run_id = ?", [row["data_run_id"]]
    )[0]["n"]
    assert made_by_wrecked == 0  # every judgment it expects was stored by loop `t`
    assert row["decision"] == "rejected" and not row["promoted"]
    assert row["reasons"] and all("failed" in reason for reason in row["reasons"])
    failed = {g["gate"] for g in json.loads(row["gates"]) if not g["passed"]}
    collapse = {"max_degenerate_increase", "max_length_shrink", "max_kl", "max_violation_increase"}
    assert failed & collapse, row["reasons"]
    kl = store.query(
        "SELECT value FROM evals WHERE run_id = ? AND metric = 'kl'", [row["eval_run_id"]]
    )
    assert len(kl) == 1 and kl[0]["value"] >= 0
    config = load_loop_config(str(config_path))
    assert current_incumbent(config).name == row["incumbent_model_id"]
    assert current_incumbent(config).name.startswith("tiny-")
    promoted = store.query(
        "SELECT promoted FROM models WHERE model_id = ?", [row["candidate_model_id"]]
    )
    assert promoted == [{"promoted": False}]


def test_kill_9_during_sampling_judging_and_training_then_resume_equals_a_clean_run(
    loop_store, tmp_path: Path
):
    """Three processes killed mid-iteration, then a rerun: the store matches a clean run."""
    _, _, clean = loop_store
    store = Store(tmp_path / "store")
    config_path = write_loop_config(tmp_path / "loop.yaml", store.root)
    args = ["self-improve", "--config", str(config_path)]
    # The session's Prefect server, not a temporary one per killed process (~12 s each);
    # each process's engine runs in the process itself (conftest.py), so it dies with it.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}

    run_until(args, tmp_path / "kill-0.log", lambda: bool(shards(store, "responses")), env=env)
    assert not shards(store, "judgments")  # it died while sampling
    run_until(args, tmp_path / "kill-1.log", lambda: bool(shards(store, "judgments")), env=env)
    assert not shards(store, "preference_pairs")  # it died while judging
    log = tmp_path / "kill-2.log"
    training = lambda: log.exists() and "training dpo on" in log.read_text()  # noqa: E731
    run_until(args, log, training, env=env)
    assert shards(store, "preference_pairs") and not shards(store, "models")  # while training

    self_improve(config_path=str(config_path))  # the next run resumes the session
    assert_same_run(snapshot(store), clean)
