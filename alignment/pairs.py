"""Pairs: confident pairwise judgments become preference pairs; the rest are counted
by the reason they were dropped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from alignment.conversation import last_turn, messages_json
from alignment.ids import content_id
from alignment.judge import Candidate, Judgment
from alignment.judge_config import JudgeConfig

DROP_REASONS = (
    "tie",
    "low_confidence",
    "position_inconsistent",
    "refusal",
    "unparseable",
    "missing_logprobs",
)


@dataclass(frozen=True)
class PreferencePair:
    """Field names are the store's ``preference_pairs`` columns that the judge knows."""

    pair_id: str
    prompt_id: str
    prompt: str  # a conversation's last user turn
    chosen: str
    rejected: str
    chosen_response_id: str
    rejected_response_id: str
    p_chosen: float
    principle_ids: tuple[str, ...]
    judgment_ids: tuple[str, ...]
    constitution_id: str
    judge_model: str
    messages: str | None = None  # the prompt's conversation as JSON; None for a text

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["principle_ids"] = list(self.principle_ids)
        row["judgment_ids"] = list(self.judgment_ids)
        return row


@dataclass
class PairOutcome:
    pairs: list[PreferencePair]
    dropped: dict[str, int]  # reason (DROP_REASONS) -> count


def drop_reason(judgment: Judgment, config: JudgeConfig) -> str | None:
    """Why a pairwise judgment does not become a pair, or None if it does."""
    if judgment.status != "ok" or judgment.p_a is None:
        return judgment.status
    if judgment.p_a == 0.5:
        return "tie"
    if max(judgment.p_a, 1 - judgment.p_a) < config.min_confidence:
        return "low_confidence"
    if config.require_position_consistent and not judgment.position_consistent:
        return "position_inconsistent"
    return None


def pair_settings(config: JudgeConfig) -> dict[str, Any]:
    """The thresholds that decide whether a judgment becomes a pair."""
    return {
        "min_confidence": config.min_confidence,
        "require_position_consistent": config.require_position_consistent,
    }


def _pair(
    judgment: Judgment, chosen: Candidate, rejected: Candidate, config: JudgeConfig
) -> PreferencePair:
    p_a = judgment.p_a
    assert p_a is not None
    return PreferencePair(
        # The judgment id covers the question and the judge; the thresholds decide the set.
        pair_id=content_id(
            "pair",
            judgment.judgment_id,
            chosen.response_id,
            rejected.response_id,
            pair_settings(config),
        ),
        prompt_id=judgment.prompt_id,
        prompt=last_turn(chosen.prompt),
        messages=messages_json(chosen.prompt),
        chosen=chosen.text,
        rejected=rejected.text,
        chosen_response_id=chosen.response_id,
        rejected_response_id=rejected.response_id,
        p_chosen=max(p_a, 1 - p_a),
        principle_ids=(judgment.principle_id,),
        judgment_ids=(judgment.judgment_id,),
        constitution_id=judgment.constitution_id,
        judge_model=judgment.judge_model,
    )


def build_pairs(
    judgments: Sequence[Judgment],
    candidates_by_prompt: Mapping[str, Sequence[Candidate]],
    config: JudgeConfig,
) -> PairOutcome:
    """Confident pairwise judgments become preference pairs; the rest are counted by reason.

    Pointwise judgments (``response_b_id`` None) are neither pairs nor dropped.
    """
    by_id = {c.response_id: c for cs in candidates_by_prompt.values() for c in cs}
    outcome = PairOutcome(pairs=[], dropped=dict.fromkeys(DROP_REASONS, 0))
    for j in judgments:
        if j.response_b_id is None:
            continue
        reason = drop_reason(j, config)
        if reason is not None:
            outcome.dropped[reason] += 1
            continue
        a, b = by_id[j.response_a_id], by_id[j.response_b_id]
        chosen, rejected = (a, b) if j.p_a is not None and j.p_a > 0.5 else (b, a)
        outcome.pairs.append(_pair(j, chosen, rejected, config))
    return outcome
