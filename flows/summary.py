"""What a run produced, read back from the store (never from the flow's memory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage import Store

TABLES_SHOWN = ("prompts", "responses", "critiques", "judgments", "preference_pairs")


def next_queries(run_id: str) -> list[tuple[str, str]]:
    """Questions a user asks next about one run, as SQL over its rows."""
    pairs = f"(SELECT row_id FROM run_rows WHERE run_id = '{run_id}')"
    return [
        (
            "Which principles produced the run's pairs, and how sure was the judge?",
            "SELECT principle_ids[1] AS principle, count(*) AS pairs, "
            "round(avg(p_chosen), 3) AS mean_p_chosen FROM preference_pairs "
            f"WHERE pair_id IN {pairs} GROUP BY 1 ORDER BY pairs DESC",
        ),
        (
            "Which of its judgments flipped when the order was swapped?",
            "SELECT principle_id, round(p_a_first, 2) AS p_first, round(p_a_second, 2) "
            "AS p_second FROM judgments WHERE status = 'ok' AND NOT position_consistent "
            f"AND judgment_id IN {pairs} LIMIT 10",
        ),
    ]


# Why a judgment did not become a pair, in SQL, mirroring alignment.pairs.drop_reason.
_OUTCOME = """
CASE
  WHEN j.response_b_id IS NULL THEN 'pointwise score'
  WHEN j.status <> 'ok' THEN 'dropped: ' || j.status
  WHEN j.p_a = 0.5 THEN 'dropped: tie'
  WHEN greatest(j.p_a, 1 - j.p_a) < CAST(json_extract(r.config, '$.judge.min_confidence') AS DOUBLE)
    THEN 'dropped: low_confidence'
  WHEN CAST(json_extract(r.config, '$.judge.require_position_consistent') AS BOOLEAN)
    AND NOT j.position_consistent THEN 'dropped: position_inconsistent'
  ELSE 'pair'
END
"""


@dataclass
class RunSummary:
    run: dict[str, Any]
    rows: dict[str, int]  # rows each table holds for this run
    position_consistency: float | None  # share of model-judged ok comparisons
    model_comparisons: int
    statuses: dict[str, int]
    outcomes: dict[str, int]
    examples: list[dict[str, Any]]


def latest_run_id(store: Store) -> str | None:
    rows = store.query("SELECT run_id FROM runs ORDER BY updated_at DESC LIMIT 1")
    return rows[0]["run_id"] if rows else None


def mine(table: str, key: str, alias: str = "") -> str:
    """SQL condition: the row is one of the run's rows (bind the run id once)."""
    column = f"{alias}.{key}" if alias else key
    return f"{column} IN (SELECT row_id FROM run_rows WHERE run_id = ? AND table_name = '{table}')"


def run_summary(store: Store, run_id: str) -> RunSummary:
    """What one run expects of each table, whichever run stored the rows first."""
    run = store.query("SELECT * FROM runs WHERE run_id = ?", [run_id])[0]
    counted = store.query(
        "SELECT table_name, count(*) AS n FROM run_rows WHERE run_id = ? GROUP BY 1", [run_id]
    )
    rows = dict.fromkeys(TABLES_SHOWN, 0) | {
        r["table_name"]: r["n"] for r in counted if r["table_name"] in TABLES_SHOWN
    }
    judged = mine("judgments", "judgment_id", "j")
    consistency = store.query(
        "SELECT avg(position_consistent::INT) AS rate, count(*) AS n FROM judgments j "
        f"WHERE {judged} AND status = 'ok' AND mode NOT IN ('checks', 'contrast', 'likelihood') "
        "AND response_b_id IS NOT NULL",
        [run_id],
    )[0]
    statuses = store.query(
        f"SELECT status, count(*) AS n FROM judgments j WHERE {judged} GROUP BY 1 ORDER BY 2 DESC",
        [run_id],
    )
    outcomes = store.query(
        f"SELECT {_OUTCOME} AS outcome, count(*) AS n FROM judgments j, runs r "
        f"WHERE r.run_id = ? AND {judged} GROUP BY 1 ORDER BY 2 DESC",
        [run_id, run_id],
    )
    # The most confident pair of each principle first, so the examples show several.
    examples = store.query(
        "SELECT prompt, chosen, rejected, principle_ids[1] AS principle, p_chosen, "
        "row_number() OVER (PARTITION BY principle_ids[1] ORDER BY p_chosen DESC, pair_id) "
        f"AS rank FROM preference_pairs WHERE {mine('preference_pairs', 'pair_id')} "
        "ORDER BY rank, p_chosen DESC, pair_id LIMIT 3",
        [run_id],
    )
    return RunSummary(
        run=run,
        rows=rows,
        position_consistency=consistency["rate"],
        model_comparisons=consistency["n"],
        statuses={r["status"]: r["n"] for r in statuses},
        outcomes={r["outcome"]: r["n"] for r in outcomes},
        examples=examples,
    )


def where_batches_ran(store: Store, run_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Per stage and place (engine, actor or endpoint, and its node): the batches sent
    there, their requests, how many failed, and their time; every run when ``run_ids`` is
    None."""
    runs = "" if run_ids is None else "WHERE run_id IN (SELECT unnest(?))"
    return store.query(
        "SELECT stage, kind, ran_on, node, count(*) AS batches, sum(requests) AS requests, "
        "count(*) FILTER (WHERE NOT ok) AS failed, round(sum(seconds), 1) AS seconds, "
        "round(avg(seconds), 2) AS mean_seconds, min(started_at) AS first_started "
        f"FROM batches {runs} GROUP BY ALL ORDER BY first_started, stage, ran_on",
        [] if run_ids is None else [run_ids],
    )
