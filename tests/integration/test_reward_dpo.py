"""Reward model and DPO on a learnable synthetic preference set, with a tiny local Llama.

Chosen answers are short and say "please"; rejected ones are long and say
"never". Both stages must learn that from 200 pairs and rank 50 held-out pairs
about topics they never saw.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from alignment.tiny_model import TinyModelConfig, build_model, build_tokenizer
from alignment.training.dpo import DPOStageConfig, train_dpo
from alignment.training.online_rl import reward_function
from alignment.training.reward import (
    STATS_FILE,
    RewardStageConfig,
    chat_row,
    reward_input_ids,
    score,
    train_reward_model,
)

pytestmark = pytest.mark.integration

TOPICS = ["tea", "rivers", "bread", "chess", "maps", "music", "gardens", "stars"]
HELD_OUT_TOPICS = ["bikes", "clocks", "owls", "rain"]
ADJECTIVES = ["old", "bright", "quiet", "green", "useful", "strange", "warm", "simple"]


def synthetic_pairs(
    n: int, seed: int, topics: list[str] = TOPICS, conversational: bool = True
) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic, adj, other = rng.choice(topics), rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
        prompt = f"Tell me about {topic}."
        chosen = f"Sure, please enjoy {topic}; it is {adj}."
        rejected = f"No. I will never talk about {topic}, never, it is {adj} and {other} anyway."
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if conversational:
            row = {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        rows.append(row | {"p_chosen": rng.uniform(0.6, 1.0)})
    return rows


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """An untrained 2-layer Llama (head_dim 64) and a BPE tokenizer fitted to the pairs' text."""
    import torch

    rows = synthetic_pairs(300, seed=99, topics=TOPICS + HELD_OUT_TOPICS, conversational=False)
    texts = [r[key] for r in rows for key in ("prompt", "chosen", "rejected")]
    tokenizer = build_tokenizer(texts, vocab_size=384)
    config = TinyModelConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        head_dim=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_model(tokenizer, config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs() -> tuple[list[dict], list[dict]]:
    return synthetic_pairs(200, seed=1), synthetic_pairs(50, seed=2, topics=HELD_OUT_TOPICS)


def test_reward_model_margin_loss_ranks_held_out_pairs_and_normalises(tiny_llama, pairs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train, held_out = pairs
    config = RewardStageConfig(
        loss="margin",
        learning_rate=1e-3,
        num_train_epochs=2,
        per_device_train_batch_size=16,
        max_length=64,
    )
    result = train_reward_model(tiny_llama, None, train, held_out, train, config, tmp_path / "rm")
    assert result.metrics["eval_accuracy"] >= 0.8, result.metrics
    assert result.metrics["train_pairs"] == 200 and result.metrics["eval_pairs"] == 50

    stats = json.loads((result.path / STATS_FILE).read_text())
    assert stats["n"] == 400 and stats["std"] > 0
    assert stats["mean"] == pytest.approx(result.metrics["mean"])
    AutoModelForSequenceClassification.from_pretrained(result.path)  # a plain folder

    responses = [(r["prompt"], r[side]) for r in train for side in ("chosen", "rejected")]
    normalised = score(result.path, responses)
    assert abs(statistics.fmean(normalised)) < 0.05
    assert abs(statistics.pstdev(normalised) - 1) < 0.05
    raw = score(result.path, responses[:2], normalise=False)
    assert raw[0] > raw[1]  # chosen above rejected

    # RLOO/GRPO get the same normalised scores, called as TRL calls a reward function
    reward = reward_function(result.path)
    prompts, completions = [p for p, _ in responses[:4]], [r for _, r in responses[:4]]
    got = reward(prompts=prompts, completions=completions, completion_ids=[[0]] * 4, log_extra=None)
    assert reward.__name__ == "reward_model"  # TRL logs rewards/reward_model/mean
    assert got == pytest.approx(normalised[:4], abs=1e-5)


def test_reward_model_soft_cross_entropy_lora_on_standard_format(tiny_llama, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rows = synthetic_pairs(250, seed=3, conversational=False)
    config = RewardStageConfig(
        loss="soft_ce",
        use_lora=True,
        lora_r=8,
        lora_alpha=16,
        learning_rate=3e-3,
        num_train_epochs=2,
        per_device_train_batch_size=16,
        max_length=64,
        eval_fraction=0.2,
    )
    result = train_reward_model(tiny_llama, tiny_llama, rows, None, None, config, tmp_path / "rm")
    assert result.metrics["eval_pairs"] == 50 and result.metrics["reference_n"] == 400
    assert result.metrics["eval_accuracy"] >= 0.8, result.metrics
    assert result.metrics["loss_last"] < result.metrics["loss_first"]
    assert not (result.path / "adapter_config.json").exists()
    AutoModelForSequenceClassification.from_pretrained(result.path)


def test_trl_trains_the_reward_model_on_the_tokens_it_is_scored_on(tiny_llama, tmp_path):
    """TRL tokenises the rows ``train_reward_model`` gives it (``chat_row``) exactly as
    ``RewardScorer`` tokenises a (prompt, response), in either format."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from alignment.training.common import trainer_args

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    plain = synthetic_pairs(4, seed=7, conversational=False)
    trainer = RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1),
        args=trainer_args(RewardConfig, str(tmp_path), max_length=None),
        train_dataset=datasets.Dataset.from_list([chat_row(r) for r in plain]),
        processing_class=tokenizer,
    )
    for row, example in zip(plain, trainer.train_dataset, strict=True):
        chat = chat_row(row)
        for side in ("chosen", "rejected"):
            expected = example[f"{side}_ids"]
            assert reward_input_ids(tokenizer, row["prompt"], row[side]) == expected
            assert reward_input_ids(tokenizer, chat["prompt"], chat[side]) == expected


@pytest.mark.parametrize(
    "soft_labels, use_lora",
    [(False, False), (True, True)],
    ids=["sigmoid-full-ref-copy", "soft-lora-precomputed-ref"],
)
def test_dpo_held_out_reward_accuracy(tiny_llama, pairs, tmp_path, soft_labels, use_lora):
    from transformers import AutoModelForCausalLM

    train, held_out = pairs
    config = DPOStageConfig(
        beta=0.1,
        soft_labels=soft_labels,
        use_lora=use_lora,
        lora_r=8,
        lora_alpha=16,
        precompute_ref_log_probs=use_lora,
        learning_rate=5e-3 if use_lora else 1e-3,
        num_train_epochs=1,
        per_device_train_batch_size=16,
        max_length=64,
    )
    result = train_dpo(tiny_llama, train, held_out, config, tmp_path / "dpo")
    assert result.metrics["eval_pairs"] == 50
    assert result.metrics["eval_reward_accuracy"] >= 0.8, result.metrics
    assert result.metrics["eval_reward_margin"] > 0
    assert not (result.path / "adapter_config.json").exists()  # merged: vLLM loads it
    AutoModelForCausalLM.from_pretrained(result.path)


def test_soft_labels_need_the_sigmoid_loss():
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        DPOStageConfig(soft_labels=True, loss_type="hinge")
    with pytest.raises(ValueError, match="extra"):
        DPOStageConfig(label_smoothing=0.1)
