"""loop.merge without models: the merges an iteration tries, and which model is promoted."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from alignment.evaluation import Metric
from alignment.gates import GateResult
from alignment.merge import LoopMergeConfig, incumbent_merges
from alignment.promotion import best_passing
from flows.evaluation import EvalResult
from flows.promotion import Trial, choose


def test_one_merge_per_weight_the_candidate_share() -> None:
    slerp = incumbent_merges(LoopMergeConfig(method="slerp", weights=[0.3, 0.5]))
    assert [(w, m.method, m.t) for w, m in slerp] == [(0.3, "slerp", 0.3), (0.5, "slerp", 0.5)]
    linear = incumbent_merges(LoopMergeConfig(method="linear", weights=[0.25]))
    assert linear[0][1].weights == [0.75, 0.25]  # [incumbent, candidate]


def test_ties_from_the_incumbent_itself_tries_one_merge() -> None:
    """While the incumbent is the starting model (the ties parent), its task vector is zero
    and every weight gives the same model."""
    config = LoopMergeConfig(method="ties", weights=[0.3, 0.5], density=0.5)
    assert len(incumbent_merges(config)) == 2
    assert len(incumbent_merges(config, incumbent_is_parent=True)) == 1


def test_weights_that_reproduce_a_parent_are_skipped() -> None:
    config = LoopMergeConfig.model_construct(method="slerp", weights=[0.0, 0.5, 1.0], density=0.2)
    assert [w for w, _ in incumbent_merges(config)] == [0.5]


@pytest.mark.parametrize("weights", [[0.3, 1.5], [0.0], [1.0], [-0.2], [], [0.5, 0.5]])
def test_bad_weights_are_refused(weights: list[float]) -> None:
    with pytest.raises(ValidationError):
        LoopMergeConfig(weights=weights)


def trial(model_id: str, passed: bool, lc: float, raw: float = 0.5, merge: bool = True) -> Trial:
    gate = GateResult(
        "max_kl", "kl", 1.0, 2.0, passed, f"max_kl {'passed' if passed else 'failed'}"
    )
    metrics = [Metric("lc_win_rate", lc, 8), Metric("win_rate", raw, 8)]
    settings = {"method": "slerp", "weight": 0.5} if merge else None
    return Trial(model_id, EvalResult(f"eval-{model_id}", metrics), [gate], settings)


def test_the_best_passing_model_is_promoted_by_length_controlled_win_rate() -> None:
    trials = [
        trial("cand", True, 0.55, merge=False),
        trial("m1", False, 0.9),
        trial("m2", True, 0.6),
    ]
    chosen, notes = choose(trials)
    assert chosen.model_id == "m2"
    assert notes[0].startswith("promoted merge slerp w=0.5 m2: the best of 2 that passed")
    assert notes[1].startswith("tried candidate cand: passed every gate (lc_win_rate 0.550")
    assert notes[2].startswith("tried merge slerp w=0.5 m1: max_kl failed")
    assert "max_kl failed" in notes[2] and "eval run eval-m1" in notes[2]


def test_nothing_passes_the_trained_candidate_is_recorded() -> None:
    trials = [trial("cand", False, 0.7, merge=False), trial("m1", False, 0.9)]
    chosen, notes = choose(trials)
    assert chosen.model_id == "cand" and not chosen.passed
    assert notes[0] == "none of the 2 models tried passed every gate: incumbent kept"


def test_without_merges_nothing_is_added_to_the_reasons() -> None:
    chosen, notes = choose([trial("cand", True, 0.7, merge=False)])
    assert chosen.model_id == "cand" and notes == []


def test_ties_in_rank_go_to_the_trained_candidate_then_raw_win_rate_decides() -> None:
    lc = {"lc_win_rate": Metric("lc_win_rate", 0.6, 8)}
    assert best_passing([True, True], [lc, lc]) == 0
    low = lc | {"win_rate": Metric("win_rate", 0.5, 8)}
    high = lc | {"win_rate": Metric("win_rate", 0.7, 8)}
    assert best_passing([True, True], [low, high]) == 1
    assert best_passing([False, False], [low, high]) is None
