"""Training stages as Prefect tasks: read rows from the store, train, register the model.

A model's id is a hash of its stage, its starting model, the exact rows it saw
and its config, so asking for the same training twice finds the registered
model instead of training again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from alignment.ids import content_id
from alignment.training.sft import SFTStageConfig, train_sft
from alignment.yaml_spec import load_yaml
from flows.config import TINY, config_from_data
from flows.datasets import DataFilter, preference_rows, sft_rows
from flows.models import tiny_model_path
from storage import Store

Stage = Literal["sft", "reward", "dpo", "ppo", "rloo", "grpo"]


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    runs: list[str] = Field(default_factory=list, description="Only rows of these runs.")
    iteration: int | None = Field(None, ge=0, description="Only rows of this iteration.")
    split: str | None = Field("train", description="train, eval, or null for both.")
    min_p_chosen: float | None = Field(
        None, ge=0.5, le=1.0, description="Only pairs the judge preferred at least this much."
    )
    principles: list[str] = Field(default_factory=list, description="Only these principle ids.")

    def as_filter(self) -> DataFilter:
        return DataFilter(
            tuple(self.runs), self.iteration, self.split, self.min_p_chosen, tuple(self.principles)
        )


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field("rlaif-data", description="Store root the data comes from.")
    base_model: str = Field(
        TINY, description="'tiny', a model folder, or a model_id from the models table."
    )
    iteration: int = Field(0, ge=0, description="Iteration the trained model belongs to.")
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training config; every problem is reported as ``file:line: message``."""
    return config_from_data(load_yaml(path), overrides, model=TrainConfig)


def resolve_base(store: Store, base_model: str) -> tuple[str, str, str | None]:
    """(folder to load, name for lineage, parent model_id) of a starting model."""
    if base_model == TINY:
        path = tiny_model_path()
        return str(path), path.name, None
    if store.db_path.exists():
        found = store.query("SELECT path, model_id FROM models WHERE model_id = ?", [base_model])
        if found:
            return found[0]["path"], base_model, base_model
    return base_model, base_model, None


def _lineage(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "data_runs": sorted({row["run_id"] for row in rows}),
        "examples": len(rows),
        "constitution_ids": sorted({row["constitution_id"] for row in rows}),
    }


def _register(
    store: Store,
    stage: Stage,
    model_id: str,
    path: Path,
    base_name: str,
    parent: str | None,
    config: TrainConfig,
    stage_config: BaseModel,
    rows: list[dict[str, Any]],
    metrics: dict[str, Any],
) -> None:
    run_id = f"train-{model_id[:16]}"
    store.write(
        "models",
        [
            {
                "model_id": model_id,
                "stage": stage,
                "path": str(path),
                "base_model": base_name,
                "parent_model_id": parent,
                "iteration": config.iteration,
                "metrics": metrics,
                "promoted": False,
                "run_id": run_id,
                "created_at": datetime.now(UTC),
                "config": stage_config.model_dump(mode="json"),
                **_lineage(rows),
            }
        ],
        run_id,
    )


Trainer = Callable[[str, list[dict[str, Any]], Any, Path], Any]
STAGES: dict[str, tuple[Callable[[Store, DataFilter], list[dict[str, Any]]], Trainer]] = {
    "sft": (sft_rows, train_sft),
}


@task(cache_policy=NO_CACHE)
def train_stage(config: TrainConfig, stage: Stage) -> str:
    """Train one stage on rows from the store and register it; returns the model_id."""
    logger = get_run_logger()
    store = Store(config.store)
    read_rows, train = STAGES[stage]
    rows = read_rows(store, config.data.as_filter())
    if not rows:
        raise ValueError(f"no {stage} rows in {config.store} match the data filters")
    path, base_name, parent = resolve_base(store, config.base_model)
    stage_config = getattr(config, stage)
    row_ids = sorted(row.get("pair_id") or row.get("critique_id") for row in rows)
    model_id = content_id("model", stage, base_name, row_ids, stage_config.model_dump())
    if store.existing_keys("models", [model_id]):
        logger.info("%s model %s is already registered; nothing to train", stage, model_id)
        return model_id
    output = store.root / "models" / f"{stage}-{model_id[:12]}"
    logger.info("training %s on %d rows from %s", stage, len(rows), base_name)
    result = train(path, rows, stage_config, output)
    _register(
        store,
        stage,
        model_id,
        result.path,
        base_name,
        parent,
        config,
        stage_config,
        rows,
        result.metrics,
    )
    logger.info("registered %s model %s at %s: %s", stage, model_id, result.path, result.metrics)
    return model_id


@flow(name="train", log_prints=True)
def train_flow(config: TrainConfig, stage: Stage) -> str:
    """Train one stage from the store's data and register the checkpoint."""
    return train_stage(config, stage)


__all__ = ["STAGES", "TrainConfig", "load_train_config", "preference_rows", "train_flow"]
