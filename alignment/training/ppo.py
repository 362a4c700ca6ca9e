"""PPO for RLHF / RLAIF in one file, top to bottom, in the spirit of CleanRL's ``ppo.py``.

TRL removed its PPOTrainer, so the project owns this one. Per rollout batch:

1. sample a response to each prompt from the policy (pure temperature sampling, stop at any
   end token);
2. score (prompt, response) with ``reward_fn``; penalise responses that never reached an end;
3. per-token log-probs of the policy and of the frozen reference, and the policy's values;
4. per-token reward: ``-kl_coef * kl_t``, plus the score at the last response token;
5. GAE advantages and returns;
6. ``ppo_epochs`` passes of minibatches: clipped policy loss + ``vf_coef`` * clipped value loss;
7. adapt ``kl_coef`` toward ``target_kl`` (Ziegler et al. 2019);
8. log one metrics dict.

Precision: float32 master weights whatever the checkpoint's dtype, bf16 autocast only on a CUDA
device with bf16, the policy saved in the checkpoint's dtype (``alignment.training.common``).
Under ``torchrun`` / ``accelerate launch`` every statistic that steers training (whitening
moments, the KL fed to the controller) is taken over all processes, and DDP averages gradients.

Metrics (one dict per batch, means over the batch, gathered across processes):
``env/reward_mean``, ``env/reward_std`` (score after the EOS penalty), ``env/response_length``
(tokens, EOS included), ``env/eos_fraction``; ``objective/kl`` (KL estimate summed over a
response, nats), ``objective/kl_coef`` (beta used for this batch), ``objective/entropy`` (mean
per-token entropy of the sampling distribution), ``objective/non_score_reward`` (-beta * KL),
``objective/rlhf_reward`` (score - beta * KL); ``policy/loss``, ``policy/clipfrac`` (share of
tokens whose ratio was clipped), ``policy/approxkl`` (KL of old to new policy, k3 estimate);
``val/loss``, ``val/clipfrac``, ``val/explained_variance`` (of the returns by the rollout values).

References: Schulman et al. 2017 (PPO), 2016 (GAE); Ziegler et al. 2019 (KL penalty, adaptive
controller); Huang et al. 2023, "The N Implementation Details of RLHF with PPO"; Schulman 2020,
"Approximating KL Divergence" (k1, k3).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from alignment.conversation import Prompt, as_chat
from alignment.training.common import (
    MASTER_DTYPE,
    TrainingStageConfig,
    bf16_autocast,
    checkpoint_dtype,
    is_main_process,
    is_quantized,
    load_for_training,
    lora_config,
    save_for_vllm,
    wait_for_everyone,
)

RewardFn = Callable[[list[Prompt], list[str]], torch.Tensor]  # (prompts, responses) -> (batch,)
SumFn = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes


class PPOConfig(TrainingStageConfig):
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
        None,
        ge=0,
        description="Subtracted from the score of a response without an end token; null: none.",
    )
    # --- PPO ---
    learning_rate: float = Field(1e-5, gt=0, description="Adam learning rate (eps 1e-5).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (1.0 in RLHF).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (Schulman et al. 2016).")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip epsilon (PPO paper: 0.2).")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip around the rollout values.")
    clip_vloss: bool = Field(True, description="Clip the value loss like the policy loss.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (TRL: 0.1).")
    norm_adv: bool = Field(True, description="Whiten advantages over the batch (all processes).")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    # --- model (lora_r, lora_alpha and use_qlora come with TrainingStageConfig) ---
    use_lora: bool = Field(False, description="Train a LoRA adapter; the reference is adapter-off.")
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


def local_sum(x: torch.Tensor) -> torch.Tensor:
    """The SumFn of a single process: nothing to add."""
    return x


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, sum_all: SumFn = local_sum
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over the masked entries of every process.

    ``sum_all`` adds a tensor up over processes (an all-reduce); sums and counts are reduced,
    never per-process means, so processes with more response tokens weigh more, as if the
    whole batch sat on one process.
    """
    total = sum_all(torch.stack([(x * mask).sum(), mask.sum()]).float())
    count = total[1].clamp(min=1)
    mean = total[0] / count
    var = sum_all((((x - mean) ** 2) * mask).sum().float()) / count
    return mean, var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, sum_all: SumFn = local_sum
) -> torch.Tensor:
    """Mean 0 (or unchanged mean if not shift_mean), std 1 over the masked entries of every
    process (``masked_moments``); 0 elsewhere."""
    mean, var = masked_moments(x, mask, sum_all)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
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


def explained_variance(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, sum_all: SumFn = local_sum
) -> float:
    """1 - Var(target - pred) / Var(target): 1 is perfect, 0 no better than the mean."""
    var = masked_moments(target, mask, sum_all)[1]
    residual = masked_moments(target - pred, mask, sum_all)[1]
    return float("nan") if var == 0 else (1 - residual / var).item()


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
    """A causal LM plus a scalar value head on its last hidden state (one shared trunk).

    Logits and values come out in float32 whatever autocast computed them in.
    """

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
        return out.logits.float(), self.value_head(out.hidden_states[-1]).squeeze(-1).float()


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
    from peft import get_peft_model

    return get_peft_model(lm, lora_config(r, alpha))


def autocast():
    """bf16 autocast where training has it (a CUDA device with bf16), nothing elsewhere."""
    if bf16_autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free_memory() -> None:
    """Hand freed accelerator memory back between batches (a no-op on CPU, where gc is slow)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Rollout helpers: prompts in, token tensors out
# ---------------------------------------------------------------------------------------------


def prompt_batches(prompts: list[Prompt], batch_size: int, seed: int) -> Iterator[list[Prompt]]:
    """Endless batches of prompts: a fresh seeded shuffle each pass."""
    rng, order = random.Random(seed), []
    while True:
        if len(order) < batch_size:
            order += rng.sample(prompts, len(prompts))
            continue
        yield order[:batch_size]
        order = order[batch_size:]


def encode_prompts(tokenizer, prompts: list[Prompt], config: PPOConfig, pad_id: int):
    """Left-padded prompt ids and mask (generation appends on the right). A prompt is a
    text or a conversation (alignment/conversation.py), which needs the chat template."""
    chat = config.chat_template and tokenizer.chat_template is not None
    if chat:
        prompts = [
            tokenizer.apply_chat_template(as_chat(p), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    elif any(not isinstance(p, str) for p in prompts):
        raise ValueError("a multi-turn prompt needs the chat template (chat_template: true)")
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


def end_token_ids(tokenizer, lm) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's
    ``generation_config.eos_token_id`` (an id or a list: Qwen2.5-Instruct ends at both
    <|im_end|> and <|endoftext|>), in that order, without repeats."""
    ids = [tokenizer.eos_token_id]
    config_ids = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids += config_ids if isinstance(config_ids, list) else [config_ids]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise ValueError("PPO needs an end token: the tokenizer and the model name none")
    return ids


def sampling_config(config: PPOConfig, end_ids: list[int], pad_id: int):
    """The rollout's whole generation config: pure temperature sampling (top_k 0, top_p 1.0,
    repetition_penalty 1.0, no other logits processor), stopping at any end token."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=end_ids,
        pad_token_id=pad_id,
    )


@contextlib.contextmanager
def only_generation_config(lm, generation_config):
    """``generate`` fills every field its config leaves unset from the model's own
    ``generation_config`` (the checkpoint's generation_config.json: repetition_penalty,
    top_k, min_p, suppress_tokens, ...). Swapping that for ``generation_config`` while
    sampling leaves nothing of the checkpoint's to fill in."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under a LoRA wrapper
    saved = base.generation_config
    base.generation_config = generation_config
    try:
        yield
    finally:
        base.generation_config = saved


def truncate_after_eos(responses: torch.Tensor, end_ids: list[int], pad_id: int):
    """Pad everything after the first end token (any of end_ids); mask is 1 up to and
    including it."""
    is_eos = torch.isin(responses, torch.tensor(end_ids, device=responses.device))
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


def reward_model_fn(path: str | Path, normalise: bool = True, batch_size: int = 16) -> RewardFn:
    """A reward_fn from a saved reward model: ``alignment.training.reward.RewardScorer`` (pairs
    on the chat template, scores normalised by the statistics stored with the model), as a
    tensor. Under a launcher each process scores on its own GPU."""
    from alignment.training.reward import RewardScorer

    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    scorer = RewardScorer(path, normalise=normalise, batch_size=batch_size, device=device)

    def score(prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        return torch.tensor(scorer(prompts, responses), dtype=torch.float32)

    return score


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class PPOTrainer:
    """policy: a model folder or a causal LM (trained in place, as float32); prompts: plain
    user texts."""

    def __init__(
        self, config: PPOConfig, policy, tokenizer, reward_fn: RewardFn, prompts: list[Prompt]
    ):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import AutoModelForCausalLM

        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        self.config, self.tokenizer, self.reward_fn = config, tokenizer, reward_fn
        # cpu=True on a machine without CUDA: else a launcher's 2 processes run as 2 rank-0 copies
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        set_seed(config.seed, device_specific=True)  # each process samples differently

        # float32 master weights whatever the checkpoint's dtype; saved back in that dtype
        if isinstance(policy, str | Path):
            self.save_dtype = checkpoint_dtype(policy)
            lm = load_for_training(AutoModelForCausalLM, policy, config.use_qlora)
        elif config.use_qlora:
            raise ValueError("use_qlora loads the policy itself: pass its folder, not a model")
        else:
            self.save_dtype = policy.dtype
            lm = policy.to(MASTER_DTYPE)
        disable_dropout(lm)
        self.end_ids = end_token_ids(tokenizer, lm)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_ids[0]
        )
        self.generation_config = sampling_config(config, self.end_ids, self.pad_id)
        # LoRA: the reference is the same model with its adapter off; else a frozen copy.
        self.ref = None if config.trains_lora else frozen_copy(lm).to(self.accelerator.device)
        if config.trains_lora:
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

    def _sum_all(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over processes (an all-reduce; x itself on one process)."""
        return self.accelerator.reduce(x, reduction="sum")

    @torch.no_grad()
    def rollout(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        cfg, device = self.config, self.accelerator.device
        policy = self.accelerator.unwrap_model(self.model)
        # 1. sample responses (left-padded prompts): softmax(logits / T), nothing of the
        #    checkpoint's generation_config.json, stop at any end token
        queries, query_mask = (
            t.to(device) for t in encode_prompts(self.tokenizer, prompts, cfg, self.pad_id)
        )
        context = queries.shape[1]
        with only_generation_config(policy.lm, self.generation_config), autocast():
            output = policy.lm.generate(
                input_ids=queries,
                attention_mask=query_mask,
                generation_config=self.generation_config,
            )
        responses, mask, has_eos = truncate_after_eos(
            output[:, context:], self.end_ids, self.pad_id
        )
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        # 2. score; a response cut off before an end token loses missing_eos_penalty
        scores = self.reward_fn(prompts, texts).to(device=device, dtype=torch.float32)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
        # 3. per-token log-probs of policy and reference, and values
        input_ids = torch.cat([queries, responses], 1)
        attention_mask = torch.cat([query_mask, mask], 1)
        positions = position_ids(attention_mask)
        with autocast():
            logits, values = policy(input_ids, attention_mask, positions)
            # LoRA: the reference is the policy with its adapter off
            ref, adapter_off = (
                (self.ref, contextlib.nullcontext())
                if self.ref is not None
                else (policy.lm, policy.lm.disable_adapter())
            )
            with adapter_off:
                ref_logits = ref(
                    input_ids, attention_mask=attention_mask, position_ids=positions
                ).logits.float()
        logits = logits[:, context - 1 : -1] / cfg.temperature
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
            "values": values[:, context - 1 : -1],
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
                with autocast():
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
            if cfg.whiten_rewards:  # moments over every process's tokens
                rewards = masked_whiten(rewards, b["mask"], False, self._sum_all)
            # 5. GAE advantages and returns
            b["advantages"], b["returns"] = gae(rewards, b["values"], b["mask"], cfg.gamma, cfg.lam)
            if cfg.norm_adv:
                b["advantages"] = masked_whiten(b["advantages"], b["mask"], True, self._sum_all)
            # 6. ppo_epochs passes of clipped policy and value updates
            update_stats = self.ppo_update(b)
            # 7. adaptive KL controller, on the KL summed over each response of every process,
            #    so every process holds the same beta
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
                "val/explained_variance": explained_variance(
                    b["values"], b["returns"], b["mask"], self._sum_all
                ),
                "time/batch_seconds": time.monotonic() - started,
            }
            history.append(metrics)
            if progress:
                progress(batch, cfg.num_batches, metrics)
            del b
            free_memory()
        return history

    def save(self, output_dir: str | Path) -> Path:
        """The policy (LoRA merged, no value head) in the checkpoint's dtype, the tokenizer,
        ``rlaif_stage.json`` (config and precision record) and ppo_config.json.

        A copy is merged and cast, so training can go on after ``save()``. Only the main
        process writes; every process returns once the folder is complete.
        """
        output_dir = Path(output_dir)
        self.accelerator.wait_for_everyone()
        if is_main_process():
            lm = self.accelerator.unwrap_model(self.model).lm
            # merged() leaves a 4-bit base as it is (QLoRA); else the merge needs a copy
            lm = lm if is_quantized(lm) else copy.deepcopy(lm)
            extra = {"stage": "ppo", "config": self.config.model_dump()}
            save_for_vllm(lm, self.tokenizer, output_dir, extra, dtype=self.save_dtype)
            del lm
            (output_dir / "ppo_config.json").write_text(self.config.model_dump_json(indent=2))
        else:
            wait_for_everyone()  # the barrier save_for_vllm ends with on the main process
        self.accelerator.wait_for_everyone()
        return output_dir
