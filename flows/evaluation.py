"""Evaluate a candidate policy against a baseline on the eval split; write `evals` rows.

Both models answer the same held-out prompts. A model's eval response to a prompt
has a content id (prompt, model, sampling settings), so a model evaluated again,
e.g. a candidate against the incumbent and then against the starting model, reads
its stored answers instead of sampling them again. Sampling and judging are the
pipeline's own stages; the eval run's rows (``run_rows``) and its ``evals`` rows
trace a win rate to the exact comparisons behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.backends import Completion, SamplingConfig
from alignment.constitution import load_constitution
from alignment.conversation import Prompt, as_chat
from alignment.evaluation import (
    Metric,
    degenerate_rates,
    eval_metric_id,
    eval_run_id,
    kl_metrics,
    kl_to_baseline,
    lc_win_rate,
    mean_metric,
    violation_rates,
    win_rate,
)
from alignment.gates import ORDER_FREE_MODES
from alignment.judge import Candidate
from alignment.model_ref import ModelRef
from alignment.promotion import ALPHA, paired_metrics
from alignment.prompts import load_prompts
from alignment.training.reward import RewardScorer
from flows.config import PipelineConfig
from flows.models import model_ref, registered_ref
from flows.stages import judge_model, judge_stage, prompt_rows, sample_stage, store_prompt_rows
from storage import Store


def _eval_sampling(config: PipelineConfig) -> SamplingConfig:
    """One answer per prompt at the eval's temperature (max_prompts is not part of it)."""
    return SamplingConfig(
        n=1, temperature=config.eval.temperature, max_tokens=config.eval.max_tokens,
        seed=config.seed,
    )  # fmt: skip


def _answers(
    config: PipelineConfig,
    store: Store,
    run_id: str,
    model: ModelRef,
    prompts: dict[str, Prompt],
) -> tuple[list[str], list[Completion]]:
    """(response ids, responses) of ``model`` to every prompt, by the pipeline's
    sampling stage: stored answers are read back, only the missing sampled.

    A checkpoint of the policy's architecture runs on the policy's engine with its own
    weights swapped in, so evaluating a candidate starts no new engine.
    """
    if config.policy.backend != "vllm":
        raise ValueError("evaluation samples the candidate with the vllm backend")
    policy = config.policy.model_copy(update={"model": model.location, "name": model.name})
    wanted, _ = sample_stage(store, run_id, policy, prompts, _eval_sampling(config))
    ids = [wanted[pid][0] for pid in prompts]
    rows = {
        r["response_id"]: r
        for r in store.query(
            "SELECT response_id, text, finish_reason, num_tokens FROM responses "
            "WHERE response_id IN (SELECT unnest(?))",
            [ids],
        )
    }
    return ids, [
        Completion(rows[i]["text"], rows[i]["finish_reason"], rows[i]["num_tokens"]) for i in ids
    ]


@dataclass(frozen=True)
class EvalResult:
    run_id: str  # the eval's own run: its prompts, responses, judgments and evals rows
    metrics: list[Metric]


@task(cache_policy=NO_CACHE)
def evaluate_candidate(
    config: PipelineConfig,
    candidate: ModelRef,
    baseline: ModelRef,
    reward_model: ModelRef | None = None,
) -> EvalResult:
    logger = get_run_logger()
    store = Store(config.store)
    constitution = load_constitution(config.constitution)
    settings = config.identity() | {"eval": config.eval.model_dump(mode="json")}
    run_id = eval_run_id(candidate.name, baseline.name, settings, constitution.constitution_id)
    source = load_prompts(config.prompts.source, eval_fraction=config.prompts.eval_fraction)
    held_out = [p for p in source if p.split == "eval"][: config.eval.max_prompts]
    rows = prompt_rows(held_out, run_id)
    store_prompt_rows(store, run_id, rows)
    prompts = {p.prompt_id: p.prompt for p in held_out}  # texts or conversations
    prompt_ids, texts = list(prompts), list(prompts.values())
    cand_ids, cand = _answers(config, store, run_id, candidate, prompts)
    base_ids, base = _answers(config, store, run_id, baseline, prompts)

    # Judge: the candidate is always side A; both orders are asked by the judge itself.
    pairs = {
        pid: [
            Candidate(cand_ids[i], pid, texts[i], cand[i].text),
            Candidate(base_ids[i], pid, texts[i], base[i].text),
        ]
        for i, pid in enumerate(prompt_ids)
    }
    judge_config = config.judge.model_copy(update={"pair_strategy": "all_pairs"})
    judgments, _ = judge_stage(
        store, run_id, judge_model(config), config.seed, constitution, pairs, judge_config
    )

    cand_texts, base_texts = [c.text for c in cand], [c.text for c in base]
    lengths = dict(zip(cand_ids + base_ids, [c.num_tokens for c in cand + base], strict=True))
    stopped = [c.finish_reason == "stop" for c in cand]
    kls = kl_to_baseline(
        candidate.location, baseline.location, texts, cand_texts, stopped, config.eval.temperature
    )
    min_words = config.eval.min_words
    metrics = [
        *win_rate(judgments, config.eval.confidence, seed=config.seed),
        *lc_win_rate(judgments, lengths, config.eval.confidence, seed=config.seed),
        # the sign test at the loop's promotion α (alignment/promotion.py), and whether
        # the judge has an option order for judge_position_consistency to be about
        *paired_metrics(judgments, config.loop.gates.promotion_alpha or ALPHA),
        Metric("judge/order_free", float(config.judge.mode in ORDER_FREE_MODES), len(judgments)),
        *violation_rates(constitution, cand_texts, prompts=texts),
        *violation_rates(constitution, base_texts, prefix="baseline/", prompts=texts),
        *degenerate_rates(cand_texts, [c.finish_reason for c in cand], min_words),
        *degenerate_rates(base_texts, [c.finish_reason for c in base], min_words, "baseline/"),
        *mean_metric("length", [c.num_tokens for c in cand]),
        *mean_metric("baseline/length", [c.num_tokens for c in base]),
        *kl_metrics(kls),
        *_reward_scores(reward_model, texts, cand_texts, base_texts),
    ]
    store.write(
        "evals",
        [
            {
                "eval_id": eval_metric_id(run_id, m.metric),
                "model_id": candidate.content_id or candidate.name,
                "baseline_model_id": baseline.content_id or baseline.name,
                "metric": m.metric,
                "value": m.value,
                "n": m.n,
                "ci_low": m.ci_low,
                "ci_high": m.ci_high,
                "run_id": run_id,
            }
            for m in metrics
        ],
        run_id,
    )
    record_run(
        store, run_id, config, constitution.constitution_id, candidate.name,
        model_ref(judge_model(config)).name,
    )  # fmt: skip
    for m in metrics:
        logger.info("%s = %.4f (n=%d)", m.metric, m.value, m.n)
    return EvalResult(run_id, metrics)


def _reward_scores(
    reward_model: ModelRef | None,
    prompts: list[Prompt],
    candidate: list[str],
    baseline: list[str],
) -> list[Metric]:
    """Normalised scores of both sides by the reward model the candidate was trained
    with; none without one (another loop's reward model says nothing about this one).

    Each answer is scored as the conversation it was sampled in: the prompt's turns as
    ``sample_stage`` sent them, the answer as the assistant turn, on the chat template.
    """
    if not reward_model:
        return []
    scorer = RewardScorer(reward_model.location)
    chats = [as_chat(prompt) for prompt in prompts]
    return [
        *mean_metric("reward", scorer(chats, candidate)),
        *mean_metric("baseline/reward", scorer(chats, baseline)),
    ]


def record_run(
    store: Store, run_id: str, config: PipelineConfig, constitution_id: str, policy: str, judge: str
) -> None:
    now = datetime.now(UTC)
    row: dict[str, Any] = {
        "event_id": f"{run_id}:completed",
        "run_id": run_id,
        "iteration": config.iteration,
        "status": "completed",
        "started_at": now,
        "finished_at": now,
        "updated_at": now,
        "config": config.canonical_json(),
        "constitution_id": constitution_id,
        "policy_model": policy,
        "judge_model": judge,
    }
    store.write("runs", [row], run_id)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    config: PipelineConfig, candidate: str, baseline: str, reward_model: str | None = None
) -> list[Metric]:
    """Candidate vs baseline on the eval split: win rates (raw and length-controlled),
    check violations, degenerate output, length, KL at the sampling temperature, reward.
    Each model is 'tiny', 'smollm2', a registered model_id, a folder or a hub id."""
    store = Store(config.store)
    reward = registered_ref(store, reward_model) if reward_model else None
    return evaluate_candidate(
        config, registered_ref(store, candidate), registered_ref(store, baseline), reward
    ).metrics
