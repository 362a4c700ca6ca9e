"""SL-CAI critique and revision (Bai et al. 2022, §3).

Each round samples one principle per response, asks the model to critique the
response against it, then to revise it given the critique. Round r + 1
critiques round r's revision. Every round is two batched generate calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignment.backends import Backend, Completion, SamplingConfig
from alignment.constitution import Constitution, Principle
from alignment.ids import content_id
from alignment.judge import Candidate
from alignment.templates import critique_chat, revision_chat


class CritiqueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Run critique and revision at all.")
    rounds: int = Field(
        1, ge=1, description="Critique-revision rounds; each revises the previous revision."
    )
    max_tokens: int = Field(64, gt=0, description="Token budget of each critique and revision.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of both steps.")
    seed: int = Field(0, description="Seeds principle sampling and generation.")


@dataclass(frozen=True)
class CritiqueRecord:
    """Field names are the store's ``critiques`` columns, except run_id."""

    critique_id: str
    response_id: str
    principle_id: str
    constitution_id: str
    round: int
    input_text: str  # the text critiqued: the response, or the previous round's revision
    critique: str
    revision: str
    model: str

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def _first_texts(completions: list[list[Completion]]) -> list[str]:
    return [samples[0].text.strip() for samples in completions]


def _principles(
    constitution: Constitution, candidate: Candidate, config: CritiqueConfig
) -> list[Principle]:
    """The principle each round of one candidate's critique uses (sampled by weight)."""
    return [
        constitution.sample_principle(f"critique:{candidate.response_id}:{r}", config.seed)
        for r in range(config.rounds)
    ]


def _fingerprint(principle: Principle) -> list[str]:
    """What of a principle a critique depends on: its id and its two requests."""
    return [principle.id, principle.critique, principle.revision]


def template_fingerprint() -> str:
    """A hash of the critique and revision wording: both chats rendered for fixed
    sentinel texts, so editing either template changes every critique id (and no
    judgment's)."""
    prompt, response, request, critique, revision = (
        "A question?", "An answer.", "A critique request?", "A critique.", "A revision request."
    )  # fmt: skip
    chats = [
        critique_chat(prompt, response, request),
        revision_chat(prompt, response, request, critique, revision),
    ]
    return content_id("critique-templates", chats)


def critique_ids(
    constitution: Constitution, candidate: Candidate, config: CritiqueConfig, model: str
) -> list[str]:
    """The id of each round's record: the response, the principles of this round and the
    rounds before it (round r revises round r - 1's revision), the model, the settings
    and the wording of the templates."""
    settings = config.model_dump(exclude={"enabled"})
    fingerprints = [_fingerprint(p) for p in _principles(constitution, candidate, config)]
    wording = template_fingerprint()
    return [
        content_id(
            "critique", candidate.response_id, fingerprints[: r + 1], r, model, settings, wording
        )
        for r in range(config.rounds)
    ]


def critique_and_revise(
    backend: Backend,
    constitution: Constitution,
    candidates: Sequence[Candidate],
    config: CritiqueConfig,
) -> list[CritiqueRecord]:
    """``config.rounds`` records per candidate, round by round."""
    if not config.enabled or not candidates:
        return []
    sampling = SamplingConfig(
        n=1, temperature=config.temperature, max_tokens=config.max_tokens, seed=config.seed
    )
    texts = [c.text for c in candidates]
    plans = [_principles(constitution, c, config) for c in candidates]
    ids = [critique_ids(constitution, c, config, backend.model_name) for c in candidates]
    records: list[CritiqueRecord] = []
    for r in range(config.rounds):
        principles = [plan[r] for plan in plans]
        critique_chats = [
            critique_chat(c.prompt, text, p.critique)
            for c, text, p in zip(candidates, texts, principles, strict=True)
        ]
        critiques = _first_texts(backend.generate(critique_chats, sampling))
        revision_chats = [
            revision_chat(c.prompt, text, p.critique, critique, p.revision)
            for c, text, p, critique in zip(candidates, texts, principles, critiques, strict=True)
        ]
        revisions = _first_texts(backend.generate(revision_chats, sampling))
        for i, (c, p, text, critique, revision) in enumerate(
            zip(candidates, principles, texts, critiques, revisions, strict=True)
        ):
            records.append(
                CritiqueRecord(
                    critique_id=ids[i][r],
                    response_id=c.response_id,
                    principle_id=p.id,
                    constitution_id=constitution.constitution_id,
                    round=r,
                    input_text=text,
                    critique=critique,
                    revision=revision,
                    model=backend.model_name,
                )
            )
        texts = revisions
    return records
