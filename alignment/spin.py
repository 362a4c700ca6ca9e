"""SPIN as a loop method: reference answers against the policy's own samples.

Self-Play fIne-tuNing (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language
Models to Strong Language Models"): in each iteration the incumbent answers the prompts of
a reference set, every (reference, own sample) becomes a preference pair with the
reference as chosen, and the incumbent is trained on them with the DPO loss, itself the
reference model of that loss. The fixed point is a policy whose answers a judge cannot tell
from the references: the loop stops when the judge's win rate of the references against
the incumbent's samples, on held-out reference prompts, has an interval that includes 0.5.

This module is the method without a store: the reference set's format and split, the ids
of reference answers and SPIN pairs, the pairs, and the stop rule (docs/spin.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from alignment.evaluation import Metric
from alignment.ids import content_id
from alignment.prompts import hash_split
from alignment.yaml_spec import Problem, SpecError

BUILTIN_SPIN = "builtin-spin"
BUILTIN_SPIN_PATH = Path(__file__).parent / "data" / "spin_references.jsonl"
CRITIQUES = "critiques"  # the store's critique revisions as references
METRIC = "spin/reference_win_rate"
PRINCIPLE = "spin"  # the principle_ids of a SPIN pair: no principle judged it
CHANCE = 0.5
EVAL_SPLITS = {"eval": "eval", "test": "eval", "validation": "eval", "train": "train"}


class SpinConfig(BaseModel):
    """``loop.spin``: where the references come from and when the loop stops."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    references: str = Field(
        BUILTIN_SPIN,
        description="'builtin-spin' (alignment/data/spin_references.jsonl, written for the "
        "project), a TRL prompt/completion .jsonl file (optional split: train/eval), or "
        "'critiques' (the last CAI revision of each critiqued response in the store).",
    )
    limit: int | None = Field(
        None, gt=0, description="Train on at most this many reference prompts per iteration."
    )
    eval_limit: int | None = Field(
        None, gt=0, description="Judge at most this many held-out references per iteration."
    )
    eval_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Share of references held out for the judge when a row names no split "
        "(critique revisions never do).",
    )
    stop: bool = Field(
        True,
        description="Stop the loop when the judge's win rate of the references against the "
        "incumbent's samples has an interval that includes 0.5.",
    )

    @field_validator("references")
    @classmethod
    def _references_exist(cls, source: str) -> str:
        if source not in (BUILTIN_SPIN, CRITIQUES) and not Path(source).expanduser().is_file():
            raise ValueError(f"reference set {source!r} does not exist")
        return source


@dataclass(frozen=True)
class Reference:
    prompt: str
    completion: str
    split: str  # train | eval


def references_path(source: str) -> Path:
    return BUILTIN_SPIN_PATH if source == BUILTIN_SPIN else Path(source).expanduser()


def _text(value: Any, role: str) -> str | None:
    """A column's text: a string, or (TRL's conversational format) the content of its one
    turn of ``role`` (a prompt's last user turn)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        turn = value[-1]
        if turn.get("role") == role and isinstance(turn.get("content"), str):
            return turn["content"]
    return None


def load_references(source: str, eval_fraction: float = 0.2) -> list[Reference]:
    """A TRL prompt/completion JSONL file as references; bad rows raise SpecError with
    ``file:line``. A row's ``split`` (train, eval, test, validation) decides its split,
    else a hash of its prompt does."""
    path = references_path(source)
    name = BUILTIN_SPIN if source == BUILTIN_SPIN else str(source)
    problems, refs = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            problems.append(Problem(name, line_no, f"not JSON: {error}"))
            continue
        if not isinstance(row, dict):
            problems.append(
                Problem(name, line_no, f"expected a JSON object, got {type(row).__name__}")
            )
            continue
        prompt = _text(row.get("prompt"), "user")
        completion = _text(row.get("completion"), "assistant")
        for column, value in (("prompt", prompt), ("completion", completion)):
            if column not in row:
                problems.append(Problem(name, line_no, f"missing column '{column}'"))
            elif not value or not value.strip():
                problems.append(Problem(name, line_no, f"'{column}' must be a non-empty text"))
        split = EVAL_SPLITS.get(str(row.get("split", "")))
        if "split" in row and split is None:
            problems.append(
                Problem(name, line_no, f"split must be train or eval, got {row['split']!r}")
            )
        if prompt and completion and prompt.strip() and completion.strip():
            refs.append(Reference(prompt, completion, split or hash_split(prompt, eval_fraction)))
    if not problems and not refs:
        problems.append(Problem(name, 1, "no prompt/completion rows"))
    if problems:
        raise SpecError(problems)
    return refs


def split_references(
    rows: Iterable[tuple[str, str]], eval_fraction: float = 0.2
) -> list[Reference]:
    """(prompt, completion) rows with no split (critique revisions), one per prompt (the
    first), held out by a hash of the prompt."""
    first: dict[str, str] = {}
    for prompt, completion in rows:
        if completion.strip():
            first.setdefault(prompt, completion)
    return [Reference(p, c, hash_split(p, eval_fraction)) for p, c in first.items()]


def references_id(refs: Iterable[Reference]) -> str:
    """The reference set's identity: its rows, in order."""
    return content_id("references", [[r.prompt, r.completion, r.split] for r in refs])


def references_model(refs_id: str) -> str:
    """The `model` a reference answer is stored under in `responses`."""
    return f"references-{refs_id[:12]}"


def reference_response_id(prompt_id: str, completion: str) -> str:
    return content_id("reference", prompt_id, completion)


def spin_pair_id(chosen_response_id: str, rejected_response_id: str) -> str:
    return content_id("spin-pair", chosen_response_id, rejected_response_id)


@dataclass(frozen=True)
class Answer:
    response_id: str
    text: str


def spin_pairs(
    prompts: Mapping[str, str],
    references: Mapping[str, Answer],
    samples: Mapping[str, Answer],
) -> list[dict[str, Any]]:
    """One pair per prompt id: the reference chosen, the policy's own sample rejected
    (standard format, as `preference_pairs` rows without run and lineage columns). A sample
    identical to its reference teaches nothing and gives no pair."""
    pairs = []
    for pid, prompt in prompts.items():
        ref, own = references[pid], samples[pid]
        if own.text.strip() == ref.text.strip():
            continue
        pairs.append(
            {
                "pair_id": spin_pair_id(ref.response_id, own.response_id),
                "prompt_id": pid,
                "prompt": prompt,
                "chosen": ref.text,
                "rejected": own.text,
                "chosen_response_id": ref.response_id,
                "rejected_response_id": own.response_id,
                "p_chosen": 1.0,
                "principle_ids": [PRINCIPLE],
                "judgment_ids": [],
                "split": "train",
            }
        )
    return pairs


def stop_reason(win_rate: Metric, chance: float = CHANCE) -> str | None:
    """Why the loop stops (the references' win rate interval includes chance), else None."""
    low = win_rate.ci_low if win_rate.ci_low is not None else 0.0
    high = win_rate.ci_high if win_rate.ci_high is not None else 1.0
    if not low <= chance <= high:
        return None
    return (
        f"judge can no longer tell references from samples: win rate {win_rate.value:.2f} "
        f"[{low:.2f}, {high:.2f}] includes {chance} (n={win_rate.n})"
    )
