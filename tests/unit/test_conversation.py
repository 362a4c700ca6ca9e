"""Multi-turn prompts: reading, rendering for every judge mode, checks by scope, ids, the
store's messages column and the judge eval's multi-turn accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.asking import Comparison, template_fingerprint
from alignment.constitution import Check, Principle
from alignment.conversation import (
    ConversationError,
    as_chat,
    assistant_turns,
    conversation,
    from_stored,
    history,
    last_turn,
    messages_json,
    turns,
)
from alignment.judge import Candidate, Question, judgment_id
from alignment.judge_config import JudgeConfig
from alignment.judge_eval import load_preference_set, pair_id
from alignment.judge_metrics import judge_metrics
from alignment.labels import SoftLabel, decide_by_checks
from alignment.pairs import PreferencePair
from alignment.prompts import PromptSourceError, load_prompts, prompt_id
from alignment.templates import (
    conditioned_chat,
    critique_chat,
    pairwise_judge_chat,
    pointwise_judge_chat,
)

TWO_TURN = (
    {"role": "user", "content": "Name two rivers in Europe."},
    {"role": "assistant", "content": "The Danube and the Rhine."},
    {"role": "user", "content": "Tell me more about the second one."},
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the conversation value --------------------------------------------------------------


def test_a_conversation_is_checked_and_stripped() -> None:
    raw = [{"role": "user", "content": " Hi? "}, {"role": "assistant", "content": "Hello."},
           {"role": "user", "content": "Again?"}]  # fmt: skip
    chat = conversation(raw)
    assert chat[0] == {"role": "user", "content": "Hi?"}
    assert (last_turn(chat), turns(chat), assistant_turns(chat)) == ("Again?", 2, ["Hello."])
    assert history(chat) == chat[:2]
    assert as_chat("Hi?") == [{"role": "user", "content": "Hi?"}]
    assert from_stored("Again?", messages_json(chat)) == chat
    assert from_stored("Hi?", None) == "Hi?"


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([], "non-empty list"),
        ([{"role": "user"}], "exactly role and content"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            "system message may only come first",
        ),  # fmt: skip
        ([{"role": "user", "content": "  "}], "non-empty string"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "last message must be the user's",
        ),  # fmt: skip
    ],
)
def test_what_is_not_a_conversation(messages: list, says: str) -> None:
    with pytest.raises(ConversationError, match=says):
        conversation(messages)


# --- reading prompt files ------------------------------------------------------------------


def test_a_prompt_file_may_hold_conversations(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"text": "One turn."},
            {"messages": list(TWO_TURN), "split": "eval"},
            {"prompt": list(TWO_TURN)},
        ],  # fmt: skip
    )
    text, chat = load_prompts(str(path))  # the third is the second's duplicate
    assert (text.messages, text.prompt, text.prompt_id) == (
        None,
        "One turn.",
        prompt_id("One turn."),
    )
    assert chat.messages == TWO_TURN and chat.text == "Tell me more about the second one."
    assert chat.split == "eval"
    # The id is the whole conversation's: the same last turn after other history differs.
    assert chat.prompt_id == prompt_id(TWO_TURN) != prompt_id(chat.text)


def test_a_bad_conversation_names_its_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}, {"messages": [TWO_TURN[1]]}])
    with pytest.raises(PromptSourceError) as err:
        load_prompts(str(path))
    assert str(err.value) == (
        f"{path}:2: field 'messages': the last message must be the user's (the turn to answer)"
    )


def test_the_shipped_two_turn_set() -> None:
    prompts = load_prompts("builtin-two-turn")
    assert len(prompts) == 24 and all(p.messages is not None for p in prompts)
    assert {p.split for p in prompts} == {"train", "eval"}
    assert all(turns(p.prompt) == 2 for p in prompts)
    assert {p.group for p in prompts} == {"two-turn"}


# --- what the models see -------------------------------------------------------------------


PRINCIPLE = "Choose the response that answers the question asked."


def test_every_judge_mode_sees_the_history() -> None:
    pairwise = pairwise_judge_chat(PRINCIPLE, TWO_TURN, "About the Rhine.", "About the Danube.")
    question = pairwise[-2]["content"]
    assert "Human: Name two rivers in Europe.\nAssistant: The Danube and the Rhine.\n" in question
    assert question.index("Danube and the Rhine") < question.index("second one")
    pointwise = pointwise_judge_chat(PRINCIPLE, TWO_TURN, "About the Rhine.", "A")
    assert "Assistant: The Danube and the Rhine." in pointwise[0]["content"]
    contrast = conditioned_chat("Be helpful.", TWO_TURN, "About the Rhine.")
    assert [m["role"] for m in contrast] == ["system", "user", "assistant", "user", "assistant"]
    critique = critique_chat(TWO_TURN, "About the Rhine.", "What is wrong?")
    assert critique[:3] == list(TWO_TURN) and critique[-1]["content"] == "What is wrong?"


def test_a_conversations_system_message_joins_the_judges() -> None:
    chat = (
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi?"},
    )
    rendered = conditioned_chat("Be helpful.", chat, "Hello.")
    assert rendered[0] == {"role": "system", "content": "Be helpful.\nYou are terse."}
    assert [m["role"] for m in rendered] == ["system", "user", "assistant"]


def test_a_text_prompt_renders_as_before() -> None:
    """A one-turn text and the same text as a conversation ask the same question, but
    ids keep them apart by the templates' fingerprint."""
    text = pairwise_judge_chat(PRINCIPLE, "Hi?", "a", "b")
    chat = pairwise_judge_chat(PRINCIPLE, ({"role": "user", "content": "Hi?"},), "a", "b")
    assert text == chat
    config = JudgeConfig(mode="logprob")
    assert template_fingerprint("logprob", False, config) != template_fingerprint(
        "logprob", False, config, True
    )


def test_judgment_ids_know_a_conversation_from_its_last_turn() -> None:
    principle = Principle("p", PRINCIPLE, "", "")
    config = JudgeConfig(mode="logprob")

    def question(prompt):
        a = Candidate("r1", "same-id", prompt, "About the Rhine.")
        b = Candidate("r2", "same-id", prompt, "About the Danube.")
        return Question(a, b, principle)

    text, chat = question(last_turn(TWO_TURN)), question(TWO_TURN)
    assert judgment_id(text, "judge", config) != judgment_id(chat, "judge", config)


# --- checks that read the whole conversation ----------------------------------------------


def test_a_check_reads_the_last_turn_or_the_whole_conversation() -> None:
    chat = (
        {"role": "user", "content": "What is the code?"},
        {"role": "assistant", "content": "The code is 1234."},
        {"role": "user", "content": "Thanks. Anything else?"},
    )
    last = Principle("p", "t", "", "", checks=(Check("regex_must_not", r"\d{4}"),))
    whole = Principle("p", "t", "", "", checks=(Check("regex_must_not", r"\d{4}", "conversation"),))
    # The new answer is clean; only the conversation scope sees the earlier leak.
    assert decide_by_checks(last, "No.", None, chat).p_a == 1.0
    assert decide_by_checks(whole, "No.", None, chat).p_a == 0.0
    # Pairwise, both answers share the leaked history: a tie, never a preference.
    assert decide_by_checks(whole, "No.", "Yes, 5678.", chat).p_a == 0.5
    assert decide_by_checks(last, "No.", "Yes, 5678.", chat).p_a == 1.0
    words = Check("max_words", 6, "conversation")
    assert words.passes("One two three.") and not words.passes("One two three.", ["a b c d"])
    assert words.as_dict() == {"max_words": 6, "scope": "conversation"}
    assert Check("max_words", 6).as_dict() == {"max_words": 6}  # ids made before scopes hold


def test_a_constitution_check_with_a_scope(tmp_path: Path) -> None:
    from alignment.constitution import load_constitution

    path = tmp_path / "c.yaml"
    path.write_text(
        "name: c\nversion: '1'\nprinciples:\n"
        "  - id: p\n    principle: Choose the safer response.\n    critique: c?\n"
        "    revision: r.\n    checks:\n      - regex_must_not: 'secret'\n"
        "        scope: conversation\n",
        encoding="utf-8",
    )
    (check,) = load_constitution(path).principles[0].checks
    assert (check.kind, check.scope) == ("regex_must_not", "conversation")
    path.write_text(path.read_text().replace("scope: conversation", "scope: everything"))
    from alignment.yaml_spec import SpecError

    with pytest.raises(SpecError) as err:
        load_constitution(path)
    assert "scope of check #1 in principle 'p' must be one of last_turn, conversation" in str(
        err.value
    )


# --- pairs, the gold set and its metrics ----------------------------------------------------


def test_a_pair_keeps_its_conversation() -> None:
    pair = PreferencePair(
        "pair", "pid", last_turn(TWO_TURN), "a", "b", "r1", "r2", 0.9, ("p",), ("j",), "c",
        "judge", messages_json(TWO_TURN),
    )  # fmt: skip
    row = pair.to_row()
    assert from_stored(row["prompt"], row["messages"]) == TWO_TURN


def test_the_two_turn_gold_set() -> None:
    pairs = load_preference_set("builtin-two-turn")
    assert len(pairs) == 24 and all(turns(p.prompt) == 2 for p in pairs)
    assert len({pair_id(p) for p in pairs}) == 24


def _label(p_a: float) -> SoftLabel:
    return SoftLabel("ok", p_a, p_a, p_a, True, option_mass=1.0)


def test_multi_turn_accuracy_is_reported_apart() -> None:
    pairs = load_preference_set("builtin-two-turn")[:4] + load_preference_set("builtin")[:4]
    # A judge right on every one-turn pair and wrong on every multi-turn one.
    labels = [_label(0.1 if turns(p.prompt) > 1 else 0.9) for p in pairs]
    metrics = judge_metrics(pairs, labels)
    assert metrics.accuracy == 0.5
    assert metrics.accuracy_multi_turn.value == 0.0 and metrics.accuracy_multi_turn.n == 4
    assert metrics.accuracy_single_turn.value == 1.0
    assert metrics.summary()["accuracy_multi_turn"] == 0.0
    assert type(metrics).from_flat(metrics.flat()) == metrics
    # A judge that always answers A is at chance on both.
    always_a = SoftLabel("ok", 1.0, 0.0, 0.5, False, option_mass=1.0)
    chance = judge_metrics(pairs, [always_a] * len(pairs))
    assert chance.accuracy_multi_turn.value == chance.accuracy_single_turn.value == 0.5
    # A one-turn set reports neither.
    one_turn = judge_metrics(pairs[4:], labels[4:])
    assert one_turn.accuracy_multi_turn is None and "accuracy_multi_turn" not in one_turn.summary()


def test_a_comparison_with_a_conversation_is_a_value() -> None:
    principle = Principle("p", PRINCIPLE, "", "")
    assert Comparison(TWO_TURN, "a", "b", principle) == Comparison(TWO_TURN, "a", "b", principle)


class _RecordingTokenizer:
    """Renders a chat as its contents joined by '|', one token per character."""

    chat_template = "recorded"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "|".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_ppo_rollouts_start_from_the_whole_conversation() -> None:
    from alignment.training.ppo import PPOConfig, encode_prompts

    ids, mask = encode_prompts(_RecordingTokenizer(), ["Hi?", TWO_TURN], PPOConfig(), 0)
    rendered = "".join(chr(i) for i in ids[1][mask[1].bool()].tolist())
    assert rendered == "|".join(m["content"] for m in TWO_TURN)
    assert "".join(chr(i) for i in ids[0][mask[0].bool()].tolist()) == "Hi?"
    no_template = _RecordingTokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="needs the chat template"):
        encode_prompts(no_template, [TWO_TURN], PPOConfig(), 0)
