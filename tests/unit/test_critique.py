"""SL-CAI critique and revision: rounds chain, calls are batched, ids are stable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import alignment.critique
import alignment.templates
from alignment.asking import template_fingerprint
from alignment.constitution import from_dict
from alignment.critique import CritiqueConfig, critique_and_revise, critique_ids
from alignment.judge import Candidate, Question, judgment_id
from alignment.judge_config import JudgeConfig
from tests.scripted_backend import ScriptedBackend, last_user_message

CONSTITUTION = from_dict(
    {
        "name": "test",
        "version": "1",
        "principles": [
            {
                "id": pid,
                "principle": f"Choose the more {pid} response.",
                "critique": f"CRITIQUE-{pid}: how is the response not {pid}?",
                "revision": f"REVISE-{pid}: rewrite it to be {pid}.",
            }
            for pid in ("helpful", "honest", "harmless")
        ],
    }
)
CANDIDATES = [Candidate(f"r{i}", f"p{i}", f"prompt {i}", f"response {i}") for i in range(4)]


def editor(chat, index: int) -> str:
    """Critiques name what they read; revisions append a mark to the response."""
    if len(chat) == 3:  # prompt, response, critique request
        return f" critique of [{chat[1]['content']}] "
    return chat[1]["content"] + " +rev"


def run(config: CritiqueConfig, backend: ScriptedBackend | None = None):
    backend = backend or ScriptedBackend(generate_fn=editor)
    return backend, critique_and_revise(backend, CONSTITUTION, CANDIDATES, config)


def test_rounds_chain_revisions():
    _, records = run(CritiqueConfig(rounds=3))
    assert len(records) == 3 * len(CANDIDATES)
    r0 = [r for r in records if r.response_id == "r0"]
    assert [r.round for r in r0] == [0, 1, 2]
    assert [r.input_text for r in r0] == ["response 0", "response 0 +rev", "response 0 +rev +rev"]
    assert [r.revision for r in r0] == [
        "response 0 +rev",
        "response 0 +rev +rev",
        "response 0 +rev +rev +rev",
    ]
    assert r0[1].critique == "critique of [response 0 +rev]"  # stripped


def test_two_batched_generate_calls_per_round():
    backend, _ = run(CritiqueConfig(rounds=2, max_tokens=32, temperature=0.3, seed=7))
    assert [c.method for c in backend.calls] == ["generate"] * 4
    assert all(len(c.chats) == len(CANDIDATES) for c in backend.calls)
    sampling = backend.calls[0].sampling
    assert (sampling.n, sampling.max_tokens, sampling.temperature, sampling.seed) == (1, 32, 0.3, 7)


def test_chats_carry_the_sampled_principle_requests():
    backend, records = run(CritiqueConfig())
    critique_chats, revision_chats = (c.chats for c in backend.calls)
    for record, critique_chat, revision_chat in zip(
        records, critique_chats, revision_chats, strict=True
    ):
        principle = CONSTITUTION.principle(record.principle_id)
        assert [m["role"] for m in critique_chat] == ["user", "assistant", "user"]
        assert last_user_message(critique_chat) == principle.critique
        assert [m["role"] for m in revision_chat] == [
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
        ]
        assert revision_chat[3]["content"] == record.critique
        assert last_user_message(revision_chat) == principle.revision


def test_records_carry_principle_and_constitution_ids():
    _, records = run(CritiqueConfig(rounds=2))
    for record in records:
        assert record.principle_id in {"helpful", "honest", "harmless"}
        assert (
            record.principle_id
            == CONSTITUTION.sample_principle(f"critique:{record.response_id}:{record.round}", 0).id
        )
        assert record.constitution_id == CONSTITUTION.constitution_id
        assert record.model == "scripted"
    assert set(records[0].to_row()) == {
        "critique_id",
        "response_id",
        "principle_id",
        "constitution_id",
        "round",
        "input_text",
        "critique",
        "revision",
        "model",
    }


def test_ids_are_stable_and_depend_on_config_and_model():
    _, first = run(CritiqueConfig(rounds=2))
    _, again = run(CritiqueConfig(rounds=2))
    assert [r.critique_id for r in first] == [r.critique_id for r in again]
    assert len({r.critique_id for r in first}) == len(first)
    _, hotter = run(CritiqueConfig(rounds=2, temperature=1.0))
    _, other = run(CritiqueConfig(rounds=2), ScriptedBackend("other", generate_fn=editor))
    assert not {r.critique_id for r in first} & {r.critique_id for r in hotter}
    assert not {r.critique_id for r in first} & {r.critique_id for r in other}


def test_disabled_or_empty_does_nothing():
    backend, records = run(CritiqueConfig(enabled=False))
    assert records == [] and backend.calls == []
    backend = ScriptedBackend()
    assert critique_and_revise(backend, CONSTITUTION, [], CritiqueConfig()) == []
    assert backend.calls == []


def test_config_bounds_and_unknown_keys():
    for bad in ({"rounds": 0}, {"max_tokens": 0}, {"temperature": -0.1}, {"round": 2}):
        with pytest.raises(ValidationError):
            CritiqueConfig(**bad)


def critique_and_judgment_ids() -> tuple[list[str], list[str]]:
    """Every candidate's critique ids, and one judgment id per judge mode."""
    template_fingerprint.cache_clear()
    critiques = [
        i for c in CANDIDATES for i in critique_ids(CONSTITUTION, c, CritiqueConfig(), "m")
    ]
    a, b, *_ = CANDIDATES
    principle = CONSTITUTION.principles[0]
    modes = ("logprob", "cot", "contrast", "likelihood", "ensemble")
    judgments = [
        judgment_id(Question(a, b, principle), "m", JudgeConfig(mode=mode)) for mode in modes
    ]
    return critiques, judgments


@pytest.fixture
def fresh_fingerprints():
    """Judge fingerprints are cached per process: none rendered from patched templates stays."""
    yield
    template_fingerprint.cache_clear()


def test_a_critique_wording_edit_changes_critique_ids_only(monkeypatch, fresh_fingerprints):
    critiques, judgments = critique_and_judgment_ids()
    templates, original = alignment.templates, alignment.templates.critique_chat

    def critique_chat(prompt, response, critique_request):
        return original(prompt, response, "Critique: " + critique_request)

    # revision_chat calls templates.critique_chat; critique.py calls its own import.
    monkeypatch.setattr(templates, "critique_chat", critique_chat)
    monkeypatch.setattr(alignment.critique, "critique_chat", critique_chat)
    edited, same = critique_and_judgment_ids()
    assert set(edited).isdisjoint(critiques) and same == judgments
    monkeypatch.undo()

    monkeypatch.setattr(templates, "LEAD_IN", "The better one is (")  # a judge wording
    unchanged, relabelled = critique_and_judgment_ids()
    assert unchanged == critiques and relabelled != judgments


def test_a_revision_wording_edit_changes_critique_ids(monkeypatch):
    critiques, _ = critique_and_judgment_ids()
    revision_chat = alignment.critique.revision_chat

    def reworded(*args):
        chat = revision_chat(*args)
        return [*chat[:-1], {"role": "user", "content": chat[-1]["content"] + " Be brief."}]

    monkeypatch.setattr(alignment.critique, "revision_chat", reworded)
    assert set(critique_and_judgment_ids()[0]).isdisjoint(critiques)
