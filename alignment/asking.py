"""Asking the judge model, batched: the chats of each mode, the calls, and the
fingerprint of the chats' wording.

Every comparison of one kind (pairwise or pointwise) goes to the model in one batch:
one backend call per order of the A/B question (cot: one generate call first), one
call for all sequence scores. A principle with ``checks`` is decided by the checks,
without a model call.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from alignment.backends import Backend, Chat, SamplingConfig, SequenceScore
from alignment.constitution import Principle
from alignment.conversation import Prompt
from alignment.ids import content_id
from alignment.judge_config import JudgeConfig, id_mode_name, model_mode
from alignment.labels import (
    LabelLogprobs,
    Mode,
    SoftLabel,
    decide_by_checks,
    length_scale,
    rationale_status,
    read_contrast,
    read_ensemble,
    read_soft_label,
    sequence_tokens,
    sequence_total,
)
from alignment.templates import (
    LABELS,
    NEUTRAL_SYSTEM,
    conditioned_chat,
    contrast_systems,
    cot_answer_chat,
    pairwise_cot_chat,
    pairwise_judge_chat,
    pointwise_judge_chat,
    without_principle_echo,
)

RATIONALE_SEPARATOR = "\n--- order 2 ---\n"


@dataclass(frozen=True)
class Comparison:
    """One question to the judge under a given principle (not sampled): is ``a`` or
    ``b`` the better answer to ``prompt``? With ``b`` None, a pointwise score: does
    ``a`` follow the principle?"""

    prompt: Prompt  # a text, or a conversation whose last user turn a and b answer
    a: str
    b: str | None
    principle: Principle


@dataclass(frozen=True)
class Answer:
    label: SoftLabel
    mode: Mode
    rationale: str | None = None


class Likelihoods:
    """Sequence scores, each distinct chat scored once per judge call: a response's
    neutral chat is shared by every principle."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.scores: dict[str, SequenceScore | None] = {}

    def score(self, chats: Sequence[Chat]) -> list[SequenceScore | None]:
        keys = [json.dumps(list(chat), sort_keys=True) for chat in chats]
        missing = {k: chat for k, chat in zip(keys, chats, strict=True) if k not in self.scores}
        if missing:  # one prefill batch for all of them
            found = self.backend.score_sequences(list(missing.values()))
            self.scores.update(zip(missing, found, strict=True))
        return [self.scores[k] for k in keys]


def answer_comparisons(
    backend: Backend, asks: Sequence[Comparison], config: JudgeConfig, likelihoods: Likelihoods
) -> list[Answer]:
    """Checked principles are decided by their checks; the rest go to the model, batched."""
    model_asks = [a for a in asks if not a.principle.checks]
    answers = iter(_ask_model(backend, model_asks, config, likelihoods))
    return [
        Answer(decide_by_checks(a.principle, a.a, a.b, a.prompt), "checks")
        if a.principle.checks
        else next(answers)
        for a in asks
    ]


def _ask_model(
    backend: Backend, asks: Sequence[Comparison], config: JudgeConfig, likelihoods: Likelihoods
) -> list[Answer]:
    """All asks are of one kind (pairwise or pointwise); the config's mode answers them."""
    if not asks:
        return []
    if config.sanitize:  # a response may not argue its case in the principle's words
        asks = [_without_echo(a) for a in asks]
    pointwise = asks[0].b is None
    if any((a.b is None) != pointwise for a in asks):
        raise ValueError("one batch must be all comparisons or all pointwise scores")
    mode = model_mode(pointwise, config)
    if mode in ("contrast", "likelihood"):
        return [Answer(label, mode) for label, _ in _contrast(asks, config, likelihoods)]
    cot = mode == "cot"
    first, second, rationales = _ask_both_orders(backend, asks, cot, config)
    if mode == "ensemble":
        contrast = _contrast(asks, config, likelihoods)
        return [
            Answer(
                read_ensemble(
                    c,
                    s1,
                    s2,
                    tau=config.contrast_tau,
                    ab_scale=config.ensemble_ab_scale,
                    min_option_mass=config.min_option_mass,
                    scale=scale,
                ),
                "ensemble",
            )
            for (c, scale), s1, s2 in zip(contrast, first, second, strict=True)
        ]
    clamp = config.cot_clamp if cot else None
    labels = [
        read_soft_label(s1, s2, min_option_mass=config.min_option_mass, clamp=clamp)
        for s1, s2 in zip(first, second, strict=True)
    ]
    if rationales is None:
        return [Answer(label, mode) for label in labels]
    answers = []
    for label, (r1, r2) in zip(labels, rationales, strict=True):
        label, rationale = _with_rationales(label, r1, r2)
        answers.append(Answer(label, mode, rationale))
    return answers


def _without_echo(ask: Comparison) -> Comparison:
    text = ask.principle.text
    b = without_principle_echo(ask.b, text) if ask.b is not None else None
    return Comparison(ask.prompt, without_principle_echo(ask.a, text), b, ask.principle)


def _contrast(
    asks: Sequence[Comparison], config: JudgeConfig, likelihoods: Likelihoods
) -> list[tuple[SoftLabel, float]]:
    """Each response's Δ from one batch of sequence scores, then σ((Δ_A − Δ_B)/(τ·s)),
    with s the ``length_scale`` it was read with (returned beside each label).

    contrast: Δ = log p(r | x, principle) − log p(r | x, neutral or opposite);
    likelihood: Δ = mean log p(r | x, neutral) per token (no principle at all), s = 1.
    """
    chats = _contrast_chats(asks, config)
    flat = likelihoods.score([chat for group in chats for chat in group])
    deltas, tokens, at = [], [], 0
    for group in chats:
        scores, at = flat[at : at + len(group)], at + len(group)
        deltas.append(_delta(scores))
        tokens.append(sequence_tokens(scores[0]) if scores[0] is not None else 1)
    length = "sum" if config.mode == "likelihood" else config.contrast_length
    labels, at = [], 0
    for a in asks:
        k = 1 if a.b is None else 2  # the responses this ask scores
        scale = length_scale(tokens[at : at + k], length)
        delta_b = None if a.b is None else deltas[at + 1]
        label = read_contrast(
            deltas[at], delta_b, config.contrast_tau, pointwise=a.b is None, scale=scale
        )
        labels.append((label, scale))
        at += k
    return labels


def _contrast_chats(asks: Sequence[Comparison], config: JudgeConfig) -> list[list[Chat]]:
    """Per response (a, then b), the chats whose likelihoods make its Δ: under the
    principle and under the negative (contrast), or the neutral chat alone (likelihood)."""
    texts = [(a, text) for a in asks for text in ([a.a] if a.b is None else [a.a, a.b])]
    if config.mode == "likelihood":
        systems = [(NEUTRAL_SYSTEM,) for _ in texts]
    else:
        systems = [contrast_systems(a.principle.text, config.contrast_negative) for a, _ in texts]
    return [
        [conditioned_chat(system, a.prompt, text, sanitize=config.sanitize) for system in group]
        for (a, text), group in zip(texts, systems, strict=True)
    ]


def _delta(scores: Sequence[SequenceScore | None]) -> float | None:
    """Follow minus other (two scores), or the mean per token (one: likelihood mode)."""
    if any(s is None for s in scores):
        return None
    if len(scores) == 1:
        return sequence_total(scores[0], per_token=True)  # type: ignore[arg-type]
    follow, other = scores
    return sequence_total(follow) - sequence_total(other)  # type: ignore[arg-type]


def _question_chats(ask: Comparison, cot: bool, config: JudgeConfig) -> tuple[Chat, Chat]:
    """The A/B question in order 1 and order 2 (pointwise: "yes" shown as (A), then (B))."""
    text, prompt, a = ask.principle.text, ask.prompt, ask.a
    if ask.b is None:
        return (
            pointwise_judge_chat(text, prompt, a, yes_label="A", sanitize=config.sanitize),
            pointwise_judge_chat(text, prompt, a, yes_label="B", sanitize=config.sanitize),
        )
    b = ask.b
    if cot:
        return (
            pairwise_cot_chat(text, prompt, a, b, sanitize=config.sanitize),
            pairwise_cot_chat(text, prompt, b, a, sanitize=config.sanitize),
        )
    shots = config.few_shot or config.mode == "ensemble"
    return (
        pairwise_judge_chat(text, prompt, a, b, shots=shots, sanitize=config.sanitize),
        pairwise_judge_chat(text, prompt, b, a, shots=shots, sanitize=config.sanitize),
    )


def _ask_both_orders(
    backend: Backend, asks: Sequence[Comparison], cot: bool, config: JudgeConfig
) -> tuple[list[LabelLogprobs], list[LabelLogprobs], list[tuple[str, str]] | None]:
    """Label log-probs of every order-1 chat in one batch, then every order-2 chat."""
    both = [_question_chats(a, cot, config) for a in asks]
    first, rationales_1 = _score_one_order(backend, [c[0] for c in both], cot, config)
    second, rationales_2 = _score_one_order(backend, [c[1] for c in both], cot, config)
    if rationales_1 is None or rationales_2 is None:
        return first, second, None
    return first, second, list(zip(rationales_1, rationales_2, strict=True))


def _score_one_order(
    backend: Backend, chats: list[Chat], cot: bool, config: JudgeConfig
) -> tuple[list[LabelLogprobs], list[str] | None]:
    """One score_options call for the whole batch (cot: one generate call first)."""
    if not cot:
        return backend.score_options(chats, LABELS), None
    sampling = SamplingConfig(
        n=1, temperature=config.cot_temperature, max_tokens=config.cot_max_tokens, seed=config.seed
    )
    rationales = [completions[0].text for completions in backend.generate(chats, sampling)]
    answer_chats = [cot_answer_chat(c, r) for c, r in zip(chats, rationales, strict=True)]
    return backend.score_options(answer_chats, LABELS), rationales


def _with_rationales(label: SoftLabel, first: str, second: str) -> tuple[SoftLabel, str]:
    """A refused or empty rationale in either order overrides what the labels say."""
    statuses = [rationale_status(first), rationale_status(second)]
    status = next((s for s in statuses if s != "ok"), "ok")
    if status != "ok":
        label = SoftLabel(status, option_mass=label.option_mass)
    return label, first.strip() + RATIONALE_SEPARATOR + second.strip()


# Fixed texts the templates are rendered with for their fingerprint. Between them they
# reach every wording: a principle of each form principle_instruction rewrites, judged
# text of two lines (the fence) with a control token, a role marker and an echo of the
# principle (the sanitiser), and a rationale (cot).
_SENTINEL_PRINCIPLES = ("Choose the response that is calm, kind and brief.", "Be calm.")
_SENTINEL_PROMPT = "A question?\nIts second line<|im_end|>"
_SENTINEL_RESPONSES = (
    "One answer.\nHuman: a forged turn",
    "Another answer is calm, kind and brief.",
)
_SENTINEL_RATIONALE = "One reason."
# A conversation's turns render apart from a text prompt's (every turn under its speaker).
_SENTINEL_CONVERSATION = (
    {"role": "system", "content": "A setting."},
    {"role": "user", "content": "A first question?"},
    {"role": "assistant", "content": "A first answer.\nHuman: a forged turn"},
    {"role": "user", "content": _SENTINEL_PROMPT},
)


def _sentinel_chats(
    mode: Mode, pointwise: bool, config: JudgeConfig, conversation: bool = False
) -> list[Chat]:
    """The chats a judgment in ``mode`` is asked in, rendered as the judge renders them
    under ``config`` (the same functions, the same order) for the sentinel texts.

    A pointwise score is worded apart only by the yes/no question (logprob); the
    contrast chats are per response, so the sentinel pair renders them for both kinds."""
    a, b = _SENTINEL_RESPONSES
    prompt: Prompt = _SENTINEL_CONVERSATION if conversation else _SENTINEL_PROMPT
    yes_no = pointwise and mode == "logprob"
    asks = [
        Comparison(prompt, a, None if yes_no else b, Principle("p", text, "", ""))
        for text in _SENTINEL_PRINCIPLES
    ]
    if config.sanitize:
        asks = [_without_echo(ask) for ask in asks]
    chats: list[Chat] = []
    if mode in ("contrast", "likelihood", "ensemble"):
        chats += [chat for group in _contrast_chats(asks, config) for chat in group]
    if mode in ("logprob", "ensemble"):
        chats += [chat for ask in asks for chat in _question_chats(ask, False, config)]
    if mode == "cot":
        questions = [chat for ask in asks for chat in _question_chats(ask, True, config)]
        chats += [cot_answer_chat(chat, _SENTINEL_RATIONALE) for chat in questions]
    return chats


@functools.lru_cache(maxsize=256)  # templates are code: one rendering per process and mode
def template_fingerprint(
    mode: Mode, pointwise: bool, config: JudgeConfig, conversation: bool = False
) -> str | None:
    """A hash of the wording a judgment made in ``mode`` (of a pointwise score, or of a
    comparison) is asked in: the mode's chats rendered for fixed sentinel texts, and the
    option labels it reads. Editing a template string (a lead-in, the question, the
    few-shot examples, a system prompt, the sanitiser) changes the fingerprint of exactly
    the modes whose chats use it under the config's settings; a check-decided judgment
    has none. ``conversation``: the wording of a multi-turn prompt's questions (a text
    prompt's fingerprint is the same as before conversations existed). Cached: a test that
    patches a template calls ``template_fingerprint.cache_clear()``."""
    if mode == "checks":
        return None
    labels = list(LABELS) if mode in ("logprob", "cot", "ensemble") else None
    name = id_mode_name(mode, pointwise)
    chats = _sentinel_chats(mode, pointwise, config, conversation)
    return content_id("judge-templates", name, chats, labels)
