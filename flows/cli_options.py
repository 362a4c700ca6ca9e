"""What the `rlaif` commands share: their options, written once, and the bad-input handler.

As in sqlite-utils, a command stacks these decorators instead of repeating an option. Two
`--store` options differ on purpose: `store_option` names a store to read (default
./rlaif-data), `store_override_option` replaces the `store:` of the command's config.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from alignment.judge_eval import PreferenceSetError
from alignment.prompts import PromptSourceError
from alignment.yaml_spec import SpecError
from flows.cli_output import fail, one_line
from storage import QueryError, StoreError

F = TypeVar("F", bound=Callable[..., Any])

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
DEFAULT_STORE = "rlaif-data"


def store_option(command: F) -> F:
    """--store: the store a command reads or looks after (default ./rlaif-data)."""
    return click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store root.")(
        command
    )


def store_override_option(
    help: str = "Store root (overrides the config's `store`).",
) -> Callable[[F], F]:
    """--store for a command run from a config: None keeps the config's `store`."""
    return click.option("--store", default=None, help=help)


def config_option(help: str, dest: str = "config_path", **settings: Any) -> Callable[[F], F]:
    """--config: the YAML a command runs from; required unless `settings` say otherwise."""
    settings = {"required": True, "type": click.Path(), **settings}
    return click.option("--config", dest, help=help, **settings)


def format_option(*choices: str, help: str = "Output format.") -> Callable[[F], F]:
    """--format: how rows are printed or written; the first choice is the default."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(list(choices)),
        default=choices[0],
        show_default=True,
        help=help,
    )


def loop_option(command: F) -> F:
    """--loop: which loop in the store (default: the latest)."""
    return click.option("--loop", "loop", default=None, help="Loop name (default: the latest).")(
        command
    )


def cache_dir_option(command: F) -> F:
    """--cache-dir: where built models are cached."""
    return click.option(
        "--cache-dir", default=None, type=click.Path(), help="Where models are cached."
    )(command)


def user_errors(command: F) -> F:
    """Turn the library's bad-input errors into one clear message and exit code 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpecError as error:
            fail(str(error))
        except (PromptSourceError, PreferenceSetError) as error:  # "file[:line]: message"
            fail(one_line(str(error)))
        except (QueryError, StoreError) as error:
            fail(f"error: {one_line(str(error))}")

    return wrapper  # type: ignore[return-value]
