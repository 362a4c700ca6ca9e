"""The stages of preference collection, each in the shape of a stage (``run_stage``).

The ids a stage expects → the ones already stored → one ``alignment`` call for the
missing ones → one write. Each id hashes every input that determines its row (the
recipes sit next to their methods in ``alignment/``), so a rerun after a crash redoes
only what is missing, and an edited principle, check or weight recomputes only the
judgments, critiques and pairs that used it. The expected ids are recorded in
``run_rows``: "a run's rows" are the rows whose ids it expects, whichever run stored
them first. ``flows/pipeline.py`` sequences these stages; the evaluation reuses the
sampling and judging ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.backends import SamplingConfig, placement
from alignment.constitution import Constitution
from alignment.conversation import Prompt, as_chat, first_turn, from_stored, messages_json
from alignment.critique import critique_and_revise, critique_ids
from alignment.ids import content_id
from alignment.judge import (
    Candidate,
    Judgment,
    Question,
    judge_questions,
    judgment_id,
    judgments_in_rounds,
)
from alignment.judge_config import JudgeConfig
from alignment.model_ref import ModelRef
from alignment.pairs import build_pairs
from alignment.prompts import SeedPrompt, load_prompts
from alignment.synthesis import filter_synthetic, self_instruct_chats
from flows.config import ModelConfig, PipelineConfig
from flows.models import make_backend, model_ref
from storage import Store
from storage.schemas import table_spec


@dataclass(frozen=True)
class Run:
    """What every task needs to know about the run it works for."""

    run_id: str
    iteration: int
    store_root: str
    constitution_id: str
    policy: ModelRef
    judge: ModelRef
    started_at: datetime

    @property
    def store(self) -> Store:
        return shared_store(self.store_root)


@functools.cache
def shared_store(root: str) -> Store:
    """One Store per root in this process, so its key index is built once and then only
    completed from the new shards, instead of read again by every task."""
    return Store(root)


def judge_model(config: PipelineConfig) -> ModelConfig:
    """The judge: the configured judge model, else the policy itself."""
    return config.judge_model or config.policy


def sampling_config(config: PipelineConfig) -> SamplingConfig:
    gen = config.generation
    return SamplingConfig(
        n=gen.n,
        temperature=gen.temperature,
        top_p=gen.top_p,
        max_tokens=gen.max_tokens,
        seed=config.seed,
    )


def _batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _rows_for(store: Store, table: str, column: str, keys: list[str]) -> list[dict[str, Any]]:
    if not keys:
        return []
    return store.query(f"SELECT * FROM {table} WHERE {column} IN (SELECT unnest(?))", [keys])


# --- The shape of every stage ----------------------------------------------------------


@dataclass(frozen=True)
class StageCount:
    """What one stage expected, found already stored (reused), and computed."""

    stage: str
    expected: int = 0
    reused: int = 0
    computed: int = 0

    def __add__(self, other: StageCount) -> StageCount:
        return StageCount(
            self.stage,
            self.expected + other.expected,
            self.reused + other.reused,
            self.computed + other.computed,
        )


def run_stage(
    store: Store,
    run_id: str,
    stage: str,
    table: str,
    expected: list[str],
    compute: Callable[[list[str]], list[dict[str, Any]]],
) -> StageCount:
    """Expected ids → the ones already stored → compute only the missing → one write.

    ``compute`` gets the missing ids and returns rows covering them (rows it makes
    beyond them are already stored and skipped). The expected ids are also recorded as
    the run's rows (``run_rows``), whichever run stored them first.
    """
    expected = list(dict.fromkeys(expected))
    stored = store.existing_keys(table, expected)
    missing = [key for key in expected if key not in stored]
    with placement.recording() as batches:
        try:
            rows = compute(missing) if missing else []
        finally:  # a crashed stage's batches say where it failed
            store.write("batches", batch_rows(run_id, stage, table, batches.placements), run_id)
    made = {row[table_spec(table).key] for row in rows}
    if not_made := [key for key in missing if key not in made]:
        raise RuntimeError(f"{stage}: {len(not_made)} expected {table} rows were not computed")
    written = store.write(table, rows, run_id).written
    store.write(
        "run_rows",
        [
            {"member_id": f"{run_id}/{table}/{key}", "table_name": table, "row_id": key}
            for key in expected
        ],
        run_id,
    )
    if missing:
        get_run_logger().info(
            "%s: %d expected, %d reused, %d computed (%d written)",
            stage, len(expected), len(stored), len(missing), written,
        )  # fmt: skip
    return StageCount(stage, len(expected), len(stored), len(missing))


def batch_rows(
    run_id: str, stage: str, table: str, placements: Sequence[placement.Placement]
) -> list[dict[str, Any]]:
    """The ``batches`` rows of one stage's placements (their id hashes the whole record:
    each batch sent is an event of its own)."""
    rows = []
    for p in placements:
        record = {"run_id": run_id, "stage": stage, "table_name": table} | asdict(p)
        started_at = datetime.fromtimestamp(record.pop("started_at"), tz=timezone.utc)
        record["ran_on"] = record.pop("where")
        batch_id = content_id("batch", record, started_at.isoformat())
        rows.append({"batch_id": batch_id, **record, "started_at": started_at})
    return rows


def run_row_ids(store: Store, run_id: str, table: str) -> list[str]:
    """The ids of the rows of ``table`` that a run expects ("a run's rows")."""
    if not store.db_path.exists():
        return []
    rows = store.query(
        "SELECT row_id FROM run_rows WHERE run_id = ? AND table_name = ? ORDER BY row_id",
        [run_id, table],
    )
    return [row["row_id"] for row in rows]


# --- Sampling and judging, shared with the evaluation --------------------------------


def sample_stage(
    store: Store,
    run_id: str,
    policy: ModelConfig,
    prompts: Mapping[str, Prompt],
    sampling: SamplingConfig,
) -> tuple[dict[str, list[str]], StageCount]:
    """n samples of each prompt (id → text or conversation) from ``policy``; a prompt with
    all of its samples stored is not sampled again. Returns each prompt's sample ids."""
    name = model_ref(policy).name
    wanted = {pid: sampling.sample_ids(pid, name) for pid in prompts}
    owner = {rid: pid for pid, ids in wanted.items() for rid in ids}

    def compute(missing: list[str]) -> list[dict[str, Any]]:
        todo = list(dict.fromkeys(owner[rid] for rid in missing))
        backend = make_backend(policy, sampling.seed)
        chats = [as_chat(prompts[pid]) for pid in todo]
        return [
            {
                "response_id": wanted[pid][i],
                "prompt_id": pid,
                "run_id": run_id,
                "model": name,
                "text": c.text.strip(),
                "sample_index": i,
                "finish_reason": c.finish_reason,
                "num_tokens": c.num_tokens,
                "sampling": sampling.as_json(),
            }
            for pid, samples in zip(todo, backend.generate(chats, sampling), strict=True)
            for i, c in enumerate(samples)
        ]

    ids = [rid for pid in prompts for rid in wanted[pid]]
    return wanted, run_stage(store, run_id, "sample", "responses", ids, compute)


def _by_judgment_id(
    questions: list[Question], judge: str, config: JudgeConfig
) -> dict[str, Question]:
    return {judgment_id(q, judge, config): q for q in questions}


def judge_stage(
    store: Store,
    run_id: str,
    judge: ModelConfig,
    seed: int,
    constitution: Constitution,
    candidates: Mapping[str, Sequence[Candidate]],
    config: JudgeConfig,
) -> tuple[list[Judgment], StageCount]:
    """Judge each prompt's candidates: the first questions, then the second ones that
    best_vs_worst asks from the pointwise scores, each round in the shape of a stage.
    Returns the run's judgments, read back from the store."""
    name = model_ref(judge).name

    counts: list[StageCount] = []

    def judge_round(questions: list[Question]) -> list[Judgment]:
        by_id = _by_judgment_id(questions, name, config)

        def compute(missing: list[str]) -> list[dict[str, Any]]:
            backend = make_backend(judge, seed)
            asked = [by_id[key] for key in missing]
            judged = judge_questions(backend, asked, config, constitution.constitution_id)
            return [j.to_row() | {"run_id": run_id} for j in judged]

        counts.append(run_stage(store, run_id, "judge", "judgments", list(by_id), compute))
        return stored_judgments(store, list(by_id))

    judged = judgments_in_rounds(constitution, candidates, config, judge_round)
    return judged, counts[0] + counts[1]


def stored_judgments(store: Store, judgment_ids: list[str]) -> list[Judgment]:
    """The stored judgments with these ids, in id order."""
    fields = Judgment.__dataclass_fields__
    rows = _rows_for(store, "judgments", "judgment_id", judgment_ids)
    judged = [Judgment(**{k: v for k, v in row.items() if k in fields}) for row in rows]
    return sorted(judged, key=lambda j: j.judgment_id)


def expected_judgments(
    store: Store,
    judge: ModelRef,
    constitution: Constitution,
    candidates: Mapping[str, Sequence[Candidate]],
    config: JudgeConfig,
) -> list[Judgment]:
    """The judgments the judge stage stored for these candidates, read by the ids it
    expects (both rounds); a missing one is an error, never judged here."""

    def read(questions: list[Question]) -> list[Judgment]:
        ids = list(_by_judgment_id(questions, judge.name, config))
        found = stored_judgments(store, ids)
        if missing := len(set(ids)) - len(found):
            raise RuntimeError(f"pairs: {missing} expected judgments are not stored")
        return found

    return judgments_in_rounds(constitution, candidates, config, read)


# --- Prompts ------------------------------------------------------------------------------


def prompt_rows(prompts: Iterable[SeedPrompt], run_id: str) -> list[dict[str, Any]]:
    """Prompts as ``prompts`` rows; a prompt's id is its text's (or conversation's) hash."""
    return [
        {
            "prompt_id": p.prompt_id,
            "run_id": run_id,
            "text": p.text,
            "source": p.source,
            "split": p.split,
            "category": p.category,
            "messages": messages_json(p.prompt),
        }
        for p in prompts
    ]


def store_prompt_rows(store: Store, run_id: str, rows: list[dict]) -> StageCount:
    """Prompts are read, not computed: the stage stores the ones not yet stored."""
    by_id = {row["prompt_id"]: row for row in rows}
    return run_stage(
        store, run_id, "prompts", "prompts", list(by_id), lambda ids: [by_id[i] for i in ids]
    )


@task(cache_policy=NO_CACHE)
def store_prompts(config: PipelineConfig, run: Run) -> tuple[list[str], StageCount]:
    """Load the prompt set, store it, and return the ids of the training prompts."""
    prompts = load_prompts(
        config.prompts.source,
        limit=config.prompts.limit,
        eval_fraction=config.prompts.eval_fraction,
    )
    rows = prompt_rows(prompts, run.run_id)
    count = store_prompt_rows(run.store, run.run_id, rows)
    return [row["prompt_id"] for row in rows if row["split"] == "train"], count


def _synthetic_prompt_ids(run: Run) -> list[str]:
    """The run's self-instruct prompts, once it has made them."""
    ids = run_row_ids(run.store, run.run_id, "prompts")
    rows = _rows_for(run.store, "prompts", "prompt_id", ids)
    return sorted(row["prompt_id"] for row in rows if row["source"] == "synthetic")


@task(cache_policy=NO_CACHE)
def synthesize_prompts(config: PipelineConfig, run: Run) -> tuple[list[str], StageCount]:
    """Self-instruct: the policy writes new train prompts from seed examples (once per run).

    The one stage whose ids are not known before computing: a prompt's id is its text.
    So the stage is done once the run has recorded its synthetic prompts.
    """
    stored = _synthetic_prompt_ids(run)
    if stored:  # written in one shard, so a stored set is a whole set
        return stored, StageCount("self-instruct", len(stored), len(stored), 0)
    source = load_prompts(config.prompts.source, eval_fraction=config.prompts.eval_fraction)
    # Self-instruct writes one-turn requests: a conversation shows its opening request.
    seeds = [first_turn(p.prompt) for p in source if p.split == "train"]
    chats = self_instruct_chats(
        seeds, config.prompts.synthetic, config.prompts.synthetic_shots, config.seed
    )
    sampling = replace(sampling_config(config), n=1)
    backend = make_backend(config.policy, config.seed)
    generated = [c[0].text for c in backend.generate(chats, sampling)]
    # Compared with every seed and eval prompt: none may leak into training. Synthetic
    # prompts of other runs are not excluded: the same policy writes the same prompts.
    known = (
        [
            row["text"]
            for row in run.store.query("SELECT text FROM prompts WHERE source <> 'synthetic'")
        ]
        if run.store.db_path.exists()
        else []
    )
    opening = [first_turn(p.prompt) for p in source if p.messages is not None]
    result = filter_synthetic(generated, [*(p.text for p in source), *opening, *known])
    rows = prompt_rows(
        [
            SeedPrompt(text=text, source="synthetic", split="train", category="synthetic")
            for text in result.kept
        ],
        run.run_id,
    )
    dropped = ", ".join(f"{k}={v}" for k, v in result.dropped.items()) or "none"
    get_run_logger().info("self-instruct: %d chats, dropped: %s", len(chats), dropped)
    count = store_prompt_rows(run.store, run.run_id, rows)
    return [row["prompt_id"] for row in rows], replace(count, stage="self-instruct")


# --- Samples, critiques, judgments and pairs of a batch of prompts --------------------------


@task(cache_policy=NO_CACHE)
def sample_responses(config: PipelineConfig, run: Run, prompt_ids: list[str]) -> StageCount:
    """n samples per prompt from the policy; prompts that have all of theirs are skipped."""
    stored = {
        row["prompt_id"]: from_stored(row["text"], row["messages"])
        for row in _rows_for(run.store, "prompts", "prompt_id", prompt_ids)
    }
    prompts = {pid: stored[pid] for pid in prompt_ids}
    return sample_stage(run.store, run.run_id, config.policy, prompts, sampling_config(config))[1]


def _candidates(
    config: PipelineConfig, run: Run, prompt_ids: list[str]
) -> dict[str, list[Candidate]]:
    """This run's responses to each prompt (other runs may have sampled the same prompts)."""
    sampling = sampling_config(config)
    wanted = [rid for pid in prompt_ids for rid in sampling.sample_ids(pid, run.policy.name)]
    rows = run.store.query(
        "SELECT r.response_id, r.prompt_id, p.text AS prompt, p.messages, r.text "
        "FROM responses r JOIN prompts p USING (prompt_id) "
        "WHERE r.response_id IN (SELECT unnest(?)) ORDER BY r.prompt_id, r.sample_index",
        [wanted],
    )
    by_prompt: dict[str, list[Candidate]] = {pid: [] for pid in prompt_ids}
    for row in rows:
        prompt = from_stored(row.pop("prompt"), row.pop("messages"))
        by_prompt[row["prompt_id"]].append(Candidate(prompt=prompt, **row))
    return by_prompt


@task(cache_policy=NO_CACHE)
def critique_responses(
    config: PipelineConfig, run: Run, constitution: Constitution, prompt_ids: list[str]
) -> StageCount:
    """SL-CAI critique and revision by the policy, for responses not yet critiqued."""
    candidates = [c for cs in _candidates(config, run, prompt_ids).values() for c in cs]
    ids = {
        c.response_id: critique_ids(constitution, c, config.critique, run.policy.name)
        for c in candidates
    }
    owner = {key: c for c in candidates for key in ids[c.response_id]}

    def compute(missing: list[str]) -> list[dict[str, Any]]:
        todo = list({owner[key].response_id: owner[key] for key in missing}.values())
        backend = make_backend(config.policy, config.seed)
        records = critique_and_revise(backend, constitution, todo, config.critique)
        return [r.to_row() | {"run_id": run.run_id} for r in records]

    expected = [key for c in candidates for key in ids[c.response_id]]
    return run_stage(run.store, run.run_id, "critique", "critiques", expected, compute)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 15])
def judge_responses(
    config: PipelineConfig, run: Run, constitution: Constitution, prompt_ids: list[str]
) -> StageCount:
    """Judge the batch's candidates; judgments already stored (by any run) are reused."""
    candidates = _candidates(config, run, prompt_ids)
    return judge_stage(
        run.store, run.run_id, judge_model(config), config.seed, constitution, candidates,
        config.judge,
    )[1]  # fmt: skip


@task(cache_policy=NO_CACHE)
def store_pairs(
    config: PipelineConfig, run: Run, constitution: Constitution, prompt_ids: list[str]
) -> StageCount:
    """Turn the batch's stored judgments into preference pairs (dropping ties and low
    confidence)."""
    candidates = _candidates(config, run, prompt_ids)
    judgments = expected_judgments(run.store, run.judge, constitution, candidates, config.judge)
    outcome = build_pairs(judgments, candidates, config.judge)
    splits = {
        row["prompt_id"]: row["split"]
        for row in _rows_for(run.store, "prompts", "prompt_id", prompt_ids)
    }
    rows = {
        pair.pair_id: pair.to_row()
        | {
            "policy_model": run.policy.name,
            "run_id": run.run_id,
            "iteration": run.iteration,
            "split": splits[pair.prompt_id],
        }
        for pair in outcome.pairs
    }
    dropped = ", ".join(f"{k}={v}" for k, v in outcome.dropped.items() if v)
    get_run_logger().info("pairs: %d, dropped: %s", len(rows), dropped or "none")
    return run_stage(
        run.store, run.run_id, "pairs", "preference_pairs", list(rows),
        lambda ids: [rows[i] for i in ids],
    )  # fmt: skip
