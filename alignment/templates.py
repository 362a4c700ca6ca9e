"""Every prompt the models see, in one place.

Judge questions end with an assistant turn holding a fixed lead-in, so the
very next token is the option label and its log-prob can be read in one
prefill. Wording is kept short: the CPU demo model has a small context.
"""

from __future__ import annotations

from alignment.backends import Chat, Message

LABELS = ("A", "B")
LEAD_IN = "The answer is ("
COT_LEAD_IN = "Therefore, the answer is ("


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


def pairwise_judge_chat(principle_text: str, prompt: str, first: str, second: str) -> list[Message]:
    """Multiple-choice question; the next token after the lead-in is the label."""
    return [_user(_pairwise_question(principle_text, prompt, first, second)), _assistant(LEAD_IN)]


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
