"""A scripted Backend for unit tests: deterministic, instant, and it records every call.

By default ``generate`` echoes a short deterministic text, and ``score_options``
prefers the longer option of a pairwise question (``(A) ...`` / ``(B) ...``) and,
for a yes/no question, says "yes" more strongly for a longer response.
``score_sequences`` likewise makes a longer response gain more likelihood from a
principle: each word costs 1 nat, 0.5 under a principle, 1.5 under its opposite.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from alignment.backends import Chat, Completion, SamplingConfig, SequenceScore
from alignment.templates import NEUTRAL_SYSTEM

GenerateFn = Callable[[Chat, int], str]  # (chat, sample index) -> text
ScoreFn = Callable[[Chat, Sequence[str]], dict[str, float | None]]
SequenceFn = Callable[[Chat], SequenceScore | None]

OPTION_MASS = 0.9  # the labels' share of the scripted next-token distribution
_OPTIONS = re.compile(r"^\(A\) (.*)\n\(B\) (.*)\n", re.MULTILINE | re.DOTALL)
_RESPONSE = re.compile(r"^Assistant: (.*?)\n\n", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Call:
    method: str  # "generate" | "score_options" | "score_sequences"
    chats: list[list[dict[str, str]]]
    sampling: SamplingConfig | None = None
    options: tuple[str, ...] = ()


def last_user_message(chat: Chat) -> str:
    return next(m["content"] for m in reversed(chat) if m["role"] == "user")


def default_generate(chat: Chat, index: int) -> str:
    return f"reply {index} to: {last_user_message(chat)[:40]}"


def _logprobs(p_first: float, options: Sequence[str]) -> dict[str, float | None]:
    p = min(max(p_first, 1e-6), 1 - 1e-6)
    return {options[0]: math.log(OPTION_MASS * p), options[1]: math.log(OPTION_MASS * (1 - p))}


def default_score(chat: Chat, options: Sequence[str]) -> dict[str, float | None]:
    """P(first option): longer option text wins; yes/no: longer response says yes."""
    match = _OPTIONS.search(last_user_message(chat))
    if match is None:
        return dict.fromkeys(options, None)
    first, second = match.group(1), match.group(2)
    if {first, second} == {"yes", "no"}:
        response = _RESPONSE.search(last_user_message(chat))
        length = len(response.group(1)) if response else 0
        p_yes = length / (length + 20)
        return _logprobs(p_yes if first == "yes" else 1 - p_yes, options)
    return _logprobs((len(first) + 1) / (len(first) + len(second) + 2), options)


def system_prompt(chat: Chat) -> str:
    return next((m["content"] for m in chat if m["role"] == "system"), "")


def default_sequence(chat: Chat) -> SequenceScore | None:
    """Words cost 1 nat each; 0.5 after a principle, 1.5 after "do the opposite"."""
    words = len(chat[-1]["content"].split())
    system = system_prompt(chat)
    per_word = 1.0 if system == NEUTRAL_SYSTEM else 1.5 if "opposite" in system else 0.5
    return SequenceScore(logprob=-per_word * words, num_tokens=words)


class ScriptedBackend:
    def __init__(
        self,
        model_name: str = "scripted",
        generate_fn: GenerateFn | None = None,
        score_fn: ScoreFn | None = None,
        sequence_fn: SequenceFn | None = None,
    ) -> None:
        self.model_name = model_name
        self.generate_fn = generate_fn or default_generate
        self.score_fn = score_fn or default_score
        self.sequence_fn = sequence_fn or default_sequence
        self.calls: list[Call] = []

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[list[Completion]]:
        self.calls.append(Call("generate", [list(c) for c in chats], sampling=sampling))
        return [
            [self._completion(self.generate_fn(chat, k)) for k in range(sampling.n)]
            for chat in chats
        ]

    def score_options(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float | None]]:
        self.calls.append(Call("score_options", [list(c) for c in chats], options=tuple(options)))
        return [self.score_fn(chat, options) for chat in chats]

    def score_sequences(self, chats: Sequence[Chat]) -> list[SequenceScore | None]:
        self.calls.append(Call("score_sequences", [list(c) for c in chats]))
        return [self.sequence_fn(chat) for chat in chats]

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    @staticmethod
    def _completion(text: str) -> Completion:
        return Completion(text=text, finish_reason="stop", num_tokens=len(text.split()))
