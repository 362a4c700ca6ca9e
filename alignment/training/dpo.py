"""DPO (TRL ``DPOTrainer``), with per-example soft targets as an option.

Rows are preference pairs as in ``reward.py`` (conversational or standard, plus
``p_chosen``). The reference is the starting policy: a second, frozen copy
loaded from ``policy_path`` in float32, like the policy's master weights (so the
two agree exactly at step 0); under LoRA the same weights with the adapter off;
with ``precompute_ref_log_probs`` its log-probs are computed once before the
first step, so no copy is kept.

``soft_labels`` replaces TRL's ``sigmoid`` loss −logσ(β·(Δπ − Δref)) by the
binary cross-entropy against each pair's p_chosen (``losses.soft_dpo_loss``).
TRL has one global ``label_smoothing``; the per-example version is the one
override below, of ``DPOTrainer._compute_loss``. It computes the same sequence
log-probs as TRL (the fused LM head TRL installs; reference log-probs from TRL's
``compute_ref_log_probs`` or the precomputed columns) and logs TRL's reward
metrics, but not its entropy/logit/token-accuracy metrics.

The held-out metric is the reward accuracy: the share of eval pairs whose
implicit reward margin β·(Δπ − Δref) is positive.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignment.training import common
from alignment.training.losses import soft_dpo_loss
from alignment.training.reward import WithPChosen, pair_rows, split_eval

# TRL 1.16's loss types, less exo_pair: it needs TRL's global label_smoothing > 0,
# which this stage replaces by per-example soft labels.
LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


class DPOStageConfig(common.TrainingStageConfig):
    beta: float = Field(
        0.1, gt=0, description="KL strength β: how far the policy may move from the reference."
    )
    loss_type: LossType = Field("sigmoid", description="TRL loss type; sigmoid is the DPO paper's.")
    soft_labels: bool = Field(
        False,
        description="Target each pair's p_chosen instead of 1 (soft-label DPO; sigmoid loss only).",
    )
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the pairs.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Pairs per step.")
    max_length: int = Field(
        1024,
        gt=0,
        description="Tokens per prompt+response; longer ones lose their end, as TRL truncates.",
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs once before training; keeps no ref copy."
    )
    eval_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Held-out share of the training pairs when no eval set is given.",
    )
    use_lora: bool = Field(
        False, description="Train a LoRA adapter (reference: adapter off), merged before saving."
    )
    seed: int = Field(0, description="Seed for shuffling, LoRA initialisation and the split.")

    @model_validator(mode="after")
    def _soft_labels_need_sigmoid(self) -> DPOStageConfig:
        if self.soft_labels and self.loss_type != "sigmoid":
            raise ValueError(
                f"soft_labels=True replaces the sigmoid loss; got loss_type={self.loss_type!r}. "
                "Use loss_type='sigmoid' or soft_labels=False."
            )
        return self


def completion_logps(model, batch: dict[str, Any]):
    """Summed log-probs of the completion tokens, [chosen; rejected], via TRL's fused LM head."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
    )
    return outputs.log_probs[:, -(labels.size(1) - 1) :].sum(dim=1)  # 0 where label is -100


def reference_logps(trainer, batch: dict[str, Any]):
    """(ref_chosen, ref_rejected): precomputed columns, or TRL's reference forward."""
    if "ref_chosen_logps" in batch:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    # TRL turns the adapter off when there is no ref_model and the policy is a PeftModel
    return trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, batch)


def _soft_label_trainer_class():
    from trl import DPOTrainer

    class SoftLabelDPOTrainer(DPOTrainer):
        """DPOTrainer whose per-pair loss is ``soft_dpo_loss`` against the row's ``p_chosen``."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)  # precomputes reference log-probs with TRL's collator
            self.data_collator = WithPChosen(self.data_collator)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "p_chosen"]

        def _compute_loss(self, model, inputs, return_outputs):
            if return_outputs:
                raise NotImplementedError("soft-label DPO returns the loss only")
            p_chosen = inputs.pop("p_chosen")
            chosen, rejected = completion_logps(model, inputs).chunk(2)
            ref_chosen, ref_rejected = reference_logps(self, inputs)
            loss = soft_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, p_chosen, self.beta)

            mode = "train" if self.model.training else "eval"
            chosen_rewards = self.beta * (chosen - ref_chosen).detach()
            rejected_rewards = self.beta * (rejected - ref_rejected).detach()
            gather = self.accelerator.gather
            for name, value in {
                "rewards/chosen": chosen_rewards,
                "rewards/rejected": rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "rewards/margins": chosen_rewards - rejected_rewards,
                "logps/chosen": chosen.detach(),
                "logps/rejected": rejected.detach(),
            }.items():
                self._metrics[mode][name].append(gather(value).mean().item())
            return loss.mean()

    return SoftLabelDPOTrainer


def heldout_margins(trainer, beta: float) -> list[float]:
    """Implicit reward margins β·(Δπ − Δref) of the trainer's eval pairs (all of them on
    every rank: under torchrun each rank scores its shard and the shards are gathered)."""
    import torch

    margins: list[float] = []
    trainer.model.eval()
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch.pop("p_chosen", None)
            chosen, rejected = completion_logps(trainer.model, batch).chunk(2)
            ref_chosen, ref_rejected = reference_logps(trainer, batch)
            margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
            margins += trainer.accelerator.gather_for_metrics(margin).float().tolist()
    return margins


def train_dpo(
    policy_path: str | Path,
    train_rows: Iterable[dict[str, Any]],
    eval_rows: Iterable[dict[str, Any]] | None,
    config: DPOStageConfig,
    output_dir: str | Path,
) -> common.StageResult:
    """DPO from a causal LM folder; save a plain (merged) model folder that vLLM loads.

    ``eval_rows`` None holds out ``config.eval_fraction`` of ``train_rows``.
    """
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    train, held_out = split_eval(
        pair_rows(train_rows), eval_rows, config.eval_fraction, config.seed
    )
    if not train:
        raise ValueError("need at least one training pair")
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    # A frozen float32 copy of the starting policy; none under LoRA or QLoRA (adapter off) or
    # when the reference log-probs are precomputed from the policy before its first step.
    needs_copy = not (config.trains_lora or config.precompute_ref_log_probs)
    ref_model = common.load_for_training(AutoModelForCausalLM, policy_path) if needs_copy else None
    trainer, output = common.train_in_scratch(
        _soft_label_trainer_class() if config.soft_labels else DPOTrainer,
        DPOConfig,
        {
            "beta": config.beta,
            "loss_type": [config.loss_type],
            "learning_rate": config.learning_rate,
            "num_train_epochs": config.num_train_epochs,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "max_length": config.max_length,
            "precompute_ref_log_probs": config.precompute_ref_log_probs,
            "seed": config.seed,
        },
        model=common.load_for_training(AutoModelForCausalLM, policy_path, config.use_qlora),
        ref_model=ref_model,
        train_dataset=datasets.Dataset.from_list(train),
        eval_dataset=datasets.Dataset.from_list(held_out) if held_out else None,
        processing_class=tokenizer,
        peft_config=common.peft_config(config),
    )

    margins = heldout_margins(trainer, config.beta) if held_out else []
    metrics = {
        "eval_reward_accuracy": sum(m > 0 for m in margins) / len(margins) if margins else None,
        "eval_reward_margin": sum(margins) / len(margins) if margins else None,
        **common.loss_summary(trainer, output),
        "train_pairs": len(trainer.train_dataset),  # after TRL drops prompts over max_length
        "eval_pairs": len(margins),
    }
    path = common.save_stage(
        trainer.model, tokenizer, output_dir, policy_path, "dpo", config, metrics
    )
    return common.StageResult(path, metrics)
