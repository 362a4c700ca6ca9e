"""The report's plots: matplotlib figures as inline SVG, their text kept as text.

matplotlib's own XML writer escapes every label it writes (principle ids included), so a
figure goes into the page as it is.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from alignment.gates import ORDER_FREE_MODES
from flows.report_store import Iteration, JudgeAudit, JudgeAudits, LoopHistory, incumbent_values

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
