"""The data half of a self-improvement iteration, as a Prefect flow.

prompts → n samples per prompt (policy) → critique and revision (policy, SL-CAI)
→ pairwise judging against the constitution (judge) → preference pairs.

Each task works on one batch of prompts, calls one ``alignment`` function and
makes one ``storage`` write. Ids are content hashes and each task first asks the
store what is already there, so a rerun (after a crash, or of a finished run)
redoes only the missing batches and writes nothing twice. Phases run one after
another over all batches, so the policy engine is done before the judge needs
memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.backends import SamplingConfig
from alignment.constitution import Constitution, load_constitution
from alignment.critique import critique_and_revise
from alignment.ids import content_id
from alignment.judge import Candidate, Judgment, build_pairs, judge_prompts
from alignment.prompts import load_prompts
from alignment.synthesis import filter_synthetic, self_instruct_chats
from flows.config import PipelineConfig
from flows.models import make_backend, model_location
from storage import Store


@dataclass(frozen=True)
class Run:
    """What every task needs to know about the run it works for."""

    run_id: str
    iteration: int
    store_root: str
    constitution_id: str
    policy_model: str
    judge_model: str
    started_at: datetime

    @property
    def store(self) -> Store:
        return Store(self.store_root)


def _batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _rows_for(store: Store, table: str, column: str, keys: list[str]) -> list[dict[str, Any]]:
    if not keys:
        return []
    return store.query(f"SELECT * FROM {table} WHERE {column} IN (SELECT unnest(?))", [keys])


def response_ids(config: PipelineConfig, run: Run, prompt_ids: list[str]) -> dict[str, list[str]]:
    """The ids of this run's samples of each prompt: its policy, sampling and seed."""
    sampling = _sampling_json(config)
    return {
        pid: [content_id("response", pid, run.policy_model, sampling, i)
              for i in range(config.generation.n)]
        for pid in prompt_ids
    }  # fmt: skip


def _sampling_json(config: PipelineConfig) -> str:
    return json.dumps(config.generation.model_dump() | {"seed": config.seed}, sort_keys=True)


def _candidates(
    config: PipelineConfig, run: Run, prompt_ids: list[str]
) -> dict[str, list[Candidate]]:
    """This run's responses to each prompt (other runs may have sampled the same prompts)."""
    wanted = [rid for ids in response_ids(config, run, prompt_ids).values() for rid in ids]
    rows = run.store.query(
        "SELECT r.response_id, r.prompt_id, p.text AS prompt, r.text FROM responses r "
        "JOIN prompts p USING (prompt_id) WHERE r.response_id IN (SELECT unnest(?)) "
        "ORDER BY r.prompt_id, r.sample_index",
        [wanted],
    )
    by_prompt: dict[str, list[Candidate]] = {pid: [] for pid in prompt_ids}
    for row in rows:
        by_prompt[row["prompt_id"]].append(Candidate(**row))
    return by_prompt


def _judgments_of(config: PipelineConfig, run: Run, prompt_ids: list[str]) -> list[dict]:
    """Stored judgments of this run's responses by this run's judge and constitution."""
    wanted = [rid for ids in response_ids(config, run, prompt_ids).values() for rid in ids]
    return run.store.query(
        "SELECT * EXCLUDE (run_id) FROM judgments WHERE response_a_id IN (SELECT unnest(?)) "
        "AND constitution_id = ? AND judge_model = ? ORDER BY judgment_id",
        [wanted, run.constitution_id, run.judge_model],
    )


def _write_logged(run: Run, table: str, rows: list[dict[str, Any]], what: str) -> int:
    result = run.store.write(table, rows, run.run_id)
    get_run_logger().info(
        "%s: %d new rows (%d already stored) from %s", table, result.written, result.skipped, what
    )
    return result.written


# --- Tasks ------------------------------------------------------------------------------


def describe_run(config: PipelineConfig, constitution: Constitution) -> Run:
    """The run a config makes: its id is a hash of the settings that decide its data."""
    policy_name = model_location(config.policy)[1]
    judge_name = model_location(config.judge_model)[1] if config.judge_model else policy_name
    settings = config.identity()
    run_id = content_id("run", settings, constitution.constitution_id, policy_name, judge_name)
    store_root = str(Store(config.store).root)
    return Run(
        run_id,
        config.iteration,
        store_root,
        constitution.constitution_id,
        policy_name,
        judge_name,
        datetime.now(UTC),
    )


def run_pair_ids(config: PipelineConfig, limit: int | None = None) -> list[str]:
    """The train pairs of the run a config makes: judged comparisons of its own samples.

    Found by the ids of its samples, not by run_id: a row that another run stored first
    (the same samples of the same policy, judged the same way) belongs to this run too.
    With ``limit``, the most confident pairs of each principle in turn, so a principle
    decided by checks (p = 1) cannot crowd out the model-judged ones.
    """
    run = describe_run(config, load_constitution(config.constitution))
    seeds = [row["prompt_id"] for row in _prompt_rows(config, run) if row["split"] == "train"]
    synthetic = _synthetic_prompt_ids(run)
    samples = [rid for ids in response_ids(config, run, seeds + synthetic).values() for rid in ids]
    rows = run.store.query(
        "SELECT pair_id FROM preference_pairs WHERE chosen_response_id IN (SELECT unnest(?)) "
        "AND judge_model = ? AND constitution_id = ? ORDER BY row_number() OVER "
        "(PARTITION BY principle_ids[1] ORDER BY p_chosen DESC, pair_id), pair_id",
        [samples, run.judge_model, run.constitution_id],
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
                "policy_model": run.policy_model,
                "judge_model": run.judge_model,
            }
        ],
        run.run_id,
    )


@task(cache_policy=NO_CACHE)
def store_prompts(config: PipelineConfig, run: Run) -> list[str]:
    """Load the prompt set, store it, and return the ids of the training prompts."""
    rows = _prompt_rows(config, run)
    run.store.write("prompts", rows, run.run_id)
    return [row["prompt_id"] for row in rows if row["split"] == "train"]


def _prompt_rows(config: PipelineConfig, run: Run) -> list[dict[str, Any]]:
    prompts = load_prompts(
        config.prompts.source,
        limit=config.prompts.limit,
        eval_fraction=config.prompts.eval_fraction,
    )
    return [
        {
            "prompt_id": content_id("prompt", p.text),
            "run_id": run.run_id,
            "text": p.text,
            "source": p.source,
            "split": p.split,
            "category": p.category,
        }
        for p in prompts
    ]


def _synthetic_prompt_ids(run: Run) -> list[str]:
    """The run's self-instruct prompts: new texts by construction, so stored under this run."""
    if not run.store.db_path.exists():
        return []
    rows = run.store.query(
        "SELECT prompt_id FROM prompts WHERE run_id = ? AND source = 'synthetic' "
        "ORDER BY prompt_id",
        [run.run_id],
    )
    return [row["prompt_id"] for row in rows]


@task(cache_policy=NO_CACHE)
def synthesize_prompts(config: PipelineConfig, run: Run) -> list[str]:
    """Self-instruct: the policy writes new train prompts from seed examples (once per run)."""
    stored = _synthetic_prompt_ids(run)
    if stored:  # written in one shard, so a stored set is a whole set
        return stored
    source = load_prompts(config.prompts.source, eval_fraction=config.prompts.eval_fraction)
    seeds = [p.text for p in source if p.split == "train"]
    chats = self_instruct_chats(
        seeds, config.prompts.synthetic, config.prompts.synthetic_shots, config.seed
    )
    sampling = SamplingConfig(
        n=1,
        temperature=config.generation.temperature,
        top_p=config.generation.top_p,
        max_tokens=config.generation.max_tokens,
        seed=config.seed,
    )
    backend = make_backend(config.policy, config.seed)
    generated = [c[0].text for c in backend.generate(chats, sampling)]
    # Compared with every prompt, eval ones included: none may leak into training.
    known = [row["text"] for row in run.store.query("SELECT text FROM prompts")]
    result = filter_synthetic(generated, [*(p.text for p in source), *known])
    rows = [
        {
            "prompt_id": content_id("prompt", text),
            "run_id": run.run_id,
            "text": text,
            "source": "synthetic",
            "split": "train",
            "category": "synthetic",
        }
        for text in result.kept
    ]
    dropped = ", ".join(f"{k}={v}" for k, v in result.dropped.items()) or "none"
    _write_logged(run, "prompts", rows, f"{len(chats)} self-instruct chats, dropped: {dropped}")
    return [row["prompt_id"] for row in rows]


@task(cache_policy=NO_CACHE)
def sample_responses(config: PipelineConfig, run: Run, prompt_ids: list[str]) -> int:
    """n samples per prompt from the policy; prompts that have all of theirs are skipped."""
    gen = config.generation
    sampling = SamplingConfig(
        n=gen.n,
        temperature=gen.temperature,
        top_p=gen.top_p,
        max_tokens=gen.max_tokens,
        seed=config.seed,
    )
    sampling_json = _sampling_json(config)
    wanted = response_ids(config, run, prompt_ids)
    stored = run.store.existing_keys("responses", [r for ids in wanted.values() for r in ids])
    todo = [pid for pid, ids in wanted.items() if not set(ids) <= stored]
    if not todo:
        return 0
    texts = {
        row["prompt_id"]: row["text"] for row in _rows_for(run.store, "prompts", "prompt_id", todo)
    }
    backend = make_backend(config.policy, config.seed)
    completions = backend.generate(
        [[{"role": "user", "content": texts[p]}] for p in todo], sampling
    )
    rows = [
        {
            "response_id": wanted[pid][i],
            "prompt_id": pid,
            "run_id": run.run_id,
            "model": run.policy_model,
            "text": c.text.strip(),
            "sample_index": i,
            "finish_reason": c.finish_reason,
            "num_tokens": c.num_tokens,
            "sampling": sampling_json,
        }
        for pid, samples in zip(todo, completions, strict=True)
        for i, c in enumerate(samples)
    ]
    return _write_logged(run, "responses", rows, f"{len(todo)} prompts")


@task(cache_policy=NO_CACHE)
def critique_responses(
    config: PipelineConfig, run: Run, constitution: Constitution, prompt_ids: list[str]
) -> int:
    """SL-CAI critique and revision by the policy, for responses not yet critiqued."""
    candidates = [c for cs in _candidates(config, run, prompt_ids).values() for c in cs]
    done = {
        row["response_id"]
        for row in run.store.query(
            "SELECT DISTINCT response_id FROM critiques WHERE response_id IN (SELECT unnest(?)) "
            "AND constitution_id = ? AND model = ?",
            [[c.response_id for c in candidates], run.constitution_id, run.policy_model],
        )
    }
    todo = [c for c in candidates if c.response_id not in done]
    if not todo:
        return 0
    backend = make_backend(config.policy, config.seed)
    records = critique_and_revise(backend, constitution, todo, config.critique)
    rows = [r.to_row() | {"run_id": run.run_id} for r in records]
    return _write_logged(run, "critiques", rows, f"{len(todo)} responses")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 15])
def judge_responses(
    config: PipelineConfig, run: Run, constitution: Constitution, prompt_ids: list[str]
) -> int:
    """Judge every prompt of the batch whose responses have no judgments by this judge yet.

    A prompt's judgments are written in one shard, so a judged prompt is wholly judged.
    """
    judged = {row["prompt_id"] for row in _judgments_of(config, run, prompt_ids)}
    todo = [pid for pid in prompt_ids if pid not in judged]
    if not todo:
        return 0
    backend = make_backend(config.judge_model or config.policy, config.seed)
    judgments = judge_prompts(backend, constitution, _candidates(config, run, todo), config.judge)
    rows = [j.to_row() | {"run_id": run.run_id} for j in judgments]
    return _write_logged(run, "judgments", rows, f"{len(todo)} prompts")


@task(cache_policy=NO_CACHE)
def store_pairs(config: PipelineConfig, run: Run, prompt_ids: list[str]) -> int:
    """Turn the batch's judgments into preference pairs (dropping ties and low confidence)."""
    judgments = [Judgment(**row) for row in _judgments_of(config, run, prompt_ids)]
    outcome = build_pairs(judgments, _candidates(config, run, prompt_ids), config.judge)
    splits = {
        row["prompt_id"]: row["split"]
        for row in _rows_for(run.store, "prompts", "prompt_id", prompt_ids)
    }
    pair_rows = [
        pair.to_row()
        | {
            "policy_model": run.policy_model,
            "run_id": run.run_id,
            "iteration": run.iteration,
            "split": splits[pair.prompt_id],
        }
        for pair in outcome.pairs
    ]
    dropped = ", ".join(f"{k}={v}" for k, v in outcome.dropped.items() if v)
    return _write_logged(run, "preference_pairs", pair_rows, f"dropped: {dropped or 'none'}")


@task(cache_policy=NO_CACHE)
def finish_run(config: PipelineConfig, run: Run) -> None:
    completed = run.store.existing_keys("runs", [f"{run.run_id}:completed"])
    if not completed:
        write_run_event(run, config, "completed")


# --- Flow -------------------------------------------------------------------------------


@flow(name="collect-preferences", log_prints=True)
def collect_preferences(config: PipelineConfig) -> str:
    """Prompts → samples → critiques → judgments → preference pairs; returns the run id."""
    logger = get_run_logger()
    constitution = load_constitution(config.constitution)  # refused before any work
    run = start_run(config, constitution)
    prompt_ids = store_prompts(config, run)
    if config.prompts.synthetic:
        prompt_ids += synthesize_prompts(config, run)
    batches = _batches(prompt_ids, config.batch_size)
    logger.info(
        "run %s: %d batches of up to %d prompts", run.run_id, len(batches), config.batch_size
    )

    # Sample
    for batch in batches:
        sample_responses(config, run, batch)
    # Critique and revise
    if config.critique.enabled:
        for batch in batches:
            critique_responses(config, run, constitution, batch)
    # Judge
    for batch in batches:
        judge_responses(config, run, constitution, batch)
    # Pairs
    for batch in batches:
        store_pairs(config, run, batch)
    finish_run(config, run)
    return run.run_id
