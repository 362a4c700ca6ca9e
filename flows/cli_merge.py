"""`rlaif merge`, defined beside flows/cli.py (which adds it to the `rlaif` group)."""

from __future__ import annotations

import click

from flows import cli_calls as calls
from flows.cli_options import config_option, store_override_option, user_errors


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--method",
    type=click.Choice(["linear", "slerp", "ties"]),
    default=None,
    help="linear, slerp (two models) or ties (needs --parent) (default: the config's).",
)
@click.option("--weights", default=None, help="linear, ties: one per model, e.g. 0.3,0.7.")
@click.option("--t", type=click.FloatRange(0, 1), default=None, help="slerp: 0 first, 1 second.")
@click.option(
    "--density",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="ties: fraction of each task vector kept.",
)
@click.option("--parent", default=None, help="ties: the models' common parent (same forms).")
@config_option("Train YAML: store, iteration, `merge:` settings.")
@store_override_option()
@user_errors
def merge(
    models: tuple[str, ...], method: str | None, weights: str | None, t: float | None,
    density: float | None, parent: str | None, config_path: str, store: str | None,
) -> None:  # fmt: skip
    """Merge models (embedded names, model_ids, folders) and register the result in `models`.

    Weights are divided by their sum (default: equal). See docs/merging.md.

    Example: rlaif merge tiny ./my-model --method slerp --t 0.5 --config configs/train-demo.yaml
    """
    settings = {"method": method, "weights": calls.float_list(weights), "t": t, "density": density}
    model_id, merged = calls.merge(config_path, store, models, parent, settings)
    click.echo(f"merge model {model_id} {'registered' if merged else 'already registered'}")
