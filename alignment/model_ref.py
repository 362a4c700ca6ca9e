"""One model, named the same way everywhere: ``ModelRef``, and the recipes of model ids.

A model has two names that matter: ``name``, the one hashed into every response,
critique, judgment, run and eval id (``tiny-0123456789ab``, ``policy@<12 hex>``, a
registered model's id), and ``location``, what the engine and the trainer load (a
folder or a hub id). The flows make a ``ModelRef`` in one place (``flows/models.py``)
and pass it on; nothing here reads a file or the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignment.ids import content_id


@dataclass(frozen=True)
class ModelRef:
    """Which model: the name ids use, what is loaded, and the registered id if any."""

    name: str  # the name in lineage and ids, e.g. tiny-0123456789ab, policy@<12 hex>
    location: str  # the folder or hub id the engine and the trainer load
    content_id: str | None = None  # the store's model_id of a registered (trained) model
    dtype: str = "auto"  # the weights dtype the engine is asked for
    chat_template: str | None = None  # a template replacing the tokenizer's own


def folder_id(files: Sequence[tuple[str, int, str]]) -> str:
    """32 hex of a model folder's content: each identity file's (name, size, sha256)."""
    return content_id("model-folder", [list(entry) for entry in files])


def trained_model_id(
    stage: str,
    base_name: str,
    row_ids: Sequence[str],
    reward: str | None,
    settings: dict[str, Any],
    world_size: int = 1,
) -> str:
    """A trained model's id: its stage, starting model, the exact rows it saw (sorted),
    the reward model it learnt from and its settings. Batch sizes are per process, so N
    processes train another model; one process keeps the ids of models registered
    before the option existed, as ``use_qlora: false`` does (ID_NEUTRAL_DEFAULTS)."""
    scale = [{"world_size": world_size}] if world_size > 1 else []
    kept = {k: v for k, v in settings.items() if ID_NEUTRAL_DEFAULTS.get(k, object()) != v}
    return content_id("model", stage, base_name, sorted(row_ids), reward, kept, *scale)


# Settings added after models were registered, left out of the id at their default so
# those models keep their ids.
ID_NEUTRAL_DEFAULTS: dict[str, Any] = {"use_qlora": False}
