"""Seed prompts: the shipped set and user prompt files, read into one list of ``SeedPrompt``.

Accepted sources (nothing is ever downloaded):

* ``"builtin"``: ``alignment/data/seed_prompts.jsonl``, about 60% everyday requests and 40%
  red-team requests, each with a ``category`` such as ``"everyday/code"`` or
  ``"redteam/privacy"``. Its split is fixed in the file: within each category, every 5th
  prompt (positions 2, 7, 12, ... counting from 0) is ``eval``.
* a ``.jsonl`` file: one JSON object per line with the text under ``text_field`` (or
  ``"prompt"`` when that field is absent); blank lines are skipped. The field may instead
  hold a conversation (TRL's conversational format: a list of ``{role, content}`` messages
  ending with a user turn, ``alignment/conversation.py``); ``"messages"`` is read too.
  ``builtin-two-turn`` is the shipped two-turn set (``alignment/data/two_turn_prompts.jsonl``,
  MT-Bench style: the second turn refers back to the first answer).
* a ``.parquet`` file with the same columns.
* a folder written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.
  A ``DatasetDict``'s ``"train"`` split is train; ``"test"``, ``"eval"`` and ``"validation"``
  are eval, and the split name decides over any split column.

Refused, with the row's place (``path:line``): a row whose text is empty or blank, a
conversation that is not one (a role other than system/user/assistant, a blank turn, a last
turn that is not the user's), a text
longer than ``MAX_PROMPT_CHARS`` (32,768 characters, more than the longest context a shipped
config reserves), and a source with no prompt at all. Exact duplicates (after stripping) keep
their first occurrence; ``read_prompts`` says how many were dropped, so the CLI can warn.

A row's split comes from ``split_field`` (``train``, or ``eval``/``test``/``validation``
for eval). A row with none gets one from its text alone, the same on every machine:
eval iff ``int(sha256(text)[:8], 16) / 2**32 < eval_fraction``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignment.conversation import (
    Conversation,
    ConversationError,
    Prompt,
    conversation,
    last_turn,
    prompt_key,
)
from alignment.ids import content_id
from alignment.records import ACCEPTED_FORMS as RECORD_FORMS
from alignment.records import Record, dataset_rows, read_records

Split = Literal["train", "eval"]

BUILTIN = "builtin"
BUILTIN_TWO_TURN = "builtin-two-turn"
MAX_PROMPT_CHARS = 32_768
BUILTIN_PATH = Path(__file__).parent / "data" / "seed_prompts.jsonl"
BUILTIN_SOURCES = {
    BUILTIN: BUILTIN_PATH,
    BUILTIN_TWO_TURN: Path(__file__).parent / "data" / "two_turn_prompts.jsonl",
}
FALLBACK_TEXT_FIELDS = ("prompt", "messages")
ACCEPTED_FORMS = f"'{BUILTIN}', '{BUILTIN_TWO_TURN}', {RECORD_FORMS}"
_SPLIT_ALIASES: dict[str, Split] = {
    "train": "train",
    "eval": "eval",
    "test": "eval",
    "validation": "eval",
}


@dataclass(frozen=True)
class SeedPrompt:
    text: str  # a conversation's last user turn
    split: Split
    source: str  # "seed" for the shipped set, "file" for user files, "synthetic" for generated
    category: str = ""
    messages: Conversation | None = None  # the whole conversation; None for a text

    @property
    def prompt(self) -> Prompt:
        """What a model is asked: the conversation, or the text."""
        return self.messages if self.messages is not None else self.text

    @property
    def prompt_id(self) -> str:
        return prompt_id(self.prompt)

    @property
    def group(self) -> str:
        """Top-level category: ``"redteam"`` for ``"redteam/privacy"``; ``""`` if none."""
        return self.category.split("/", 1)[0]


def prompt_id(prompt: Prompt) -> str:
    """A prompt's id: its text's hash (a conversation's: its canonical JSON's), so the same
    prompt from any source is one row."""
    return content_id("prompt", prompt_key(prompt))


class PromptSourceError(ValueError):
    """A prompt source that cannot be read; the message starts with ``path`` (and line)."""


@dataclass(frozen=True)
class PromptFile:
    """The prompts of a source, and the exact duplicates dropped from it."""

    prompts: list[SeedPrompt]
    duplicates: int = 0
    first_duplicate: str = ""  # "path:line" (or "path: row N") of the first one dropped

    def duplicates_warning(self) -> str | None:
        """'prompts.jsonl: 3 duplicate prompts dropped (first at line 7)', or None."""
        if not self.duplicates:
            return None
        path, _, place = self.first_duplicate.rpartition(":")
        place = place.strip() if place.strip().startswith("row") else f"line {place}"
        plural = "s" if self.duplicates > 1 else ""
        return f"{path}: {self.duplicates} duplicate prompt{plural} dropped (first at {place})"


_Row = Record


def load_prompts(
    source: str | Path = BUILTIN,
    *,
    text_field: str = "text",
    split_field: str = "split",
    eval_fraction: float = 0.2,
    limit: int | None = None,
) -> list[SeedPrompt]:
    """Read prompts from ``source``, in source order.

    Texts are stripped; an empty one is refused; exact duplicates keep their first occurrence.
    ``limit`` then keeps the first ``round(limit * (1 - eval_fraction))`` train prompts and
    fills the rest of ``limit`` with the first eval prompts, in source order. When one split
    runs short, the other fills the gap; when ``limit >= 2`` and both splits exist, each
    keeps at least one prompt. The result stays in source order.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    prompts = read_prompts(
        source, text_field=text_field, split_field=split_field, eval_fraction=eval_fraction
    ).prompts
    return prompts if limit is None else _apply_limit(prompts, limit, eval_fraction)


def read_prompts(
    source: str | Path = BUILTIN,
    *,
    text_field: str = "text",
    split_field: str = "split",
    eval_fraction: float = 0.2,
) -> PromptFile:
    """Every prompt of ``source`` (no limit), with a count of the duplicates dropped."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be within [0, 1], got {eval_fraction}")
    is_builtin = isinstance(source, str) and source in BUILTIN_SOURCES
    path = BUILTIN_SOURCES[str(source)] if is_builtin else Path(source)
    tag = "seed" if is_builtin else "file"
    prompts: list[SeedPrompt] = []
    seen: set[str] = set()
    duplicates, first_duplicate = 0, ""
    for row in _read_rows(path):
        prompt = _to_prompt(row, text_field, split_field, eval_fraction, tag)
        if prompt.prompt_id in seen:
            duplicates += 1
            first_duplicate = first_duplicate or row.where
            continue
        seen.add(prompt.prompt_id)
        prompts.append(prompt)
    if not prompts:
        raise PromptSourceError(f"{path}: no prompts (it is empty, or has only blank lines)")
    return PromptFile(prompts, duplicates, first_duplicate)


def hash_split(text: str, eval_fraction: float) -> Split:
    """The split of a row that names none: a stable function of its text."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return "eval" if bucket < eval_fraction else "train"


def prompt_stats(prompts: Iterable[SeedPrompt]) -> dict[str, Any]:
    """Counts: total, by split, by top-level category and by (category group, split)."""
    prompts = list(prompts)
    return {
        "total": len(prompts),
        "by_split": dict(Counter(p.split for p in prompts)),
        "by_group": dict(Counter(p.group for p in prompts)),
        "by_group_split": {
            f"{group}/{split}": n
            for (group, split), n in sorted(Counter((p.group, p.split) for p in prompts).items())
        },
    }


# --- reading -----------------------------------------------------------------------------


def _read_rows(path: Path) -> Iterator[_Row]:
    return read_records(path, PromptSourceError, ACCEPTED_FORMS, _dataset_dict_rows)


def _dataset_dict_rows(loaded: Any, path: Path) -> Iterator[_Row]:
    unknown = [name for name in loaded if name not in _SPLIT_ALIASES]
    if unknown:
        raise PromptSourceError(
            f"{path}: DatasetDict split(s) {unknown} not one of {sorted(_SPLIT_ALIASES)}"
        )
    ordered = sorted(loaded, key=lambda name: _SPLIT_ALIASES[name] != "train")
    for name in ordered:
        yield from dataset_rows(loaded[name], f"{path}[{name}]", _SPLIT_ALIASES[name])


# --- one row -----------------------------------------------------------------------------


def _to_prompt(
    row: _Row, text_field: str, split_field: str, eval_fraction: float, tag: str
) -> SeedPrompt:
    prompt = _prompt_of(row, text_field)
    # A conversation's split hashes its canonical JSON, as its id does.
    split = row.split or _split_of(row, split_field)
    split = split or hash_split(prompt_key(prompt), eval_fraction)
    category = row.record.get("category") or ""
    messages = None if isinstance(prompt, str) else prompt
    return SeedPrompt(last_turn(prompt), split, tag, str(category), messages)


def _prompt_of(row: _Row, text_field: str) -> Prompt:
    present = [f for f in (text_field, *FALLBACK_TEXT_FIELDS) if f in row.record]
    if not present:
        fields = ", ".join(sorted(row.record)) or "none"
        others = " or ".join(f"'{f}'" for f in FALLBACK_TEXT_FIELDS)
        raise PromptSourceError(
            f"{row.where}: no '{text_field}' field (nor {others}); fields: {fields}"
        )
    field = present[0]
    value = row.record[field]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise PromptSourceError(f"{row.where}: field '{field}' is empty; a prompt needs text")
    if isinstance(value, list):
        try:
            value = conversation(value)
        except ConversationError as error:
            raise PromptSourceError(f"{row.where}: field '{field}': {error}") from None
        size = sum(len(m["content"]) for m in value)
    elif isinstance(value, str):
        value, size = value.strip(), len(value)
    else:
        raise PromptSourceError(
            f"{row.where}: field '{field}' must be a string or a list of messages, "
            f"got {type(value).__name__}"
        )
    if size > MAX_PROMPT_CHARS:
        raise PromptSourceError(
            f"{row.where}: field '{field}' is {size:,} characters; a prompt must be at "
            f"most {MAX_PROMPT_CHARS:,}"
        )
    return value


def _split_of(row: _Row, split_field: str) -> Split | None:
    value = row.record.get(split_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    split = _SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise PromptSourceError(
            f"{row.where}: field '{split_field}' is {value!r}; expected one of "
            f"{sorted(_SPLIT_ALIASES)} or empty"
        )
    return split


# --- limit -------------------------------------------------------------------------------


def _apply_limit(prompts: list[SeedPrompt], limit: int, eval_fraction: float) -> list[SeedPrompt]:
    train = [p for p in prompts if p.split == "train"]
    evals = [p for p in prompts if p.split == "eval"]
    n_train = _train_quota(limit, eval_fraction, len(train), len(evals))
    n_eval = min(limit - n_train, len(evals))
    kept = {p.prompt_id for p in train[:n_train] + evals[:n_eval]}
    return [p for p in prompts if p.prompt_id in kept]


def _train_quota(limit: int, eval_fraction: float, n_train: int, n_eval: int) -> int:
    quota = round(limit * (1 - eval_fraction))
    if limit >= 2 and n_train and n_eval:
        quota = min(max(quota, 1), limit - 1)  # both splits keep at least one prompt
    quota = max(quota, limit - n_eval)  # too few eval prompts: train fills the gap
    return min(quota, n_train)  # too few train prompts: eval fills the gap
