"""SL-CAI: supervised fine-tuning on the constitution's revisions (TRL ``SFTTrainer``).

Rows are conversational prompt/completion pairs (``flows.training_rows.sft_rows``);
the loss is on the completion only, so the model learns the revised answers,
not the prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from alignment.training import common


class SFTStageConfig(common.TrainingStageConfig):
    learning_rate: float = Field(2e-5, gt=0, description="AdamW learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the revisions.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Examples per step.")
    max_length: int = Field(1024, gt=0, description="Tokens per example (longer is truncated).")
    completion_only_loss: bool = Field(
        True, description="Loss on the revision only, not on the prompt."
    )


def train_sft(
    model_path: str | Path,
    rows: list[dict[str, Any]],
    config: SFTStageConfig,
    output_dir: str | Path,
) -> common.StageResult:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = datasets.Dataset.from_list(
        [{"prompt": row["prompt"], "completion": row["completion"]} for row in rows]
    )
    trainer, output = common.train_in_scratch(
        SFTTrainer,
        SFTConfig,
        {
            "learning_rate": config.learning_rate,
            "num_train_epochs": config.num_train_epochs,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "max_length": config.max_length,
            "completion_only_loss": config.completion_only_loss,
            "seed": config.seed,
        },
        model=common.load_for_training(AutoModelForCausalLM, model_path, config.use_qlora),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=common.peft_config(config),
    )
    metrics = {**common.loss_summary(trainer, output), "examples": len(rows)}
    path = common.save_stage(
        trainer.model, tokenizer, output_dir, model_path, "sft", config, metrics
    )
    return common.StageResult(path, metrics)
