"""Training data read from the store with SQL, in the formats TRL trains on.

Preference rows are conversational ``prompt`` / ``chosen`` / ``rejected`` (TRL's
preference format) plus ``p_chosen`` and lineage columns; SFT rows are
conversational ``prompt`` / ``completion`` built from the last CAI revision of
each response. Export writes exactly these rows, so what a user inspects is
what a trainer sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignment import atomic
from alignment.conversation import as_chat, from_stored
from storage import Store

ExportFormat = Literal["hf", "jsonl", "parquet"]


@dataclass(frozen=True)
class DataFilter:
    """Which rows a stage sees. Empty fields do not filter."""

    runs: tuple[str, ...] = ()
    iteration: int | None = None
    split: str | None = "train"
    min_p_chosen: float | None = None
    principles: tuple[str, ...] = field(default_factory=tuple)
    pair_ids: tuple[str, ...] = field(default_factory=tuple)

    def where(self, columns: dict[str, str]) -> tuple[str, list[Any]]:
        """SQL conditions and parameters; ``columns`` maps row_id (the row's key),
        iteration, split, p_chosen and principles (a list expression) to the query's
        expressions."""
        wanted = {
            # A run's rows are the ones it expects, whichever run stored them first.
            "run_id": (
                f"{columns['row_id']} IN (SELECT row_id FROM run_rows "
                "WHERE run_id IN (SELECT unnest(?)))",
                list(self.runs) or None,
            ),
            "iteration": (f"{columns['iteration']} = ?", self.iteration),
            "split": (f"{columns['split']} = ?", self.split or None),
            "p_chosen": (f"{columns.get('p_chosen')} >= ?", self.min_p_chosen),
            "principles": (
                f"list_has_any({columns['principles']}, ?)",
                list(self.principles) or None,
            ),
            "pair_ids": (
                f"{columns.get('pair_id')} IN (SELECT unnest(?))",
                list(self.pair_ids) or None,
            ),
        }
        clauses, params = ["TRUE"], []
        for clause, value in wanted.values():
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return " AND ".join(clauses), params


def _with_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its prompt in TRL's conversational format: the stored conversation
    (its ``messages`` column, which the row then drops), or its text as one user turn."""
    messages = row.pop("messages")
    return row | {"prompt": as_chat(from_stored(row["prompt"], messages))}


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def preference_rows(store: Store, data: DataFilter) -> list[dict[str, Any]]:
    """Conversational preference pairs with p_chosen and lineage, in a stable order."""
    where, params = data.where(
        {
            "row_id": "p.pair_id",
            "iteration": "p.iteration",
            "split": "p.split",
            "p_chosen": "p.p_chosen",
            "principles": "p.principle_ids",
            "pair_id": "p.pair_id",
        }
    )
    rows = store.query(
        "SELECT p.prompt, p.messages, p.chosen, p.rejected, p.p_chosen, p.pair_id, p.prompt_id, "
        "p.chosen_response_id, p.rejected_response_id, p.principle_ids, p.judgment_ids, "
        "p.constitution_id, p.policy_model, p.judge_model, p.run_id, p.iteration, p.split "
        f"FROM preference_pairs p WHERE {where} ORDER BY p.pair_id",
        params,
    )
    return [
        _with_prompt(row)
        | {"chosen": _assistant(row["chosen"]), "rejected": _assistant(row["rejected"])}
        for row in rows
    ]


def sft_rows(store: Store, data: DataFilter) -> list[dict[str, Any]]:
    """The last revision of each critiqued response, as a prompt/completion conversation."""
    if data.min_p_chosen is not None or data.pair_ids:
        raise ValueError("min_p_chosen and pair ids filter preference pairs, not SFT revisions")
    where, params = data.where(
        {
            "row_id": "c.critique_id",
            "iteration": "run.iteration",
            "split": "pr.split",
            "principles": "[c.principle_id]",
        }
    )
    rows = store.query(
        "SELECT pr.text AS prompt, pr.messages, c.revision AS completion, c.critique_id, "
        "c.response_id, "
        "r.prompt_id, c.principle_id, c.constitution_id, c.model, c.run_id, run.iteration, "
        "pr.split FROM critiques c JOIN responses r USING (response_id) "
        "JOIN prompts pr ON pr.prompt_id = r.prompt_id JOIN runs run ON run.run_id = c.run_id "
        f"WHERE {where} AND c.revision <> '' AND c.round = (SELECT max(c2.round) "
        "FROM critiques c2 WHERE c2.response_id = c.response_id "
        "AND c2.constitution_id = c.constitution_id) ORDER BY c.critique_id",
        params,
    )
    return [_with_prompt(row) | {"completion": _assistant(row["completion"])} for row in rows]


def export_rows(rows: list[dict[str, Any]], fmt: ExportFormat, out: Path) -> Path:
    """Write rows atomically: hf (datasets.save_to_disk folder), jsonl or parquet file."""
    import datasets

    out = Path(out)
    with atomic.replacing(out) as built:
        if fmt == "hf":
            datasets.Dataset.from_list(rows).save_to_disk(str(built))
        elif fmt == "jsonl":
            with built.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(built))
    return out
