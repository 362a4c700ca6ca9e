"""Which tokens a backend reads: the option labels' token ids after the judge's lead-in,
and where a chat's last (assistant) message sits among its token ids."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from alignment.backends.protocol import Chat, SequenceScore


class LabelTokenError(ValueError):
    """An option label is not a single token in the judge's tokenizer."""


def label_token_variants(
    tokenizer, labels: Sequence[str], *, contexts: Sequence[str] | None = None
) -> dict[str, list[int]]:
    """The token ids a judge may answer each label with, refusing a label that is not
    one token where it is read.

    The label is read right after a lead-in that ends with "(" (``contexts``, by
    default the judge's LEAD_IN and COT_LEAD_IN), so the id that counts is the one the
    tokenizer writes for the label there: ``encode(context + label)`` less
    ``encode(context)``. It is not always ``encode(label)``: a SentencePiece tokenizer
    with a dummy prefix (Llama 2, Mistral) encodes "A" alone as "▁A", while after "("
    the model writes "A". The label on its own and after a space, when each is one
    token, are kept as further variants (the backend sums them, log-sum-exp). A label
    that takes more than one token there, or that merges with the text before it (no
    token boundary after "("), raises LabelTokenError.
    """
    if contexts is None:
        from alignment.templates import COT_LEAD_IN, LEAD_IN  # templates imports this module

        contexts = (LEAD_IN, COT_LEAD_IN)
    variants: dict[str, list[int]] = {}
    for label in labels:
        ids = [_label_token(tokenizer, context, label) for context in contexts]
        for alone in (label, " " + label):
            found = tokenizer.encode(alone, add_special_tokens=False)
            if len(found) == 1:
                ids.append(found[0])
        variants[label] = list(dict.fromkeys(ids))  # unique, in-context ids first
    return variants


def _label_token(tokenizer, context: str, label: str) -> int:
    """The one token id ``label`` gets right after ``context``."""
    before = tokenizer.encode(context, add_special_tokens=False)
    after = tokenizer.encode(context + label, add_special_tokens=False)
    if after[: len(before)] != before:
        raise LabelTokenError(
            f"the judge's tokenizer merges option label {label!r} with the text before it "
            f"(encoding {context + label!r} does not start with the tokens of {context!r}), "
            "so the label's own token cannot be read; choose a judge model (or labels) "
            "where a token boundary falls before the label"
        )
    added = after[len(before) :]
    if len(added) != 1:
        raise LabelTokenError(
            f"the judge's tokenizer splits option label {label!r} into {len(added)} tokens "
            f"{added} after {context!r}; choose a judge model (or labels) where each label "
            "is one token"
        )
    return added[0]


def label_context(chat: Chat) -> str:
    """What an option label is read right after: the last line of the chat's final
    (assistant prefix) message, e.g. "The answer is (" or "Therefore, the answer is ("."""
    return chat[-1]["content"].rsplit("\n", 1)[-1] if chat else ""


def chat_response_tokens(tokenizer, chat: Chat) -> ResponseTokens:
    """A chat's token ids up to the end-of-turn token, and where its last (assistant)
    message sits, rendered by the tokenizer's chat template."""
    if not chat or chat[-1]["role"] != "assistant":
        raise ValueError("score_sequences needs chats that end with an assistant message")

    def render(messages: Chat, **kwargs: bool) -> str:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)

    return split_response(
        render(chat[:-1], add_generation_prompt=True),
        render(chat, add_generation_prompt=False, continue_final_message=True),
        render(chat, add_generation_prompt=False),
        lambda text: tokenizer.encode(text, add_special_tokens=False),
    )


@dataclass(frozen=True)
class ResponseTokens:
    """A chat's token ids; the response is ``token_ids[start:end]``, and the template's
    end-of-turn token, when it writes one, is ``token_ids[end]`` (the last id)."""

    token_ids: list[int]
    start: int
    end: int

    def score(self, token_logprobs: Sequence[float | None]) -> SequenceScore | None:
        """Sum ``token_logprobs[i]`` = log p(token_ids[i] | ids before it) over the response."""
        values = token_logprobs[self.start : len(self.token_ids)]
        if len(values) < len(self.token_ids) - self.start or any(
            v is None or math.isnan(v) for v in values
        ):
            return None
        has_end = len(self.token_ids) > self.end
        return SequenceScore(
            logprob=math.fsum(values[: self.end - self.start]),  # type: ignore[arg-type]
            num_tokens=self.end - self.start,
            end_logprob=values[-1] if has_end else None,
        )


def split_response(
    prefix: str, body: str, full: str, encode: Callable[[str], list[int]]
) -> ResponseTokens:
    """Token ids of ``full`` cut after its end-of-turn token, with the response located.

    ``prefix`` is the chat before the response with the assistant turn opened,
    ``body`` that plus the response, ``full`` the whole rendered chat. When
    tokenizing ``full`` in one piece keeps the pieces' boundaries, those tokens are
    used; when a token straddles a boundary, each piece is tokenized on its own and
    the ids are joined, so every scored position belongs to the response alone.
    """
    if not (body.startswith(prefix) and full.startswith(body)):
        raise ValueError(
            "the chat template does not render the response after the opened assistant "
            "turn; score_sequences cannot tell which tokens are the response"
        )
    prefix_ids, body_ids, full_ids = encode(prefix), encode(body), encode(full)
    whole = body_ids[: len(prefix_ids)] == prefix_ids and full_ids[: len(body_ids)] == body_ids
    if not whole:
        body_ids = prefix_ids + encode(body[len(prefix) :])
        full_ids = body_ids + encode(full[len(body) :])
    end = len(body_ids)
    return ResponseTokens(full_ids[: end + 1], len(prefix_ids), end)
