"""Evaluate a candidate policy against a baseline on the eval split; write `evals` rows.

Both models answer the same held-out prompts. A model's eval response to a prompt
has a content id (prompt, model, sampling settings), so a model evaluated again,
e.g. a candidate against the incumbent and then against the starting model, reads
its stored answers instead of sampling them again. Judgments and metrics are
stored under the eval's own run id, so a win rate can be traced to the exact
comparisons behind it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.backends import Completion, SamplingConfig
from alignment.constitution import load_constitution
from alignment.evaluation import (
    Metric,
    degenerate_rates,
    kl_metrics,
    kl_to_baseline,
    lc_win_rate,
    mean_metric,
    violation_rates,
    win_rate,
)
from alignment.ids import content_id
from alignment.judge import Candidate, judge_prompts
from alignment.prompts import load_prompts
from alignment.training.reward import score
from flows.config import PipelineConfig
from flows.models import make_backend
from flows.training import resolve_base
from storage import Store


def _sample(config: PipelineConfig, path: str, name: str, prompts: Sequence[str]) -> list:
    """One response per prompt from the model at ``path``.

    A checkpoint of the policy's architecture runs on the policy's engine with its own
    weights swapped in, so evaluating a candidate starts no new engine.
    """
    if config.policy.backend != "vllm":
        raise ValueError("evaluation samples the candidate with the vllm backend")
    backend = make_backend(config.policy.model_copy(update={"model": path, "name": name}), 0)
    sampling = SamplingConfig(
        n=1,
        temperature=config.eval.temperature,
        max_tokens=config.eval.max_tokens,
        seed=config.seed,
    )
    chats = [[{"role": "user", "content": p}] for p in prompts]
    return [c[0] for c in backend.generate(chats, sampling)]


def _sampling_json(config: PipelineConfig) -> str:
    """What determines an eval sample besides prompt and model (not e.g. max_prompts)."""
    return json.dumps(
        {
            "temperature": config.eval.temperature,
            "max_tokens": config.eval.max_tokens,
            "seed": config.seed,
        },
        sort_keys=True,
    )


def _responses(
    config: PipelineConfig,
    store: Store,
    run_id: str,
    model: tuple[str, str],
    prompt_ids: list[str],
    texts: list[str],
) -> tuple[list[str], list[Completion]]:
    """(response ids, responses) of ``model`` (path, name) to every prompt: stored ones are
    read back, only the missing are sampled and written under ``run_id``."""
    path, name = model
    sampling_json = _sampling_json(config)
    ids = [content_id("response", pid, name, sampling_json, 0) for pid in prompt_ids]
    stored = store.existing_keys("responses", ids)
    missing = [i for i, rid in enumerate(ids) if rid not in stored]
    found: dict[str, Completion] = {}
    if missing:
        fresh = _sample(config, path, name, [texts[i] for i in missing])
        found |= {
            ids[i]: Completion(c.text.strip(), c.finish_reason, c.num_tokens)
            for i, c in zip(missing, fresh, strict=True)
        }
        store.write(
            "responses",
            [
                {
                    "response_id": ids[i],
                    "prompt_id": prompt_ids[i],
                    "run_id": run_id,
                    "model": name,
                    "text": found[ids[i]].text,
                    "sample_index": 0,
                    "finish_reason": found[ids[i]].finish_reason,
                    "num_tokens": found[ids[i]].num_tokens,
                    "sampling": sampling_json,
                }
                for i in missing
            ],
            run_id,
        )
    if stored:
        rows = store.query(
            "SELECT response_id, text, finish_reason, num_tokens FROM responses "
            "WHERE response_id IN (SELECT unnest(?))",
            [sorted(stored)],
        )
        found |= {
            r["response_id"]: Completion(r["text"], r["finish_reason"], r["num_tokens"])
            for r in rows
        }
    return ids, [found[rid] for rid in ids]


@dataclass(frozen=True)
class EvalResult:
    run_id: str  # the eval's own run: its prompts, responses, judgments and evals rows
    metrics: list[Metric]


@task(cache_policy=NO_CACHE)
def evaluate_candidate(
    config: PipelineConfig, candidate: str, baseline: str, reward_model: str | None = None
) -> EvalResult:
    logger = get_run_logger()
    store = Store(config.store)
    constitution = load_constitution(config.constitution)
    cand_path, cand_name, cand_id = resolve_base(store, candidate)
    base_path, base_name, base_id = resolve_base(store, baseline)
    prompts = [
        p
        for p in load_prompts(config.prompts.source, eval_fraction=config.prompts.eval_fraction)
        if p.split == "eval"
    ][: config.eval.max_prompts]
    settings = config.identity() | {"eval": config.eval.model_dump(mode="json")}
    run_id = content_id("eval", cand_name, base_name, settings, constitution.constitution_id)
    prompt_ids = [content_id("prompt", p.text) for p in prompts]
    store.write(
        "prompts",
        [
            {
                "prompt_id": pid,
                "run_id": run_id,
                "text": p.text,
                "source": p.source,
                "split": p.split,
                "category": p.category,
            }
            for pid, p in zip(prompt_ids, prompts, strict=True)
        ],
        run_id,
    )

    texts = [p.text for p in prompts]
    cand_ids, cand = _responses(config, store, run_id, (cand_path, cand_name), prompt_ids, texts)
    base_ids, base = _responses(config, store, run_id, (base_path, base_name), prompt_ids, texts)

    # Judge: the candidate is always side A; both orders are asked inside judge_prompts.
    pairs = {
        pid: [
            Candidate(cand_ids[i], pid, texts[i], cand[i].text),
            Candidate(base_ids[i], pid, texts[i], base[i].text),
        ]
        for i, pid in enumerate(prompt_ids)
    }
    judge = make_backend(config.judge_model or config.policy, config.seed)
    judge_config = config.judge.model_copy(update={"pair_strategy": "all_pairs"})
    judgments = judge_prompts(judge, constitution, pairs, judge_config)
    store.write("judgments", [j.to_row() | {"run_id": run_id} for j in judgments], run_id)

    cand_texts, base_texts = [c.text for c in cand], [c.text for c in base]
    lengths = dict(zip(cand_ids + base_ids, [c.num_tokens for c in cand + base], strict=True))
    stopped = [c.finish_reason == "stop" for c in cand]
    kls = kl_to_baseline(cand_path, base_path, texts, cand_texts, stopped, config.eval.temperature)
    min_words = config.eval.min_words
    metrics = [
        *win_rate(judgments, config.eval.confidence),
        *lc_win_rate(judgments, lengths, config.eval.confidence, seed=config.seed),
        *violation_rates(constitution, cand_texts),
        *violation_rates(constitution, base_texts, prefix="baseline/"),
        *degenerate_rates(cand_texts, [c.finish_reason for c in cand], min_words),
        *degenerate_rates(base_texts, [c.finish_reason for c in base], min_words, "baseline/"),
        *mean_metric("length", [c.num_tokens for c in cand]),
        *mean_metric("baseline/length", [c.num_tokens for c in base]),
        *kl_metrics(kls),
        *_reward_scores(store, reward_model, texts, cand_texts, base_texts),
    ]
    store.write(
        "evals",
        [
            {
                "eval_id": content_id("eval-metric", run_id, m.metric),
                "model_id": cand_id or cand_name,
                "baseline_model_id": base_id or base_name,
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
    _record_run(store, run_id, config, constitution.constitution_id, cand_name, judge.model_name)
    for m in metrics:
        logger.info("%s = %.4f (n=%d)", m.metric, m.value, m.n)
    return EvalResult(run_id, metrics)


def _reward_scores(
    store: Store,
    reward_model: str | None,
    prompts: list[str],
    candidate: list[str],
    baseline: list[str],
) -> list[Metric]:
    """Normalised reward-model scores of both sides: the named model, else the latest one."""
    if reward_model:
        path = resolve_base(store, reward_model)[0]
    else:
        latest = store.query(
            "SELECT path FROM models WHERE stage = 'reward' ORDER BY created_at DESC LIMIT 1"
        )
        if not latest:
            return []
        path = latest[0]["path"]
    return [
        *mean_metric("reward", score(path, list(zip(prompts, candidate, strict=True)))),
        *mean_metric("baseline/reward", score(path, list(zip(prompts, baseline, strict=True)))),
    ]


def _record_run(
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
    check violations, degenerate output, length, KL at the sampling temperature, reward."""
    return evaluate_candidate(config, candidate, baseline, reward_model).metrics
