"""Option labels are read on the token the judge's tokenizer writes after the lead-in.

Two tokenizers are trained here, offline, on the judge's own questions: one
SentencePiece-style (a Metaspace dummy prefix, as Llama 2 and Mistral v0.1 have: "A"
alone encodes as "▁A", but after "(" the model writes "A"), and the project's
byte-level BPE (GPT-2 and SmolLM2's kind). tests/integration/test_label_tokens_real.py
runs a judge with the first through real vLLM.
"""

from __future__ import annotations

import functools

import pytest

from alignment.backends import LabelTokenError, label_context, label_token_variants
from alignment.judge_eval import load_preference_set
from alignment.templates import (
    COT_LEAD_IN,
    LABELS,
    LEAD_IN,
    cot_answer_chat,
    pairwise_cot_chat,
    pairwise_judge_chat,
    pointwise_judge_chat,
)
from alignment.tiny_model import build_tokenizer

# Llama 2's chat format, the assistant's turn closed by EOS.
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def judge_chats(limit: int = 24) -> list[list[dict]]:
    """The judge's questions about the first built-in gold pairs, each in the shapes the
    judge asks (A/B, yes/no, after a rationale), its lead-in left open."""
    chats = []
    for pair in load_preference_set("builtin", limit):
        text, prompt, a, b = pair.principle.text, pair.prompt, pair.chosen, pair.rejected
        chats += [
            pairwise_judge_chat(text, prompt, a, b),
            pairwise_judge_chat(text, prompt, b, a, shots=True),
            pointwise_judge_chat(text, prompt, a, yes_label="B"),
            cot_answer_chat(pairwise_cot_chat(text, prompt, a, b), "Both answer; one is kinder."),
        ]
    return chats


def corpus() -> list[str]:
    """The judge's questions answered "A)" and "B)", and the labels as words."""
    texts = []
    for i, chat in enumerate(judge_chats()):
        texts += [m["content"] for m in chat[:-1]]
        texts.append(chat[-1]["content"] + LABELS[i % 2] + ")")
    return texts + ["Response A is better than response B.", "Pick A or B, not C."] * 10


@functools.cache
def sentencepiece_tokenizer(split_punctuation: bool = True):
    """A Llama-2-like tokenizer: BPE over Metaspace words with a dummy prefix ("▁"
    before the first word), "<s>" and "</s>", Llama 2's chat template. With
    ``split_punctuation`` (as Llama's vocabulary behaves) "(" ends a piece, so "(A"
    is "▁(" + "A"; without it "▁(B" may become one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = (
        pre_tokenizers.Sequence([words, pre_tokenizers.Punctuation("merged_with_previous")])
        if split_punctuation
        else words
    )
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    special = ["<unk>", "<s>", "</s>"]
    bpe.train_from_iterator(
        corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False)
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


@functools.cache
def byte_level_tokenizer():
    """The tiny model's own byte-level BPE (GPT-2, SmolLM2: "A" and "ĠA")."""
    return build_tokenizer(corpus(), 800)


TOKENIZERS = {"sentencepiece": sentencepiece_tokenizer, "byte_level": byte_level_tokenizer}


def token_written_for_label(tokenizer, chat: list[dict], label: str) -> int:
    """Render the judge's whole prompt with the label after the lead-in, encode it in one
    piece, and return the token that holds the label's character; it must be the label
    alone (neither merged with "(" nor split)."""
    text = tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    encoded = tokenizer(text + label, add_special_tokens=False, return_offsets_mapping=True)
    end = len(text) + len(label)
    (index,) = [k for k, (s, e) in enumerate(encoded["offset_mapping"]) if s < end <= e]
    token = encoded["input_ids"][index]
    assert tokenizer.decode([token]).strip() == label
    return token


def old_variants(tokenizer, label: str) -> list[int]:
    """What label_token_variants read before issue 16: the label alone and after a space."""
    found = [tokenizer.encode(t, add_special_tokens=False) for t in (label, " " + label)]
    return [ids[0] for ids in found if len(ids) == 1]


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_the_labels_include_the_token_written_after_each_lead_in(kind):
    tokenizer = TOKENIZERS[kind]()
    variants = label_token_variants(tokenizer, LABELS)
    for chat in judge_chats(limit=3):
        assert label_context(chat) in (LEAD_IN, COT_LEAD_IN)
        for label in LABELS:
            assert token_written_for_label(tokenizer, chat, label) in variants[label]
    assert set(variants["A"]).isdisjoint(variants["B"])


def test_a_dummy_prefix_tokenizer_writes_the_label_without_its_prefix():
    tokenizer = sentencepiece_tokenizer()
    chat = judge_chats(limit=1)[0]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert prompt.endswith(f"[/INST] {LEAD_IN}")
    variants = label_token_variants(tokenizer, LABELS)
    for label in LABELS:
        written = token_written_for_label(tokenizer, chat, label)
        assert tokenizer.convert_ids_to_tokens(written) == label
        # Alone, the label gets the dummy prefix: "▁A", one token but not the one written.
        (alone,) = tokenizer.encode(label, add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(alone) == "▁" + label
        assert written not in old_variants(tokenizer, label)  # the old rule missed it
        assert variants[label] == [written, alone]  # both are read, summed by the backend


def test_byte_level_labels_keep_the_bare_and_spaced_variants():
    tokenizer = byte_level_tokenizer()
    variants = label_token_variants(tokenizer, LABELS)
    for label in LABELS:
        assert tokenizer.convert_ids_to_tokens(variants[label]) == [label, "Ġ" + label]


def test_a_label_of_several_tokens_is_refused_clearly():
    for tokenizer in (sentencepiece_tokenizer(), byte_level_tokenizer()):
        with pytest.raises(LabelTokenError, match=r"splits option label 'zebra-crossing' into"):
            label_token_variants(tokenizer, ["A", "zebra-crossing"])


def test_a_label_that_merges_with_the_parenthesis_is_refused_clearly():
    tokenizer = sentencepiece_tokenizer(split_punctuation=False)
    merged = [
        label
        for label in LABELS
        if len(tokenizer.encode(LEAD_IN + label, add_special_tokens=False))
        <= len(tokenizer.encode(LEAD_IN, add_special_tokens=False))
    ]
    assert merged, "the corpus should teach this tokenizer a '▁(A' or '▁(B' token"
    with pytest.raises(LabelTokenError, match=f"merges option label '{merged[0]}' with the"):
        label_token_variants(tokenizer, LABELS)


def test_the_context_is_the_last_line_of_the_assistant_prefix():
    pairwise, *_, cot = judge_chats(limit=1)
    assert label_context(pairwise) == LEAD_IN
    assert label_context(cot) == COT_LEAD_IN
    tokenizer = sentencepiece_tokenizer()
    custom = label_token_variants(tokenizer, ["A"], contexts=["Pick one: ("])
    assert custom["A"][0] == token_written_for_label(tokenizer, pairwise, "A")
