"""`rlaif judge eval` with a judge whose tokenizer has a dummy prefix (Llama 2's kind),
through real vLLM: its labels are read on the tokens it writes after the lead-in.

The judge is a random one-layer Llama (head_dim 64, as vLLM's CPU attention needs)
with tests/unit/test_label_tokens.py's SentencePiece-style tokenizer, wired to answer
as a judge that has learnt the format does: its next token after any context is "A"
or "B" as the tokenizer writes them after "(", never "▁A" or "▁B". Read on the labels
alone ("▁A", what label_token_variants took before issue 16) the same answers have no
mass on the labels and are all unparseable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import alignment.backends.vllm_backend
from alignment.backends import release_engines
from alignment.judge import judge_comparisons
from alignment.judge_config import JudgeConfig
from alignment.judge_eval import load_preference_set, to_comparisons
from alignment.templates import LABELS, LEAD_IN
from flows.cli import main
from flows.config import ModelConfig
from flows.models import make_backend
from storage import Store
from tests.unit.test_label_tokens import sentencepiece_tokenizer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PAIRS = 4  # built-in gold pairs judged, both orders: 8 questions
ENGINE = {"kv_cache_gib": 0.25, "max_model_len": 2048}


def answering_llama(tokenizer):
    """Attention and MLP outputs zeroed, so the last hidden state is the last token's
    embedding, whose first dimension is a constant 1; only the rows of the label tokens
    written after the lead-in read it in the (untied) output layer: P("A") ≈ 0.75 and
    P("B") ≈ 0.25 after every context, every other token ≈ 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, torch_dtype="float32",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    written = [tokenizer.encode(LEAD_IN + x, add_special_tokens=False)[-1] for x in LABELS]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[written[0], 0] = 1.0
        model.lm_head.weight[written[1], 0] = 0.9
    return model


@pytest.fixture(scope="module")
def prefix_judge(tmp_path_factory) -> Path:
    tokenizer = sentencepiece_tokenizer()
    folder = tmp_path_factory.mktemp("prefix-judge")
    answering_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    yield folder
    release_engines(folder)  # this judge's engine only; the shared tiny one stays


def test_judge_eval_reads_the_labels_of_a_dummy_prefix_tokenizer(
    prefix_judge, tmp_path, monkeypatch
):
    monkeypatch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    config = tmp_path / "judge.yaml"
    config.write_text(
        json.dumps(
            {
                "store": str(tmp_path / "store"),
                "constitution": str(REPO / "constitutions" / "default.yaml"),
                "policy": {"model": str(prefix_judge), **ENGINE},
            }
        )
    )
    args = ["judge", "eval", "builtin", "--config", str(config), "--mode", "logprob"]
    result = CliRunner().invoke(main, [*args, "--limit", str(PAIRS), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = Store(tmp_path / "store").query("SELECT metric, value, n FROM judge_evals")
    figures = {r["metric"]: (r["value"], r["n"]) for r in rows}
    assert figures["not_ok"] == (0.0, PAIRS)  # no unparseable, no missing log-probs
    # The wired judge answers (A) in both orders: chosen first, then rejected first.
    assert figures["first_position_rate"] == (1.0, 2 * PAIRS)
    assert figures["accuracy"] == (0.5, PAIRS)

    # Control: the same judge read on the labels alone ("▁A", "▁B") finds no answer.
    backend = make_backend(ModelConfig(model=str(prefix_judge), **ENGINE), seed=0)
    comparisons = to_comparisons(load_preference_set("builtin", PAIRS))
    logprob = JudgeConfig(mode="logprob")
    assert {x.status for x in judge_comparisons(backend, comparisons, logprob)} == {"ok"}

    def alone(tokenizer, labels, **_):
        return {x: tokenizer.encode(x, add_special_tokens=False) for x in labels}

    monkeypatch.setattr(alignment.backends.vllm_backend, "label_token_variants", alone)
    backend._label_ids.clear()
    assert {x.status for x in judge_comparisons(backend, comparisons, logprob)} == {"unparseable"}
