"""loop.method: spin on the tiny model: reference answers over the incumbent's own samples,
trained with the DPO loss, the references' judged win rate stored per iteration, and the
stop rule recorded on the iteration (docs/spin.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.spin import METRIC, load_references
from flows.loop import self_improve
from storage import Store
from tests.integration.loop_helpers import write_tiny_loop

pytestmark = pytest.mark.integration


def write_spin_loop(path: Path, store: Path, name: str, stop: bool) -> Path:
    """Two SPIN iterations on 6 train and 4 held-out shipped references."""
    loop = [
        f"name: {name}",
        "method: spin",
        "iterations: 2",
        f"spin: {{references: builtin-spin, limit: 6, eval_limit: 4, stop: {str(stop).lower()}}}",
    ]
    return write_tiny_loop(path, store, "{limit: 8}", loop, 128)


@pytest.fixture(scope="module")
def spin_loop(tmp_path_factory, prefect_harness, vllm_backend):
    root = tmp_path_factory.mktemp("spin")
    config_path = write_spin_loop(root / "spin.yaml", root / "store", "s", stop=False)
    self_improve(config_path=str(config_path))
    return root, Store(root / "store")


def reference_rates(store: Store, loop: str) -> list[dict]:
    return store.query(
        "SELECT i.iteration, i.incumbent_model_id, e.value, e.n, e.ci_low, e.ci_high, "
        "e.baseline_model_id FROM iterations i JOIN evals e ON e.run_id = i.data_run_id "
        "WHERE i.loop = ? AND e.metric = ? ORDER BY i.iteration",
        [loop, METRIC],
    )


def test_two_spin_iterations_train_on_references_over_own_samples(spin_loop):
    _, store = spin_loop
    rows = store.query("SELECT * FROM iterations WHERE loop = 's' ORDER BY iteration")
    assert [r["iteration"] for r in rows] == [1, 2]
    references = {r.prompt: r.completion for r in load_references("builtin-spin")}
    for row in rows:
        assert row["method"] == "spin" and row["decision"] in ("promoted", "rejected")
        pairs = store.query(
            "SELECT p.prompt, p.chosen, p.rejected, p.rejected_response_id, r.model "
            "FROM preference_pairs p JOIN responses r ON r.response_id = p.rejected_response_id "
            "WHERE p.run_id = ?",
            [row["data_run_id"]],
        )
        assert 0 < len(pairs) <= 6 and row["pairs"] == len(pairs)
        for pair in pairs:
            assert pair["chosen"] == references[pair["prompt"]]  # chosen: the reference
            assert pair["model"] == row["incumbent_model_id"]  # rejected: the incumbent's own
        trained = store.query(
            "SELECT stage, parent_model_id, base_model FROM models WHERE model_id = ?",
            [row["candidate_model_id"]],
        )[0]
        assert trained["stage"] == "dpo" and trained["base_model"] == row["incumbent_model_id"]
        assert json.loads(row["gates"])
    # The incumbent of iteration 2 is iteration 1's promoted candidate, or the start.
    first, second = rows
    expected = first["candidate_model_id"] if first["promoted"] else first["incumbent_model_id"]
    assert second["incumbent_model_id"] == expected
    # The references' judged win rate against each iteration's incumbent, with n and CI.
    rates = reference_rates(store, "s")
    assert [r["iteration"] for r in rates] == [1, 2]
    for rate, row in zip(rates, rows, strict=True):
        assert rate["baseline_model_id"] == row["incumbent_model_id"]
        assert rate["n"] > 0 and rate["ci_low"] <= rate["value"] <= rate["ci_high"]


def test_the_loop_stops_when_the_judge_cannot_tell_references_from_samples(spin_loop):
    """The same loop with the stop rule on: iteration 1's win rate is the one above (the
    same judgments, read back); where its interval includes 0.5 the loop records why and
    ends, else it goes on as above."""
    root, store = spin_loop
    config_path = write_spin_loop(root / "spin-stop.yaml", store.root, "stop", stop=True)
    self_improve(config_path=str(config_path))
    rows = store.query("SELECT * FROM iterations WHERE loop = 'stop' ORDER BY iteration")
    rate = reference_rates(store, "stop")[0]
    assert rate["value"] == reference_rates(store, "s")[0]["value"]
    if rate["ci_low"] <= 0.5 <= rate["ci_high"]:
        assert len(rows) == 1  # two were asked for
        row = rows[0]
        assert row["decision"] == "skipped" and row["pairs"] == 0
        assert row["candidate_model_id"] is None
        assert row["reasons"][0].startswith("judge can no longer tell references from samples")
        assert "includes 0.5" in row["reasons"][0]
    else:
        assert [r["decision"] != "skipped" for r in rows] == [True, True]
