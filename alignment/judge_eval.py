"""Judge quality, measured on labelled preference data (`rlaif judge eval`).

A preference set is TRL's preference format: one row per pair with ``prompt``,
``chosen`` and ``rejected``, either as strings (standard) or as lists of
``{role, content}`` messages (conversational: a response is its last assistant message;
a prompt of one user message is that text, a longer one the whole conversation, judged
with its history). Optional columns:
``principle`` (the text to judge by), ``principle_id``, ``subset``, and
``rejected_injected``: the rejected response with text aimed at the judge added (an
injection set, e.g. ``builtin-injection``), whose pairs are judged twice, clean and
injected, to measure ``injection_flip_rate``.

The shipped gold set is split for good into two halves, ``builtin-tuning`` (what
the judge's defaults may be tuned on) and ``builtin-audit`` (what the loop audits on):
see ``gold_half``.

Every pair is judged with the chosen response as A, in both orders, so the
gold label says which side of each soft label is right. What the numbers mean
is written once, in alignment/judge_metrics.py; they are only worth what the gold set
is worth, and a judge's accuracy on it says nothing about prompts unlike it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from alignment.asking import Comparison
from alignment.constitution import Constitution, Principle
from alignment.conversation import ConversationError, Prompt, conversation, prompt_key
from alignment.records import ACCEPTED_FORMS as RECORD_FORMS
from alignment.records import Record, dataset_rows, read_records

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).parent / "data" / "judge_gold.jsonl"
BUILTIN_INJECTION = "builtin-injection"
BUILTIN_INJECTION_PATH = Path(__file__).parent / "data" / "judge_injection.jsonl"
BUILTIN_TWO_TURN = "builtin-two-turn"  # two-turn pairs that only the history decides
BUILTIN_TWO_TURN_PATH = Path(__file__).parent / "data" / "judge_gold_two_turn.jsonl"
BUILTIN_TUNING = "builtin-tuning"  # half of the gold set: tune the judge's defaults on it
BUILTIN_AUDIT = "builtin-audit"  # the other half: audit on it
GOLD_HALVES = (BUILTIN_TUNING, BUILTIN_AUDIT)
ACCEPTED_FORMS = f"'{BUILTIN}', {RECORD_FORMS}"  # 'builtin-injection' and the halves too
# The question asked of a pair whose row names no principle: the CAI papers' generic one.
GENERIC_PRINCIPLE = Principle(
    id="generic",
    text="Choose the response that is more helpful, honest and harmless.",
    critique="",
    revision="",
)


class PreferenceSetError(ValueError):
    """A preference set that cannot be used; the message starts with FILE:LINE or FILE."""


@dataclass(frozen=True)
class GoldPair:
    """One labelled pair: ``chosen`` is the better response to ``prompt`` under ``principle``."""

    prompt: Prompt  # a text, or a conversation whose last user turn the responses answer
    chosen: str
    rejected: str
    principle: Principle
    subset: str | None = None
    where: str = ""  # "FILE:LINE" or "FILE: row N", for messages about this pair
    rejected_injected: str | None = None  # rejected, with text aimed at the judge

    def __hash__(self) -> int:  # a conversation's messages are dicts
        return hash(pair_id(self))


# --- Reading ---------------------------------------------------------------------------


_Row = Record


def source_path(source: str | Path) -> Path:
    """The file or folder a source names; ``builtin`` is the shipped gold set (and
    ``builtin-tuning`` / ``builtin-audit`` its halves), ``builtin-injection`` the
    shipped prompt-injection set and ``builtin-two-turn`` the two-turn gold pairs."""
    builtins = {
        BUILTIN: BUILTIN_PATH,
        BUILTIN_TUNING: BUILTIN_PATH,
        BUILTIN_AUDIT: BUILTIN_PATH,
        BUILTIN_INJECTION: BUILTIN_INJECTION_PATH,
        BUILTIN_TWO_TURN: BUILTIN_TWO_TURN_PATH,
    }
    return builtins.get(str(source), Path(source))


def load_preference_set(
    source: str | Path, limit: int | None = None, *, constitution: Constitution | None = None
) -> list[GoldPair]:
    """The first ``limit`` pairs (all when None) of ``source``, in source order.

    ``source`` is ``builtin``, ``builtin-tuning`` or ``builtin-audit`` (a half of it, in
    the gold set's order), ``builtin-injection``, a ``.jsonl`` file (blank lines
    skipped), a ``.parquet`` file, or a ``datasets.save_to_disk`` folder; a DatasetDict
    gives its ``test`` split when it has one, else ``train`` (a gold set is held-out
    data). Each pair's principle
    is the row's ``principle`` text (its id the row's ``principle_id``, else
    ``custom-<hash>``); else ``principle_id`` looked up in ``constitution``; else
    GENERIC_PRINCIPLE. Texts are stripped. Raises PreferenceSetError on the first bad
    row, and when no pair is left.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    path = source_path(source)
    half = str(source) if str(source) in GOLD_HALVES else None
    rows = (_to_pair(row, constitution) for row in _read_rows(path))
    if half is not None:  # the half is known only once the whole set is read
        halves = gold_half(list(rows))
        rows = (p for p in halves if halves[p] == half)
    pairs: list[GoldPair] = []
    for pair in rows:
        pairs.append(pair)
        if len(pairs) == limit:
            break
    if not pairs:
        raise PreferenceSetError(f"{path}: no preference pairs")
    return pairs


def preference_set_id(source: str | Path) -> str:
    """sha256 of the set's bytes (a folder: of its files' names and bytes), so an edited
    gold set is a different data set in the store; a half of the gold set hashes its
    name too, so the two halves are two data sets."""
    path = source_path(source)
    if str(source) in GOLD_HALVES:
        return hashlib.sha256(f"{source}\0".encode() + path.read_bytes()).hexdigest()
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def pair_id(pair: GoldPair) -> str:
    """A pair's identity: sha256 of its principle id, prompt, chosen and rejected texts
    (stripped), whatever line it is on."""
    parts = (pair.principle.id, prompt_key(pair.prompt), pair.chosen, pair.rejected)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def gold_half(pairs: Sequence[GoldPair]) -> dict[GoldPair, str]:
    """Each pair's half, ``builtin-tuning`` or ``builtin-audit``, fixed by pair id.

    Stratified by (principle id, subset): within each stratum the pairs are ordered by
    pair_id, the first half (the larger, for an odd count) is tuning and the rest audit.
    So both halves have every principle and subset, neither depends on the file's order,
    and adding or removing one pair moves at most one other pair across.
    """
    strata: dict[tuple[str, str | None], list[GoldPair]] = {}
    for pair in pairs:
        strata.setdefault((pair.principle.id, pair.subset), []).append(pair)
    halves: dict[GoldPair, str] = {}
    for members in strata.values():
        ordered = sorted(members, key=pair_id)
        cut = (len(ordered) + 1) // 2
        for k, pair in enumerate(ordered):
            halves[pair] = BUILTIN_TUNING if k < cut else BUILTIN_AUDIT
    return {pair: halves[pair] for pair in pairs}  # in the pairs' order


def to_comparisons(pairs: Sequence[GoldPair]) -> list[Comparison]:
    """Each pair as a comparison with the chosen response as A.

    Checks are stripped from the principles: a principle with checks is decided by the
    checks, without the model, and it is the model that is measured here.
    """
    return [
        Comparison(p.prompt, p.chosen, p.rejected, replace(p.principle, checks=())) for p in pairs
    ]


def injected_comparisons(pairs: Sequence[GoldPair]) -> list[Comparison]:
    """The pairs that have an injected variant, in order, with chosen as A against the
    injected rejected response (checks stripped, as in to_comparisons)."""
    return [
        Comparison(p.prompt, p.chosen, p.rejected_injected, replace(p.principle, checks=()))
        for p in pairs
        if p.rejected_injected is not None
    ]


def _read_rows(path: Path) -> Iterator[_Row]:
    return read_records(path, PreferenceSetError, ACCEPTED_FORMS, _dataset_dict_rows)


def _dataset_dict_rows(loaded: Any, path: Path) -> Iterator[_Row]:
    """A DatasetDict's "test" split when it has one, else its "train" split."""
    split = next((s for s in ("test", "train") if s in loaded), None)
    if split is None:
        raise PreferenceSetError(
            f"{path}: DatasetDict has no 'test' or 'train' split (splits: {list(loaded)})"
        )
    return dataset_rows(loaded[split], f"{path}[{split}]")


# --- One row ---------------------------------------------------------------------------


def _to_pair(row: _Row, constitution: Constitution | None) -> GoldPair:
    chosen, rejected = _text(row, "chosen", "assistant"), _text(row, "rejected", "assistant")
    if chosen == rejected:
        raise PreferenceSetError(f"{row.where}: 'chosen' and 'rejected' are the same text")
    injected = None
    if row.record.get("rejected_injected") is not None:
        injected = _text(row, "rejected_injected", "assistant")
        if injected == rejected:
            raise PreferenceSetError(
                f"{row.where}: 'rejected_injected' is the same text as 'rejected'"
            )
    return GoldPair(
        prompt=_prompt(row),
        chosen=chosen,
        rejected=rejected,
        principle=_principle(row, constitution),
        subset=_optional(row, "subset"),
        where=row.where,
        rejected_injected=injected,
    )


def _prompt(row: _Row) -> Prompt:
    """The prompt column: a string, a one-message conversation (its text), or a longer
    conversation ending with the user's turn."""
    value = row.record.get("prompt")
    if not isinstance(value, list) or len(value) < 2:
        return _text(row, "prompt", "user")
    try:
        return conversation(value)
    except ConversationError as error:
        raise PreferenceSetError(f"{row.where}: 'prompt': {error}") from None


def _text(row: _Row, column: str, role: str) -> str:
    """A string column, or the last ``role`` message of a conversational one; never empty."""
    if column not in row.record:
        columns = ", ".join(sorted(row.record)) or "none"
        raise PreferenceSetError(f"{row.where}: missing column '{column}' (columns: {columns})")
    value = row.record[column]
    if isinstance(value, list):
        if not all(isinstance(m, Mapping) for m in value):
            raise PreferenceSetError(
                f"{row.where}: '{column}' must be a list of {{role, content}} messages"
            )
        contents = [m.get("content") for m in value if m.get("role") == role]
        if not contents:
            raise PreferenceSetError(f"{row.where}: '{column}' has no {role} message")
        value = contents[-1]
    if not isinstance(value, str):
        raise PreferenceSetError(
            f"{row.where}: '{column}' must be a string or a list of {{role, content}} "
            f"messages, got {type(value).__name__}"
        )
    if not value.strip():
        raise PreferenceSetError(f"{row.where}: '{column}' is empty")
    return value.strip()


def _optional(row: _Row, column: str) -> str | None:
    value = row.record.get(column)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PreferenceSetError(
            f"{row.where}: '{column}' must be a string, got {type(value).__name__}"
        )
    return value.strip() or None


def _principle(row: _Row, constitution: Constitution | None) -> Principle:
    text, principle_id = _optional(row, "principle"), _optional(row, "principle_id")
    if text is not None:
        custom = "custom-" + hashlib.sha256(text.encode()).hexdigest()[:8]
        return Principle(id=principle_id or custom, text=text, critique="", revision="")
    if principle_id is None:
        return GENERIC_PRINCIPLE
    if constitution is None:
        raise PreferenceSetError(
            f"{row.where}: principle_id '{principle_id}' needs a constitution to look it up "
            "(or a 'principle' column with its text)"
        )
    try:
        return constitution.principle(principle_id)
    except KeyError:
        known = ", ".join(p.id for p in constitution.principles)
        raise PreferenceSetError(
            f"{row.where}: unknown principle_id '{principle_id}' "
            f"(constitution '{constitution.name}' has: {known})"
        ) from None
