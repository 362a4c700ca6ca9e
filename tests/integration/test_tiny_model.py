"""The embedded tiny model: deterministic, small, loadable by transformers (vLLM: elsewhere)."""

from __future__ import annotations

import json

import pytest

from alignment.templates import LABELS
from alignment.tiny_model import TinyModelConfig, build_tiny_model, corpus_chats

pytestmark = pytest.mark.integration

PRINCIPLES = [
    ("Choose the kinder response.", "Say what is unkind.", "Rewrite it kindly."),
    ("Choose the shorter response.", "Say what is too long.", "Rewrite it shorter."),
]
PROMPTS = ["How do I boil an egg?", "What is a prime number?", "Plan a day in Rome."]


def _weights_close(first, second) -> bool:
    """Equal up to float rounding: a build's reductions may round differently on another
    CPU (AVX-512 vs AVX2) or thread count, so bitwise equality is not a promise."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def test_same_seed_same_model(tmp_path):
    chats = corpus_chats(PROMPTS, PRINCIPLES, seed=3, n_chats=60)
    assert chats == corpus_chats(PROMPTS, PRINCIPLES, seed=3, n_chats=60)
    config = TinyModelConfig(train_steps=3, batch_size=2, block_size=64, vocab_size=400)
    first = build_tiny_model(chats, config, cache_dir=tmp_path / "a")
    second = build_tiny_model(chats, config, cache_dir=tmp_path / "b")
    assert first.name == second.name  # the folder name is a hash of corpus and config
    assert _weights_close(first, second)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    assert build_tiny_model(chats, config, cache_dir=tmp_path / "a") == first  # cached
    other = build_tiny_model(
        chats, TinyModelConfig(**{**config.__dict__, "seed": 1}), cache_dir=tmp_path / "a"
    )
    assert other != first and not _weights_close(other, first)


def test_embedded_model_loads_in_transformers_with_chat_template(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.head_dim == 64  # vLLM's CPU attention refuses 16
    build = json.loads((tiny_model / "rlaif_build.json").read_text())
    assert build["loss_last"] < build["loss_first"] / 2  # it learned the project's text
    for label in LABELS:
        assert len(tokenizer.encode(label, add_special_tokens=False)) == 1
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(tokenizer.bos_token) and text.endswith("<|assistant|>\n")
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
