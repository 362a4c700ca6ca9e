"""What a self-improvement loop did, read back from the store: typed records, no formatting.

All of the report's SQL lives here. `flows.report_rows` turns these records into the rows
that `rlaif status` prints and `rlaif report` writes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from alignment.constitution import Constitution, from_dict
from alignment.judge import Judgment
from alignment.judge_metrics import JudgeMetrics
from alignment.yaml_spec import SpecError
from storage import Store

_LATEST_LOOP_SQL = (
    "SELECT loop FROM iterations "
    "ORDER BY coalesce(finished_at, started_at) DESC NULLS LAST, iteration DESC LIMIT 1"
)
# A rerun of an iteration number keeps only its latest row.
_ITERATIONS_SQL = """
SELECT * FROM iterations WHERE loop = ?
QUALIFY row_number() OVER (
    PARTITION BY iteration ORDER BY coalesce(finished_at, started_at) DESC NULLS LAST) = 1
ORDER BY iteration
"""
_EVALS_SQL = """
SELECT run_id, metric, value, n, ci_low, ci_high FROM evals
WHERE run_id IN (SELECT eval_run_id FROM iterations WHERE loop = ?)
ORDER BY eval_id
"""
_MODELS_SQL = """
SELECT model_id, stage, path, base_model, parent_model_id, iteration, examples, promoted,
       data_runs, run_id, created_at
FROM models ORDER BY created_at NULLS FIRST, model_id
"""
# The data run's train pairs: the rows its ids expect (run_rows), whichever run stored
# them first. A pair judged under several principles counts once under each.
_PAIRS_SQL = """
SELECT m.run_id, principle, count(*) AS pairs
FROM run_rows m
JOIN (SELECT pair_id, unnest(principle_ids) AS principle FROM preference_pairs
      WHERE split = 'train') p ON p.pair_id = m.row_id
WHERE m.table_name = 'preference_pairs'
  AND m.run_id IN (SELECT data_run_id FROM iterations WHERE loop = ?)
GROUP BY 1, 2 ORDER BY 1, 2
"""

# The latest audit of each iteration (a rerun under another judge config writes a new run).
_JUDGE_SQL = """
SELECT iteration, run_id, judge_model, mode, metric, value, n FROM judge_evals
WHERE loop = ? AND iteration IS NOT NULL
QUALIFY dense_rank() OVER (PARTITION BY iteration ORDER BY created_at DESC, run_id DESC) = 1
ORDER BY iteration, metric
"""
# The loop's latest session run holds its config, and with it the judge gate.
_LOOP_CONFIG_SQL = """
SELECT config FROM runs WHERE regexp_matches(run_id, ?)
ORDER BY updated_at DESC NULLS LAST LIMIT 1
"""


class Metric(NamedTuple):
    value: float | None
    n: int | None
    ci_low: float | None
    ci_high: float | None


@dataclass
class Iteration:
    iteration: int
    method: str | None
    decision: str
    promoted: bool
    incumbent: str | None  # the model that sampled this iteration's data
    candidate: str | None  # the model trained this iteration; None when skipped
    data_run_id: str | None
    eval_run_id: str | None
    pairs: int | None
    gates: list[dict[str, Any]]  # {gate, metric, value, threshold, passed, message}
    reasons: list[str]
    metrics: dict[str, Metric]  # its eval: `m` for the candidate, `baseline/m` the incumbent
    started_at: datetime | None
    finished_at: datetime | None

    def value(self, metric: str) -> float | None:
        found = self.metrics.get(metric)
        return found.value if found else None

    def failing(self) -> list[str]:
        """Names of the gates that failed, else the reasons given (e.g. why skipped)."""
        failed = [str(g.get("gate")) for g in self.gates if not g.get("passed")]
        return failed or list(self.reasons)

    def not_applicable(self) -> list[str]:
        """Names of the gates that could not apply (e.g. consistency of an order-free judge)."""
        return [str(g.get("gate")) for g in self.gates if g.get("applicable") is False]

    def order_free(self) -> bool:
        """Its eval's judge asked no A/B question: position consistency is n/a, not 1.0."""
        return self.value("judge/order_free") == 1.0


@dataclass
class LoopHistory:
    loop: str | None
    iterations: list[Iteration]
    models: dict[str, dict[str, Any]]  # every registered model, by model_id

    def run_ids(self) -> list[str] | None:
        """The runs of the loop's iterations (data and evals); None without iterations."""
        if not self.iterations:
            return None
        return [r for it in self.iterations for r in (it.data_run_id, it.eval_run_id) if r]

    def incumbent(self) -> str | None:
        """The incumbent after the last iteration."""
        if not self.iterations:
            return None
        last = self.iterations[-1]
        return last.candidate if last.promoted and last.candidate else last.incumbent


def latest_loop(store: Store) -> str | None:
    rows = store.query(_LATEST_LOOP_SQL)
    return rows[0]["loop"] if rows else None


def loop_history(store: Store, loop: str | None = None) -> LoopHistory:
    """Every iteration of `loop` (default: the loop of the latest iteration) with its eval."""
    loop = loop or latest_loop(store)
    models = {row["model_id"]: row for row in store.query(_MODELS_SQL)}
    if loop is None:
        return LoopHistory(None, [], models)
    metrics: dict[str, dict[str, Metric]] = {}
    for row in store.query(_EVALS_SQL, [loop]):
        metrics.setdefault(row["run_id"], {})[row["metric"]] = Metric(
            row["value"], row["n"], row["ci_low"], row["ci_high"]
        )
    rows = store.query(_ITERATIONS_SQL, [loop])
    iterations = [_iteration(row, metrics.get(row["eval_run_id"], {})) for row in rows]
    return LoopHistory(loop, iterations, models)


def _iteration(row: dict[str, Any], metrics: dict[str, Metric]) -> Iteration:
    return Iteration(
        iteration=row["iteration"],
        method=row["method"],
        decision=row["decision"],
        promoted=bool(row["promoted"]),
        incumbent=row["incumbent_model_id"],
        candidate=row["candidate_model_id"],
        data_run_id=row["data_run_id"],
        eval_run_id=row["eval_run_id"],
        pairs=row["pairs"],
        gates=json.loads(row["gates"]) if row["gates"] else [],
        reasons=list(row["reasons"] or []),
        metrics=metrics,
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def pairs_by_principle(store: Store, history: LoopHistory) -> dict[int, dict[str, int]]:
    """Preference pairs of each iteration's data run, per principle: {iteration: {id: n}}."""
    if history.loop is None:
        return {}
    counts: dict[str, dict[str, int]] = {}
    for row in store.query(_PAIRS_SQL, [history.loop]):
        counts.setdefault(row["run_id"], {})[row["principle"]] = row["pairs"]
    return {it.iteration: counts.get(it.data_run_id or "", {}) for it in history.iterations}


def incumbent_values(iterations: list[Iteration], metric: str) -> list[tuple[int, float]]:
    """The metric of the incumbent after each iteration, 0 being the starting model.

    A promoted iteration's candidate value becomes the incumbent's; otherwise the eval's
    `baseline/<metric>` is the incumbent's. Iterations without that eval carry the last value.
    """
    baselines = [it.value(f"baseline/{metric}") for it in iterations]
    value = next((v for v in baselines if v is not None), None)
    if value is None:
        return []
    series = [(0, value)]
    for it, baseline in zip(iterations, baselines, strict=True):
        candidate = it.value(metric)
        if it.promoted and candidate is not None:
            value = candidate
        elif baseline is not None:
            value = baseline
        series.append((it.iteration, value))
    return series


def incumbent_series(
    store: Store, loop: str | None = None, metric: str = "violation_rate"
) -> list[tuple[int, float]]:
    """(iteration, metric of the incumbent after it); [] when the loop has no such evals."""
    return incumbent_values(loop_history(store, loop).iterations, metric)


@dataclass
class JudgeAudit:
    """One gold-set audit of the loop's judge (`judge_evals` rows of one run)."""

    iteration: int
    run_id: str
    judge_model: str | None
    mode: str | None
    metrics: JudgeMetrics


@dataclass
class JudgeAudits:
    audits: list[JudgeAudit]  # the latest audit of each iteration, in iteration order
    min_accuracy: float | None  # the loop's min_judge_accuracy gate; None when off

    def latest(self) -> JudgeAudit | None:
        return self.audits[-1] if self.audits else None

    def distrusted(self) -> bool:
        """The latest audit's accuracy is below the gate: the judge's win rates promote nothing."""
        latest = self.latest()
        return (
            latest is not None
            and self.min_accuracy is not None
            and latest.metrics.accuracy < self.min_accuracy
        )


def judge_audits(store: Store, loop: str | None) -> JudgeAudits:
    """The loop's judge audits and its min_judge_accuracy gate, from the store."""
    if loop is None:
        return JudgeAudits([], None)
    runs: dict[str, tuple[int, str | None, str | None, dict[str, tuple[float, int]]]] = {}
    for row in store.query(_JUDGE_SQL, [loop]):
        run = runs.setdefault(
            row["run_id"], (row["iteration"], row["judge_model"], row["mode"], {})
        )
        run[3][row["metric"]] = (row["value"], row["n"])
    audits = [
        JudgeAudit(iteration, run_id, model, mode, JudgeMetrics.from_flat(figures))
        for run_id, (iteration, model, mode, figures) in runs.items()
    ]
    configs = store.query(_LOOP_CONFIG_SQL, [f"^loop-{re.escape(loop)}-[0-9]+$"])
    config = json.loads(configs[0]["config"]) if configs and configs[0]["config"] else {}
    bound = config.get("loop", {}).get("gates", {}).get("min_judge_accuracy")
    return JudgeAudits(sorted(audits, key=lambda a: a.iteration), bound)


# -- answers and pairs -----------------------------------------------------------------------

# Each eval comparison with both answers: flows/evaluation.py puts the candidate on side A
# and the incumbent (the baseline) on side B of every judgment of its run.
_EVAL_ANSWERS_SQL = """
SELECT m.run_id AS eval_run_id, j.*, p.text AS prompt_text,
       a.text AS a_text, a.finish_reason AS a_finish,
       b.text AS b_text, b.finish_reason AS b_finish
FROM run_rows m
JOIN judgments j ON j.judgment_id = m.row_id
JOIN responses a ON a.response_id = j.response_a_id
JOIN responses b ON b.response_id = j.response_b_id
LEFT JOIN prompts p ON p.prompt_id = j.prompt_id
WHERE m.table_name = 'judgments' AND j.status = 'ok' AND j.p_a IS NOT NULL
  AND m.run_id IN (SELECT unnest(?))
ORDER BY m.run_id, j.judgment_id
"""
_CONSTITUTIONS_SQL = """
SELECT constitution_id, content FROM constitutions WHERE constitution_id IN (SELECT unnest(?))
"""
# The train pairs of each iteration's data run, newest iteration first, at most `?` of them.
_PAIR_ROWS_SQL = """
WITH its AS (SELECT unnest(?) AS run_id, unnest(?) AS iteration)
SELECT its.iteration, p.pair_id, p.principle_ids, p.prompt, p.chosen, p.rejected, p.p_chosen,
       count(*) OVER () AS total
FROM its
JOIN run_rows m ON m.run_id = its.run_id AND m.table_name = 'preference_pairs'
JOIN preference_pairs p ON p.pair_id = m.row_id
WHERE p.split = 'train'
ORDER BY its.iteration DESC, p.principle_ids[1], p.p_chosen DESC, p.pair_id
LIMIT ?
"""
STRONGEST = 2  # eval comparisons shown per side the judge favoured, per iteration
MAX_PAIRS = 2000  # preference pairs in the pairs page


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    failed: list[tuple[str, str]] | None  # (principle id, check); None: constitution unknown


@dataclass(frozen=True)
class Example:
    """One eval prompt: the incumbent's and the candidate's answers and the judge's verdict."""

    why: str  # how it was picked
    prompt: str
    candidate: Answer  # side A of the judgment
    incumbent: Answer  # side B
    judgment: Judgment


@dataclass(frozen=True)
class IterationExamples:
    iteration: int
    judged: int  # ok comparisons in the iteration's eval
    examples: list[Example]


def pick_examples(judged: list[Judgment], strongest: int = STRONGEST) -> list[tuple[str, Judgment]]:
    """(why, judgment) of the comparisons to show, in a fixed order for the same judgments.

    The `strongest` with the largest |p_a − 0.5| for the candidate (p_a > 0.5), as many for
    the incumbent (p_a < 0.5), filled from the other side when one has fewer, then the one
    closest to 0.5. Model-judged comparisons rank before those decided by checks (p 0 or 1
    by rule: their answers' checks are shown anyway); ties go to the smaller prompt id.
    """

    def p(j: Judgment) -> float:
        return 0.5 if j.p_a is None else j.p_a

    ranked = sorted(judged, key=lambda j: (j.mode == "checks", -abs(p(j) - 0.5), j.prompt_id))
    sides = [
        ("strongest for the candidate", [j for j in ranked if p(j) > 0.5]),
        ("strongest for the incumbent", [j for j in ranked if p(j) < 0.5]),
    ]
    picked = [(why, j) for why, side in sides for j in side[:strongest]]
    taken = {j.judgment_id for _, j in picked}
    fill = [j for j in ranked if j.judgment_id not in taken][: 2 * strongest - len(picked)]
    picked += [("next strongest", j) for j in fill]
    taken |= {j.judgment_id for j in fill}
    rest = [j for j in ranked if j.judgment_id not in taken]
    if rest:
        closest = min(rest, key=lambda j: (j.mode == "checks", abs(p(j) - 0.5), j.prompt_id))
        picked.append(("closest to 0.5", closest))
    return picked


def eval_examples(
    store: Store, history: LoopHistory, strongest: int = STRONGEST
) -> list[IterationExamples]:
    """A few eval prompts of each evaluated iteration, picked by `pick_examples`."""
    runs = {it.eval_run_id: it.iteration for it in history.iterations if it.eval_run_id}
    if not runs:
        return []
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in store.query(_EVAL_ANSWERS_SQL, [list(runs)]):
        by_run.setdefault(row["eval_run_id"], []).append(row)
    constitutions = _constitutions(
        store, sorted({r["constitution_id"] for rows in by_run.values() for r in rows})
    )
    found = []
    for it in history.iterations:
        rows = {r["judgment_id"]: r for r in by_run.get(it.eval_run_id or "", [])}
        if not rows:
            continue
        fields = Judgment.__dataclass_fields__
        judged = [Judgment(**{k: v for k, v in r.items() if k in fields}) for r in rows.values()]
        examples = []
        for why, j in pick_examples(judged, strongest):
            row, constitution = rows[j.judgment_id], constitutions.get(j.constitution_id)
            examples.append(
                Example(
                    why,
                    row["prompt_text"] or "",
                    _answer(row["a_text"], row["a_finish"], constitution),
                    _answer(row["b_text"], row["b_finish"], constitution),
                    j,
                )
            )
        found.append(IterationExamples(it.iteration, len(judged), examples))
    return found


def _constitutions(store: Store, ids: list[str]) -> dict[str, Constitution]:
    """The stored constitutions by id, rebuilt from their canonical JSON (`content`)."""
    if not ids:
        return {}
    found = {}
    for row in store.query(_CONSTITUTIONS_SQL, [ids]):
        data = json.loads(row["content"])
        principles = [
            {**{k: v for k, v in p.items() if k != "text"}, "principle": p["text"]}
            for p in data.get("principles", [])
        ]
        try:
            found[row["constitution_id"]] = from_dict({**data, "principles": principles})
        except SpecError:  # written by another version of the format: show no checks
            continue
    return found


def _answer(
    text: str | None, finish_reason: str | None, constitution: Constitution | None
) -> Answer:
    """An answer with the principle checks it fails, as the eval's `violation_rates` counts
    them: a checked principle is violated when any of its checks fails."""
    text = text or ""
    if constitution is None:
        return Answer(text, finish_reason, None)
    failed = [
        (p.id, check.describe()) for p in constitution.principles for check in p.failed_checks(text)
    ]
    return Answer(text, finish_reason, failed)


@dataclass(frozen=True)
class PairRows:
    rows: list[dict[str, Any]]  # iteration, pair_id, principle_ids, prompt, chosen, ...
    total: int  # the loop's train pairs, of which `rows` are the first MAX_PAIRS


def loop_pairs(store: Store, history: LoopHistory, limit: int = MAX_PAIRS) -> PairRows:
    """The train pairs of every iteration's data run, newest iteration first, at most `limit`."""
    runs = {it.data_run_id: it.iteration for it in history.iterations if it.data_run_id}
    if not runs:
        return PairRows([], 0)
    rows = store.query(_PAIR_ROWS_SQL, [list(runs), list(runs.values()), limit])
    return PairRows(rows, rows[0]["total"] if rows else 0)
