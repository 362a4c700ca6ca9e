"""What every TRL-based stage shares: CPU-safe trainer arguments, LoRA, saving for vLLM."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def trainer_args(config_class: type, output_dir: str, **fields: Any):
    """A TRL config for a stage: no checkpoints, no reporting, and runnable on CPU."""
    import torch

    return config_class(
        output_dir=output_dir,
        bf16=False,  # every TRL config defaults to bf16, an error on CPU
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        **fields,
    )


def loss_summary(trainer, output) -> dict[str, Any]:
    """Training loss overall, at the first and last logged step, and the step count."""
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {
        "train_loss": output.training_loss,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
    }


def lora_config(r: int, alpha: int, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type=task_type
    )


def save_for_vllm(model, tokenizer, output_dir: Path, extra: dict[str, Any]) -> Path:
    """Merge any LoRA adapter and save a plain model folder that vLLM and transformers load."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # Saved beside the target and renamed into place: a killed run leaves no half model.
    staging = output_dir.parent / f".{output_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "rlaif_stage.json").write_text(json.dumps(extra, indent=2, default=str))
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    return output_dir
