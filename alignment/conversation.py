"""A prompt is a text or a conversation (TRL's conversational format: a list of
``{role, content}`` messages ending with a user turn).

A text is the one-turn conversation ``[{"role": "user", "content": text}]``; every stage
that talks to a model builds its chat with ``as_chat``, so a conversation's history reaches
sampling, critiques and every judge mode alike. A conversation is a tuple of messages, so
it stays a value (frozen dataclasses hold it). Its id hashes its canonical JSON, so a
one-turn conversation and the bare text are different prompts only in that id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from alignment.backends import Message

Conversation = tuple[Message, ...]
Prompt = str | Conversation

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A list of messages that is not a conversation a model can continue."""


def conversation(messages: Any) -> Conversation:
    """``messages`` checked: a non-empty list of ``{role, content}`` mappings with roles in
    ROLES, a system turn only first, non-blank contents, the last turn the user's. The
    contents are stripped."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ConversationError("a conversation is a non-empty list of {role, content} messages")
    turns: list[Message] = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ConversationError(f"message {i} must be an object with exactly role and content")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ConversationError(f"message {i}: role {role!r} is not one of {list(ROLES)}")
        if role == "system" and i != 1:
            raise ConversationError(f"message {i}: a system message may only come first")
        if not isinstance(content, str) or not content.strip():
            raise ConversationError(f"message {i}: content must be a non-empty string")
        turns.append({"role": role, "content": content.strip()})
    if turns[-1]["role"] != "user":
        raise ConversationError("the last message must be the user's (the turn to answer)")
    return tuple(turns)


def is_conversation(prompt: Prompt) -> bool:
    return not isinstance(prompt, str)


def as_chat(prompt: Prompt) -> list[Message]:
    """The chat a model continues: the conversation, or the text as one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(message) for message in prompt]


def last_turn(prompt: Prompt) -> str:
    """The turn to answer: the text itself, or the conversation's last user message."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def first_turn(prompt: Prompt) -> str:
    """The request that opens the prompt: the text, or the conversation's first user turn."""
    return next(m["content"] for m in as_chat(prompt) if m["role"] == "user")


def history(prompt: Prompt) -> Conversation:
    """Every turn before the one to answer (empty for a text)."""
    return () if isinstance(prompt, str) else tuple(prompt[:-1])


def turns(prompt: Prompt) -> int:
    """How many user turns the prompt has."""
    return 1 if isinstance(prompt, str) else sum(m["role"] == "user" for m in prompt)


def prompt_key(prompt: Prompt) -> str:
    """What a prompt's id and hash split read: the text, or the conversation's canonical
    JSON."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(list(prompt), ensure_ascii=False, separators=(",", ":"))


def messages_json(prompt: Prompt) -> str | None:
    """The store's ``messages`` column: the conversation's canonical JSON, None for a text."""
    return None if isinstance(prompt, str) else prompt_key(prompt)


def from_stored(text: str, messages: str | Sequence[Message] | None) -> Prompt:
    """The prompt a stored row holds: its ``messages`` when set, else its text."""
    if messages is None:
        return text
    loaded = json.loads(messages) if isinstance(messages, str) else messages
    return tuple({"role": m["role"], "content": m["content"]} for m in loaded)


def assistant_turns(prompt: Prompt) -> list[str]:
    """The assistant's earlier answers in the conversation, in order."""
    return [m["content"] for m in history(prompt) if m["role"] == "assistant"]
