"""Merge models named as training names them and register the result in `models`.

The stage's shape (docs/merging.md): the id the merge must end with (a hash of the merged
models' names and the settings), whether the store has it already, the merge if not, one
write. Merging the same models the same way again finds the row and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from alignment.merge import (
    LoopMergeConfig,
    MergeConfig,
    MergeError,
    check_settings,
    incumbent_merges,
    merge_models,
    merge_settings,
    merged_model_id,
)
from alignment.model_ref import ModelRef
from flows.models import registered_ref
from storage import Store


def merge_input(store: Store, name: str) -> ModelRef:
    """A model to merge: an embedded name, a registered model_id or a local folder."""
    ref = registered_ref(store, name)
    if not Path(ref.location).is_dir():
        raise MergeError(
            f"unknown model {name!r}: not an embedded model (tiny, smollm2, ...), a model_id "
            f"registered in {store.root}, or a model folder"
        )
    return ref


def merge_and_register(
    store: Store,
    models: Sequence[str],
    config: MergeConfig,
    parent: str | None = None,
    iteration: int = 0,
) -> tuple[str, bool]:
    """Merge `models` (ties: from their common `parent`) into the store's models folder and
    register it; (model_id, False) if that merge is registered already. Bad settings, an
    unknown model or models of different architectures raise MergeError before anything
    is written."""
    check_settings(config, len(models), parent is not None)
    refs = [merge_input(store, name) for name in models]
    base = merge_input(store, parent) if parent is not None else None
    names = [ref.name for ref in refs]
    model_id = merged_model_id(names, config, base.name if base else None)
    settings = merge_settings(config, len(names), base.name if base else None)
    if store.existing_keys("models", [model_id]):
        return model_id, False
    out = merge_models(
        [ref.location for ref in refs],
        store.root / "models" / f"merge-{model_id[:12]}",  # a registered model's folder name
        config,
        parent=base.location if base else None,
    )
    run_id = f"merge-{model_id[:16]}"
    row = {
        "model_id": model_id,
        "stage": "merge",
        "path": str(out),
        "base_model": refs[0].name,
        "parent_model_id": refs[0].content_id,  # as training: a model_id, or None
        "iteration": iteration,
        "metrics": {},
        "promoted": False,
        "run_id": run_id,
        "created_at": datetime.now(UTC),
        "config": {**settings, "parents": names},
    }
    store.write("models", [row], run_id)
    return model_id, True


def merge_with_incumbent(
    store: Store,
    incumbent: str,
    candidate: str,
    config: LoopMergeConfig,
    start: str,
    iteration: int,
) -> list[tuple[float, MergeConfig, str]]:
    """``loop.merge``: each merge of [incumbent, candidate] (ties: from the loop's starting
    model), registered; (the candidate's share, the settings, model_id) per merge. A merge
    registered already (a resumed iteration) is found, not merged again."""
    merges = incumbent_merges(config, incumbent_is_parent=incumbent == start)
    parent = start if config.method == "ties" else None
    pair = [incumbent, candidate]
    return [
        (weight, merge, merge_and_register(store, pair, merge, parent, iteration)[0])
        for weight, merge in merges
    ]
