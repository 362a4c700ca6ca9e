"""What `make demo` proves, read back from the store: does the loop improve the policy?

Every figure printed here is a row of `judge_evals`, `evals` or `iterations`; the
goals are checked against those rows and reported as met or not met, with the
numbers, never softened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage import Store

# The demo's goals (issue: "The proof on a CPU").
VIOLATION_FACTOR = 0.5  # the check-violation rate at least halves by the last iteration
LC_BOUND = 0.5  # the LC win rate's interval against the starting policy ends above this
# "No collapse": the final policy's degenerate answers (empty, under eval.min_words, or
# repetitive; alignment/evaluation.py) at most this much more frequent than the start's.
# Mean length alone is no test here: the constitution's `concise` check asks for shorter
# answers, and most of the starting policy's answers are cut off by max_tokens.
MAX_DEGENERATE_INCREASE = 0.1


@dataclass(frozen=True)
class Figure:
    value: float
    n: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass(frozen=True)
class Step:
    """One iteration: its decision and the candidate's figures against the starting policy."""

    iteration: int
    decision: str
    candidate: str | None
    gates: list[dict[str, Any]]
    versus_start: dict[str, Figure]


@dataclass(frozen=True)
class Proof:
    judge: dict[str, Figure]  # the latest gold audit of the loop's judge
    steps: list[Step]

    def incumbent_after(self, metric: str) -> list[tuple[int, Figure]]:
        """The metric of the policy that samples after each iteration, from iteration 0.

        Iteration 0 is the starting policy (the baseline side of the first eval); after
        a rejected iteration the previous incumbent's figure carries over.
        """
        series: list[tuple[int, Figure]] = []
        first = next((s for s in self.steps if s.versus_start), None)
        start = first.versus_start.get(f"baseline/{metric}") if first else None
        if start is None:
            return series
        series.append((0, start))
        current = start
        for step in self.steps:
            if step.decision == "promoted" and metric in step.versus_start:
                current = step.versus_start[metric]
            series.append((step.iteration, current))
        return series

    def incumbent_versus_start(self, metric: str) -> list[tuple[int, Figure | None]]:
        """A versus-start metric (e.g. lc_win_rate) of the incumbent, as (the iteration that
        promoted it, its figure), after each iteration."""
        series: list[tuple[int, Figure | None]] = []
        current: tuple[int, Figure | None] = (0, None)
        for step in self.steps:
            if step.decision == "promoted":
                current = (step.iteration, step.versus_start.get(metric))
            series.append(current)
        return series


def _figures(store: Store, sql: str, params: list[Any]) -> dict[str, Figure]:
    return {
        row["metric"]: Figure(row["value"], row["n"], row.get("ci_low"), row.get("ci_high"))
        for row in store.query(sql, params)
    }


def read_proof(store: Store, loop: str) -> Proof:
    audit = store.query(
        "SELECT run_id FROM judge_evals WHERE loop = ? ORDER BY iteration DESC, created_at DESC "
        "LIMIT 1",
        [loop],
    )
    judge = (
        _figures(
            store, "SELECT metric, value, n FROM judge_evals WHERE run_id = ?", [audit[0]["run_id"]]
        )
        if audit
        else {}
    )
    steps = []
    for row in store.query(
        "SELECT iteration, decision, candidate_model_id, start_eval_run_id, gates "
        "FROM iterations WHERE loop = ? ORDER BY iteration",
        [loop],
    ):
        versus_start = (
            _figures(
                store,
                "SELECT metric, value, n, ci_low, ci_high FROM evals WHERE run_id = ?",
                [row["start_eval_run_id"]],
            )
            if row["start_eval_run_id"]
            else {}
        )
        steps.append(
            Step(
                row["iteration"],
                row["decision"],
                row["candidate_model_id"],
                _gates(row["gates"]),
                versus_start,
            )
        )
    return Proof(judge, steps)


def _gates(value: Any) -> list[dict[str, Any]]:
    import json

    if isinstance(value, str):
        return json.loads(value) or []
    return list(value or [])


def _fmt(figure: Figure | None, digits: int = 3) -> str:
    if figure is None:
        return "n/a"
    text = f"{figure.value:.{digits}f}"
    if figure.ci_low is not None and figure.ci_high is not None:
        text += f" [{figure.ci_low:.{digits}f}, {figure.ci_high:.{digits}f}]"
    return text


def proof_lines(proof: Proof) -> list[str]:
    """The demo's closing report: the judge, each iteration, and each goal with its numbers."""
    lines = ["Judge (gold audit set, both orders)"]
    if proof.judge:
        accuracy = proof.judge.get("accuracy")
        consistency = proof.judge.get("position_consistency")
        n = accuracy.n if accuracy else None
        lines.append(
            f"  accuracy {_fmt(accuracy)}, position consistency {_fmt(consistency)}"
            f" on {n} gold pairs"
        )
    else:
        lines.append("  not audited (loop.judge_audit is off)")

    lines.append("")
    lines.append("Each candidate against the starting policy (eval split)")
    for step in proof.steps:
        lines.extend(step_lines(step))
    lines.append("")
    lines.extend(goal_lines(proof))
    return lines


# The two scales of every rate: hard (win 1, tie 1/2, loss 0) and soft (the judge's p_a),
# each raw and length-controlled (alignment/evaluation.py), as (label, raw, LC) metrics.
RATE_LINES = (
    ("win rate (hard)", "win_rate", "lc_win_rate"),
    ("mean p(win) (soft)", "mean_p_win", "lc_mean_p_win"),
)


def step_lines(step: Step) -> list[str]:
    """One iteration: its decision and figures, then one line per scale, raw and LC."""
    vs = step.versus_start
    failed = [g["gate"] for g in step.gates if not g.get("passed")]
    head = f"  iteration {step.iteration}: {step.decision}" + (
        f" (failed: {', '.join(failed)})" if failed else ""
    )
    # The promotion decision itself: the sign test against the incumbent, with its power.
    paired = [f"    vs the incumbent: {g['message']}" for g in step.gates
              if g["gate"] == "promotion_alpha"]  # fmt: skip
    if not vs:
        return [head + "; not measured against the starting policy", *paired]
    width = max(len(label) for label, _, _ in RATE_LINES)
    return [
        head
        + f"; length {_fmt(vs.get('length'), 1)} vs {_fmt(vs.get('baseline/length'), 1)}"
        + f" tokens, KL {_fmt(vs.get('kl'), 2)}, violations {_fmt(vs.get('violation_rate'))}",
        *(
            f"    {label:<{width}}  {_fmt(vs.get(raw))}, length-controlled {_fmt(vs.get(lc))}"
            for label, raw, lc in RATE_LINES
        ),
        *paired,
    ]


def goal_lines(proof: Proof) -> list[str]:
    """Each goal: met or NOT met, with the measured figures."""
    lines = ["Goals"]
    violations = proof.incumbent_after("violation_rate")
    if len(violations) > 1:
        first, last = violations[0][1].value, violations[-1][1].value
        met = last <= first * VIOLATION_FACTOR
        series = ", ".join(f"{k}: {f.value:.3f}" for k, f in violations)
        lines.append(
            f"  check-violation rate of the incumbent ({series}): "
            f"{'met' if met else 'NOT met'} (goal: at most {VIOLATION_FACTOR:g} x {first:.3f})"
        )
    else:
        lines.append("  check-violation rate: NOT measured (no iteration was evaluated)")

    lc = [(k, f) for k, f in proof.incumbent_versus_start("lc_win_rate") if f is not None]
    lengths = proof.incumbent_after("length")
    degenerate = proof.incumbent_after("degenerate_rate")
    if lc:
        k, figure = lc[-1]
        above = figure.ci_low is not None and figure.ci_low > LC_BOUND
        lines.append(
            f"  LC win rate of the incumbent (promoted in iteration {k}) vs the starting policy "
            f"{_fmt(figure)}: {'met' if above else 'NOT met'} (goal: interval above {LC_BOUND})"
        )
        start_len, final_len = lengths[0][1].value, lengths[-1][1].value
        start_bad, final_bad = degenerate[0][1].value, degenerate[-1][1].value
        collapsed = final_bad > start_bad + MAX_DEGENERATE_INCREASE
        lines.append(
            f"  length {final_len:.1f} vs {start_len:.1f} tokens "
            f"({final_len / start_len if start_len else float('inf'):.2f}x), degenerate answers "
            f"{final_bad:.3f} vs {start_bad:.3f}: {'COLLAPSED' if collapsed else 'no collapse'}"
            f" (bound: at most {MAX_DEGENERATE_INCREASE:g} more degenerate answers than the start)"
        )
    else:
        lines.append("  LC win rate vs the starting policy: NOT met (no candidate was promoted)")
    return lines
