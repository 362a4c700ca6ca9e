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
from alignment.constitution import Constitution
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
    records: list[CritiqueRecord] = []
    for r in range(config.rounds):
        principles = [
            constitution.sample_principle(f"critique:{c.response_id}:{r}", config.seed)
            for c in candidates
        ]
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
        for c, p, text, critique, revision in zip(
            candidates, principles, texts, critiques, revisions, strict=True
        ):
            records.append(
                CritiqueRecord(
                    critique_id=content_id(
                        "critique",
                        c.response_id,
                        p.id,
                        constitution.constitution_id,
                        r,
                        backend.model_name,
                        config.model_dump(),
                    ),
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
