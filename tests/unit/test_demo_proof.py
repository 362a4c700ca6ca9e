"""The demo's goals are checked against the stored figures: met or NOT met, never softer."""

from __future__ import annotations

from flows.demo import Figure, Proof, Step, goal_lines, step_lines


def step(k: int, decision: str, **figures: float) -> Step:
    versus_start = {name.replace("__", "/"): Figure(v, 32) for name, v in figures.items()}
    if "lc_win_rate" in figures:
        lc = figures["lc_win_rate"]
        versus_start["lc_win_rate"] = Figure(lc, 32, lc - 0.1, lc + 0.1)
    return Step(k, decision, f"m{k}", [], versus_start)


START = {"baseline__violation_rate": 0.8, "baseline__length": 60.0,
         "baseline__degenerate_rate": 0.0}  # fmt: skip


def test_goals_met_when_the_figures_say_so() -> None:
    proof = Proof({}, [
        step(1, "promoted", **START, violation_rate=0.5, length=50, degenerate_rate=0.0,
             lc_win_rate=0.7),
        step(2, "promoted", **START, violation_rate=0.3, length=40, degenerate_rate=0.03,
             lc_win_rate=0.68),
        step(3, "rejected"),
    ])  # fmt: skip
    text = "\n".join(goal_lines(proof))
    assert "0: 0.800, 1: 0.500, 2: 0.300, 3: 0.300): met" in text
    assert "(promoted in iteration 2) vs the starting policy 0.680 [0.580, 0.780]: met" in text
    assert "no collapse" in text


def test_a_collapsed_policy_and_a_rejected_loop_are_not_met() -> None:
    collapsed = Proof({}, [
        step(1, "promoted", **START, violation_rate=0.0, length=2, degenerate_rate=0.9,
             lc_win_rate=0.55),
    ])  # fmt: skip
    text = "\n".join(goal_lines(collapsed))
    assert "COLLAPSED" in text
    assert "[0.450, 0.650]: NOT met" in text  # the interval's low end is under 0.5
    nothing = Proof({}, [step(1, "rejected", **START)])
    text = "\n".join(goal_lines(nothing))
    assert "1: 0.800): NOT met" in text
    assert "LC win rate vs the starting policy: NOT met (no candidate was promoted)" in text


def test_each_iteration_prints_both_scales_raw_and_length_controlled_with_intervals() -> None:
    figures = {
        "win_rate": Figure(0.812, 32, 0.647, 0.911),
        "lc_win_rate": Figure(0.79, 32, 0.62, 0.905),
        "mean_p_win": Figure(0.612, 32, 0.58, 0.64),
        "lc_mean_p_win": Figure(0.6, 32, 0.57, 0.63),
        "length": Figure(59.2, 32), "baseline/length": Figure(63.0, 32),
        "kl": Figure(6.28, 32), "violation_rate": Figure(0.656, 32),
    }  # fmt: skip
    promoted = Step(1, "promoted", "m1", [{"gate": "min_win_rate", "passed": True}], figures)
    assert step_lines(promoted) == [
        "  iteration 1: promoted; length 59.2 vs 63.0 tokens, KL 6.28, violations 0.656",
        "    win rate (hard)     0.812 [0.647, 0.911], length-controlled 0.790 [0.620, 0.905]",
        "    mean p(win) (soft)  0.612 [0.580, 0.640], length-controlled 0.600 [0.570, 0.630]",
    ]
    rejected = Step(2, "rejected", "m2", [{"gate": "min_lc_win_rate", "passed": False}], {})
    assert step_lines(rejected) == [
        "  iteration 2: rejected (failed: min_lc_win_rate); not measured against the starting "
        "policy"
    ]


def test_each_iteration_prints_the_paired_test_that_decided_it() -> None:
    """A promoted iteration shows p < α; a rejected one shows why, with the power."""
    why = ("sign test 12 wins of 22 decided comparisons (10 of 32 undecided), p = 0.416 ≥ α "
           "0.05; detecting a 60% win rate (of decided comparisons) with 80% power at α 0.05 "
           "needs 211 prompts")  # fmt: skip
    gates = [{"gate": "promotion_alpha", "passed": False, "message": why},
             {"gate": "min_lc_win_rate", "passed": True, "message": "fine"}]  # fmt: skip
    lines = step_lines(Step(2, "rejected", "m2", gates, {}))
    assert lines[0].startswith("  iteration 2: rejected (failed: promotion_alpha)")
    assert lines[1:] == [f"    vs the incumbent: {why}"]
