"""Every prompt the models see, in one place.

Judge questions end with an assistant turn holding a fixed lead-in, so the
very next token is the option label and its log-prob can be read in one
prefill. The contrast judge's chats instead end with the response itself, whose
likelihood is read under a principle-conditioned and a neutral system prompt.
Wording is kept short: the CPU demo model has a small context. Every wording
here was measured on the gold set (docs/judging.md), and is part of the ids of
what it produces: judgment ids hash the chats each judge mode renders for fixed
texts (judge.template_fingerprint), critique ids the critique and revision chats
(critique.template_fingerprint), so editing one wording relabels exactly the
judgments of the modes that use it.

Judged text (prompts and responses) is untrusted: with ``sanitize`` (the default) it
is passed through ``judged_text`` first, so it cannot close the chat turn, open a new
one or forge the question's own lines (docs/judging.md, "Hostile content").
"""

from __future__ import annotations

import re

from alignment.backends import Chat, Message
from alignment.conversation import Prompt, as_chat, history, last_turn

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


def critique_chat(prompt: Prompt, response: str, critique_request: str) -> list[Message]:
    """The conversation so far (every turn of a multi-turn prompt), then the critique
    request."""
    return [*as_chat(prompt), _assistant(response), _user(critique_request)]


def revision_chat(
    prompt: Prompt, response: str, critique_request: str, critique: str, revision_request: str
) -> list[Message]:
    """The critique exchange, then the revision request."""
    return [
        *critique_chat(prompt, response, critique_request),
        _assistant(critique),
        _user(revision_request),
    ]


# --- Judged text: hostile content -----------------------------------------------------

# Control tokens of the common chat templates. A tokenizer reads them in plain text as
# the real special tokens, so "<|im_end|>" inside a response would end the judge's turn.
# Any "<|...|>" (ChatML: SmolLM2, Qwen; Llama 3; Phi), sentencepiece's "<s>" "</s>",
# Llama 2's "[INST]" "<<SYS>>", Gemma's turn tags; each with a role name right after it.
_SPECIAL_TOKEN = re.compile(
    r"(?:<\|[^|<>\s]{1,40}\|>|</?s>|<(?:bos|eos|pad|unk)>|\[/?INST\]|<</?SYS>>"
    r"|<(?:start|end)_of_turn>)(?:[ \t]*(?:system|user|assistant|human|model)\b)?",
    re.IGNORECASE,
)
# Role tags and the question's own headings at the start of a line ("### Assistant:",
# "Human:", "Principle:"): plain-text transcripts and the judge question use them.
_ROLE_MARKER = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:human|user|assistant|system|instruction|response"
    r"|principle|options)[ \t]*:[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
INDENT = "    "  # continuation lines of judged text in a judge question


def judged_text(text: str) -> str:
    """``text`` made inert for a judge: chat-template control tokens (SmolLM2's
    ``all_special_tokens`` are all "<|...|>") and role markers at the start of a line
    are removed, until none is left (removing one may join the halves of another).
    Clean text comes back unchanged."""
    while True:
        cleaned = _ROLE_MARKER.sub("", _SPECIAL_TOKEN.sub("", text))
        if cleaned == text:
            return text
        text = cleaned


ECHO_WORDS = 5  # this many consecutive words of the principle make an echo
_WORD = re.compile(r"\w+")


def without_principle_echo(text: str, principle_text: str) -> str:
    """``text`` without the runs of ``ECHO_WORDS`` or more consecutive words it copies
    from the principle (case and punctuation aside).

    A response that claims "this response directly and correctly answers the question"
    in the principle's own words is likelier under a system prompt that states the
    principle, so it fools the contrast judge however bad it is (every such pair of the
    injection set flipped). An honest answer rarely repeats five words of its principle
    in a row; none of the gold set's responses does. Text without an echo is unchanged.
    """
    words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]
    principle = [w.lower() for w in _WORD.findall(principle_text)]
    k = ECHO_WORDS
    grams = {tuple(principle[i : i + k]) for i in range(len(principle) - k + 1)}
    echoed = [False] * len(words)
    for i in range(len(words) - k + 1):
        if tuple(w for w, _, _ in words[i : i + k]) in grams:
            echoed[i : i + k] = [True] * k
    if not any(echoed):
        return text
    kept, at = [], 0
    for (_, start, end), cut in zip(words, echoed, strict=True):
        if cut:
            kept.append(text[at:start])
            at = end
    kept.append(text[at:])
    return re.sub(r"[ \t]{2,}", " ", "".join(kept)).strip()


def _fenced(text: str, sanitize: bool) -> str:
    """Judged text for a judge question: sanitised, and every line after the first
    indented, so none of its lines can pass for one of the question's ("(B) ...",
    "Principle: ...", the lead-in), which all start at the margin. A one-line text is
    unchanged."""
    if not sanitize:
        return text
    first, *rest = judged_text(text).split("\n")
    return "\n".join([first, *(INDENT + line if line.strip() else "" for line in rest)])


# --- The judge ------------------------------------------------------------------

_SPEAKERS = {"system": "System", "user": "Human", "assistant": "Assistant"}


def _transcript(prompt: Prompt, sanitize: bool) -> str:
    """The conversation as the judge reads it: one "Human:" line for a text; for a
    multi-turn prompt every earlier turn under its speaker, each fenced, the last
    "Human:" turn being the one the responses answer."""
    turns = [*history(prompt), _user(last_turn(prompt))]
    return "".join(f"{_SPEAKERS[m['role']]}: {_fenced(m['content'], sanitize)}\n" for m in turns)


def _pairwise_question(
    principle_text: str, prompt: Prompt, first: str, second: str, sanitize: bool = True
) -> str:
    return (
        "Consider the following conversation between a human and an assistant:\n"
        f"{_transcript(prompt, sanitize)}\n"
        f"Principle: {principle_text}\n"
        "Which response follows the principle better?\n"
        "Options:\n"
        f"(A) {_fenced(first, sanitize)}\n"
        f"(B) {_fenced(second, sanitize)}\n"
    )


def pairwise_judge_chat(
    principle_text: str,
    prompt: Prompt,
    first: str,
    second: str,
    shots: bool = False,
    *,
    sanitize: bool = True,
) -> list[Message]:
    """Multiple-choice question; the next token after the lead-in is the label.

    ``shots`` puts two answered example questions first (FEW_SHOT), one answered
    (A) and one (B). ``sanitize``: the prompt and responses go through ``_fenced``.
    """
    question = _pairwise_question(principle_text, prompt, first, second, sanitize)
    return [*(few_shot_turns() if shots else []), _user(question), _assistant(LEAD_IN)]


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


def pairwise_cot_chat(
    principle_text: str, prompt: Prompt, first: str, second: str, *, sanitize: bool = True
) -> list[Message]:
    """The same question, asking for a rationale first (the backend generates it)."""
    question = _pairwise_question(principle_text, prompt, first, second, sanitize)
    return [_user(question + "Let's think step by step before answering.")]


def cot_answer_chat(cot_chat: Chat, rationale: str) -> list[Message]:
    """The rationale, then the lead-in, so the next token is the label."""
    return [*cot_chat, _assistant(rationale.strip() + "\n" + COT_LEAD_IN)]


def pointwise_judge_chat(
    principle_text: str, prompt: Prompt, response: str, yes_label: str, *, sanitize: bool = True
) -> list[Message]:
    """Does the response follow the principle? ``yes_label`` picks where "yes" is shown."""
    if yes_label not in LABELS:
        raise ValueError(f"yes_label must be one of {LABELS}, got {yes_label!r}")
    options = ("yes", "no") if yes_label == "A" else ("no", "yes")
    question = (
        "Consider the following conversation between a human and an assistant:\n"
        f"{_transcript(prompt, sanitize)}"
        f"Assistant: {_fenced(response, sanitize)}\n\n"
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


def conditioned_chat(
    system: str, prompt: Prompt, response: str, *, sanitize: bool = True
) -> list[Message]:
    """The response to the prompt (every turn of a conversation) under a system prompt;
    its likelihood is what is read. A conversation's own system message follows the
    judge's in the one system turn.

    ``sanitize``: the prompt and response go through ``judged_text`` (the chat template
    delimits them; removing control tokens keeps that delimiting real)."""
    turns = as_chat(prompt)
    if turns[0]["role"] == "system":
        system = f"{system}\n{turns.pop(0)['content']}"
    if sanitize:
        turns = [{**m, "content": judged_text(m["content"])} for m in turns]
        response = judged_text(response)
    return [_system(system), *turns, _assistant(response)]


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
