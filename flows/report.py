"""What a self-improvement loop did, read back from the store: `rlaif status` and `rlaif report`.

All SQL lives in the reading sections; status prints rich tables, the report writes one
self-contained HTML file whose plots are inline SVG drawn by matplotlib, with a few eval
answers of each iteration side by side, and next to it a second file that lists the loop's
preference pairs with a small filter script. Every judged text is model output: it is
escaped (`_e`) and never reaches a script as code, and both pages forbid any load from
elsewhere (Content-Security-Policy), so they open from the file with nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table
from rich.text import Text

from alignment.constitution import Constitution, from_dict
from alignment.evaluation import _position_biased, _win
from alignment.gates import ORDER_FREE_MODES
from alignment.judge import Judgment
from alignment.judge_eval import JudgeMetrics, Share
from alignment.yaml_spec import SpecError
from storage import Store

SHORT = 12  # characters of a model id shown in tables
DECISION_STYLES = {"promoted": "green", "rejected": "red", "skipped": "yellow"}

# -- reading ---------------------------------------------------------------------------------

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


# -- reading: answers and pairs --------------------------------------------------------------

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
ANSWER_CHARS = 2000  # characters of an answer shown in the report
PAIR_CHARS = 1200  # characters of a prompt, chosen or rejected text in the pairs page


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


def lineage(history: LoopHistory) -> list[str]:
    """The current incumbent, then its parents back to the base model, one label each."""
    labels: list[str] = []
    seen: set[str] = set()
    model_id = history.incumbent()
    while model_id is not None and model_id not in seen:  # `seen` guards against a cycle
        seen.add(model_id)
        model = history.models.get(model_id)
        if model is None:  # a base model, never registered
            labels.append(model_id[:SHORT])
            break
        labels.append(_model_label(model))
        model_id = model["parent_model_id"] or _unless_same(model["base_model"], model_id)
    return labels


def _unless_same(base_model: str | None, model_id: str) -> str | None:
    return base_model if base_model and base_model != model_id else None


def _model_label(model: dict[str, Any]) -> str:
    runs = ", ".join(model["data_runs"] or [])
    trained_on = f", trained on run {runs}" if runs else ""
    details = f"{model['stage']}, iteration {model['iteration']}{trained_on}"
    return f"{model['model_id'][:SHORT]} ({details})"


def lineage_line(history: LoopHistory) -> str | None:
    labels = lineage(history)
    return "incumbent " + " ← ".join(labels) if labels else None


# -- formatting -----------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _short(model_id: str | None) -> str:
    return (model_id or "–")[:SHORT]


def _win_rate(it: Iteration) -> str:
    win = it.metrics.get("win_rate")
    if win is None or win.value is None:
        return "–"
    if win.ci_low is None or win.ci_high is None:
        return _num(win.value, 2)
    return f"{win.value:.2f} [{win.ci_low:.2f}, {win.ci_high:.2f}]"


def _pair(it: Iteration, metric: str, digits: int = 3) -> str:
    """Incumbent → candidate value of a metric."""
    baseline, candidate = it.value(f"baseline/{metric}"), it.value(metric)
    if baseline is None and candidate is None:
        return "–"
    return f"{_num(baseline, digits)}→{_num(candidate, digits)}"


def _gate_text(gate: dict[str, Any]) -> str:
    mark = "n/a" if gate.get("applicable") is False else "pass" if gate.get("passed") else "FAIL"
    value, threshold = gate.get("value"), gate.get("threshold")
    numbers = f" {_any(value)} vs {_any(threshold)}" if value is not None else ""
    message = f" ({gate['message']})" if gate.get("message") else ""
    return f"{mark} {gate.get('gate')}{numbers}{message}"


def _any(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# -- status ---------------------------------------------------------------------------------


def print_status(store: Store, loop: str | None = None, console: Console | None = None) -> None:
    """Iterations, models and the incumbent's lineage as rich tables. Raises StoreNotFound."""
    # Piped output gets 80 columns by default, too narrow for the iterations table.
    console = console or Console(width=max(Console().width, 140))
    history = loop_history(store, loop)
    if history.iterations:
        console.print(_iterations_table(history))
    else:
        where = f"loop {loop!r}" if loop else "this store"
        console.print(f"No loop iterations in {where} yet.", markup=False)
    if history.models:
        console.print(_models_table(history.models))
    line = lineage_line(history)
    if line:
        console.print(line, markup=False)


def _iterations_table(history: LoopHistory) -> Table:
    table = Table(title=f"loop {history.loop}")
    for name in ("it", "method", "incumbent → candidate", "pairs", "win rate [CI]"):
        table.add_column(name)
    for name in ("violations", "KL", "decision", "failed gates / why"):
        table.add_column(name)
    for it in history.iterations:
        table.add_row(
            str(it.iteration),
            it.method or "–",
            f"{_short(it.incumbent)} → {_short(it.candidate)}",
            str(it.pairs if it.pairs is not None else "–"),
            _win_rate(it),
            _pair(it, "violation_rate"),
            _num(it.value("kl")),
            Text(it.decision, style=DECISION_STYLES.get(it.decision, "")),
            Text("; ".join([*it.failing(), *(f"{g} n/a" for g in it.not_applicable())])),
        )
    return table


def _models_table(models: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="models")
    for name in ("model", "stage", "iteration", "parent", "examples", "promoted"):
        table.add_column(name)
    for model in models.values():
        table.add_row(
            Text(_short(model["model_id"])),
            Text(model["stage"] or "–"),
            str(model["iteration"] if model["iteration"] is not None else "–"),
            Text(_short(model["parent_model_id"] or model["base_model"])),
            str(model["examples"] if model["examples"] is not None else "–"),
            "yes" if model["promoted"] else "no",
        )
    return table


# -- plots ----------------------------------------------------------------------------------

Draw = Callable[[Any], None]  # draws on a matplotlib Axes


def _svg(title: str, draw: Draw, per_iteration: bool = True) -> str:
    """One figure as an inline <svg> element; text stays text so the browser renders it.

    A per-iteration figure gets the iteration axis; any other labels its own axes."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global figure state
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.add_subplot()
        draw(ax)
        ax.set_title(title)
        if per_iteration:
            ax.set_xlabel("iteration")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(
            buffer,
            format="svg",
            metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
        )
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")


def _step(ax: Any, series: list[tuple[int, float]], label: str) -> None:
    """A value that holds until the next iteration changes it."""
    xs, ys = zip(*series, strict=True)
    ax.step(xs, ys, where="post", marker="o", label=label)


def _points(iterations: list[Iteration], metric: str) -> tuple[list[int], list[float]]:
    found = [(it.iteration, it.value(metric)) for it in iterations]
    kept = [(x, y) for x, y in found if y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def _draw_win_rate(iterations: list[Iteration]) -> Draw:
    def draw(ax: Any) -> None:
        points = [(it.iteration, it.metrics.get("win_rate")) for it in iterations]
        points = [(x, m) for x, m in points if m is not None and m.value is not None]
        if not points:
            return _no_data(ax)
        xs = [x for x, _ in points]
        ys = [m.value for _, m in points]
        low = [m.value - (m.ci_low if m.ci_low is not None else m.value) for _, m in points]
        high = [(m.ci_high if m.ci_high is not None else m.value) - m.value for _, m in points]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=4, label="candidate")
        ax.axhline(0.5, color="grey", linestyle="--", label="tie (0.5)")
        ax.set_ylim(0, 1)
        ax.set_ylabel("win rate vs incumbent")

    return draw


def _draw_incumbent_and_candidate(iterations: list[Iteration], metric: str, ylabel: str) -> Draw:
    """The incumbent after each iteration as a step line, each candidate as a point."""

    def draw(ax: Any) -> None:
        series = incumbent_values(iterations, metric)
        xs, ys = _points(iterations, metric)
        if not series and not xs:
            return _no_data(ax)
        if series:
            _step(ax, series, "incumbent")
        if xs:
            ax.plot(xs, ys, "x", markersize=9, label="candidate")
        ax.set_ylabel(ylabel)

    return draw


def _draw_side_by_side(iterations: list[Iteration], metric: str, ylabel: str) -> Draw:
    """Candidate and incumbent values of the same eval, per iteration."""

    def draw(ax: Any) -> None:
        drawn = False
        for name, label in ((metric, "candidate"), (f"baseline/{metric}", "incumbent")):
            xs, ys = _points(iterations, name)
            if xs:
                ax.plot(xs, ys, "o-", label=label)
                drawn = True
        if not drawn:
            return _no_data(ax)
        ax.set_ylabel(ylabel)

    return draw


def _draw_one(iterations: list[Iteration], metric: str, ylabel: str) -> Draw:
    def draw(ax: Any) -> None:
        xs, ys = _points(iterations, metric)
        if not xs:
            return _no_data(ax)
        ax.plot(xs, ys, "o-")
        ax.set_ylabel(ylabel)

    return draw


def _draw_consistency(iterations: list[Iteration]) -> Draw:
    """The eval judge's position consistency; n/a where it asked no A/B question."""
    ordered = [it for it in iterations if not it.order_free()]
    evaluated = [it for it in iterations if it.value("judge_position_consistency") is not None]

    def draw(ax: Any) -> None:
        if evaluated and all(it.order_free() for it in evaluated):
            why = "n/a: order-free judge (contrast, likelihood)"
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center")
            return
        _draw_one(ordered, "judge_position_consistency", "share")(ax)

    return draw


def _draw_principle_violations(iterations: list[Iteration]) -> Draw:
    prefix = "violation_rate/"
    principles = sorted({m for it in iterations for m in it.metrics if m.startswith(prefix)})

    def draw(ax: Any) -> None:
        for metric in principles:
            series = incumbent_values(iterations, metric)
            if series:
                _step(ax, series, metric.removeprefix(prefix))
        if not principles:
            return _no_data(ax)
        ax.set_ylabel("incumbent violation rate")

    return draw


def _draw_pairs(pairs: dict[int, dict[str, int]]) -> Draw:
    principles = sorted({p for counts in pairs.values() for p in counts})

    def draw(ax: Any) -> None:
        if not principles:
            return _no_data(ax)
        xs = sorted(pairs)
        bottom = [0] * len(xs)
        for principle in principles:
            heights = [pairs[x].get(principle, 0) for x in xs]
            ax.bar(xs, heights, bottom=bottom, label=principle)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_ylabel("pairs (per principle)")

    return draw


def plots(history: LoopHistory, pairs: dict[int, dict[str, int]]) -> list[tuple[str, str]]:
    """(title, inline svg) of every plot in the report."""
    its = history.iterations
    drawn = [
        ("Judge win rate, candidate vs incumbent (with CI)", _draw_win_rate(its)),
        (
            "Check violation rate, any principle",
            _draw_incumbent_and_candidate(its, "violation_rate", "share of responses"),
        ),
        ("Incumbent violation rate per principle", _draw_principle_violations(its)),
        ("Mean response length", _draw_side_by_side(its, "length", "tokens")),
        ("KL(candidate ‖ incumbent)", _draw_one(its, "kl", "KL estimate")),
        ("Judge position consistency", _draw_consistency(its)),
        ("Preference pairs per principle", _draw_pairs(pairs)),
    ]
    if any(it.value("reward") is not None for it in its):
        drawn.append(("Reward", _draw_side_by_side(its, "reward", "mean reward")))
    return [(title, _svg(title, draw)) for title, draw in drawn]


def _draw_judge_quality(judge: JudgeAudits) -> Draw:
    def draw(ax: Any) -> None:
        xs = [a.iteration for a in judge.audits]
        ax.plot(xs, [a.metrics.accuracy for a in judge.audits], "o-", label="gold accuracy")
        ordered = [a for a in judge.audits if a.mode not in ORDER_FREE_MODES]
        consistency = [a.metrics.position_consistency for a in ordered]
        label = "position consistency" if ordered else "position consistency: n/a (order-free)"
        ax.plot([a.iteration for a in ordered], consistency, "s-", label=label)
        ax.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
        if judge.min_accuracy is not None:
            ax.axhline(judge.min_accuracy, color="red", linestyle="--", label="min_judge_accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of pairs")

    return draw


def _draw_reliability(audit: JudgeAudit) -> Draw:
    """Accuracy against stated confidence per bin; a calibrated judge sits on the diagonal."""

    def draw(ax: Any) -> None:
        ax.plot([0.5, 1.0], [0.5, 1.0], color="grey", linestyle="--", label="calibrated")
        full = [b for b in audit.metrics.calibration if b.count]
        if not full:
            _no_data(ax)
        else:
            ax.plot([b.confidence for b in full], [b.accuracy for b in full], "o-", label="judge")
            for b in full:
                where = (b.confidence, b.accuracy)
                ax.annotate(str(b.count), where, xytext=(4, 4), textcoords="offset points")
        ax.set_xlim(0.5, 1.0)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("confidence max(p_a, 1 − p_a) (labels: pairs per bin)")
        ax.set_ylabel("accuracy")

    return draw


def judge_plots(judge: JudgeAudits) -> list[tuple[str, str]]:
    """(title, inline svg) of the judge section; none when the loop has no audits."""
    latest = judge.latest()
    if latest is None:
        return []
    quality = "Judge on the gold audit set"
    reliability = f"Judge reliability, iteration {latest.iteration} audit"
    return [
        (quality, _svg(quality, _draw_judge_quality(judge))),
        (reliability, _svg(reliability, _draw_reliability(latest), per_iteration=False)),
    ]


# -- report ---------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots svg { width: 640px; height: auto; }
.pass { color: #1a7f37; } .fail { color: #cf222e; font-weight: bold; } .na { color: #6e7781; }
.promoted { color: #1a7f37; } .rejected { color: #cf222e; } .skipped { color: #9a6700; }
ul { margin: 0; padding-left: 1.2em; }
code { font-size: 0.95em; }
.answer { white-space: pre-wrap; max-width: 34em; }
.note { color: #6e7781; font-size: 0.9em; }
.verdict { min-width: 16em; }
form label { margin-right: 1.5em; }
"""
# The report runs no script and loads nothing; the pairs page runs only its own script.
_REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape("–" if value is None else str(value))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are HTML already escaped by the caller."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _gates_html(it: Iteration) -> str:
    items = [f'<li class="{_gate_class(g)}">{_e(_gate_text(g))}</li>' for g in it.gates]
    return f"<ul>{''.join(items)}</ul>" if items else "–"


def _gate_class(gate: dict[str, Any]) -> str:
    return "na" if gate.get("applicable") is False else "pass" if gate.get("passed") else "fail"


def _iterations_html(history: LoopHistory) -> str:
    headers = ["it", "method", "incumbent → candidate", "data run", "pairs", "win rate [CI]"]
    headers += ["violations inc→cand", "length inc→cand", "KL", "position consistency"]
    headers += ["decision", "gates", "reasons"]
    rows = [
        [
            _e(it.iteration),
            _e(it.method),
            f"<code>{_e(_short(it.incumbent))}</code> → <code>{_e(_short(it.candidate))}</code>",
            _e(it.data_run_id),
            _e(it.pairs),
            _e(_win_rate(it)),
            _e(_pair(it, "violation_rate")),
            _e(_pair(it, "length", 1)),
            _e(_num(it.value("kl"))),
            _e("n/a" if it.order_free() else _num(it.value("judge_position_consistency"))),
            f'<span class="{_e(it.decision)}">{_e(it.decision)}</span>',
            _gates_html(it),
            "<br>".join(_e(r) for r in it.reasons) or "–",
        ]
        for it in history.iterations
    ]
    return _table(headers, rows)


def _models_html(history: LoopHistory) -> str:
    headers = ["model", "stage", "iteration", "parent", "base model", "data runs", "examples"]
    headers += ["promoted", "path"]
    rows = [
        [
            f"<code>{_e(m['model_id'])}</code>",
            _e(m["stage"]),
            _e(m["iteration"]),
            f"<code>{_e(m['parent_model_id'])}</code>",
            _e(m["base_model"]),
            _e(", ".join(m["data_runs"] or [])),
            _e(m["examples"]),
            "yes" if m["promoted"] else "no",
            _e(m["path"]),
        ]
        for m in history.models.values()
    ]
    return _table(headers, rows)


def _judge_verdict(judge: JudgeAudits) -> str:
    """One plain sentence: is the loop's judge trusted by its gate?"""
    latest = judge.latest()
    if latest is None:
        return "<p>No judge audits in this loop (loop.judge_audit is off, or no iteration ran).</p>"
    accuracy = f"gold accuracy {latest.metrics.accuracy:.3f} (iteration {latest.iteration} audit)"
    if judge.min_accuracy is None:
        return f"<p>Judge {_e(accuracy)}; no min_judge_accuracy gate is set.</p>"
    bound = f"min_judge_accuracy {judge.min_accuracy:.3f}"
    if judge.distrusted():
        return (
            f'<p class="fail">Judge not trusted: {_e(accuracy)} is below {_e(bound)}; '
            "its win rates promote nothing.</p>"
        )
    return f'<p class="pass">Judge trusted: {_e(accuracy)} is at least {_e(bound)}.</p>'


def _judge_html(judge: JudgeAudits) -> str:
    figures = "".join(f"<figure>{svg}</figure>" for _, svg in judge_plots(judge))
    headers = ["it", "judge", "mode", "pairs", "accuracy", "position consistency"]
    headers += ["first-position rate", "ECE", "chosen longer / shorter", "not ok", "run"]
    rows = [
        [
            _e(a.iteration),
            f"<code>{_e(a.judge_model)}</code>",
            _e(a.mode),
            _e(a.metrics.n),
            _e(_num(a.metrics.accuracy)),
            _e("n/a" if a.mode in ORDER_FREE_MODES else _num(a.metrics.position_consistency)),
            _e(_num(_share(a.metrics.first_position_rate))),
            _e(_num(_share(a.metrics.ece))),
            _e(_length_bias(a.metrics)),
            _e(a.metrics.not_ok),
            f"<code>{_e(a.run_id)}</code>",
        ]
        for a in judge.audits
    ]
    table = _table(headers, rows) if rows else ""
    return f'{_judge_verdict(judge)}<div class="plots">{figures}</div>{table}'


def _share(share: Share | None) -> float | None:
    return None if share is None else share.value


def _length_bias(metrics: JudgeMetrics) -> str:
    """Accuracy when chosen is the longer / the shorter response: far apart means length bias."""
    longer, shorter = (
        _share(metrics.accuracy_chosen_longer),
        _share(metrics.accuracy_chosen_shorter),
    )
    return f"{_num(longer)} / {_num(shorter)}"


def _clip(text: str | None, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else f"{text[:limit]} … [{len(text) - limit} more characters]"


def _answer_html(answer: Answer) -> str:
    if answer.failed is None:
        checks = '<span class="na">checks unknown: the constitution is not in the store</span>'
    elif answer.failed:
        failed = "; ".join(f"{pid}: {what}" for pid, what in answer.failed)
        checks = f'<span class="fail">fails {_e(failed)}</span>'
    else:
        checks = '<span class="pass">fails no check</span>'
    cut = answer.finish_reason == "length"
    note = '<div class="note">cut off by the token budget</div>' if cut else ""
    return (
        f'<div class="answer">{_e(_clip(answer.text, ANSWER_CHARS))}</div>{note}<div>{checks}</div>'
    )


def _verdict_html(j: Judgment) -> str:
    """The judge's preference: p that the candidate is better, its orders, and the outcome
    the win rate counts (alignment.evaluation: a position-biased comparison is a tie)."""
    lines = [f"principle <code>{_e(j.principle_id)}</code> ({_e(j.mode)})"]
    lines.append(f"p(candidate better) <b>{_e(_num(j.p_a))}</b>")
    if j.mode == "checks":
        lines.append("decided by the principle's checks, no model")
    elif j.mode in ORDER_FREE_MODES:
        lines.append('<span class="na">orders n/a: order-free judge</span>')
    else:
        orders = f"candidate shown first {_num(j.p_a_first)}, shown second {_num(j.p_a_second)}"
        agree = "the orders agree" if j.position_consistent else "the orders disagree"
        lines.append(f"{_e(orders)}; {_e(agree)}")
    if j.delta_a is not None and j.delta_b is not None:
        lines.append(_e(f"Δ candidate {j.delta_a:.3f}, Δ incumbent {j.delta_b:.3f}"))
    outcome = _win(j)
    if outcome == 1.0:
        verdict, style = "candidate wins", "pass"
    elif outcome == 0.0:
        verdict, style = "incumbent wins", "fail"
    else:
        verdict, style = "tie" + (" (position bias)" if _position_biased(j) else ""), "na"
    lines.append(f'<span class="{style}">counted as: {_e(verdict)}</span>')
    if j.rationale:
        rationale = _e(_clip(j.rationale, ANSWER_CHARS))
        lines.append(
            f'<details><summary>rationale</summary><div class="answer">{rationale}</div></details>'
        )
    return "<br>".join(lines)


def _examples_html(found: list[IterationExamples], history: LoopHistory) -> str:
    if not found:
        return "<p>No judged eval comparisons of this loop in the store.</p>"
    intro = (
        "<p>Per iteration, eval prompts picked from its candidate-vs-incumbent comparisons: "
        f"the {STRONGEST} where the judge most preferred the candidate (largest p − 0.5), "
        f"the {STRONGEST} where it most preferred the incumbent (filled from the other side "
        "when one has fewer), and the one closest to 0.5. Comparisons decided by checks rank "
        "after the judge's own; ties go to the smaller prompt id. Checks are the constitution's "
        "(a principle is violated when any of its checks fails, as in the violation rate).</p>"
    )
    by_number = {it.iteration: it for it in history.iterations}
    parts = [intro]
    for found_it in found:
        it = by_number[found_it.iteration]
        title = (
            f"Iteration {it.iteration}: incumbent <code>{_e(_short(it.incumbent))}</code> vs "
            f"candidate <code>{_e(_short(it.candidate))}</code> "
            f'(<span class="{_e(it.decision)}">{_e(it.decision)}</span>)'
        )
        shown = f"{len(found_it.examples)} of {found_it.judged} judged eval prompts"
        rows = [
            [
                _e(ex.why),
                f'<div class="answer">{_e(_clip(ex.prompt, ANSWER_CHARS))}</div>',
                _answer_html(ex.incumbent),
                _answer_html(ex.candidate),
                f'<div class="verdict">{_verdict_html(ex.judgment)}</div>',
            ]
            for ex in found_it.examples
        ]
        headers = ["picked", "prompt", "incumbent", "candidate", "judge"]
        parts.append(f'<h3>{title}</h3><p class="note">{_e(shown)}</p>{_table(headers, rows)}')
    return "".join(parts)


def _pairs_link_html(pairs: PairRows | None, page: str | None) -> str:
    if pairs is None or page is None or not pairs.rows:
        return "<p>No preference pairs of this loop in the store.</p>"
    shown = len(pairs.rows)
    which = f"all {shown}" if shown == pairs.total else f"the newest {shown} of {pairs.total}"
    href = _e(urllib.parse.quote(page))
    return (
        f'<p><a href="{href}">Browse {_e(which)} train preference pairs</a> of this loop '
        "(prompt, chosen, rejected, p_chosen), filtered by principle, iteration, minimum "
        f"p_chosen and text, in <code>{_e(page)}</code> next to this file.</p>"
    )


# The pairs page's filter: it hides rows, never writes text into the page. The filter
# state lives in the URL fragment (#principle=honest&min_p=0.8&q=word), so a link opens
# a filtered view.
_FILTER_JS = """
(function () {
  "use strict";
  var form = document.getElementById("filters");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#pairs tbody tr"));
  var texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
  var fields = ["principle", "iteration", "min_p", "q"];
  function fromHash() {
    var params = new URLSearchParams(location.hash.slice(1));
    fields.forEach(function (name) {
      if (params.has(name)) { form.elements[name].value = params.get(name); }
    });
  }
  function apply() {
    var principle = form.elements.principle.value;
    var iteration = form.elements.iteration.value;
    var min = parseFloat(form.elements.min_p.value) || 0;
    var needle = form.elements.q.value.trim().toLowerCase();
    var shown = 0;
    rows.forEach(function (row, i) {
      var keep = (!principle || row.dataset.principles.split(" ").indexOf(principle) >= 0) &&
        (!iteration || row.dataset.iteration === iteration) &&
        !(parseFloat(row.dataset.p) < min) &&
        (!needle || texts[i].indexOf(needle) >= 0);
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    var status = document.getElementById("shown");
    status.textContent = shown + " of " + rows.length + " pairs shown";
    status.setAttribute("data-filtered", "yes");
  }
  function save() {
    var params = new URLSearchParams();
    fields.forEach(function (name) {
      var value = form.elements[name].value;
      if (value && !(name === "min_p" && parseFloat(value) === 0)) { params.set(name, value); }
    });
    try { history.replaceState(null, "", "#" + params.toString()); } catch (e) { /* kept */ }
  }
  form.addEventListener("input", function () { apply(); save(); });
  form.addEventListener("submit", function (event) { event.preventDefault(); });
  window.addEventListener("hashchange", function () { fromHash(); apply(); });
  fromHash();
  apply();
})();
"""


def render_pairs_page(history: LoopHistory, pairs: PairRows, store_root: Path) -> str:
    """The loop's train pairs as one static table, with a filter that hides rows."""
    title = f"rlaif loop {history.loop or '(none)'}: preference pairs — {store_root}"
    principles = sorted({p for row in pairs.rows for p in row["principle_ids"] or []})
    iterations = sorted({row["iteration"] for row in pairs.rows}, reverse=True)
    options = "".join(f'<option value="{_e(p)}">{_e(p)}</option>' for p in principles)
    its = "".join(f'<option value="{_e(i)}">{_e(i)}</option>' for i in iterations)
    rows = "".join(_pair_row_html(row) for row in pairs.rows)
    shown = len(pairs.rows)
    which = f"All {shown}" if shown == pairs.total else f"The newest {shown} of {pairs.total}"
    digest = base64.b64encode(hashlib.sha256(_FILTER_JS.encode()).digest()).decode()
    csp = f"{_REPORT_CSP}; script-src 'sha256-{digest}'"
    headers = "".join(
        f"<th>{h}</th>" for h in ("it", "principle", "p_chosen", "prompt", "chosen", "rejected")
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<title>{_e(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p>{_e(which)} train pairs of the loop's data runs, newest iteration first; texts longer
than {PAIR_CHARS} characters are cut.</p>
<form id="filters">
<label>principle <select name="principle"><option value="">any</option>{options}</select></label>
<label>iteration <select name="iteration"><option value="">any</option>{its}</select></label>
<label>min p_chosen <input name="min_p" type="number" min="0" max="1" step="0.05" value="0"></label>
<label>text <input name="q" type="search" placeholder="prompt, chosen or rejected"></label>
</form>
<p id="shown">{shown} pairs</p>
<noscript><p>The filter needs JavaScript; every pair is listed.</p></noscript>
<table id="pairs"><thead><tr>{headers}</tr></thead><tbody>{rows}</tbody></table>
<script>{_FILTER_JS}</script>
</body></html>
"""


def _pair_row_html(row: dict[str, Any]) -> str:
    principles = " ".join(row["principle_ids"] or [])
    p = row["p_chosen"]
    cells = [
        _e(row["iteration"]),
        _e(principles),
        _e(_num(p)),
        *(
            f'<div class="answer">{_e(_clip(row[k], PAIR_CHARS))}</div>'
            for k in ("prompt", "chosen", "rejected")
        ),
    ]
    data = (
        f'data-iteration="{_e(row["iteration"])}" data-principles="{_e(principles)}" '
        f'data-p="{_e("" if p is None else repr(float(p)))}"'
    )
    return f"<tr {data}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def render_report(
    history: LoopHistory,
    pairs: dict[int, dict[str, int]],
    store_root: Path,
    judge: JudgeAudits | None = None,
    examples: list[IterationExamples] | None = None,
    pair_rows: PairRows | None = None,
    pairs_page: str | None = None,
) -> str:
    """The report; `pairs_page` is the file name of the pairs page written next to it."""
    title = f"rlaif loop {history.loop or '(none)'} — {store_root}"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures = "".join(f"<figure>{svg}</figure>" for _, svg in plots(history, pairs))
    line = lineage_line(history)
    iterations = _iterations_html(history) if history.iterations else "<p>No iterations.</p>"
    models = _models_html(history) if history.models else "<p>No models registered.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_REPORT_CSP}">
<title>{_e(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p>Generated {_e(generated)}; {len(history.iterations)} iterations.</p>
<p>{_e(line or "No incumbent yet.")}</p>
<h2>Across iterations</h2>
<div class="plots">{figures}</div>
<h2>Judge</h2>
{_judge_html(judge or JudgeAudits([], None))}
<h2>Iterations and gate decisions</h2>
{iterations}
<h2>Answers: incumbent and candidate on eval prompts</h2>
{_examples_html(examples or [], history)}
<h2>Preference pairs</h2>
{_pairs_link_html(pair_rows, pairs_page)}
<h2>Models and lineage</h2>
{models}
</body></html>
"""


def pairs_page_path(report: Path) -> Path:
    """Where the pairs page of the report at `report` is written: next to it."""
    return report.with_name(f"{report.stem}-pairs.html")


def write_report(store: Store, out: Path, loop: str | None = None) -> Path:
    """Write the loop's HTML report to `out` (a file, or a folder to put one in), and its
    pairs page next to it (`pairs_page_path`) when the loop has iterations; the report's path."""
    history = loop_history(store, loop)
    out = Path(out)
    if out.is_dir():
        out = out / f"report-{history.loop or 'store'}.html"
    pairs = pairs_by_principle(store, history)
    pair_rows, page = None, None
    if history.iterations:
        pair_rows, page = loop_pairs(store, history), pairs_page_path(out)
        _write_atomic(page, render_pairs_page(history, pair_rows, store.root))
    report = render_report(
        history, pairs, store.root, judge_audits(store, history.loop),
        eval_examples(store, history), pair_rows, page.name if page else None,
    )  # fmt: skip
    _write_atomic(out, report)
    return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
