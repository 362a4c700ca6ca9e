"""The judge scored on a labelled preference set: `rlaif judge eval`, and the loop's audit.

One stage of the usual shape. A measurement's run id hashes everything that decides
the numbers: the judge model and its settings, the data set's bytes, the pairs used and
the principle texts. When its rows are stored they are read back and no model is
loaded; otherwise every pair is judged in one batch and all metrics are written as one
shard, so a run's rows are all there or none are. A loop's audit of iteration k records
the same figures again under its own run (loop, iteration), so each iteration has its
audit rows while an unchanged judge is measured once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.asking import template_fingerprint
from alignment.constitution import load_constitution
from alignment.ids import content_id
from alignment.judge import judge_comparisons
from alignment.judge_config import JudgeConfig, model_mode
from alignment.judge_eval import (
    GoldPair,
    injected_comparisons,
    load_preference_set,
    preference_set_id,
    to_comparisons,
)
from alignment.judge_metrics import JudgeMetrics, judge_metrics
from flows.config import PipelineConfig
from flows.models import make_backend, model_ref
from storage import Store

TABLE = "judge_evals"


@dataclass(frozen=True)
class JudgeEvalResult:
    run_id: str
    judge_model: str
    mode: str
    dataset: str  # the source as given, e.g. "builtin" or a path
    dataset_id: str
    metrics: JudgeMetrics
    reused: bool  # read back from the store: the judge was not asked again


def judge_settings(config: PipelineConfig, mode: str | None = None) -> JudgeConfig:
    """The config's judge settings, ``mode`` (when given) replacing judge.mode, validated."""
    if mode is None:
        return config.judge
    return JudgeConfig.model_validate({**config.judge.model_dump(), "mode": mode})


def evaluate_judge(
    config: PipelineConfig,
    source: str,
    *,
    mode: str | None = None,
    limit: int | None = None,
    loop: str | None = None,
    iteration: int | None = None,
) -> JudgeEvalResult:
    """Judge every pair of ``source`` (chosen as A, both orders) and store the metrics.
    A pair with an injected variant is judged against it too (injection_flip_rate).

    The judge is ``config.judge_model`` (else the policy) with ``config.judge``'s
    settings. Bad data raises PreferenceSetError, and a bad mode a ValidationError,
    before the store or a model is touched.
    """
    constitution = load_constitution(config.constitution)
    pairs = load_preference_set(source, limit, constitution=constitution)
    comparisons = to_comparisons(pairs)
    injected = injected_comparisons(pairs)  # judged in the same batch, after the clean ones
    judge_config = judge_settings(config, mode)
    model = config.judge_model or config.policy
    judge_model = model_ref(model).name
    settings = judge_config.model_dump(mode="json")
    # The wording the judge is asked in decides its answers as much as its settings do.
    templates = template_fingerprint(model_mode(False, judge_config), False, judge_config)
    judge_config_id = content_id("judge-config", judge_model, settings, templates)
    dataset_id = preference_set_id(source)
    # The measurement depends on the judge and the data only; a loop's audit of an
    # unchanged judge reuses it and records a copy under its own iteration.
    measurement_id = content_id(
        "judge-eval", judge_config_id, dataset_id, len(pairs), _principles(pairs)
    )
    run_id = (
        measurement_id
        if loop is None
        else content_id("judge-audit", measurement_id, loop, iteration)
    )
    store = Store(config.store)
    metrics = _stored_metrics(store, measurement_id)
    reused = metrics is not None
    if metrics is None:
        backend = make_backend(model, config.seed)
        labels = judge_comparisons(backend, comparisons + injected, judge_config)
        metrics = judge_metrics(pairs, labels[: len(pairs)], labels[len(pairs) :])
        measured = JudgeEvalResult(
            measurement_id, judge_model, judge_config.mode, source, dataset_id, metrics, False
        )
        store.write(TABLE, _rows(measured, judge_config_id, settings, None, None), measurement_id)
    result = JudgeEvalResult(
        run_id, judge_model, judge_config.mode, source, dataset_id, metrics, reused
    )
    if run_id != measurement_id and _stored_metrics(store, run_id) is None:
        store.write(TABLE, _rows(result, judge_config_id, settings, loop, iteration), run_id)
    return result


def _rows(
    result: JudgeEvalResult,
    judge_config_id: str,
    settings: dict[str, Any],
    loop: str | None,
    iteration: int | None,
) -> list[dict[str, Any]]:
    """One `judge_evals` row per metric; all share one creation time."""
    created = datetime.now(UTC)
    return [
        {
            "judge_eval_id": _row_id(result.run_id, metric),
            "run_id": result.run_id,
            "judge_model": result.judge_model,
            "judge_config_id": judge_config_id,
            "mode": result.mode,
            "dataset": result.dataset,
            "dataset_id": result.dataset_id,
            "metric": metric,
            "value": value,
            "n": n,
            "judge_config": settings,
            "iteration": iteration,
            "loop": loop,
            "created_at": created,
        }
        for metric, (value, n) in result.metrics.flat().items()
    ]


def _principles(pairs: list[GoldPair]) -> list[tuple[str, str]]:
    """The (id, text) of each principle the pairs are judged by: a row may name a
    constitution's principle by id, and editing that principle changes the audit."""
    return sorted({(p.principle.id, p.principle.text) for p in pairs})


def _row_id(run_id: str, metric: str) -> str:
    return content_id("judge-eval-metric", run_id, metric)


def _stored_metrics(store: Store, run_id: str) -> JudgeMetrics | None:
    """The run's metrics when they are stored. They are written as one shard, so the
    `accuracy` row, which every run has, stands for all of them."""
    if not store.existing_keys(TABLE, [_row_id(run_id, "accuracy")]):
        return None
    rows = store.query(f"SELECT metric, value, n FROM {TABLE} WHERE run_id = ?", [run_id])
    return JudgeMetrics.from_flat({r["metric"]: (r["value"], r["n"]) for r in rows})


@task(cache_policy=NO_CACHE)
def audit_judge(
    config: PipelineConfig, source: str, limit: int | None, loop: str, iteration: int
) -> dict[str, tuple[float, int]]:
    """The loop's judge audit of one iteration: {"judge/<metric>": (value, n)}, the names
    the gates read (e.g. judge/accuracy for min_judge_accuracy)."""
    result = evaluate_judge(config, source, limit=limit, loop=loop, iteration=iteration)
    m = result.metrics
    get_run_logger().info(
        "judge %s (%s) on %s: accuracy %.3f, position consistency %.3f, n=%d%s",
        result.judge_model, result.mode, source, m.accuracy, m.position_consistency, m.n,
        " (stored)" if result.reused else "",
    )  # fmt: skip
    return {f"judge/{name}": figure for name, figure in m.flat().items()}
