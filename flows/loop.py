"""The self-improvement loop: the policy makes its own preference data and learns from it.

Iteration k of a loop (a named lineage of policies in one store):

  prompts (seed + self-instruct by the incumbent) → samples → critiques → judgments
  → pairs (the collect-preferences flow) → train a candidate from the incumbent
  (DPO, or a reward model then PPO / RLOO / GRPO) → evaluate candidate vs incumbent
  (and vs the starting policy) on held-out prompts → promote it only if every gate
  passes. With ``loop.merge``, merges of the incumbent and the candidate are evaluated and
  gated alike, and the best that passes is promoted (docs/merging.md). ``loop.method:
  spin`` replaces the data half with reference answers over the incumbent's own samples
  and ends the loop once the judge cannot tell them apart (flows/spin.py, docs/spin.md).
  Each iteration first audits the judge on a fixed gold set, so the win-rate gates can
  refuse to trust a judge that is no better than chance.

The judge stays the starting model (or the configured judge_model) for every
iteration, so its verdicts are comparable across iterations. Checkpoints of one
architecture share one vLLM engine: the promoted policy's weights are swapped in
place, no restart.

A run of the loop is a session of ``iterations`` new iterations, recorded in `runs`
as ``loop-<name>-<first iteration>``. A session that did not finish (a crash, a kill)
is resumed by the next run: finished iterations are skipped and the unfinished one
continues from its last stored batch, since every id is a hash of its inputs. One
loop at a time holds the store.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Cancelled

from alignment.backends import release_engines
from alignment.constitution import load_constitution
from alignment.evaluation import Metric
from alignment.gates import GateResult, failed_reasons
from alignment.ids import iteration_id
from alignment.model_ref import ModelRef
from alignment.yaml_spec import Problem, SpecError, load_yaml
from flows.config import PipelineConfig, config_from_data
from flows.evaluation import EvalResult, evaluate_candidate
from flows.judge_eval import audit_judge
from flows.models import model_ref, registered_ref
from flows.pipeline import collect_preferences, run_pair_ids, write_run_event
from flows.promotion import Trial, choose, gate_results, merge_trials
from flows.spin import spin_data
from flows.stages import Run, judge_model
from flows.training import DataConfig, TrainConfig, train_stage
from storage import Store, StoreBusy


@dataclass(frozen=True)
class Session:
    run_id: str
    first: int
    last: int
    resumed: bool

    @property
    def iterations(self) -> range:
        return range(self.first, self.last + 1)


def session_id(loop: str, first: int) -> str:
    return f"loop-{loop}-{first:04d}"


def _holder() -> str:
    run = flow_run.id
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f", flow run {run}" if run else "")


# --- Reading the loop's state ------------------------------------------------------------


def starting_model(config: PipelineConfig) -> ModelRef:
    return model_ref(config.policy)


def current_incumbent(config: PipelineConfig) -> ModelRef:
    """The policy that samples an iteration: the last promoted candidate of this loop (a
    registered model), else the starting model."""
    store = Store(config.store)
    if store.db_path.exists():
        promoted = store.query(
            "SELECT m.model_id, m.path FROM iterations i "
            "JOIN models m ON m.model_id = i.candidate_model_id "
            "WHERE i.loop = ? AND i.promoted ORDER BY i.iteration DESC LIMIT 1",
            [config.loop.name],
        )
        if promoted:
            row = promoted[0]
            return ModelRef(row["model_id"], row["path"], content_id=row["model_id"])
    return starting_model(config)


def training_base(config: PipelineConfig, incumbent: ModelRef) -> str:
    """What training starts from and evaluation compares with: the incumbent's model_id,
    else the config's policy.model (named as ``rlaif train`` names it, without the
    policy's configured name)."""
    return incumbent.content_id or config.policy.model


def last_iteration(store: Store, loop: str) -> int:
    if not store.db_path.exists():
        return 0
    rows = store.query("SELECT max(iteration) AS k FROM iterations WHERE loop = ?", [loop])
    return rows[0]["k"] or 0


def unfinished_session(store: Store, loop: str) -> Session | None:
    if not store.db_path.exists():
        return None
    rows = store.query(
        "SELECT run_id, iteration, status FROM runs WHERE regexp_matches(run_id, ?) "
        "ORDER BY started_at DESC LIMIT 1",
        [f"^loop-{loop}-[0-9]+$"],
    )
    if not rows or rows[0]["status"] == "completed":
        return None
    first = int(rows[0]["run_id"].rsplit("-", 1)[1])
    return Session(rows[0]["run_id"], first, rows[0]["iteration"], resumed=True)


def iteration_config(config: PipelineConfig, k: int, incumbent: ModelRef) -> PipelineConfig:
    """Iteration k's data settings: the incumbent samples, the starting model judges."""
    policy = config.policy.model_copy(update={"model": incumbent.location, "name": incumbent.name})
    return eval_config(config, k).model_copy(
        update={"seed": config.seed + k, "policy": policy}  # fresh samples every iteration
    )


def eval_config(config: PipelineConfig, k: int) -> PipelineConfig:
    """Iteration k's eval settings: the same prompts, seed and judge in every iteration, so
    a model evaluated twice gets the same samples and iterations compare."""
    return config.model_copy(
        update={"iteration": k, "judge_model": config.judge_model or config.policy}
    )


# --- Tasks -------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE)
def open_session(config: PipelineConfig, iterations: int) -> Session | None:
    """Resume this loop's unfinished session, else start one of ``iterations`` iterations."""
    store = Store(config.store)
    session = unfinished_session(store, config.loop.name)
    if session is None:
        if iterations == 0:
            return None
        first = last_iteration(store, config.loop.name) + 1
        session = Session(session_id(config.loop.name, first), first, first + iterations - 1, False)
    _session_event(config, session, "running")
    return session


def _session_event(config: PipelineConfig, session: Session, status: str) -> None:
    incumbent = current_incumbent(config)
    judge = model_ref(judge_model(config))
    store = Store(config.store)
    started = store.query(
        "SELECT started_at FROM run_events WHERE run_id = ? ORDER BY updated_at LIMIT 1",
        [session.run_id],
    ) if store.db_path.exists() else []  # fmt: skip
    run = Run(
        session.run_id,
        session.last,
        str(store.root),
        load_constitution(config.constitution).constitution_id,
        incumbent,
        judge,
        started[0]["started_at"] if started else datetime.now(UTC),
    )
    write_run_event(run, config, status)  # a second write of an event is skipped


@task(cache_policy=NO_CACHE)
def close_session(config: PipelineConfig, session: Session) -> None:
    _session_event(config, session, "completed")


def train_candidate(
    config: PipelineConfig, k: int, incumbent: ModelRef, pairs: list[str]
) -> tuple[str, str | None]:
    """Train this iteration's candidate from the incumbent on the iteration's pairs;
    (candidate, the reward model it learnt from, if any)."""
    settings = config.loop.train.model_dump()
    data = DataConfig(pairs=pairs, split="train")
    common = {
        "store": config.store,
        "iteration": k,
        "data": data,
        "nproc_per_node": config.loop.nproc_per_node,
        "launcher": config.loop.launcher,
        "ray_address": config.loop.ray_address,
    }
    # spin: the DPO loss on its pairs, the incumbent (the training base) as the reference
    stage = "dpo" if config.loop.method == "spin" else config.loop.method
    reward_model = None
    if stage != "dpo":  # the RL methods learn from a reward model trained on the pairs
        reward_config = TrainConfig(**settings, **common, base_model=config.policy.model)
        reward_model = train_stage(reward_config, "reward")
    train_config = TrainConfig(
        **settings, **common, base_model=training_base(config, incumbent), reward_model=reward_model
    )
    return train_stage(train_config, stage), reward_model


@task(cache_policy=NO_CACHE)
def record_iteration(
    config: PipelineConfig,
    session: Session,
    k: int,
    incumbent: ModelRef,
    data_run: str,
    pairs: int,
    started: datetime,
    candidate: str | None = None,
    evaluation: EvalResult | None = None,
    versus_start: EvalResult | None = None,
    judge_quality: list[Metric] | None = None,
    tried: list[Trial] | None = None,
    notes: list[str] | None = None,
    stop: str | None = None,
) -> dict[str, Any]:
    """Decide by the gates, store the decision, and publish it as Prefect artifacts.

    ``candidate`` is the model the decision is about (with ``loop.merge``, the best of the
    models ``tried`` that passed, else the trained candidate); ``notes`` say how it was
    chosen. ``stop``: why the loop ends here (spin), recorded as a skipped iteration."""
    results: list[GateResult] = []
    metrics = [*(evaluation.metrics if evaluation else []), *(judge_quality or [])]
    if stop is not None:
        decision, reasons = "skipped", [stop]
    elif candidate is None or evaluation is None:
        decision, reasons = "skipped", [f"no train pairs in run {data_run}: nothing to learn"]
    else:
        results = gate_results(config, evaluation.metrics, judge_quality)
        failed = failed_reasons(results)
        decision = "rejected" if failed else "promoted"
        reasons = [*failed, *(notes or [])]
    row = {
        "iteration_id": iteration_id(config.loop.name, k),
        "loop": config.loop.name,
        "iteration": k,
        "method": config.loop.method,
        "incumbent_model_id": incumbent.name,
        "candidate_model_id": candidate,
        "data_run_id": data_run,
        "eval_run_id": evaluation.run_id if evaluation else None,
        "start_eval_run_id": versus_start.run_id if versus_start else None,
        "pairs": pairs,
        "decision": decision,
        "promoted": decision == "promoted",
        "gates": [r.as_dict() for r in results],
        "reasons": reasons,
        "started_at": started,
        "finished_at": datetime.now(UTC),
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "tried": [t.as_dict() for t in tried] if tried else None,
    }
    # Published first: once the row is stored, a rerun treats the iteration as done.
    _publish(config, row, results, metrics)
    Store(config.store).write("iterations", [row], session.run_id)
    logger = get_run_logger()
    logger.info("iteration %d: %s (%s)", k, decision, "; ".join(reasons) or "all gates passed")
    return row | {"stop": stop is not None}


def _publish(
    config: PipelineConfig, row: dict[str, Any], gates: list[GateResult], metrics: list[Metric]
) -> None:
    k, name = row["iteration"], config.loop.name
    lines = [
        f"# Loop `{name}`, iteration {k}: **{row['decision']}**",
        "",
        f"- incumbent: `{row['incumbent_model_id']}`",
        f"- candidate: `{row['candidate_model_id']}` ({row['method']})",
        f"- preference pairs (train): {row['pairs']} from run `{row['data_run_id']}`",
        f"- eval run: `{row['eval_run_id']}`",
        "",
        "| gate | value | threshold | passed |",
        "|---|---|---|---|",
        *(f"| {g.gate} | {_fmt(g.value)} | {g.threshold} | {g.passed} |" for g in gates),
        "",
        *(f"- {reason}" for reason in row["reasons"]),
    ]
    create_markdown_artifact(
        key=f"{name}-iteration-{k}",
        markdown="\n".join(lines),
        description=f"self-improve {name}: iteration {k} {row['decision']}",
    )
    table = [
        {"metric": m.metric, "value": m.value, "n": m.n, "ci_low": m.ci_low, "ci_high": m.ci_high}
        for m in metrics
    ] + [
        {"metric": f"gate/{g.gate}", "value": g.value, "n": None, "ci_low": None,
         "ci_high": g.threshold, "passed": g.passed}
        for g in gates
    ]  # fmt: skip
    if table:
        create_table_artifact(
            key=f"{name}-iteration-{k}-metrics",
            table=table,
            description=f"eval metrics and gate decisions of iteration {k}",
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# --- Flows -------------------------------------------------------------------------------


def run_iteration(config: PipelineConfig, session: Session, k: int) -> dict[str, Any]:
    started = datetime.now(UTC)
    incumbent = current_incumbent(config)
    get_run_logger().info("iteration %d: incumbent %s", k, incumbent.name)
    judge_quality = judge_audit_metrics(config, k)
    if config.loop.method == "spin":  # reference answers over the incumbent's own (flows/spin.py)
        spin = spin_data(config, k, incumbent)
        data_run, pairs = spin.run_id, spin.pair_ids
        if spin.stop:
            return record_iteration(
                config, session, k, incumbent, data_run, 0, started, judge_quality=judge_quality,
                stop=spin.stop,
            )  # fmt: skip
    else:
        data_config = iteration_config(config, k, incumbent)
        data_run = collect_preferences(data_config).run_id
        pairs = run_pair_ids(data_config, config.loop.max_pairs)
    if not pairs:
        return record_iteration(
            config, session, k, incumbent, data_run, 0, started, judge_quality=judge_quality
        )
    if config.loop.release_engines_for_training:
        release_engines()
    candidate, reward_model = train_candidate(config, k, incumbent, pairs)
    store = Store(config.store)
    trained = registered_ref(store, candidate)
    reward = registered_ref(store, reward_model) if reward_model else None
    base = training_base(config, incumbent)
    baseline = registered_ref(store, base)
    evaluating = eval_config(config, k)
    evaluation = evaluate_candidate(evaluating, trained, baseline, reward)
    trials = [
        Trial(candidate, evaluation, gate_results(config, evaluation.metrics, judge_quality)),
        *merge_trials(evaluating, k, base, candidate, baseline, reward, judge_quality),
    ]
    chosen, notes = choose(trials)
    # A model that will be promoted is also measured against the starting policy: how far
    # the loop has come, not only this step.
    start = starting_model(config)
    versus_start = chosen.evaluation if incumbent.name == start.name else None
    if versus_start is None and chosen.passed:
        start_ref = registered_ref(store, config.policy.model)
        chosen_ref = registered_ref(store, chosen.model_id)
        versus_start = evaluate_candidate(evaluating, chosen_ref, start_ref, reward)
    return record_iteration(
        config, session, k, incumbent, data_run, len(pairs), started, chosen.model_id,
        chosen.evaluation, versus_start, judge_quality, trials if len(trials) > 1 else None, notes,
    )  # fmt: skip


def judge_audit_metrics(config: PipelineConfig, k: int) -> list[Metric]:
    """The judge's accuracy on the loop's fixed gold audit set, as `judge/...` metrics.

    Stored in `judge_evals` under the loop and iteration. An unchanged judge is
    measured once and its figures are recorded again; a judge that drifts (or a
    changed judge config) is measured anew and shows up as a change in these figures.
    """
    loop = config.loop
    if loop.judge_audit is None:
        return []
    judge_config = eval_config(config, k)
    figures = audit_judge(judge_config, loop.judge_audit, loop.judge_audit_limit, loop.name, k)
    return [Metric(name, value, n) for name, (value, n) in figures.items()]


def load_loop_config(
    config_path: str, store: str | None = None, overrides: dict[str, Any] | None = None
) -> PipelineConfig:
    """The loop's config file, with the store and any top-level keys overridden."""
    updates = dict(overrides or {})
    if store:
        updates["store"] = store
    doc = load_yaml(config_path)
    config = config_from_data(doc, updates)
    if config.policy.backend != "vllm":
        where = doc.line("policy", "backend")
        raise SpecError(
            [Problem(doc.file, where, "policy.backend: the loop samples every new checkpoint "
                     "in a vLLM engine, so it needs backend: vllm (judge_model may be openai)")]
        )  # fmt: skip
    return config


@flow(name="self-improve", log_prints=True)
def self_improve(
    config_path: str,
    iterations: int | None = None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
    wait_s: float = 0.0,
) -> Any:
    """Run (or resume) a session of the self-improvement loop named in the config.

    iterations: how many new iterations this run adds (default: the config's
    loop.iterations); an unfinished session is resumed instead. store: the store root.
    overrides: top-level config keys, e.g. {"seed": 1}. wait_s: how long to wait when
    another loop holds the store (0: end at once, cancelled, writing nothing).
    """
    logger = get_run_logger()
    config = load_loop_config(config_path, store, overrides)
    count = config.loop.iterations if iterations is None else iterations
    try:
        with Store(config.store).claim("loop", _holder(), wait_s=wait_s):
            session = open_session(config, count)
            if session is None:
                return {"loop": config.loop.name, "iterations": []}
            logger.info(
                "%s loop %s: iterations %d..%d (session %s)",
                "resuming" if session.resumed else "starting",
                config.loop.name,
                session.first,
                session.last,
                session.run_id,
            )
            done = _done_iterations(config, session)
            rows = []
            for k in session.iterations:
                if k in done:
                    continue
                rows.append(run_iteration(config, session, k))
                if rows[-1]["stop"]:  # spin converged: the loop ends with this session
                    logger.info("loop %s stops: %s", config.loop.name, rows[-1]["reasons"][0])
                    break
            close_session(config, session)
            return {"loop": config.loop.name, "session": session.run_id, "iterations": rows}
    except StoreBusy as busy:
        logger.warning(str(busy))
        return Cancelled(message=str(busy))


def _done_iterations(config: PipelineConfig, session: Session) -> set[int]:
    store = Store(config.store)
    if not store.db_path.exists():
        return set()
    rows = store.query(
        "SELECT iteration FROM iterations WHERE loop = ? AND iteration BETWEEN ? AND ?",
        [config.loop.name, session.first, session.last],
    )
    return {row["iteration"] for row in rows}
