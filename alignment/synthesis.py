"""Self-instruct prompt synthesis: the policy writes new requests from a few seed examples.

Each synthetic prompt comes from its own few-shot chat (examples drawn with a seed
fixed by its index), so the set is reproducible. What the model writes is cleaned
(first line, no numbering or quotes) and kept only when it is of a sensible length and
not a near-duplicate (word-set Jaccard) of a seed prompt or of another kept one.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from alignment.backends import Chat

INSTRUCTION = (
    "Here are requests that users sent to an AI assistant:\n{examples}\n"
    "Write one new request a user might send, different from all of these. "
    "Reply with the request only."
)
_LEADING_NOISE = re.compile(r"^\s*(?:\d+[.)]|[-*•]|request:)\s*", re.IGNORECASE)


def self_instruct_chats(examples: Sequence[str], count: int, shots: int, seed: int) -> list[Chat]:
    """``count`` few-shot chats, each showing ``shots`` seed requests picked by its index."""
    chats: list[Chat] = []
    for index in range(count):
        rng = random.Random(f"{seed}:{index}")
        shown = rng.sample(list(examples), min(shots, len(examples)))
        listing = "\n".join(f"{i}. {text}" for i, text in enumerate(shown, 1))
        chats.append([{"role": "user", "content": INSTRUCTION.format(examples=listing)}])
    return chats


@dataclass
class Synthesised:
    kept: list[str]
    dropped: Counter = field(default_factory=Counter)  # reason -> count


def clean_request(text: str) -> str:
    """The first non-empty line, without list numbering or surrounding quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = _LEADING_NOISE.sub("", line)
    return line.strip().strip("\"'“”").strip()


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def filter_synthetic(
    generated: Sequence[str],
    existing: Sequence[str],
    *,
    min_words: int = 3,
    max_words: int = 80,
    max_similarity: float = 0.7,
) -> Synthesised:
    """Clean the generated requests and keep the new, well-sized, non-duplicate ones."""
    result = Synthesised([])
    seen = [_words(text) for text in existing]
    for raw in generated:
        text = clean_request(raw)
        words = _words(text)
        n_words = len(text.split())
        if n_words < min_words:
            result.dropped["too_short"] += 1
        elif n_words > max_words:
            result.dropped["too_long"] += 1
        elif any(_jaccard(words, other) >= max_similarity for other in seen):
            result.dropped["near_duplicate"] += 1
        else:
            result.kept.append(text)
            seen.append(words)
    return result
