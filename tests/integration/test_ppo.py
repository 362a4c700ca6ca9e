"""PPO end to end on a tiny random Llama built in memory: the reward rises, KL stays bounded.
Then PPO from a checkpoint shaped like a GPU user's (``bf16_model``: bfloat16 weights, a
generation config with repetition_penalty, top_k, top_p and two end tokens): float32 master
weights, updates not rounded away, samples from softmax(logits / T), either end token stops
a response, the policy saved back in bfloat16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.tiny_model import TinyModelConfig, build_model, build_tokenizer
from alignment.training.common import bf16_autocast, saved_precision
from alignment.training.ppo import (
    PPOConfig,
    PPOTrainer,
    autocast,
    encode_prompts,
    reward_model_fn,
)
from alignment.training.reward import STATS_FILE
from tests.precision_models import REPETITION_PENALTY, SECOND_END, end_token_ids, stored_dtype

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
SMOKE = {"num_batches": 2, "batch_size": 8, "mini_batch_size": 4}  # 2 batches of 2 minibatches


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


def train_tiny(tiny, **config) -> tuple[PPOTrainer, list[dict]]:
    """PPO with ``config`` on the tiny policy, rewarded by low_id_reward: the trainer and the
    metrics of each batch."""
    tokenizer, model = tiny
    trainer = PPOTrainer(PPOConfig(**config), model, tokenizer, low_id_reward(tokenizer), PROMPTS)
    return trainer, trainer.train()


def test_ppo_raises_reward_with_kl_bounded(tiny, tmp_path):
    trainer, history = train_tiny(
        tiny,
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

    assert len(history) == 25
    assert all(set(METRICS) <= set(m) for m in history)
    reward = [m["env/reward_mean"] for m in history]
    kl = [m["objective/kl"] for m in history]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert last > first + 0.2, reward
    target = trainer.config.target_kl
    assert max(kl) < 2 * target and sum(kl[-5:]) / 5 < 1.5 * target, kl
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
    _, model = tiny
    base = {name: p.clone() for name, p in model.named_parameters()}
    trainer, history = train_tiny(
        tiny,
        **SMOKE,
        ppo_epochs=2,
        max_new_tokens=6,
        learning_rate=1e-2,
        use_lora=True,
        lora_r=4,
        kl_estimator="k3",
        whiten_rewards=True,
        missing_eos_penalty=1.0,
    )
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
    unnormalised = reward_model_fn(folder, normalise=False)(prompts, responses)
    assert torch.allclose(unnormalised, raw, atol=1e-5)
    with pytest.raises(FileNotFoundError, match=STATS_FILE):
        reward_model_fn(folder)  # a reward model without its statistics is refused
    (folder / STATS_FILE).write_text(json.dumps({"mean": 2.0, "std": 4.0}))
    normalised = reward_model_fn(folder)(prompts, responses)
    assert normalised.dtype == torch.float32
    assert torch.allclose(normalised, (raw - 2.0) / 4.0, atol=1e-5)


# --- a GPU user's checkpoint: bfloat16 weights and a generation config ------------------------

PROMPT = "How do I boil an egg?"  # the tiny model's first answer tokens often repeat its words
LOW_LR = PPOConfig(
    **SMOKE,
    ppo_epochs=1,
    max_new_tokens=8,
    learning_rate=1e-6,  # pure-bf16 Adam rounds steps this small away
)


def length_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    return torch.tensor([len(r) / 20 for r in responses])


def lm_of(trainer: PPOTrainer):
    return trainer.accelerator.unwrap_model(trainer.model).lm


def float32_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: p.detach().clone() for name, p in lm.named_parameters()}


def weight_change(trainer: PPOTrainer, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every trained weight minus its starting value, flat, in float32."""
    trained = dict(lm_of(trainer).named_parameters())
    return torch.cat(
        [(trained[n].detach().float().cpu() - w).reshape(-1) for n, w in start.items()]
    )


@pytest.fixture(scope="module")
def float32_copy(bf16_model, tmp_path_factory) -> Path:
    """The same checkpoint with the same values, stored in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = tmp_path_factory.mktemp("fp32") / "model"
    AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.float32).save_pretrained(dest)
    AutoTokenizer.from_pretrained(bf16_model).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def bf16_run(bf16_model):
    """Two low-LR PPO batches from the bfloat16 checkpoint: the trainer and its weight change."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bf16_model)
    trainer = PPOTrainer(LOW_LR, bf16_model, tokenizer, length_reward, PROMPTS)
    master = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    start = float32_weights(bf16_model)
    trainer.train()
    return trainer, master, weight_change(trainer, start)


def test_ppo_trains_float32_master_weights_from_a_bf16_checkpoint(bf16_run):
    trainer, master, _ = bf16_run
    assert master == {torch.float32}
    assert {p.dtype for p in trainer.ref.parameters()} == {torch.float32}


def test_ppo_update_from_bf16_is_not_rounded_away(bf16_run, float32_copy):
    from transformers import AutoTokenizer

    _, _, change = bf16_run
    tokenizer = AutoTokenizer.from_pretrained(float32_copy)
    reference = PPOTrainer(LOW_LR, float32_copy, tokenizer, length_reward, PROMPTS)
    start = float32_weights(float32_copy)
    reference.train()
    expected = weight_change(reference, start)

    assert expected.norm() > 0
    # Adam moves almost every weight by about the learning rate; bf16 weights (resolution
    # about 4e-3 of their size) would keep almost none of it.
    assert (change != 0).float().mean() > 0.5, (change != 0).float().mean()
    assert (change - expected).norm() < 0.05 * expected.norm(), (change.norm(), expected.norm())


def test_ppo_saves_the_checkpoint_dtype_with_a_precision_record(bf16_run, tmp_path):
    trainer, _, _ = bf16_run
    out = trainer.save(tmp_path / "policy")
    assert stored_dtype(out) == "bfloat16"
    precision = saved_precision(out)
    assert precision["master_dtype"] == "float32" and precision["saved_dtype"] == "bfloat16"
    assert json.loads((out / "ppo_config.json").read_text())["learning_rate"] == 1e-6
    # save() cast a copy: the trainer still holds float32 masters and trains on
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert len(trainer.train()) == LOW_LR.num_batches


def test_ppo_samples_from_softmax_of_logits_over_temperature(bf16_model):
    """One-token rollouts: the share of tokens the prompt contains (what the checkpoint's
    repetition_penalty pushes down) and of tokens outside the likeliest 80% of the mass (what
    its top_p would cut) match softmax(logits / T) within sampling noise."""
    from transformers import AutoTokenizer
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    tokenizer = AutoTokenizer.from_pretrained(bf16_model)
    config = PPOConfig(num_batches=1, batch_size=8, mini_batch_size=8, max_new_tokens=1)
    trainer = PPOTrainer(config, bf16_model, tokenizer, length_reward, [PROMPT])
    ids, mask = encode_prompts(tokenizer, [PROMPT], config, trainer.pad_id)
    device = trainer.accelerator.device
    with torch.no_grad(), autocast():  # as the rollout computes them
        logits = lm_of(trainer)(ids.to(device), attention_mask=mask.to(device)).logits
    logits = logits[0, -1].float().cpu()
    probs = torch.softmax(logits / config.temperature, -1)
    penalised = RepetitionPenaltyLogitsProcessor(REPETITION_PENALTY)(ids, logits[None].clone())
    penalised_probs = torch.softmax(penalised[0] / config.temperature, -1)
    in_prompt = torch.zeros_like(probs, dtype=torch.bool)
    in_prompt[ids[0]] = True
    ranked = probs.sort(descending=True)
    outside_top = torch.ones_like(in_prompt)
    outside_top[ranked.indices[ranked.values.cumsum(0) - ranked.values < 0.8]] = False

    n = 512
    rollout = trainer.rollout([PROMPT] * n)
    first = rollout["input_ids"][:, int(rollout["context"])].cpu()
    for name, tokens, leaked in [
        ("in the prompt", in_prompt, penalised_probs[in_prompt].sum().item()),
        ("outside the top-p 0.8 nucleus", outside_top, 0.0),
    ]:
        expected = probs[tokens].sum().item()
        sigma = (expected * (1 - expected) / n) ** 0.5
        assert abs(leaked - expected) > 8 * sigma, name  # the check would see the leak
        seen = tokens[first].float().mean().item()
        assert abs(seen - expected) < 4.5 * sigma + 0.005, (name, seen, expected, leaked)
    # the log-probs PPO trains on are those of the same distribution
    atol = 2e-2 if bf16_autocast() else 1e-4  # bf16 logits of a batch of 512 and of 1 differ
    assert torch.allclose(rollout["logp"][:, 0].float().cpu(), probs[first].log(), atol=atol)


@pytest.fixture(scope="module")
def ends_first(bf16_model, tmp_path_factory) -> Path:
    """bf16_model whose (untied) lm_head puts nearly all mass, equally, on its two end tokens
    right after PROMPT's chat turn: the two rows are the same vector, logit about 50."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bf16_model)
    lm = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.float32)
    ids, mask = encode_prompts(tokenizer, [PROMPT], PPOConfig(), tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state[0, -1]
        lm.config.tie_word_embeddings = False
        head = lm.model.embed_tokens.weight.detach().clone()
        head[end_token_ids(tokenizer)] = 50 * hidden / hidden.norm() ** 2
        lm.lm_head.weight = torch.nn.Parameter(head)
    dest = tmp_path_factory.mktemp("ends") / "model"
    lm.to(torch.bfloat16).save_pretrained(dest)  # keeps the checkpoint's generation config
    tokenizer.save_pretrained(dest)
    return dest


def test_either_end_token_stops_a_response(ends_first):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ends_first)
    eos, second = end_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(second) == SECOND_END
    config = PPOConfig(num_batches=1, batch_size=8, mini_batch_size=8, max_new_tokens=8)
    trainer = PPOTrainer(config, ends_first, tokenizer, length_reward, [PROMPT])
    rollout = trainer.rollout([PROMPT] * 32)
    responses = rollout["input_ids"][:, int(rollout["context"]) :]
    assert set(responses[:, 0].tolist()) == {eos, second}  # each about half the time
    assert responses.shape[1] == 1  # generation stopped at either one
    assert rollout["mask"].sum(1).tolist() == [1.0] * 32
    assert rollout["has_eos"].tolist() == [1.0] * 32
