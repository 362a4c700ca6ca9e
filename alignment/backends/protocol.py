"""The backend protocol and the values it passes: chats, sampling settings, completions
and sequence scores (what each operation does is in alignment/backends/__init__.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from alignment.ids import content_id

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Chat = Sequence[Message]


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> str:
        """Canonical JSON of the settings (the store's ``responses.sampling``)."""
        settings = asdict(self)
        settings["stop"] = list(self.stop)
        return json.dumps(settings, sort_keys=True)

    def sample_ids(self, prompt_id: str, model: str) -> list[str]:
        """The id of each of the n samples of one prompt from one model: the prompt, the
        model and every sampling setting (the seed included) determine the samples."""
        return [content_id("response", prompt_id, model, self.as_json(), i) for i in range(self.n)]


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    num_tokens: int


@dataclass(frozen=True)
class SequenceScore:
    """log p(response | chat before it), read in one prefill.

    ``logprob`` sums the response's own tokens; ``num_tokens`` counts them, so a
    per-token mean is ``logprob / num_tokens``. The end-of-turn token the chat
    template writes right after the response is kept apart in ``end_logprob``
    (``None`` when the template writes none): whether the model would *stop* there
    is a signal of its own (conciseness), and the caller decides whether it counts.
    """

    logprob: float
    num_tokens: int
    end_logprob: float | None = None


class Backend(Protocol):
    model_name: str

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[list[Completion]]:
        """``sampling.n`` completions for each chat, in order."""
        ...

    def score_options(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float | None]]:
        """Next-token log-prob of each option label after each chat's assistant prefix."""
        ...

    def score_sequences(self, chats: Sequence[Chat]) -> list[SequenceScore | None]:
        """Log-likelihood of each chat's last (assistant) message; None when unreadable."""
        ...


def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(v))), stable, and -inf when every value is -inf."""
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))
