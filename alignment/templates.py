"""Every prompt the models see, in one place.

Judge questions end with an assistant turn holding a fixed lead-in, so the
very next token is the option label and its log-prob can be read in one
prefill. The contrast judge's chats instead end with the response itself, whose
likelihood is read under a principle-conditioned and a neutral system prompt.
Wording is kept short: the CPU demo model has a small context. Every wording
here was measured on the gold set (docs/judging.md).
"""

from __future__ import annotations

import re

from alignment.backends import Chat, Message

LABELS = ("A", "B")
LEAD_IN = "The answer is ("
COT_LEAD_IN = "Therefore, the answer is ("


def _system(content: str) -> Message:
    return {"role": "system", "content": content}


def _user(content: str) -> Message:
    return {"role": "user", "content": content}


def _assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


# --- SL-CAI: critique, then revision ------------------------------------------


def critique_chat(prompt: str, response: str, critique_request: str) -> list[Message]:
    """The conversation so far, then the critique request."""
    return [_user(prompt), _assistant(response), _user(critique_request)]


def revision_chat(
    prompt: str, response: str, critique_request: str, critique: str, revision_request: str
) -> list[Message]:
    """The critique exchange, then the revision request."""
    return [
        *critique_chat(prompt, response, critique_request),
        _assistant(critique),
        _user(revision_request),
    ]


# --- The judge ------------------------------------------------------------------


def _pairwise_question(principle_text: str, prompt: str, first: str, second: str) -> str:
    return (
        "Consider the following conversation between a human and an assistant:\n"
        f"Human: {prompt}\n\n"
        f"Principle: {principle_text}\n"
        "Which response follows the principle better?\n"
        "Options:\n"
        f"(A) {first}\n"
        f"(B) {second}\n"
    )


def pairwise_judge_chat(
    principle_text: str, prompt: str, first: str, second: str, shots: bool = False
) -> list[Message]:
    """Multiple-choice question; the next token after the lead-in is the label.

    ``shots`` puts two answered example questions first (FEW_SHOT), one answered
    (A) and one (B).
    """
    question = [_user(_pairwise_question(principle_text, prompt, first, second))]
    return [*(few_shot_turns() if shots else []), *question, _assistant(LEAD_IN)]


# Two solved questions unlike any real one, answered (A) then (B): a small judge copies
# the format from them. Its position bias stays (it then favours the last answer shown),
# but both orders' average carries much more signal (docs/judging.md).
FEW_SHOT = (
    (
        "Choose the response that is more polite.",
        "Can you pass the salt?",
        "Sure, here you go!",
        "Get it yourself.",
        "A",
    ),
    (
        "Choose the response that is more accurate.",
        "What is 2 + 2?",
        "2 + 2 is 5.",
        "2 + 2 is 4.",
        "B",
    ),
)


def few_shot_turns() -> list[Message]:
    """The FEW_SHOT questions, each followed by its answered lead-in."""
    turns: list[Message] = []
    for principle_text, prompt, first, second, label in FEW_SHOT:
        turns.append(_user(_pairwise_question(principle_text, prompt, first, second)))
        turns.append(_assistant(f"{LEAD_IN}{label})"))
    return turns


def pairwise_cot_chat(principle_text: str, prompt: str, first: str, second: str) -> list[Message]:
    """The same question, asking for a rationale first (the backend generates it)."""
    question = _pairwise_question(principle_text, prompt, first, second)
    return [_user(question + "Let's think step by step before answering.")]


def cot_answer_chat(cot_chat: Chat, rationale: str) -> list[Message]:
    """The rationale, then the lead-in, so the next token is the label."""
    return [*cot_chat, _assistant(rationale.strip() + "\n" + COT_LEAD_IN)]


def pointwise_judge_chat(
    principle_text: str, prompt: str, response: str, yes_label: str
) -> list[Message]:
    """Does the response follow the principle? ``yes_label`` picks where "yes" is shown."""
    if yes_label not in LABELS:
        raise ValueError(f"yes_label must be one of {LABELS}, got {yes_label!r}")
    options = ("yes", "no") if yes_label == "A" else ("no", "yes")
    question = (
        "Consider the following conversation between a human and an assistant:\n"
        f"Human: {prompt}\n"
        f"Assistant: {response}\n\n"
        f"Principle: {principle_text}\n"
        "Does the assistant's response follow the principle?\n"
        "Options:\n"
        f"(A) {options[0]}\n"
        f"(B) {options[1]}\n"
    )
    return [_user(question), _assistant(LEAD_IN)]


# --- The contrast judge: principle-conditioned likelihoods -----------------------------

NEUTRAL_SYSTEM = "You are an assistant."
_CHOOSE = re.compile(
    r"^\s*(?:please\s+)?(?:choose|pick|select|prefer)\s+the\s+(?:assistant(?:'s)?\s+)?"
    r"(?:response|answer)\s+(?:that|which)\s+",
    re.IGNORECASE,
)


def principle_instruction(principle_text: str) -> str:
    """The principle as an instruction to the writer of a response, not to a judge.

    "Choose the response that X" becomes "Write a response that X"; any other
    wording becomes "Follow this principle: ...".
    """
    text = principle_text.strip()
    match = _CHOOSE.match(text)
    if match is None:
        return f"Follow this principle: {text}"
    return "Write a response that " + text[match.end() :]


def conditioned_chat(system: str, prompt: str, response: str) -> list[Message]:
    """The response to the prompt under a system prompt; its likelihood is what is read."""
    return [_system(system), _user(prompt), _assistant(response)]


def contrast_systems(principle_text: str, negative: str) -> tuple[str, str]:
    """The system prompts whose likelihoods are contrasted: (follow, other).

    ``negative="neutral"`` contrasts the principle with no principle at all (the
    pointwise mutual information of principle and response, as in SAMI);
    ``"opposite"`` with an instruction to do the opposite (RLCD's negative prompt).
    """
    instruction = principle_instruction(principle_text)
    follow = f"{NEUTRAL_SYSTEM} {instruction}"
    if negative == "neutral":
        return follow, NEUTRAL_SYSTEM
    if negative == "opposite":
        opposite = instruction[0].lower() + instruction[1:]
        return follow, f"{NEUTRAL_SYSTEM} Do the opposite of this: {opposite}"
    raise ValueError(f"negative must be 'neutral' or 'opposite', got {negative!r}")
