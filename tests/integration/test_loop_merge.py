"""loop.merge: merges of the incumbent and the candidate are evaluated, gated and may be
promoted; the iteration row says which model was promoted and why (docs/merging.md).
The loop runs on the shipped two-turn conversations, so it also shows a multi-turn loop:
sampling, judging, DPO, merges and evals all on whole conversations (docs/multi-turn.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.loop import current_incumbent, load_loop_config, self_improve
from storage import Store
from tests.integration.loop_helpers import write_tiny_loop

pytestmark = pytest.mark.integration


def write_merge_loop(path: Path, store: Path) -> Path:
    """One iteration on two-turn prompts, with two slerp merges."""
    loop = ["name: m", "iterations: 1", "merge: {method: slerp, weights: [0.3, 0.5]}"]
    return write_tiny_loop(path, store, "{source: builtin-two-turn, limit: 8}", loop, 192)


@pytest.fixture(scope="module")
def merge_loop(tmp_path_factory, prefect_harness, vllm_backend):
    root = tmp_path_factory.mktemp("merge-loop")
    config_path = write_merge_loop(root / "loop.yaml", root / "store")
    self_improve(config_path=str(config_path))
    return config_path, Store(root / "store")


def test_merges_are_registered_evaluated_and_the_best_passing_model_promoted(merge_loop):
    config_path, store = merge_loop
    row = store.query("SELECT * FROM iterations WHERE loop = 'm'")[0]
    merges = store.query(
        "SELECT model_id, path, config, iteration FROM models WHERE stage = 'merge' "
        "ORDER BY model_id"
    )
    assert len(merges) == 2  # one per weight
    trained = store.query("SELECT model_id FROM models WHERE stage = 'dpo'")[0]["model_id"]
    incumbent = row["incumbent_model_id"]
    for merge in merges:
        settings = json.loads(merge["config"])
        assert settings["method"] == "slerp" and settings["t"] in (0.3, 0.5)
        assert settings["parents"][1] == trained  # [incumbent, candidate]
        assert merge["iteration"] == 1 and Path(merge["path"]).is_dir()
    # The iteration's `tried` column: the trained candidate first, then each merge.
    stored = json.loads(row["tried"])
    assert stored[0]["model_id"] == trained
    assert {t["model_id"] for t in stored[1:]} == {m["model_id"] for m in merges}
    assert stored[0]["merge"] is None and {t["merge"]["weight"] for t in stored[1:]} == {0.3, 0.5}
    assert [t["passed"] for t in stored] == [all(g["passed"] for g in t["gates"]) for t in stored]
    # Every model tried is in the reasons with its verdict and its eval run.
    tried = [r for r in row["reasons"] if r.startswith("tried ")]
    assert len(tried) == 3
    assert any(trained in r for r in tried)
    for merge in merges:
        line = next(r for r in tried if merge["model_id"] in r)
        assert "eval run" in line and ("passed every gate" in line or "failed" in line)
        eval_run = line.rsplit("eval run ", 1)[1].rstrip(")")
        evals = store.query(
            "SELECT metric FROM evals WHERE run_id = ? AND model_id = ? AND baseline_model_id = ?",
            [eval_run, merge["model_id"], incumbent],
        )
        assert {"win_rate", "lc_win_rate", "kl", "length"} <= {e["metric"] for e in evals}
    # The decision is about the promoted model, or the trained candidate when none passed.
    head = (
        row["reasons"][0]
        if row["promoted"]
        else next(r for r in row["reasons"] if r.startswith("none of"))
    )
    config = load_loop_config(str(config_path))
    if row["promoted"]:
        assert head.startswith("promoted ") and row["candidate_model_id"] in head
        assert all(g["passed"] for g in json.loads(row["gates"]))
        promoted = store.query("SELECT model_id FROM models WHERE promoted")
        assert promoted == [{"model_id": row["candidate_model_id"]}]
        assert current_incumbent(config).name == row["candidate_model_id"]
    else:
        assert row["candidate_model_id"] == trained
        assert "incumbent kept" in head
        assert all("failed" in r for r in tried)
        assert current_incumbent(config).name == incumbent
    # The eval run stored is the chosen model's.
    chosen = store.query(
        "SELECT DISTINCT model_id FROM evals WHERE run_id = ?", [row["eval_run_id"]]
    )
    assert chosen == [{"model_id": row["candidate_model_id"]}]


def test_the_loop_ran_on_whole_conversations(merge_loop):
    _, store = merge_loop
    row = store.query("SELECT * FROM iterations WHERE loop = 'm'")[0]
    pairs = store.query(
        "SELECT messages FROM preference_pairs WHERE run_id = ?", [row["data_run_id"]]
    )
    assert pairs and all(json.loads(p["messages"])[-1]["role"] == "user" for p in pairs)
    trained = store.query("SELECT examples FROM models WHERE stage = 'dpo'")[0]["examples"]
    assert trained == len(pairs)
    # Both models answered the held-out conversations, and the judge compared the answers.
    evaluated = store.query(
        "SELECT count(*) AS n FROM prompts p JOIN run_rows r ON r.row_id = p.prompt_id "
        "WHERE r.run_id = ? AND r.table_name = 'prompts' AND p.messages IS NOT NULL",
        [row["eval_run_id"]],
    )[0]["n"]
    assert evaluated == 4
    judged = store.query(
        "SELECT count(*) AS n FROM judgments WHERE run_id = ?", [row["eval_run_id"]]
    )
    assert judged[0]["n"] >= 4
