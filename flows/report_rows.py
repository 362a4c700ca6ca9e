"""The report's content, built once as plain rows of display text from the store's records.

`rlaif status` prints some of these rows with rich and `rlaif report` writes all of them
with Jinja2 templates (flows/report.py); neither formats a number or picks a word itself.
Every text here is plain text, never markup: the renderers escape it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alignment.evaluation import _position_biased, _win
from alignment.gates import ORDER_FREE_MODES
from alignment.judge import Judgment
from alignment.judge_metrics import JudgeMetrics, Share
from flows.report_plots import judge_plots, plots
from flows.report_store import (
    STRONGEST,
    Answer,
    Iteration,
    IterationExamples,
    JudgeAudits,
    LoopHistory,
    PairRows,
    eval_examples,
    judge_audits,
    pairs_by_principle,
)
from flows.summary import where_batches_ran
from storage import Store

SHORT = 12  # characters of a model id shown in tables
ANSWER_CHARS = 2000  # characters of an answer shown in the report
PAIR_CHARS = 1200  # characters of a prompt, chosen or rejected text in the pairs page

# -- formatting -----------------------------------------------------------------------------


def _text(value: Any) -> str:
    return "–" if value is None else str(value)


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


def _any(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


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


# -- lineage --------------------------------------------------------------------------------


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


# -- iterations and models (status and report) ----------------------------------------------


@dataclass(frozen=True)
class Styled:
    """A text and its style: pass, fail or na (promoted, rejected or skipped for decisions)."""

    style: str
    text: str


@dataclass(frozen=True)
class IterationRow:
    iteration: str
    method: str
    incumbent: str  # short ids
    candidate: str
    data_run: str
    pairs: str
    win_rate: str  # with its CI
    violations: str  # incumbent → candidate
    length: str  # incumbent → candidate
    kl: str
    position_consistency: str  # n/a for an order-free judge
    decision: str
    gates: list[Styled]
    reasons: list[str]
    why: str  # the failed gates (else the reasons), then the gates that could not apply


def iteration_rows(history: LoopHistory) -> list[IterationRow]:
    return [
        IterationRow(
            iteration=str(it.iteration),
            method=_text(it.method),
            incumbent=_short(it.incumbent),
            candidate=_short(it.candidate),
            data_run=_text(it.data_run_id),
            pairs=_text(it.pairs),
            win_rate=_win_rate(it),
            violations=_pair(it, "violation_rate"),
            length=_pair(it, "length", 1),
            kl=_num(it.value("kl")),
            position_consistency=(
                "n/a" if it.order_free() else _num(it.value("judge_position_consistency"))
            ),
            decision=it.decision,
            gates=[_gate(g) for g in it.gates],
            reasons=list(it.reasons),
            why="; ".join([*it.failing(), *(f"{g} n/a" for g in it.not_applicable())]),
        )
        for it in history.iterations
    ]


def _gate(gate: dict[str, Any]) -> Styled:
    style = "na" if gate.get("applicable") is False else "pass" if gate.get("passed") else "fail"
    mark = {"na": "n/a", "pass": "pass", "fail": "FAIL"}[style]
    value, threshold = gate.get("value"), gate.get("threshold")
    numbers = f" {_any(value)} vs {_any(threshold)}" if value is not None else ""
    message = f" ({gate['message']})" if gate.get("message") else ""
    return Styled(style, f"{mark} {gate.get('gate')}{numbers}{message}")


@dataclass(frozen=True)
class ModelRow:
    model_id: str  # in full; status shows its first SHORT characters
    stage: str
    iteration: str
    parent: str
    base_model: str
    derived_from: str  # the parent, else the base model
    data_runs: str
    examples: str
    promoted: str  # yes / no
    path: str


def model_rows(history: LoopHistory) -> list[ModelRow]:
    return [
        ModelRow(
            model_id=m["model_id"],
            stage=_text(m["stage"]),
            iteration=_text(m["iteration"]),
            parent=_text(m["parent_model_id"]),
            base_model=_text(m["base_model"]),
            derived_from=_text(m["parent_model_id"] or m["base_model"]),
            data_runs=", ".join(m["data_runs"] or []),
            examples=_text(m["examples"]),
            promoted="yes" if m["promoted"] else "no",
            path=_text(m["path"]),
        )
        for m in history.models.values()
    ]


# -- judge ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    iteration: str
    judge_model: str
    mode: str
    pairs: str
    accuracy: str
    position_consistency: str  # n/a for an order-free mode
    first_position_rate: str
    ece: str
    length_bias: str  # accuracy when chosen is longer / shorter
    not_ok: str
    run_id: str


@dataclass(frozen=True)
class JudgeSection:
    verdict: Styled  # one plain sentence: is the judge trusted by its gate? style may be ""
    figures: list[str]  # inline svg
    audits: list[AuditRow]


def judge_section(judge: JudgeAudits) -> JudgeSection:
    audits = [
        AuditRow(
            iteration=str(a.iteration),
            judge_model=_text(a.judge_model),
            mode=_text(a.mode),
            pairs=str(a.metrics.n),
            accuracy=_num(a.metrics.accuracy),
            position_consistency=(
                "n/a" if a.mode in ORDER_FREE_MODES else _num(a.metrics.position_consistency)
            ),
            first_position_rate=_num(_share(a.metrics.first_position_rate)),
            ece=_num(_share(a.metrics.ece)),
            length_bias=_length_bias(a.metrics),
            not_ok=str(a.metrics.not_ok),
            run_id=a.run_id,
        )
        for a in judge.audits
    ]
    figures = [svg for _, svg in judge_plots(judge)]
    return JudgeSection(_judge_verdict(judge), figures, audits)


def _judge_verdict(judge: JudgeAudits) -> Styled:
    latest = judge.latest()
    if latest is None:
        why = "loop.judge_audit is off, or no iteration ran"
        return Styled("", f"No judge audits in this loop ({why}).")
    accuracy = f"gold accuracy {latest.metrics.accuracy:.3f} (iteration {latest.iteration} audit)"
    if judge.min_accuracy is None:
        return Styled("", f"Judge {accuracy}; no min_judge_accuracy gate is set.")
    bound = f"min_judge_accuracy {judge.min_accuracy:.3f}"
    if judge.distrusted():
        return Styled(
            "fail",
            f"Judge not trusted: {accuracy} is below {bound}; its win rates promote nothing.",
        )
    return Styled("pass", f"Judge trusted: {accuracy} is at least {bound}.")


# -- answers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerRow:
    text: str  # clipped
    cut: bool  # cut off by the token budget
    checks: Styled


@dataclass(frozen=True)
class VerdictRow:
    """The judge's preference: p that the candidate is better, its orders, and the outcome
    the win rate counts (alignment.evaluation: a position-biased comparison is a tie)."""

    principle: str
    mode: str
    p: str
    how: Styled  # checks decided it, orders n/a, or the two orders and whether they agree
    deltas: str | None  # the contrast judge's Δ of each side
    outcome: Styled
    rationale: str | None  # clipped


@dataclass(frozen=True)
class ExampleRow:
    why: str  # how it was picked
    prompt: str  # clipped
    incumbent: AnswerRow
    candidate: AnswerRow
    verdict: VerdictRow


@dataclass(frozen=True)
class ExamplesOf:
    """The examples of one iteration."""

    iteration: str
    incumbent: str  # short ids
    candidate: str
    decision: str
    shown: str  # "5 of 6 judged eval prompts"
    rows: list[ExampleRow]


def examples_of(found: list[IterationExamples], history: LoopHistory) -> list[ExamplesOf]:
    by_number = {it.iteration: it for it in history.iterations}
    sections = []
    for found_it in found:
        it = by_number[found_it.iteration]
        rows = [
            ExampleRow(
                ex.why,
                _clip(ex.prompt, ANSWER_CHARS),
                _answer(ex.incumbent),
                _answer(ex.candidate),
                _verdict(ex.judgment),
            )
            for ex in found_it.examples
        ]
        shown = f"{len(found_it.examples)} of {found_it.judged} judged eval prompts"
        sections.append(
            ExamplesOf(
                str(it.iteration), _short(it.incumbent), _short(it.candidate), it.decision,
                shown, rows,
            )
        )  # fmt: skip
    return sections


def _answer(answer: Answer) -> AnswerRow:
    if answer.failed is None:
        checks = Styled("na", "checks unknown: the constitution is not in the store")
    elif answer.failed:
        failed = "; ".join(f"{pid}: {what}" for pid, what in answer.failed)
        checks = Styled("fail", f"fails {failed}")
    else:
        checks = Styled("pass", "fails no check")
    return AnswerRow(_clip(answer.text, ANSWER_CHARS), answer.finish_reason == "length", checks)


def _verdict(j: Judgment) -> VerdictRow:
    if j.mode == "checks":
        how = Styled("", "decided by the principle's checks, no model")
    elif j.mode in ORDER_FREE_MODES:
        how = Styled("na", "orders n/a: order-free judge")
    else:
        orders = f"candidate shown first {_num(j.p_a_first)}, shown second {_num(j.p_a_second)}"
        agree = "the orders agree" if j.position_consistent else "the orders disagree"
        how = Styled("", f"{orders}; {agree}")
    deltas = None
    if j.delta_a is not None and j.delta_b is not None:
        deltas = f"Δ candidate {j.delta_a:.3f}, Δ incumbent {j.delta_b:.3f}"
    outcome = _win(j)
    if outcome == 1.0:
        counted = Styled("pass", "candidate wins")
    elif outcome == 0.0:
        counted = Styled("fail", "incumbent wins")
    else:
        counted = Styled("na", "tie" + (" (position bias)" if _position_biased(j) else ""))
    rationale = _clip(j.rationale, ANSWER_CHARS) if j.rationale else None
    principle, mode = _text(j.principle_id), _text(j.mode)
    return VerdictRow(principle, mode, _num(j.p_a), how, deltas, counted, rationale)


# -- pairs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRow:
    iteration: str
    principles: str  # space-separated ids
    p_chosen: str  # shown
    p_exact: str  # for the filter: repr of the float, "" when unknown
    prompt: str  # clipped
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PairsPage:
    title: str
    which: str  # "All 12" / "The newest 2000 of 3100"
    principles: list[str]  # the filter's choices
    iterations: list[str]
    rows: list[PairRow]
    clip: int


def pairs_page(history: LoopHistory, pairs: PairRows, store_root: Path) -> PairsPage:
    """The loop's train pairs, newest iteration first, for the page that filters them."""
    rows = [
        PairRow(
            iteration=_text(row["iteration"]),
            principles=" ".join(row["principle_ids"] or []),
            p_chosen=_num(row["p_chosen"]),
            p_exact="" if row["p_chosen"] is None else repr(float(row["p_chosen"])),
            **{k: _clip(row[k], PAIR_CHARS) for k in ("prompt", "chosen", "rejected")},
        )
        for row in pairs.rows
    ]
    shown = len(pairs.rows)
    return PairsPage(
        title=f"rlaif loop {history.loop or '(none)'}: preference pairs — {store_root}",
        which=f"All {shown}" if shown == pairs.total else f"The newest {shown} of {pairs.total}",
        principles=sorted({p for row in pairs.rows for p in row["principle_ids"] or []}),
        iterations=[str(i) for i in sorted({r["iteration"] for r in pairs.rows}, reverse=True)],
        rows=rows,
        clip=PAIR_CHARS,
    )


@dataclass(frozen=True)
class PairsLink:
    which: str  # "all 12" / "the newest 2000 of 3100"
    page: str  # its file name, next to the report


def _pairs_link(pairs: PairRows | None, page: str | None) -> PairsLink | None:
    if pairs is None or page is None or not pairs.rows:
        return None
    shown = len(pairs.rows)
    which = f"all {shown}" if shown == pairs.total else f"the newest {shown} of {pairs.total}"
    return PairsLink(which, page)


# -- the report -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    title: str
    generated: str
    iteration_count: int
    lineage: str
    figures: list[str]  # inline svg, across iterations
    judge: JudgeSection
    iterations: list[IterationRow]
    strongest: int  # examples per side, as `pick_examples` picks them
    examples: list[ExamplesOf]
    pairs: PairsLink | None  # None: no pairs to browse
    models: list[ModelRow]
    batches: list[dict[str, Any]]  # where the loop's batches ran (where_batches_ran)


def report(
    store: Store, history: LoopHistory, pairs: PairRows | None, pairs_page: str | None
) -> Report:
    """Every row of the report; `pairs_page` is the file name of the pairs page next to it."""
    return Report(
        title=f"rlaif loop {history.loop or '(none)'} — {store.root}",
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        iteration_count=len(history.iterations),
        lineage=lineage_line(history) or "No incumbent yet.",
        figures=[svg for _, svg in plots(history, pairs_by_principle(store, history))],
        judge=judge_section(judge_audits(store, history.loop)),
        iterations=iteration_rows(history),
        strongest=STRONGEST,
        examples=examples_of(eval_examples(store, history), history),
        pairs=_pairs_link(pairs, pairs_page),
        models=model_rows(history),
        batches=where_batches_ran(store, history.run_ids()),
    )
