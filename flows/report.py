"""What a self-improvement loop did, read back from the store: `rlaif status` and `rlaif report`.

All SQL lives in the reading section; status prints rich tables, the report writes one
self-contained HTML file whose plots are inline SVG drawn by matplotlib.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table
from rich.text import Text

from alignment.judge_eval import JudgeMetrics, Share
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
    mark = "pass" if gate.get("passed") else "FAIL"
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
            Text("; ".join(it.failing())),
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
        ("Judge position consistency", _draw_one(its, "judge_position_consistency", "share")),
        ("Preference pairs per principle", _draw_pairs(pairs)),
    ]
    if any(it.value("reward") is not None for it in its):
        drawn.append(("Reward", _draw_side_by_side(its, "reward", "mean reward")))
    return [(title, _svg(title, draw)) for title, draw in drawn]


def _draw_judge_quality(judge: JudgeAudits) -> Draw:
    def draw(ax: Any) -> None:
        xs = [a.iteration for a in judge.audits]
        ax.plot(xs, [a.metrics.accuracy for a in judge.audits], "o-", label="gold accuracy")
        consistency = [a.metrics.position_consistency for a in judge.audits]
        ax.plot(xs, consistency, "s-", label="position consistency")
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
.pass { color: #1a7f37; } .fail { color: #cf222e; font-weight: bold; }
.promoted { color: #1a7f37; } .rejected { color: #cf222e; } .skipped { color: #9a6700; }
ul { margin: 0; padding-left: 1.2em; }
code { font-size: 0.95em; }
"""


def _e(value: Any) -> str:
    return html.escape("–" if value is None else str(value))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are HTML already escaped by the caller."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _gates_html(it: Iteration) -> str:
    items = [
        f'<li class="{"pass" if g.get("passed") else "fail"}">{_e(_gate_text(g))}</li>'
        for g in it.gates
    ]
    return f"<ul>{''.join(items)}</ul>" if items else "–"


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
            _e(_num(it.value("judge_position_consistency"))),
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
            _e(_num(a.metrics.position_consistency)),
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


def render_report(
    history: LoopHistory,
    pairs: dict[int, dict[str, int]],
    store_root: Path,
    judge: JudgeAudits | None = None,
) -> str:
    title = f"rlaif loop {history.loop or '(none)'} — {store_root}"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures = "".join(f"<figure>{svg}</figure>" for _, svg in plots(history, pairs))
    line = lineage_line(history)
    iterations = _iterations_html(history) if history.iterations else "<p>No iterations.</p>"
    models = _models_html(history) if history.models else "<p>No models registered.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
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
<h2>Models and lineage</h2>
{models}
</body></html>
"""


def write_report(store: Store, out: Path, loop: str | None = None) -> Path:
    """Write the loop's HTML report to `out` (a file, or a folder to put one in); its path."""
    history = loop_history(store, loop)
    out = Path(out)
    if out.is_dir():
        out = out / f"report-{history.loop or 'store'}.html"
    pairs = pairs_by_principle(store, history)
    page = render_report(history, pairs, store.root, judge_audits(store, history.loop))
    _write_atomic(out, page)
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
