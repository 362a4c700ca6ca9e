"""What a self-improvement loop did, read back from the store: `rlaif status` and `rlaif report`.

The content is built once, as rows of plain text (flows/report_rows.py, from the records of
flows/report_store.py); this module only renders those rows. Status prints them as rich
tables. The report is one self-contained HTML file (templates/report.html.j2) whose plots
are inline SVG drawn by matplotlib, with a few eval answers of each iteration side by side,
and next to it a second file (templates/report-pairs.html.j2) that lists the loop's
preference pairs with a small filter script. Every judged text is model output: the
templates escape every value they print and never hand one to a script as code, and both
pages forbid any load from elsewhere (Content-Security-Policy), so they open from the file
with nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import html
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from rich.console import Console
from rich.table import Table
from rich.text import Text

from alignment import atomic
from flows import report_rows
from flows.cli_output import print_batches
from flows.report_rows import SHORT, IterationRow, ModelRow, PairsPage, lineage_line
from flows.report_store import loop_history, loop_pairs
from flows.summary import where_batches_ran
from storage import Store

__all__ = [
    "print_status",
    "render_pairs_page",
    "render_report",
    "pairs_page_path",
    "write_report",
]
DECISION_STYLES = {"promoted": "green", "rejected": "red", "skipped": "yellow"}

# -- status ---------------------------------------------------------------------------------


def print_status(store: Store, loop: str | None = None, console: Console | None = None) -> None:
    """Iterations, models and the incumbent's lineage as rich tables. Raises StoreNotFound."""
    # Piped output gets 80 columns by default, too narrow for the iterations table.
    console = console or Console(width=max(Console().width, 140))
    history = loop_history(store, loop)
    if history.iterations:
        console.print(_iterations_table(history.loop, report_rows.iteration_rows(history)))
    else:
        where = f"loop {loop!r}" if loop else "this store"
        console.print(f"No loop iterations in {where} yet.", markup=False)
    if history.models:
        console.print(_models_table(report_rows.model_rows(history)))
    line = lineage_line(history)
    if line:
        console.print(line, markup=False)
    print_batches(console, where_batches_ran(store, history.run_ids()))


def _iterations_table(loop: str | None, rows: list[IterationRow]) -> Table:
    table = Table(title=f"loop {loop}")
    for name in ("it", "method", "incumbent → candidate", "pairs", "win rate [CI]"):
        table.add_column(name)
    for name in ("violations", "KL", "decision", "failed gates / why"):
        table.add_column(name)
    for row in rows:
        table.add_row(
            row.iteration,
            row.method,
            f"{row.incumbent} → {row.candidate}",
            row.pairs,
            row.win_rate,
            row.violations,
            row.kl,
            Text(row.decision, style=DECISION_STYLES.get(row.decision, "")),
            Text(row.why),
        )
    return table


def _models_table(rows: list[ModelRow]) -> Table:
    table = Table(title="models")
    for name in ("model", "stage", "iteration", "parent", "examples", "promoted"):
        table.add_column(name)
    for row in rows:
        table.add_row(
            Text(row.model_id[:SHORT]),
            Text(row.stage),
            row.iteration,
            Text(row.derived_from[:SHORT]),
            row.examples,
            row.promoted,
        )
    return table


# -- report ---------------------------------------------------------------------------------


def _escape(value: Any) -> Markup:
    """What a template prints: escaped as html.escape does (quotes too), unless marked safe."""
    if hasattr(value, "__html__"):
        return Markup(value)
    return Markup(html.escape(str(value)))


_TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
    finalize=_escape,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
# The report runs no script and loads nothing; the pairs page runs only its own script.
_REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'"


def render_pairs_page(page: PairsPage) -> str:
    """The loop's train pairs as one static table, with a filter that hides rows."""
    script = _TEMPLATES.loader.get_source(_TEMPLATES, "pairs-filter.js")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = f"{_REPORT_CSP}; script-src 'sha256-{digest}'"
    template = _TEMPLATES.get_template("report-pairs.html.j2")
    return template.render(vars(page), csp=csp, script=Markup(script))


def render_report(report: report_rows.Report) -> str:
    """The report page, from its rows."""
    return _TEMPLATES.get_template("report.html.j2").render(vars(report), csp=_REPORT_CSP)


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
    pairs, page = None, None
    if history.iterations:
        pairs, page = loop_pairs(store, history), pairs_page_path(out)
        pairs_page = report_rows.pairs_page(history, pairs, store.root)
        atomic.write_text(page, render_pairs_page(pairs_page))
    rows = report_rows.report(store, history, pairs, page.name if page else None)
    atomic.write_text(out, render_report(rows))
    return out
