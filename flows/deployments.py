"""The loop as Prefect deployments: served by this process, or run by a work pool's worker.

``rlaif serve`` registers one ``self-improve/<loop name>`` deployment per config, with
the config's cron schedule, and runs what is triggered in this process.
``rlaif deploy --pool P`` registers the same deployment for a process work pool, so
``prefect worker start --pool P`` runs it. Either way
``prefect deployment run 'self-improve/<name>' -p iterations=2`` works.

Paths are made absolute, so a run finds the config and the store whatever its working
directory. A deployment allows one active run: a scheduled run that would overlap a
running one is cancelled (and the store's loop claim guards against every other
way of starting a second loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType

from flows.loop import load_loop_config, self_improve

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ONE_AT_A_TIME = ConcurrencyLimitConfig(
    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
)


def deployment_settings(config_path: str | Path, store: str | None = None) -> dict[str, Any]:
    """Name, schedule and parameters of a config's deployment (the config is validated)."""
    config = load_loop_config(str(config_path), store)
    return {
        "name": config.loop.name,
        "cron": config.loop.cron,
        "parameters": {
            "config_path": str(Path(config_path).resolve()),
            "store": str(Path(config.store).resolve()),
        },
        "description": f"Self-improvement loop '{config.loop.name}' "
        f"({config.loop.method}, {config.loop.iterations} iterations per run) "
        f"on the store {Path(config.store).resolve()}",
        "concurrency_limit": ONE_AT_A_TIME,
        "tags": ["rlaif", config.loop.method],
    }


def serve_loops(config_paths: list[str], store: str | None = None) -> None:
    """Serve one deployment per config from this process until interrupted."""
    from prefect import serve

    # Imported as the module flows.loop: loading the file would put flows/ on sys.path,
    # where its modules could shadow libraries of the same name.
    deployments = [
        self_improve.to_deployment(
            **deployment_settings(path, store), entrypoint_type=EntrypointType.MODULE_PATH
        )
        for path in config_paths
    ]
    serve(*deployments, print_starting_message=True)


def deploy_to_pool(
    config_path: str, pool: str, env: dict[str, str], store: str | None = None
) -> str:
    """Register the loop for a process work pool's workers; returns the deployment id."""
    settings = deployment_settings(config_path, store)
    flow = self_improve.from_source(
        source=str(PROJECT_ROOT), entrypoint="flows/loop.py:self_improve"
    )
    deployment_id = flow.deploy(
        work_pool_name=pool,
        job_variables={"env": env, "working_dir": str(PROJECT_ROOT)},
        build=False,
        push=False,
        print_next_steps=False,
        **settings,
    )
    return str(deployment_id)
