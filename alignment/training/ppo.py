"""PPO for RLHF / RLAIF in one file, top to bottom, in the spirit of CleanRL's ``ppo.py``.

TRL removed its PPOTrainer, so the project owns this one. Per rollout batch:

1. sample a response to each prompt from the policy (temperature sampling, stop at EOS);
2. score (prompt, response) with ``reward_fn``; penalise responses that never reached EOS;
3. per-token log-probs of the policy and of the frozen reference, and the policy's values;
4. per-token reward: ``-kl_coef * kl_t``, plus the score at the last response token;
5. GAE advantages and returns;
6. ``ppo_epochs`` passes of minibatches: clipped policy loss + ``vf_coef`` * clipped value loss;
7. adapt ``kl_coef`` toward ``target_kl`` (Ziegler et al. 2019);
8. log one metrics dict.

Metrics (one dict per batch, means over the batch, gathered across processes):
``env/reward_mean``, ``env/reward_std`` (score after the EOS penalty), ``env/response_length``
(tokens, EOS included), ``env/eos_fraction``; ``objective/kl`` (KL estimate summed over a
response, nats), ``objective/kl_coef`` (beta used for this batch), ``objective/entropy`` (mean
per-token entropy of the sampling distribution), ``objective/non_score_reward`` (-beta * KL),
``objective/rlhf_reward`` (score - beta * KL); ``policy/loss``, ``policy/clipfrac`` (share of
tokens whose ratio was clipped), ``policy/approxkl`` (KL of old to new policy, k3 estimate);
``val/loss``, ``val/clipfrac``, ``val/explained_variance`` (of the returns by the rollout values;
this process only).

References: Schulman et al. 2017 (PPO), 2016 (GAE); Ziegler et al. 2019 (KL penalty, adaptive
controller); Huang et al. 2023, "The N Implementation Details of RLHF with PPO"; Schulman 2020,
"Approximating KL Divergence" (k1, k3).
"""

from __future__ import annotations

import copy
import gc
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

RewardFn = Callable[[list[str], list[str]], torch.Tensor]  # (prompts, responses) -> (batch,)


class PPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- rollouts ---
    num_batches: int = Field(100, gt=0, description="Rollout batches to collect and train on.")
    batch_size: int = Field(64, gt=0, description="Rollouts per batch and per process.")
    mini_batch_size: int = Field(8, gt=0, description="Rollouts per gradient step.")
    ppo_epochs: int = Field(4, gt=0, description="Passes over each batch (Ziegler et al.: 4).")
    max_prompt_length: int = Field(512, gt=0, description="Prompt tokens kept (from the end).")
    max_new_tokens: int = Field(64, gt=0, description="Longest sampled response, in tokens.")
    temperature: float = Field(
        0.7,
        gt=0,
        description="Sampling temperature; training logits are divided by it too, so log-probs "
        "are those of the sampling distribution (Huang et al. 2023).",
    )
    chat_template: bool = Field(True, description="Prompt as a user turn of the chat template.")
    # --- reward ---
    kl_coef: float = Field(
        0.05, ge=0, description="Initial beta in r_t = -beta * kl_t (TRL: 0.05)."
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="Per-token KL (Schulman 2020): k1 = log(p/p_ref), can be negative; "
        "k3 = (r - 1) - log r with r = p_ref/p, never negative. Both unbiased.",
    )
    adaptive_kl: bool = Field(False, description="Steer beta toward target_kl (Ziegler et al.).")
    target_kl: float = Field(6.0, gt=0, description="Target KL per response, nats (Ziegler: 6).")
    kl_horizon: int = Field(10000, gt=0, description="Controller horizon, rollouts (Ziegler: 1e4).")
    whiten_rewards: bool = Field(False, description="Unit-variance per-token rewards before GAE.")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of a response without EOS; null: none."
    )
    # --- PPO ---
    learning_rate: float = Field(1e-5, gt=0, description="Adam learning rate (eps 1e-5).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (1.0 in RLHF).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (Schulman et al. 2016).")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip epsilon (PPO paper: 0.2).")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip around the rollout values.")
    clip_vloss: bool = Field(True, description="Clip the value loss like the policy loss.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (TRL: 0.1).")
    norm_adv: bool = Field(True, description="Whiten advantages over the batch.")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    # --- model ---
    use_lora: bool = Field(False, description="Train a LoRA adapter; the reference is adapter-off.")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator.")
    seed: int = Field(0, description="Seed for prompt order, sampling and minibatch order.")

    @model_validator(mode="after")
    def _check_sizes(self) -> PPOConfig:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size {self.mini_batch_size} must divide batch_size {self.batch_size}"
            )
        if self.adaptive_kl and self.kl_coef == 0:
            raise ValueError(f"adaptive_kl needs kl_coef > 0, got {self.kl_coef}")
        return self


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: pure functions. Tensors are (batch, response tokens); mask is 1 on response tokens
# and 0 on the padding after each response's end.
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Mean 0 (or unchanged mean if not shift_mean), std 1 over the masked entries; 0 elsewhere."""
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns; the value after a response's end is 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, advantages + values


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) at the sampled tokens."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, r = p_ref / p
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def policy_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (as a loss), the clipped share of tokens, and approx KL (k3)."""
    log_ratio = new_logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = masked_mean(ratio - 1 - log_ratio, mask)
    return loss, clipfrac, approxkl


def value_loss(
    new_v: torch.Tensor,
    old_v: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    clip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * squared error to the returns, pessimistic over the value clipped near old_v."""
    unclipped = (new_v - returns) ** 2
    if not clip:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=new_v.device)
    v_clipped = old_v + torch.clamp(new_v - old_v, -cliprange_value, cliprange_value)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(target - pred) / Var(target): 1 is perfect, 0 no better than the mean."""
    var = masked_var(target, mask)
    return float("nan") if var == 0 else (1 - masked_var(target - pred, mask) / var).item()


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    Ziegler et al. 2019, section 2.2: a proportional controller on log(beta).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class PolicyWithValue(torch.nn.Module):
    """A causal LM plus a scalar value head on its last hidden state (one shared trunk)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = torch.nn.Linear(lm.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at the start (Huang et al. 2023)
        torch.nn.init.zeros_(self.value_head.bias)
        self.value_head.to(lm.dtype)

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout would make the rollout log-probs differ from the first update's (ratio != 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def frozen_copy(lm: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(lm).eval()
    ref.requires_grad_(False)
    return ref


def lora_policy(lm, r: int, alpha: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(lm, config)


def free_memory() -> None:
    """Hand freed accelerator memory back between batches (a no-op on CPU, where gc is slow)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Rollout helpers: prompts in, token tensors out
# ---------------------------------------------------------------------------------------------


def prompt_batches(prompts: list[str], batch_size: int, seed: int) -> Iterator[list[str]]:
    """Endless batches of prompts: a fresh seeded shuffle each pass."""
    rng, order = random.Random(seed), []
    while True:
        if len(order) < batch_size:
            order += rng.sample(prompts, len(prompts))
            continue
        yield order[:batch_size]
        order = order[batch_size:]


def encode_prompts(tokenizer, prompts: list[str], config: PPOConfig, pad_id: int):
    """Left-padded prompt ids and mask (generation appends on the right)."""
    chat = config.chat_template and tokenizer.chat_template is not None
    if chat:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    rows = [
        tokenizer(p, add_special_tokens=not chat)["input_ids"][-config.max_prompt_length :]
        for p in prompts
    ]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """Pad everything after the first EOS; mask is 1 up to and including it."""
    is_eos = responses == eos_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return responses.masked_fill(after, pad_id), (~after).long(), is_eos.any(1)


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, responses.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return logits.logsumexp(-1) - (F.softmax(logits, -1) * logits).sum(-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as generate() does for left-padded prompts."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


def reward_model_fn(
    path: str | Path,
    tokenizer=None,
    mean: float | None = None,
    std: float | None = None,
    batch_size: int = 16,
) -> RewardFn:
    """A reward_fn from a saved sequence-classification folder: (score - mean) / std.

    mean and std come from the arguments, else from ``<path>/rlaif_reward_stats.json``, else 0, 1.
    Pairs are tokenised as the reward model was trained (``reward.raw_scores``): as a user and
    an assistant turn when the tokenizer has a chat template.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment.training.reward import STATS_FILE, raw_scores

    path = Path(path)
    stats = json.loads((path / STATS_FILE).read_text()) if (path / STATS_FILE).exists() else {}
    mean = stats.get("mean", 0.0) if mean is None else mean
    std = stats.get("std", 1.0) if std is None else std
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    chat = tokenizer.chat_template is not None

    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        pairs = [
            ([{"role": "user", "content": p}], [{"role": "assistant", "content": r}])
            if chat
            else (p, r)
            for p, r in zip(prompts, responses, strict=True)
        ]
        return (torch.tensor(raw_scores(model, tokenizer, pairs, batch_size)) - mean) / std

    return score


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class PPOTrainer:
    """policy: a model folder or a causal LM (trained in place); prompts: plain user texts."""

    def __init__(
        self, config: PPOConfig, policy, tokenizer, reward_fn: RewardFn, prompts: list[str]
    ):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import AutoModelForCausalLM

        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        self.config, self.tokenizer, self.reward_fn = config, tokenizer, reward_fn
        self.accelerator = Accelerator()
        set_seed(config.seed, device_specific=True)  # each process samples differently
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

        lm = (
            AutoModelForCausalLM.from_pretrained(policy)
            if isinstance(policy, str | Path)
            else policy
        )
        disable_dropout(lm)
        # LoRA: the reference is the same model with its adapter off; else a frozen copy.
        self.ref = None if config.use_lora else frozen_copy(lm).to(self.accelerator.device)
        if config.use_lora:
            lm = lora_policy(lm, config.lora_r, config.lora_alpha)
        model = PolicyWithValue(lm)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.learning_rate, eps=1e-5)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.kl_ctl = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.prompts = prompts[rank::world] or prompts
        self.generator = torch.Generator().manual_seed(config.seed + rank)

    def _gathered_mean(self, x: torch.Tensor) -> float:
        return self.accelerator.gather(x.detach().float().reshape(-1)).mean().item()

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        cfg, device = self.config, self.accelerator.device
        policy = self.accelerator.unwrap_model(self.model)
        # 1. sample responses (left-padded prompts; pure temperature sampling)
        queries, query_mask = (
            t.to(device) for t in encode_prompts(self.tokenizer, prompts, cfg, self.pad_id)
        )
        context = queries.shape[1]
        output = policy.lm.generate(
            input_ids=queries,
            attention_mask=query_mask,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        responses, mask, has_eos = truncate_after_eos(output[:, context:], self.eos_id, self.pad_id)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        # 2. score; a response cut off before EOS loses missing_eos_penalty
        scores = self.reward_fn(prompts, texts).to(device=device, dtype=torch.float32)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
        # 3. per-token log-probs of policy and reference, and values
        input_ids = torch.cat([queries, responses], 1)
        attention_mask = torch.cat([query_mask, mask], 1)
        positions = position_ids(attention_mask)
        logits, values = policy(input_ids, attention_mask, positions)
        logits = logits[:, context - 1 : -1] / cfg.temperature
        if self.ref is None:
            with policy.lm.disable_adapter():
                ref_logits = policy.lm(
                    input_ids, attention_mask=attention_mask, position_ids=positions
                ).logits
        else:
            ref_logits = self.ref(
                input_ids, attention_mask=attention_mask, position_ids=positions
            ).logits
        ref_logits = ref_logits[:, context - 1 : -1] / cfg.temperature
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "context": torch.tensor(context),
            "mask": mask.float(),
            "scores": scores,
            "has_eos": has_eos.float(),
            "logp": response_logprobs(logits, responses),
            "ref_logp": response_logprobs(ref_logits, responses),
            "values": values[:, context - 1 : -1].float(),
            "entropy": masked_mean(entropy(logits), mask.float(), dim=1),
        }

    def ppo_update(self, b: dict[str, torch.Tensor]) -> dict[str, float]:
        cfg, context = self.config, int(b["context"])
        stats = torch.zeros(5, device=self.accelerator.device)
        n_updates = 0
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=self.generator)
            for start in range(0, cfg.batch_size, cfg.mini_batch_size):
                idx = order[start : start + cfg.mini_batch_size].to(self.accelerator.device)
                mb = {key: value[idx] for key, value in b.items() if value.dim()}
                mb_positions = position_ids(mb["attention_mask"])
                logits, values = self.model(mb["input_ids"], mb["attention_mask"], mb_positions)
                logits = logits[:, context - 1 : -1] / cfg.temperature
                new_logp = response_logprobs(logits, mb["input_ids"][:, context:])
                new_v = values[:, context - 1 : -1]
                pg_loss, pg_clipfrac, approxkl = policy_loss(
                    new_logp, mb["logp"], mb["advantages"], mb["mask"], cfg.cliprange
                )
                v_loss, v_clipfrac = value_loss(
                    new_v,
                    mb["values"],
                    mb["returns"],
                    mb["mask"],
                    cfg.cliprange_value,
                    cfg.clip_vloss,
                )
                loss = pg_loss + cfg.vf_coef * v_loss
                self.optimizer.zero_grad()
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                stats += torch.stack([pg_loss, pg_clipfrac, approxkl, v_loss, v_clipfrac]).detach()
                n_updates += 1
        stats = self.accelerator.gather(stats[None] / n_updates).mean(0).tolist()
        names = ["policy/loss", "policy/clipfrac", "policy/approxkl", "val/loss", "val/clipfrac"]
        return dict(zip(names, stats, strict=True))

    def train(self, progress: Callable[[int, int, dict], Any] | None = None) -> list[dict]:
        cfg, history = self.config, []
        batches = prompt_batches(self.prompts, cfg.batch_size, cfg.seed)
        self.model.train()
        for batch in range(1, cfg.num_batches + 1):
            started = time.monotonic()
            b = self.rollout(next(batches))  # steps 1-3
            # 4. per-token reward: KL penalty on every token, the score on the last one
            kl_coef = self.kl_ctl.value
            kl = kl_penalty(b["logp"], b["ref_logp"], cfg.kl_estimator) * b["mask"]
            rewards = -kl_coef * kl
            last = b["mask"].sum(1).long() - 1
            rewards[torch.arange(len(last)), last] += b["scores"]
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, b["mask"], shift_mean=False)
            # 5. GAE advantages and returns
            b["advantages"], b["returns"] = gae(rewards, b["values"], b["mask"], cfg.gamma, cfg.lam)
            if cfg.norm_adv:
                b["advantages"] = masked_whiten(b["advantages"], b["mask"])
            # 6. ppo_epochs passes of clipped policy and value updates
            update_stats = self.ppo_update(b)
            # 7. adaptive KL controller, on the KL summed over each response
            kl_mean = self._gathered_mean(kl.sum(1))
            if cfg.adaptive_kl:
                self.kl_ctl.update(kl_mean, cfg.batch_size * self.accelerator.num_processes)
            # 8. log
            reward_mean = self._gathered_mean(b["scores"])
            metrics = {
                "batch": batch,
                "episodes": batch * cfg.batch_size * self.accelerator.num_processes,
                "env/reward_mean": reward_mean,
                "env/reward_std": self.accelerator.gather(b["scores"]).std().item(),
                "env/response_length": self._gathered_mean(b["mask"].sum(1)),
                "env/eos_fraction": self._gathered_mean(b["has_eos"]),
                "objective/kl": kl_mean,
                "objective/kl_coef": kl_coef,
                "objective/entropy": self._gathered_mean(b["entropy"]),
                "objective/non_score_reward": -kl_coef * kl_mean,
                "objective/rlhf_reward": reward_mean - kl_coef * kl_mean,
                **update_stats,
                "val/explained_variance": explained_variance(b["values"], b["returns"], b["mask"]),
                "time/batch_seconds": time.monotonic() - started,
            }
            history.append(metrics)
            if progress:
                progress(batch, cfg.num_batches, metrics)
            del b
            free_memory()
        return history

    def save(self, output_dir: str | Path) -> Path:
        """The policy (LoRA merged, no value head) and tokenizer, plus ppo_config.json."""
        output_dir = Path(output_dir)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            lm = self.accelerator.unwrap_model(self.model).lm
            if self.config.use_lora:
                lm = copy.deepcopy(lm).merge_and_unload()  # a copy: training can go on
            output_dir.mkdir(parents=True, exist_ok=True)
            lm.save_pretrained(output_dir)
            self.tokenizer.save_pretrained(output_dir)
            (output_dir / "ppo_config.json").write_text(self.config.model_dump_json(indent=2))
        return output_dir
