"""Training stages as Prefect tasks: read rows from the store, train, register the model.

A model's id is a hash of its stage, its starting model, the exact rows it saw
and its config, so asking for the same training twice finds the registered
model instead of training again.

With ``nproc_per_node`` N > 1 the stage runs under torchrun (N processes on this
machine, gloo on CPU) or, with ``launcher: ray``, on N Ray Train workers of a Ray
cluster: the driver, the store's one writer, writes the job as a spec and JSONL rows in a
scratch folder under the store, launches ``alignment.training.launch`` (or
``alignment.training.ray_train``, whose workers run the same code), and registers what its
``result.json`` says once every rank reports the same final weights. Ray workers on other
nodes read and write those folders by path: the store must be on shared storage.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from alignment.merge import MergeConfig
from alignment.model_ref import ModelRef, trained_model_id
from alignment.training.launch import (
    REWARD_STAGES,
    StageJob,
    rank_digests,
    read_result,
    run_stage,
    write_spec,
)
from alignment.yaml_spec import load_yaml
from flows.config import TINY, StageConfigs, config_from_data
from flows.models import registered_ref
from flows.training_rows import DataFilter, preference_rows, sft_rows
from storage import Store

Stage = Literal["sft", "reward", "dpo", "ppo", "rloo", "grpo"]
Launcher = Literal["torchrun", "ray"]


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
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Training processes on this machine: 1 trains in this process; N > 1 "
        "runs torchrun with N processes (one per GPU, or gloo on CPU). Batch sizes are per "
        "process, so N is part of the model's id.",
    )
    launcher: Launcher = Field(
        "torchrun",
        description="How N > 1 processes start: torchrun on this machine, or Ray Train's "
        "TorchTrainer with N workers on a Ray cluster.",
    )
    ray_address: str | None = Field(
        None, description="launcher ray: the cluster (null: RAY_ADDRESS, else a local one)."
    )
    launch_timeout_s: float = Field(
        86400, gt=0, description="Longest a launched (N > 1) training may run; then stopped."
    )
    merge: MergeConfig = Field(
        default_factory=MergeConfig, description="`rlaif merge` settings (its options win)."
    )


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training config; every problem is reported as ``file:line: message``."""
    return config_from_data(load_yaml(path), overrides, model=TrainConfig)


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
    base: ModelRef,
    config: TrainConfig,
    stage_config: BaseModel,
    rows: list[dict[str, Any]],
    metrics: dict[str, Any],
    world_size: int,
) -> None:
    run_id = f"train-{model_id[:16]}"
    store.write(
        "models",
        [
            {
                "model_id": model_id,
                "stage": stage,
                "path": str(path),
                "base_model": base.name,
                "parent_model_id": base.content_id,
                "iteration": config.iteration,
                "metrics": metrics,
                "promoted": False,
                "run_id": run_id,
                "created_at": datetime.now(UTC),
                "config": stage_config.model_dump(mode="json"),
                "world_size": world_size,
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


def resolve_reward_model(store: Store, config: TrainConfig) -> tuple[str, str]:
    """(folder, identity) of the reward model an RL stage learns from: the named one,
    else the latest registered. The identity (its model_id, or the folder) goes into
    the trained model's id, so a new reward model makes a new policy."""
    name = config.reward_model
    if name:
        reward = registered_ref(store, name)
        return reward.location, reward.content_id or reward.name
    latest = store.query(
        "SELECT path, model_id FROM models WHERE stage = 'reward' ORDER BY created_at DESC "
        "LIMIT 1"
    ) if store.db_path.exists() else []  # fmt: skip
    if not latest:
        raise ValueError("no reward model registered; run `rlaif train reward` first")
    return latest[0]["path"], latest[0]["model_id"]


# Each stage: the rows it trains on, read from the store.


def _preference_rows(run: StageRun) -> list[dict[str, Any]]:
    return run.rows(preference_rows)


def _sft_rows(run: StageRun) -> list[dict[str, Any]]:
    return run.rows(sft_rows)


def _prompt_rows(run: StageRun) -> list[dict[str, Any]]:
    """One row per distinct prompt behind the selected pairs (the RL stages' prompts)."""
    return list({row["prompt_id"]: row for row in run.rows(preference_rows)}.values())


STAGES: dict[str, Callable[[StageRun], list[dict[str, Any]]]] = {
    "sft": _sft_rows,
    "reward": _preference_rows,
    "dpo": _preference_rows,
    "ppo": _prompt_rows,
    "rloo": _prompt_rows,
    "grpo": _prompt_rows,
}


def stage_job(
    run: StageRun, stage: Stage, rows: list[dict[str, Any]], reward_path: str | None
) -> StageJob:
    """What a stage trains on, without the store: reward and dpo also hold out the eval
    split's pairs (none: a fraction of the rows); reward normalises on its training rows."""
    held_out = run.rows(preference_rows, split="eval") if stage in ("reward", "dpo") else []
    return StageJob(
        stage,
        run.base_path,
        rows,
        getattr(run.config, stage).model_dump(mode="json"),
        str(run.output),
        eval_rows=held_out or None,
        reward_model=reward_path,
    )


# --- launched training (nproc_per_node > 1) ---------------------------------------------------


def launch_command(
    spec: Path, nproc: int, launcher: Launcher, ray_address: str | None = None
) -> list[str]:
    """The command that trains ``spec`` on ``nproc`` processes: torchrun on this machine, or
    Ray Train workers on the cluster at ``ray_address`` (None: RAY_ADDRESS, else local)."""
    if launcher == "ray":
        address = ["--address", ray_address] if ray_address else []
        module, size = "alignment.training.ray_train", ["--num-workers", str(nproc), *address]
    else:
        module, size = "alignment.training.launch", ["--nproc-per-node", str(nproc)]
    return [sys.executable, "-m", module, *size, str(spec)]


def launch_stage(
    job: StageJob,
    folder: Path,
    nproc: int,
    timeout_s: float,
    log: Callable[[str], None],
    launcher: Launcher = "torchrun",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Train ``job`` on ``nproc`` processes (``launch_command``) and return its result.json.

    The spec and rows go to ``folder`` (removed after success, kept for a look after a
    failure); each output line of the launch goes to ``log``.
    """
    shutil.rmtree(folder, ignore_errors=True)
    results = folder / "results"
    spec = write_spec(replace(job, results=str(results)), folder)
    lines: list[str] = []

    def logged(line: str) -> None:
        lines[:] = [*lines[-1:], line]
        log(line)

    command = launch_command(spec, nproc, launcher, ray_address)
    code = run_logged(command, timeout_s, logged)
    if code != 0:
        where = "Ray Train workers" if launcher == "ray" else "processes"
        raise RuntimeError(
            f"{job.stage} training on {nproc} {where} failed (exit {code}); "
            f"its spec, rows and partial results are in {folder}; "
            f"its last output: {' | '.join(lines) or 'none'}"
        )
    result = read_result(results)
    digests = rank_digests(results)
    if result["world_size"] != nproc or sorted(digests) != list(range(nproc)):
        raise RuntimeError(
            f"{job.stage} training asked for {nproc} processes but ran on "
            f"{result['world_size']} (ranks reporting: {sorted(digests)}); see {folder}"
        )
    if len(set(digests.values())) != 1 or "" in digests.values():
        raise RuntimeError(
            f"{job.stage} training ended with different weights on its ranks {digests} "
            f"(empty: no digest taken); nothing registered; see {folder}"
        )
    shutil.rmtree(folder)
    return result


def run_logged(command: list[str], timeout_s: float, log: Callable[[str], None]) -> int:
    """Run ``command`` with each output line sent to ``log``; its exit code. Past
    ``timeout_s``, or if the caller is interrupted, its process group (torchrun and its
    workers) is stopped: SIGTERM, then SIGKILL after 30 s."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group, led by its pid
    )

    def forward() -> None:
        for line in process.stdout:
            line = line.rstrip().rsplit("\r", 1)[-1]  # a progress bar's last state
            if line.strip():
                log(line)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"stopping {command[-1]}: still running after {timeout_s:.0f} s")
        _stop(process)
        code = process.returncode
    except BaseException:
        _stop(process)
        raise
    reader.join(timeout=10)
    return code


def _stop(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _row_id(row: dict[str, Any]) -> str:
    return row.get("pair_id") or row.get("critique_id") or row["prompt_id"]


def no_rows_message(config: TrainConfig, stage: str) -> str:
    filters = " ".join(
        f"{key}={value!r}" for key, value in config.data.model_dump().items() if value or value == 0
    )
    return f"no {stage} training rows in {config.store} match the data filters {filters}"


def has_training_rows(config: TrainConfig, stage: str) -> bool:
    """Whether the stage would find rows (checked before a flow starts)."""
    read_rows = STAGES[stage]
    return bool(read_rows(StageRun(Store(config.store), config, "", Path())))


# log_prints off: the datasets library prints bytecode listings while fingerprinting.
@task(cache_policy=NO_CACHE, log_prints=False)
def train_stage(config: TrainConfig, stage: Stage) -> str:
    """Train one stage on rows from the store and register it; returns the model_id."""
    logger = get_run_logger()
    store = Store(config.store)
    base = registered_ref(store, config.base_model)
    stage_config = getattr(config, stage)
    run = StageRun(store, config, base.location, Path())
    rows = STAGES[stage](run)
    if not rows:
        raise ValueError(no_rows_message(config, stage))
    reward_path, reward = (
        resolve_reward_model(store, config) if stage in REWARD_STAGES else (None, None)
    )
    nproc = config.nproc_per_node
    model_id = trained_model_id(
        stage, base.name, list(map(_row_id, rows)), reward, stage_config.model_dump(), nproc
    )
    if store.existing_keys("models", [model_id]):
        logger.info("%s model %s is already registered; nothing to train", stage, model_id)
        return model_id
    run = replace(run, output=store.root / "models" / f"{stage}-{model_id[:12]}")
    job = stage_job(run, stage, rows, reward_path)
    logger.info(
        "training %s on %d rows from %s, %d process(es)", stage, len(rows), base.name, nproc
    )
    if nproc == 1:
        saved, metrics, _ = run_stage(job, fingerprint=False)  # one process: nothing to compare
    else:
        folder = store.root / "launches" / f"{stage}-{model_id[:12]}"
        launch = (config.launch_timeout_s, logger.info, config.launcher, config.ray_address)
        result = launch_stage(job, folder, nproc, *launch)
        saved, metrics = Path(result["path"]), result["metrics"]
    _register(store, stage, model_id, saved, base, config, stage_config, rows, metrics, nproc)
    logger.info("registered %s model %s at %s", stage, model_id, saved)
    return model_id


@flow(name="train", log_prints=True)
def train_flow(config: TrainConfig, stage: Stage) -> str:
    """Train one stage from the store's data and register the checkpoint."""
    return train_stage(config, stage)
