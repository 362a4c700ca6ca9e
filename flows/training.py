"""Training stages as Prefect tasks: read rows from the store, train, register the model.

A model's id is a hash of its stage, its starting model, the exact rows it saw
and its config, so asking for the same training twice finds the registered
model instead of training again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from alignment.ids import content_id
from alignment.training.dpo import train_dpo
from alignment.training.online_rl import train_online_rl
from alignment.training.ppo import PPOTrainer, reward_model_fn
from alignment.training.reward import train_reward_model
from alignment.training.sft import train_sft
from alignment.yaml_spec import load_yaml
from flows.config import TINY, StageConfigs, config_from_data
from flows.models import embedded_model_path
from flows.training_rows import DataFilter, preference_rows, sft_rows
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
    pairs: list[str] = Field(
        default_factory=list, description="Only these pair ids (the loop passes its run's)."
    )

    def as_filter(self) -> DataFilter:
        return DataFilter(
            tuple(self.runs),
            self.iteration,
            self.split,
            self.min_p_chosen,
            tuple(self.principles),
            tuple(self.pairs),
        )


class TrainConfig(StageConfigs):
    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field("rlaif-data", description="Store root the data comes from.")
    base_model: str = Field(
        TINY,
        description="'tiny', 'smollm2', a model folder, or a model_id from the models table.",
    )
    iteration: int = Field(0, ge=0, description="Iteration the trained model belongs to.")
    data: DataConfig = Field(default_factory=DataConfig)
    reward_model: str | None = Field(
        None,
        description="Reward model for ppo, rloo and grpo: a model_id or folder; "
        "default the latest registered reward model.",
    )


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training config; every problem is reported as ``file:line: message``."""
    return config_from_data(load_yaml(path), overrides, model=TrainConfig)


def resolve_base(store: Store, base_model: str) -> tuple[str, str, str | None]:
    """(folder to load, name for lineage, parent model_id) of a starting model."""
    path = embedded_model_path(base_model)  # 'tiny' or 'smollm2'
    if path is not None:
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


@dataclass(frozen=True)
class StageRun:
    """What one stage trains from and where it saves."""

    store: Store
    config: TrainConfig
    base_path: str
    output: Path

    def rows(
        self, reader: Callable[[Store, DataFilter], list[dict[str, Any]]], split: str | None = None
    ) -> list[dict[str, Any]]:
        data = self.config.data.as_filter()
        return reader(self.store, replace(data, split=split) if split else data)

    def reward_model(self) -> str:
        return resolve_reward_model(self.store, self.config)[0]


def resolve_reward_model(store: Store, config: TrainConfig) -> tuple[str, str]:
    """(folder, identity) of the reward model an RL stage learns from: the named one,
    else the latest registered. The identity (its model_id, or the folder) goes into
    the trained model's id, so a new reward model makes a new policy."""
    name = config.reward_model
    if name:
        path, label, model_id = resolve_base(store, name)
        return path, model_id or label
    latest = store.query(
        "SELECT path, model_id FROM models WHERE stage = 'reward' ORDER BY created_at DESC "
        "LIMIT 1"
    ) if store.db_path.exists() else []  # fmt: skip
    if not latest:
        raise ValueError("no reward model registered; run `rlaif train reward` first")
    return latest[0]["path"], latest[0]["model_id"]


# Each stage: the rows it trains on, read from the store, then training on them.
Trained = tuple[Path, dict[str, Any]]


def _preference_rows(run: StageRun) -> list[dict[str, Any]]:
    return run.rows(preference_rows)


def _sft_rows(run: StageRun) -> list[dict[str, Any]]:
    return run.rows(sft_rows)


def _prompt_rows(run: StageRun) -> list[dict[str, Any]]:
    """One row per distinct prompt behind the selected pairs (the RL stages' prompts)."""
    return list({row["prompt_id"]: row for row in run.rows(preference_rows)}.values())


def _sft(run: StageRun, rows: list[dict[str, Any]]) -> Trained:
    result = train_sft(run.base_path, rows, run.config.sft, run.output)
    return result.path, result.metrics


def _reward(run: StageRun, rows: list[dict[str, Any]]) -> Trained:
    held_out = run.rows(preference_rows, split="eval") or None
    result = train_reward_model(
        run.base_path, None, rows, held_out, rows, run.config.reward, run.output
    )
    return result.path, result.metrics


def _dpo(run: StageRun, rows: list[dict[str, Any]]) -> Trained:
    held_out = run.rows(preference_rows, split="eval") or None
    result = train_dpo(run.base_path, rows, held_out, run.config.dpo, run.output)
    return result.path, result.metrics


def _ppo(run: StageRun, rows: list[dict[str, Any]]) -> Trained:
    from transformers import AutoTokenizer

    reward_path = run.reward_model()
    tokenizer = AutoTokenizer.from_pretrained(run.base_path)
    prompts = [row["prompt"][0]["content"] for row in rows]
    trainer = PPOTrainer(
        run.config.ppo, run.base_path, tokenizer, reward_model_fn(reward_path), prompts
    )
    history = trainer.train()
    path = trainer.save(run.output)
    return path, {"reward_model": reward_path, "first": history[0], "last": history[-1]}


def _online_rl(algorithm: Literal["rloo", "grpo"]) -> Callable[[StageRun, list], Trained]:
    def train(run: StageRun, rows: list[dict[str, Any]]) -> Trained:
        reward_path = run.reward_model()
        result = train_online_rl(
            algorithm, run.base_path, reward_path, rows, getattr(run.config, algorithm), run.output
        )
        return result.path, {"reward_model": reward_path, **result.metrics}

    return train


REWARD_STAGES = ("ppo", "rloo", "grpo")  # the stages that learn from a reward model
STAGES: dict[str, tuple[Callable[[StageRun], list], Callable[[StageRun, list], Trained]]] = {
    "sft": (_sft_rows, _sft),
    "reward": (_preference_rows, _reward),
    "dpo": (_preference_rows, _dpo),
    "ppo": (_prompt_rows, _ppo),
    "rloo": (_prompt_rows, _online_rl("rloo")),
    "grpo": (_prompt_rows, _online_rl("grpo")),
}


def _row_id(row: dict[str, Any]) -> str:
    return row.get("pair_id") or row.get("critique_id") or row["prompt_id"]


def no_rows_message(config: TrainConfig, stage: str) -> str:
    filters = " ".join(
        f"{key}={value!r}" for key, value in config.data.model_dump().items() if value or value == 0
    )
    return f"no {stage} training rows in {config.store} match the data filters {filters}"


def has_training_rows(config: TrainConfig, stage: str) -> bool:
    """Whether the stage would find rows (checked before a flow starts)."""
    read_rows = STAGES[stage][0]
    return bool(read_rows(StageRun(Store(config.store), config, "", Path())))


# log_prints off: the datasets library prints bytecode listings while fingerprinting.
@task(cache_policy=NO_CACHE, log_prints=False)
def train_stage(config: TrainConfig, stage: Stage) -> str:
    """Train one stage on rows from the store and register it; returns the model_id."""
    logger = get_run_logger()
    store = Store(config.store)
    path, base_name, parent = resolve_base(store, config.base_model)
    stage_config = getattr(config, stage)
    read_rows, train = STAGES[stage]
    run = StageRun(store, config, path, Path())
    rows = read_rows(run)
    if not rows:
        raise ValueError(no_rows_message(config, stage))
    reward = resolve_reward_model(store, config)[1] if stage in REWARD_STAGES else None
    model_id = content_id(
        "model", stage, base_name, sorted(map(_row_id, rows)), reward, stage_config.model_dump()
    )
    if store.existing_keys("models", [model_id]):
        logger.info("%s model %s is already registered; nothing to train", stage, model_id)
        return model_id
    run = replace(run, output=store.root / "models" / f"{stage}-{model_id[:12]}")
    logger.info("training %s on %d rows from %s", stage, len(rows), base_name)
    saved, metrics = train(run, rows)
    _register(store, stage, model_id, saved, base_name, parent, config, stage_config, rows, metrics)
    logger.info("registered %s model %s at %s", stage, model_id, saved)
    return model_id


@flow(name="train", log_prints=True)
def train_flow(config: TrainConfig, stage: Stage) -> str:
    """Train one stage from the store's data and register the checkpoint."""
    return train_stage(config, stage)
