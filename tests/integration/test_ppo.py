"""PPO end to end on a tiny random Llama built in memory: the reward rises, KL stays bounded."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.tiny_model import TinyModelConfig, build_model, build_tokenizer
from alignment.training.ppo import PPOConfig, PPOTrainer, reward_model_fn
from alignment.training.reward import STATS_FILE

pytestmark = pytest.mark.integration

TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "a prime number has exactly two divisors",
    "boil the egg for seven minutes then cool it",
    "plan a day in rome with museums and food",
] * 20
PROMPTS = ["How do I boil an egg?", "What is a prime?", "Plan a day in Rome.", "Tell me a story."]
METRICS = [
    "env/reward_mean",
    "env/response_length",
    "objective/kl",
    "objective/kl_coef",
    "objective/entropy",
    "policy/clipfrac",
    "policy/approxkl",
    "val/loss",
    "val/explained_variance",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture
def tiny(tokenizer):
    """A fresh random policy per test: the trainer trains the model it is given in place."""
    torch.manual_seed(0)
    return tokenizer, build_model(tokenizer, TinyModelConfig(vocab_size=300))


def low_id_reward(tokenizer):
    """Learnable: the share of response tokens in the lower half of the vocabulary, centred."""
    half = len(tokenizer) // 2

    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        shares = []
        for text in responses:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            shares.append(sum(i < half for i in ids) / max(len(ids), 1))
        return 5 * (torch.tensor(shares) - 0.6)

    return reward


def test_ppo_raises_reward_with_kl_bounded(tiny, tmp_path):
    tokenizer, model = tiny
    config = PPOConfig(
        num_batches=25,
        batch_size=16,
        mini_batch_size=8,
        max_new_tokens=10,
        temperature=1.0,
        learning_rate=3e-4,
        adaptive_kl=True,
        target_kl=3.0,
        kl_horizon=200,
    )
    trainer = PPOTrainer(config, model, tokenizer, low_id_reward(tokenizer), PROMPTS)
    history = trainer.train()

    assert len(history) == 25
    assert all(set(METRICS) <= set(m) for m in history)
    reward = [m["env/reward_mean"] for m in history]
    kl = [m["objective/kl"] for m in history]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert last > first + 0.2, reward
    assert max(kl) < 2 * config.target_kl and sum(kl[-5:]) / 5 < 1.5 * config.target_kl, kl
    assert history[0]["policy/approxkl"] >= 0 and history[0]["objective/kl"] == pytest.approx(0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trainer.save(tmp_path / "policy")
    assert json.loads((out / "ppo_config.json").read_text())["target_kl"] == 3.0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("value_head" in name for name, _ in loaded.named_parameters())
    loaded_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = loaded_tokenizer("What is a prime?", return_tensors="pt")
    generated = loaded.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_ppo_with_lora_trains_and_saves_merged(tiny, tmp_path):
    tokenizer, model = tiny
    config = PPOConfig(
        num_batches=2,
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        learning_rate=1e-2,
        use_lora=True,
        lora_r=4,
        kl_estimator="k3",
        whiten_rewards=True,
        missing_eos_penalty=1.0,
    )
    base = {name: p.clone() for name, p in model.named_parameters()}
    trainer = PPOTrainer(config, model, tokenizer, low_id_reward(tokenizer), PROMPTS)
    history = trainer.train()
    assert history[0]["objective/kl"] == pytest.approx(0)  # adapter starts as a no-op
    assert history[1]["objective/kl"] > 0  # k3 is never negative; the adapter moved

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(trainer.save(tmp_path / "lora"))
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, base[n])]
    assert changed  # the merged adapter changed the weights


def test_reward_model_fn_normalises_with_stored_stats(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer, model = tiny
    config = LlamaConfig(**{**model.config.to_dict(), "num_labels": 1})
    torch.manual_seed(1)
    reward_model = LlamaForSequenceClassification(config).eval()
    folder = tmp_path / "reward"
    reward_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts, responses = ["What is a prime?", "Tell me a story."], ["two divisors", "the cat sat"]

    with torch.no_grad():
        raw = torch.cat(
            [
                reward_model(
                    **tokenizer(
                        tokenizer.apply_chat_template(
                            [
                                {"role": "user", "content": p},
                                {"role": "assistant", "content": r},
                            ],
                            tokenize=False,
                        ),
                        add_special_tokens=False,
                        return_tensors="pt",
                    )
                ).logits[:, 0]
                for p, r in zip(prompts, responses, strict=True)
            ]
        )
    assert torch.allclose(reward_model_fn(folder)(prompts, responses), raw, atol=1e-5)
    (folder / STATS_FILE).write_text(json.dumps({"mean": 2.0, "std": 4.0}))
    normalised = reward_model_fn(folder)(prompts, responses)
    assert torch.allclose(normalised, (raw - 2.0) / 4.0, atol=1e-5)
    explicit = reward_model_fn(folder, tokenizer, mean=1.0, std=0.5)(prompts, responses)
    assert torch.allclose(explicit, (raw - 1.0) / 0.5, atol=1e-5)
