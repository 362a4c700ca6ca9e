"""The embedded Qwen2.5-Coder-0.5B-Instruct, a judge that is not the policy: converted from
its six wheels, served by vLLM, judging in contrast mode.

Only when it is already built (`make qwen-coder`): `make test` never downloads its
470 MB."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alignment.asking import Comparison
from alignment.backends import SamplingConfig, VLLMBackend, label_token_variants, release_engines
from alignment.constitution import load_constitution
from alignment.judge import judge_comparisons
from alignment.judge_config import JudgeConfig
from alignment.judge_eval import load_preference_set, to_comparisons
from alignment.model_ref import ModelRef
from alignment.templates import LABELS
from alignment.wheel_models import MARKER, QWEN_CODER, build_model, is_built, model_target
from flows.config import ModelConfig
from flows.models import make_backend, model_ref

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not is_built(model_target(QWEN_CODER)),
        reason="qwen-coder-0.5b is not built (make qwen-coder downloads 470 MB)",
    ),
    # Opt-in (`make test-qwen`): its engine and judge take about 80 s, which `make test`'s
    # 15-minute budget on 2 cores does not have, on machines that built it for other work.
    pytest.mark.skipif(
        os.environ.get("RLAIF_TEST_QWEN") != "1", reason="set RLAIF_TEST_QWEN=1 (make test-qwen)"
    ),
]
REPO = Path(__file__).resolve().parents[2]
CONFIG = ModelConfig(model="qwen-coder-0.5b", kv_cache_gib=1.0, max_model_len=2048)


@pytest.fixture(scope="module")
def qwen_model() -> Path:
    return build_model(QWEN_CODER)  # built: returns at once


@pytest.fixture(scope="module")
def qwen_backend(qwen_model: Path) -> VLLMBackend:
    backend = make_backend(CONFIG, seed=0)  # about 35 s to start on 2 cores
    assert isinstance(backend, VLLMBackend)
    yield backend
    release_engines(qwen_model)


def test_folder_is_qwen_coder(qwen_model: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(qwen_model)
    # Qwen2Config has no head_dim attribute: it is hidden_size / num_attention_heads.
    head_dim = config.hidden_size // config.num_attention_heads
    assert (config.model_type, config.num_hidden_layers, head_dim) == ("qwen2", 24, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    assert json.loads((qwen_model / "config.json").read_text())["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(qwen_model)
    assert tokenizer.eos_token == "<|im_end|>"
    eos = GenerationConfig.from_pretrained(qwen_model).eos_token_id
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # The config does not check an embedded judge's labels: each must be one token here.
    assert set(label_token_variants(tokenizer, LABELS)) == set(LABELS)
    record = json.loads((qwen_model / MARKER).read_text())
    assert record["source"]["gguf_sha256"] == QWEN_CODER.gguf_sha256
    assert record["parameters"] > 400_000_000
    assert model_ref(CONFIG) == ModelRef(qwen_model.name, str(qwen_model))


def test_greedy_answer_is_right(qwen_backend: VLLMBackend) -> None:
    [[answer]] = qwen_backend.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]],
        SamplingConfig(temperature=0.0, max_tokens=32),
    )
    assert "Paris" in answer.text, answer.text
    assert answer.finish_reason == "stop"


def test_contrast_judge_reads_every_gold_pair(qwen_backend: VLLMBackend) -> None:
    """Every pair gets a soft label from both responses' Δ, and the same pair with its
    responses swapped gets the complementary label (contrast has no option order)."""
    constitution = load_constitution(REPO / "constitutions" / "demo.yaml")
    pairs = load_preference_set("builtin-audit", 6, constitution=constitution)
    comparisons = to_comparisons(pairs)
    swapped = [Comparison(c.prompt, c.b, c.a, c.principle) for c in comparisons]
    config = JudgeConfig(mode="contrast")
    labels = judge_comparisons(qwen_backend, [*comparisons, *swapped], config)
    assert [label.status for label in labels] == ["ok"] * len(labels)
    forward, backward = labels[: len(comparisons)], labels[len(comparisons) :]
    for one, other in zip(forward, backward, strict=True):
        assert one.p_a is not None and other.p_a is not None and 0 < one.p_a < 1
        assert one.p_a + other.p_a == pytest.approx(1, abs=1e-6)
