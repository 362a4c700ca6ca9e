"""The data half of a self-improvement iteration, as a Prefect flow.

prompts → n samples per prompt (policy) → critique and revision (policy, SL-CAI)
→ pairwise judging against the constitution (judge) → preference pairs.

The stages are in ``flows/stages.py``, each in one shape: the ids it expects → the
ones already stored → one ``alignment`` call for the missing ones → one write. This
flow only sequences them. Phases run one after another over all batches, so the
policy engine is done before the judge needs memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.constitution import Constitution, load_constitution
from alignment.ids import collection_run_id
from flows.config import PipelineConfig
from flows.models import model_ref
from flows.stages import (
    Run,
    StageCount,
    _batches,
    _rows_for,
    critique_responses,
    judge_model,
    judge_responses,
    sample_responses,
    store_pairs,
    store_prompts,
    synthesize_prompts,
)
from storage import Store


def describe_run(config: PipelineConfig, constitution: Constitution) -> Run:
    """The run a config makes: its id is a hash of the settings that decide its data."""
    policy = model_ref(config.policy)
    judge = model_ref(judge_model(config))
    settings = config.identity()
    run_id = collection_run_id(settings, constitution.constitution_id, policy.name, judge.name)
    store_root = str(Store(config.store).root)
    return Run(
        run_id,
        config.iteration,
        store_root,
        constitution.constitution_id,
        policy,
        judge,
        datetime.now(UTC),
    )


def run_pair_ids(config: PipelineConfig, limit: int | None = None) -> list[str]:
    """The train pairs of the run a config makes: the pairs its ids expect.

    A pair that another run stored first (the same judgment under the same thresholds)
    belongs to this run too; a pair of the same samples under a lower ``min_confidence``
    does not. With ``limit``, the most confident pairs of each principle in turn, so a
    principle decided by checks (p = 1) cannot crowd out the model-judged ones.
    """
    run = describe_run(config, load_constitution(config.constitution))
    rows = run.store.query(
        "SELECT pair_id FROM preference_pairs WHERE split = 'train' AND pair_id IN "
        "(SELECT row_id FROM run_rows WHERE run_id = ? AND table_name = 'preference_pairs') "
        "ORDER BY row_number() OVER "
        "(PARTITION BY principle_ids[1] ORDER BY p_chosen DESC, pair_id), pair_id",
        [run.run_id],
    )
    chosen = [row["pair_id"] for row in rows][:limit]
    return sorted(chosen)


@task(cache_policy=NO_CACHE)
def start_run(config: PipelineConfig, constitution: Constitution) -> Run:
    """Record the run and its constitution."""
    run = describe_run(config, constitution)
    store, run_id = run.store, run.run_id
    previous = _rows_for(store, "runs", "run_id", [run_id]) if store.db_path.exists() else []
    if previous:
        run = replace(run, started_at=previous[0]["started_at"])
    store.write(
        "constitutions",
        [
            {
                "constitution_id": constitution.constitution_id,
                "name": constitution.name,
                "version": constitution.version,
                "content": constitution.content,
                "path": constitution.path,
            }
        ],
        run_id,
    )
    if not previous:
        write_run_event(run, config, "running")
    return run


def write_run_event(run: Run, config: PipelineConfig, status: str) -> None:
    now = datetime.now(UTC)
    run.store.write(
        "runs",
        [
            {
                "event_id": f"{run.run_id}:{status}",
                "run_id": run.run_id,
                "iteration": run.iteration,
                "status": status,
                "started_at": run.started_at,
                "finished_at": now if status != "running" else None,
                "updated_at": now,
                "config": config.canonical_json(),
                "constitution_id": run.constitution_id,
                "policy_model": run.policy.name,
                "judge_model": run.judge.name,
            }
        ],
        run.run_id,
    )


@task(cache_policy=NO_CACHE)
def finish_run(config: PipelineConfig, run: Run) -> None:
    completed = run.store.existing_keys("runs", [f"{run.run_id}:completed"])
    if not completed:
        write_run_event(run, config, "completed")


# --- Flow -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectResult:
    run_id: str
    stages: tuple[StageCount, ...]  # per stage: expected, reused, computed

    def lines(self) -> list[str]:
        return [
            f"{c.stage:<13} {c.expected:>6} expected  {c.reused:>6} reused  "
            f"{c.computed:>6} computed"
            for c in self.stages
        ]


@flow(name="collect-preferences", log_prints=True)
def collect_preferences(config: PipelineConfig) -> CollectResult:
    """Prompts → samples → critiques → judgments → preference pairs."""
    logger = get_run_logger()
    constitution = load_constitution(config.constitution)  # refused before any work
    run = start_run(config, constitution)
    prompt_ids, prompts_count = store_prompts(config, run)
    counts = [prompts_count]
    if config.prompts.synthetic:
        synthetic_ids, synthetic_count = synthesize_prompts(config, run)
        prompt_ids, counts = prompt_ids + synthetic_ids, [*counts, synthetic_count]
    batches = _batches(prompt_ids, config.batch_size)
    logger.info(
        "run %s: %d batches of up to %d prompts", run.run_id, len(batches), config.batch_size
    )

    def over_batches(stage: str, step: Callable[[list[str]], StageCount]) -> None:
        total = StageCount(stage)
        for batch in batches:
            total += step(batch)
        counts.append(total)

    over_batches("sample", lambda b: sample_responses(config, run, b))
    if config.critique.enabled:
        over_batches("critique", lambda b: critique_responses(config, run, constitution, b))
    over_batches("judge", lambda b: judge_responses(config, run, constitution, b))
    over_batches("pairs", lambda b: store_pairs(config, run, constitution, b))
    finish_run(config, run)
    result = CollectResult(run.run_id, tuple(counts))
    for line in result.lines():
        logger.info(line)
    return result
