"""The data half of a SPIN iteration (``loop.method: spin``; docs/spin.md).

Reference answers are stored as `responses` of the model ``references-<12 hex>`` (their
prompts in `prompts`, source ``spin``), so the pairs and judgments that use them point at
stored rows. Then, each in the shape of a stage, under one run id (a hash of the settings,
the reference set and the incumbent):

1. the incumbent answers the held-out reference prompts (the eval's seed, so every
   iteration is measured alike) and the judge compares each reference with that answer:
   `judgments`, and the references' win rate in `evals` as ``spin/reference_win_rate``;
2. unless that win rate's interval includes 0.5 (the loop then stops), the incumbent
   answers the train reference prompts (a fresh seed each iteration) and each
   (reference, own answer) becomes a `preference_pairs` row, the reference chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.constitution import load_constitution
from alignment.evaluation import Metric, eval_metric_id, win_rate
from alignment.ids import content_id
from alignment.judge import Candidate
from alignment.model_ref import ModelRef
from alignment.prompts import SeedPrompt, prompt_id
from alignment.spin import (
    CRITIQUES,
    METRIC,
    Answer,
    Reference,
    load_references,
    reference_response_id,
    references_id,
    references_model,
    spin_pairs,
    split_references,
    stop_reason,
)
from flows.config import PipelineConfig
from flows.evaluation import record_run
from flows.models import model_ref
from flows.stages import (
    judge_model,
    judge_stage,
    prompt_rows,
    run_stage,
    sample_stage,
    sampling_config,
    store_prompt_rows,
)
from flows.training_rows import DataFilter, sft_rows
from storage import Store


@dataclass(frozen=True)
class SpinData:
    run_id: str
    pair_ids: list[str]
    win_rate: Metric  # the references' judged win rate against the incumbent's answers
    stop: str | None  # why the loop stops here, if it does


def spin_references(config: PipelineConfig, store: Store) -> list[Reference]:
    """The configured reference set: a file, or the store's critique revisions."""
    spin = config.loop.spin
    if spin.references != CRITIQUES:
        return load_references(spin.references, spin.eval_fraction)
    rows = sft_rows(store, DataFilter(split=None)) if store.db_path.exists() else []
    refs = split_references(
        ((r["prompt"][-1]["content"], r["completion"][-1]["content"]) for r in rows),
        spin.eval_fraction,
    )
    if not refs:
        raise ValueError(f"loop.spin.references: 'critiques', but {store.root} has no revisions")
    return refs


def _store_references(
    store: Store, run_id: str, refs: list[Reference], model: str
) -> dict[str, Answer]:
    """Each reference's prompt and answer, stored; prompt id → the reference answer."""
    prompts = [
        SeedPrompt(text=r.prompt, split=r.split, source="spin", category="spin") for r in refs
    ]
    store_prompt_rows(store, run_id, prompt_rows(prompts, run_id))
    answers = {
        prompt_id(r.prompt): Answer(
            reference_response_id(prompt_id(r.prompt), r.completion), r.completion
        )
        for r in refs
    }
    rows = {
        answer.response_id: {
            "response_id": answer.response_id,
            "prompt_id": pid,
            "run_id": run_id,
            "model": model,
            "text": answer.text,
            "sample_index": 0,
            "finish_reason": "stop",
        }
        for pid, answer in answers.items()
    }
    run_stage(
        store, run_id, "references", "responses", list(rows), lambda ids: [rows[i] for i in ids]
    )
    return answers


def _own_answers(
    config: PipelineConfig,
    store: Store,
    run_id: str,
    incumbent: ModelRef,
    prompts: dict[str, str],
    seed: int,
) -> dict[str, Answer]:
    """The incumbent's one answer to each prompt, by the pipeline's sampling stage."""
    policy = config.policy.model_copy(update={"model": incumbent.location, "name": incumbent.name})
    sampling = replace(sampling_config(config), n=1, seed=seed)
    wanted, _ = sample_stage(store, run_id, policy, prompts, sampling)
    ids = [wanted[pid][0] for pid in prompts]
    texts = {
        r["response_id"]: r["text"]
        for r in store.query(
            "SELECT response_id, text FROM responses WHERE response_id IN (SELECT unnest(?))", [ids]
        )
    }
    return {pid: Answer(wanted[pid][0], texts[wanted[pid][0]]) for pid in prompts}


@task(cache_policy=NO_CACHE)
def spin_data(config: PipelineConfig, k: int, incumbent: ModelRef) -> SpinData:
    """Iteration k's SPIN data: the references' win rate against the incumbent on held-out
    references (stored in `evals`), then, unless the loop stops, the train pairs."""
    logger = get_run_logger()
    store = Store(config.store)
    spin = config.loop.spin
    constitution = load_constitution(config.constitution)
    refs = spin_references(config, store)
    refs_id = references_id(refs)
    settings = config.identity() | {"spin": spin.model_dump(mode="json")}
    run_id = "spin-" + content_id("spin-run", settings, refs_id, incumbent.name, k)[:24]
    answers = _store_references(store, run_id, refs, references_model(refs_id))
    held_out = {prompt_id(r.prompt): r.prompt for r in refs if r.split == "eval"}
    train = {prompt_id(r.prompt): r.prompt for r in refs if r.split == "train"}
    held_out = dict(list(held_out.items())[: spin.eval_limit])
    train = dict(list(train.items())[: spin.limit])

    # 1. the judge: references (side A) against the incumbent's answers, held-out prompts
    own = _own_answers(config, store, run_id, incumbent, held_out, config.seed)
    pairs = {
        pid: [
            Candidate(answers[pid].response_id, pid, text, answers[pid].text),
            Candidate(own[pid].response_id, pid, text, own[pid].text),
        ]
        for pid, text in held_out.items()
    }
    judge_config = config.judge.model_copy(update={"pair_strategy": "all_pairs"})
    judgments, _ = judge_stage(
        store, run_id, judge_model(config), config.seed, constitution, pairs, judge_config
    )
    rate = next(
        m
        for m in win_rate(judgments, config.eval.confidence, seed=config.seed)
        if m.metric == "win_rate"
    )
    rate = Metric(METRIC, rate.value, rate.n, rate.ci_low, rate.ci_high)
    store.write(
        "evals",
        [
            {
                "eval_id": eval_metric_id(run_id, METRIC),
                "model_id": references_model(refs_id),
                "baseline_model_id": incumbent.name,
                "metric": METRIC,
                "value": rate.value,
                "n": rate.n,
                "ci_low": rate.ci_low,
                "ci_high": rate.ci_high,
                "run_id": run_id,
            }
        ],
        run_id,
    )
    judge = model_ref(judge_model(config)).name
    record_run(
        store,
        run_id,
        config.model_copy(update={"iteration": k}),
        constitution.constitution_id,
        incumbent.name,
        judge,
    )
    logger.info(
        "%s = %.3f [%.3f, %.3f] (n=%d)", METRIC, rate.value, rate.ci_low, rate.ci_high, rate.n
    )
    stop = stop_reason(rate) if spin.stop else None
    if stop:
        return SpinData(run_id, [], rate, stop)

    # 2. the pairs: each train reference chosen over the incumbent's own answer
    own = _own_answers(config, store, run_id, incumbent, train, config.seed + k)
    rows = {
        row["pair_id"]: row
        | {
            "constitution_id": constitution.constitution_id,
            "policy_model": incumbent.name,
            "judge_model": None,
            "run_id": run_id,
            "iteration": k,
        }
        for row in spin_pairs(train, {pid: answers[pid] for pid in train}, own)
    }
    run_stage(
        store, run_id, "pairs", "preference_pairs", list(rows), lambda ids: [rows[i] for i in ids]
    )
    pair_ids = sorted(rows)[: config.loop.max_pairs]
    logger.info("spin: %d pairs of %d train references", len(pair_ids), len(train))
    return SpinData(run_id, pair_ids, rate, None)
