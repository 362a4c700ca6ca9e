"""Which model an iteration promotes: the trained candidate, or with ``loop.merge`` the
best of it and its merges with the incumbent that passes every gate (alignment/promotion.py
ranks them; docs/merging.md). Each model tried is a ``Trial``: its eval against the
incumbent and its gate results, all recorded on the iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignment.evaluation import Metric
from alignment.gates import GateResult, check_gates, failed_reasons
from alignment.model_ref import ModelRef
from alignment.promotion import RANK_METRICS, best_passing
from flows.config import PipelineConfig
from flows.evaluation import EvalResult, evaluate_candidate
from flows.merging import merge_with_incumbent
from flows.models import registered_ref
from storage import Store


def gate_results(
    config: PipelineConfig, metrics: list[Metric], judge_quality: list[Metric] | None
) -> list[GateResult]:
    """The gates on the eval's metrics and the judge's audit (judge/accuracy, ...)."""
    return check_gates(config.loop.gates, {m.metric: m for m in [*metrics, *(judge_quality or [])]})


@dataclass(frozen=True)
class Trial:
    """A model tried for promotion against the incumbent: the trained candidate, or (with
    ``loop.merge``) one merge of the incumbent and the candidate."""

    model_id: str
    evaluation: EvalResult
    gates: list[GateResult]
    merge: dict[str, Any] | None = None  # {method, weight (the candidate's share)}

    @property
    def passed(self) -> bool:
        return not failed_reasons(self.gates)

    @property
    def label(self) -> str:
        if self.merge is None:
            return "candidate"
        return f"merge {self.merge['method']} w={self.merge['weight']:g}"

    def ranked_on(self) -> str:
        found = {m.metric: m.value for m in self.evaluation.metrics}
        return ", ".join(f"{name} {found[name]:.3f}" for name in RANK_METRICS if name in found)

    def summary(self) -> str:
        verdict = "passed every gate" if self.passed else "; ".join(failed_reasons(self.gates))
        return (
            f"tried {self.label} {self.model_id}: {verdict} ({self.ranked_on()}; eval run "
            f"{self.evaluation.run_id})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "merge": self.merge,
            "eval_run_id": self.evaluation.run_id,
            "passed": self.passed,
            "gates": [g.as_dict() for g in self.gates],
        }


def choose(trials: list[Trial]) -> tuple[Trial, list[str]]:
    """The best trial that passed every gate (alignment/promotion.py best_passing), else
    the trained candidate; and what to record about the choice (nothing without merges)."""
    best = best_passing(
        [t.passed for t in trials], [{m.metric: m for m in t.evaluation.metrics} for t in trials]
    )
    chosen = trials[0] if best is None else trials[best]
    if len(trials) == 1:
        return chosen, []
    ranking = f"ranked by {', then '.join(RANK_METRICS)} against the incumbent"
    if best is None:
        head = f"none of the {len(trials)} models tried passed every gate: incumbent kept"
    else:
        passed = sum(t.passed for t in trials)
        head = (
            f"promoted {chosen.label} {chosen.model_id}: the best of {passed} that passed "
            f"every gate, {ranking}"
        )
    return chosen, [head, *(t.summary() for t in trials)]


def merge_trials(
    config: PipelineConfig,
    k: int,
    base: str,
    candidate: str,
    baseline: ModelRef,
    reward: ModelRef | None,
    judge_quality: list[Metric],
) -> list[Trial]:
    """``loop.merge``: each merge of the incumbent (``base``, the candidate's training base,
    named as training names it; ``baseline`` its registered reference) and the candidate,
    registered in `models`, evaluated against the incumbent as the candidate was
    (``config`` is iteration k's eval config), and gated alike."""
    merge = config.loop.merge
    if merge is None:
        return []
    store = Store(config.store)
    merged = merge_with_incumbent(store, base, candidate, merge, config.policy.model, k)
    trials = []
    for weight, settings, model_id in merged:
        evaluation = evaluate_candidate(config, registered_ref(store, model_id), baseline, reward)
        gates = gate_results(config, evaluation.metrics, judge_quality)
        trials.append(
            Trial(model_id, evaluation, gates, {"method": settings.method, "weight": weight})
        )
    return trials
