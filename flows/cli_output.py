"""How the `rlaif` commands print: rows as a table, CSV or JSON, a run's summary, the demo's
result, the judge's scores, a progress bar, and the one-line error that exits with code 2."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click


def fail(message: str) -> NoReturn:
    """Print `message` to stderr and exit with code 2 (bad input)."""
    click.echo(message, err=True)
    sys.exit(2)


def one_line(message: str) -> str:
    """DuckDB's message without its 'LINE 1: ... ^^^' query excerpt, on one line."""
    lines = []
    for line in message.splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt == "json":
        records = [dict(zip(columns, row, strict=True)) for row in rows]
        return json.dumps(records, default=str, ensure_ascii=False, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return out.getvalue()
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    return console.file.getvalue()


@contextmanager
def loss_progress(description: str) -> Iterator[Callable[[int, int, float], None]]:
    """A progress bar; the callback it yields takes (step, total, loss)."""
    from rich.progress import Progress

    with Progress() as progress:
        bar = progress.add_task(description, total=None)

        def report(step: int, total: int, loss: float) -> None:
            progress.update(
                bar,
                completed=step,
                total=total,
                description=f"{description} (loss {loss:.2f})",
            )

        yield report


def print_tiny_build(path: Path) -> None:
    """The tiny model's folder, its size and its training loss, first and last."""
    build = json.loads((path / "rlaif_build.json").read_text())
    click.echo(
        f"{path}\n{build['parameters']:,} parameters, loss {build['loss_first']:.2f} "
        f"-> {build['loss_last']:.2f}"
    )


def print_metrics(metrics: list[Any]) -> None:
    """One line per eval metric: name, value, n and its interval where there is one."""
    for m in metrics:
        interval = f"  [{m.ci_low:.3f}, {m.ci_high:.3f}]" if m.ci_low is not None else ""
        click.echo(f"{m.metric:40} {m.value:10.4f}  n={m.n}{interval}")


def print_batches(console: Any, placed: list[dict[str, Any]]) -> None:
    """Where a run's batches ran (engine, actor or endpoint, node) and how long they took."""
    from rich.table import Table

    if not placed:
        return
    table = Table(title="where batches ran")
    for name in ("stage", "kind", "ran on", "node", "batches", "requests", "failed"):
        table.add_column(name)
    table.add_column("seconds (mean)")
    for row in placed:
        cells = [row["stage"], row["kind"], row["ran_on"], row["node"]]
        counts = [str(row[k]) for k in ("batches", "requests", "failed")]
        table.add_row(*cells, *counts, f"{row['seconds']} ({row['mean_seconds']})")
    console.print(table)


def print_summary(store: Any, run_id: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from flows.summary import next_queries, run_summary, where_batches_ran

    s = run_summary(store, run_id)
    console = Console(soft_wrap=True)
    console.print(
        f"\n[bold]Run[/bold] {run_id}  status={s.run['status']}  "
        f"policy={s.run['policy_model']}  judge={s.run['judge_model']}"
    )
    table = Table("table", "rows (this run)")
    for name, n in s.rows.items():
        table.add_row(name, str(n))
    console.print(table)
    rate = "n/a" if s.position_consistency is None else f"{s.position_consistency:.1%}"
    console.print(
        f"Judge position consistency: {rate} of {s.model_comparisons} "
        "model-judged comparisons (both orders agree)"
    )
    print_batches(console, where_batches_ran(store, [run_id]))
    console.print("Judgment statuses: " + ", ".join(f"{k}={v}" for k, v in s.statuses.items()))
    console.print("Judgment outcomes: " + ", ".join(f"{k}={v}" for k, v in s.outcomes.items()))
    for i, pair in enumerate(s.examples, 1):
        console.print(
            f"\n[bold]Example pair {i}[/bold]  principle={pair['principle']}  "
            f"p_chosen={pair['p_chosen']:.3f}"
        )
        for field in ("prompt", "chosen", "rejected"):
            console.print(f"  {field + ':':9} {_shorten(pair[field])}", markup=False)
    console.print("\n[bold]Try next[/bold]")
    for question, query in next_queries(run_id):
        console.print(f"# {question}")
        console.print(f'rlaif sql --store {store.root} "{query}"', markup=False, soft_wrap=True)


def _shorten(text: str, width: int = 110) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def print_demo_result(config: Any, demo_config: Path) -> None:
    from rich.console import Console

    from flows.demo import proof_lines, read_proof
    from flows.report import print_status, write_report
    from storage import Store

    store = Store(config.store)
    console = Console(width=max(Console().width, 140))
    print_status(store, config.loop.name, console)
    console.print()
    for line in proof_lines(read_proof(store, config.loop.name)):
        console.print(line, markup=False, soft_wrap=True)
    report = write_report(store, store.root / "report.html", config.loop.name)
    console.print(f"\nReport with plots: {report}")
    console.print("[bold]Try next[/bold]")
    for line in (
        f"rlaif status --store {store.root}",
        f'rlaif sql --store {store.root} "SELECT iteration, decision, reasons FROM iterations"',
        f'rlaif sql --store {store.root} "SELECT metric, value, n FROM judge_evals '
        "WHERE loop = 'demo' AND metric LIKE 'by_principle/%'\"",
        f"rlaif judge eval builtin --config {demo_config} --store {store.root}",
        f"rlaif self-improve --config {demo_config} --iterations 1   # one more iteration",
    ):
        console.print(line, markup=False)


def print_judge_eval(result: Any, data: str, fmt: str) -> None:
    """The judge's scores on `data`: as JSON, or as tables (`fmt` "table")."""
    summary = {**result.metrics.summary(), "judge_model": result.judge_model, "mode": result.mode}
    if fmt == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_judge_tables(summary, result.run_id, data, result.reused)


def _print_judge_tables(summary: dict[str, Any], run_id: str, data: str, reused: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    stored = " (read from the store)" if reused else ""
    console.print(
        f"judge {summary['judge_model']} ({summary['mode']}) on {data}: {summary['n']} pairs, "
        f"{summary['not_ok']} not ok; run {run_id}{stored}",
        markup=False,
    )
    table = Table("metric", "value", title="both orders, chosen as A")
    for name in ("accuracy", "position_consistency", "first_position_rate", "ece",
                 "accuracy_chosen_longer", "accuracy_chosen_shorter",
                 "accuracy_injected", "injection_flip_rate",
                 "accuracy_multi_turn", "accuracy_single_turn"):  # fmt: skip
        if name not in summary:  # injection / turn figures: sets with injected / multi-turn pairs
            continue
        value = summary[name]
        table.add_row(name, "n/a" if value is None else f"{value:.3f}")
    console.print(table)
    for group in ("by_principle", "by_subset"):
        if summary[group]:
            table = Table(group.removeprefix("by_"), "accuracy", "n")
            for key, figure in summary[group].items():
                table.add_row(key, f"{figure['accuracy']:.3f}", str(figure["n"]))
            console.print(table)
    if summary["by_length"]:  # a judge reading length: low p_chosen in one bucket, high in another
        table = Table("length (words chosen / rejected)", "accuracy", "mean p_chosen", "n")
        for key, figure in summary["by_length"].items():
            p = figure["mean_p_chosen"]
            p_chosen = "n/a" if p is None else f"{p:.3f}"
            table.add_row(key, f"{figure['accuracy']:.3f}", p_chosen, str(figure["n"]))
        console.print(table)
