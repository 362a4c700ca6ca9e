"""What every training stage shares: loading with float32 master weights (or a 4-bit base for
QLoRA), mixed-precision trainer arguments, LoRA, the result and config fields every stage has,
distributed ranks, and saving for vLLM in the checkpoint's dtype.

Why float32 masters: transformers 5 loads a checkpoint in its own dtype (``dtype=None``
means "auto"), and real checkpoints ship bfloat16. Adam updates of about 1e-6 on bf16
weights (relative resolution about 4e-3) mostly round to nothing, so every stage loads
float32 weights and trains under bf16 *autocast* where the device has it (CUDA with bf16),
never on CPU. The saved model is cast back to the checkpoint's dtype, so the next
iteration's engine loads what it loaded before.

QLoRA (Dettmers et al. 2023, ``use_qlora``): the frozen base is stored in 4-bit NormalFloat
with double-quantised constants (bitsandbytes), the LoRA adapter on top trains in float32, and
the adapter is merged into the base reloaded in full precision before saving (merging into the
4-bit base would round the update to NF4). bitsandbytes >= 0.49 trains on CPU too
(docs/qlora.md).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from alignment import atomic

MASTER_DTYPE = torch.float32
QLORA_INSTALL = "pip install -e '.[qlora]'"
QLORA_CPU_BNB = "0.49"  # the first bitsandbytes with a CPU backend
T = TypeVar("T")


# --- stage results and configs ---------------------------------------------------------------


@dataclass(frozen=True)
class StageResult:
    """The folder a training stage saved its model to, and the stage's metrics."""

    path: Path
    metrics: dict[str, Any]


class TrainingStageConfig(BaseModel):
    """The fields every training stage's config has: LoRA or full fine-tuning, and the seed.
    A stage subclasses it with its own fields (and may restate a field's description)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    use_lora: bool = Field(False, description="Train a LoRA adapter, merged before saving.")
    use_qlora: bool = Field(
        False,
        description="QLoRA: a LoRA adapter (lora_r, lora_alpha; implies use_lora) on a frozen "
        "4-bit NF4 base (bitsandbytes, the `qlora` extra); merged into the full-precision "
        "base before saving.",
    )
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator.")
    seed: int = Field(0, description="Training seed.")

    @property
    def trains_lora(self) -> bool:
        """Whether the stage trains a LoRA adapter (use_lora, or use_qlora which implies it)."""
        return self.use_lora or self.use_qlora

    @model_validator(mode="after")
    def _qlora_can_run(self) -> TrainingStageConfig:
        if not self.use_qlora:
            return self
        problem = qlora_problem(bitsandbytes_version(), torch.cuda.is_available())
        if problem:  # reported at the `use_qlora:` line
            raise PydanticCustomError("qlora_unavailable", problem, {"field": "use_qlora"})
        return self


# --- precision --------------------------------------------------------------------------------


def checkpoint_dtype(model_path: str | Path) -> torch.dtype:
    """The dtype a checkpoint is stored in (config.json ``dtype`` / ``torch_dtype``); float32
    when the folder does not say."""
    config_file = Path(model_path) / "config.json"
    if not config_file.exists():
        return torch.float32
    config = json.loads(config_file.read_text())
    text_config = config.get("text_config") or {}
    name = (
        config.get("dtype")
        or config.get("torch_dtype")
        or text_config.get("dtype")
        or text_config.get("torch_dtype")
    )
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def bf16_autocast() -> bool:
    """Whether training runs under bf16 autocast: on a CUDA device with bf16, never on CPU."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def precision_args() -> dict[str, Any]:
    """The trainer fields that decide precision and device (TRL defaults to bf16=True,
    an error on CPU)."""
    return {"bf16": bf16_autocast(), "fp16": False, "use_cpu": not torch.cuda.is_available()}


def load_for_training(model_class, model_path: str | Path, qlora: bool = False, **kwargs: Any):
    """``model_class.from_pretrained`` with float32 master weights, whatever the
    checkpoint's dtype (e.g. ``AutoModelForCausalLM``). ``qlora``: the linear layers 4-bit
    NF4 on this process's device, the rest float32, frozen for k-bit training; the stage's
    LoRA adapter goes on top. Gradient checkpointing stays the trainer's choice (TRL's
    configs turn it on; PPO's rollouts need the KV cache it turns off)."""
    if not qlora:
        return model_class.from_pretrained(model_path, dtype=MASTER_DTYPE, **kwargs)
    from peft import prepare_model_for_kbit_training

    model = model_class.from_pretrained(
        model_path,
        dtype=MASTER_DTYPE,
        quantization_config=quantization_config(),
        device_map={"": local_device()},
        **kwargs,
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# --- QLoRA ------------------------------------------------------------------------------------


def quantization_config():
    """QLoRA's base: 4-bit NormalFloat, double-quantised constants, matmuls in bf16 where
    training autocasts to it, else float32."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16_autocast() else torch.float32,
        bnb_4bit_use_double_quant=True,
    )


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes' version, read without importing it; None if absent."""
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def qlora_problem(found: str | None, cuda: bool) -> str | None:
    """Why QLoRA cannot train with bitsandbytes ``found`` (None: not installed), on a machine
    with or without CUDA; None when it can."""
    from packaging.version import Version

    if found is None:
        return f"QLoRA needs bitsandbytes, which is not installed here: {QLORA_INSTALL}"
    if not cuda and Version(found) < Version(QLORA_CPU_BNB):
        return (
            f"QLoRA without a CUDA GPU needs bitsandbytes >= {QLORA_CPU_BNB} (its CPU backend); "
            f"found bitsandbytes {found} and no CUDA GPU: {QLORA_INSTALL}"
        )
    return None


def is_quantized(model) -> bool:
    """Whether the model (or a PEFT model's base) holds 4- or 8-bit weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(getattr(base, f"is_loaded_in_{bits}bit", False) for bits in (4, 8))


def float32_adapter(model) -> None:
    """Trainable parameters back to float32 masters: TRL casts a quantized model's adapter to
    bf16 (as the QLoRA paper does), where Adam's small updates round away."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != MASTER_DTYPE:
            param.data = param.data.to(MASTER_DTYPE)


def master_dtype(model) -> str:
    """The dtype of the trainable parameters (what the optimizer steps on); of every
    parameter when none is trainable."""
    params = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in params}))


def precision_record(model, saved_dtype: torch.dtype) -> dict[str, Any]:
    """What a registration says about precision: master weights, autocast, saved dtype."""
    return {
        "master_dtype": master_dtype(model),
        "autocast": "bf16" if bf16_autocast() else None,
        "saved_dtype": str(saved_dtype).removeprefix("torch."),
        "world_size": world_size(),
    }


# --- ranks ------------------------------------------------------------------------------------


def world_size() -> int:
    """Processes training together (torchrun / accelerate launch); 1 for a plain process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def local_device() -> str:
    """This process's device: its own GPU under torchrun (``LOCAL_RANK``), else CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def from_main_process(value: T) -> T:
    """Rank 0's ``value`` on every rank (``value`` itself in a plain process): metrics that
    each rank computes from the same weights and rows then agree to the bit."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- TRL --------------------------------------------------------------------------------------


def trainer_args(config_class: type, output_dir: str, **fields: Any):
    """A TRL config for a stage: no checkpoints, no reporting, mixed precision where the
    device has it."""
    return config_class(
        output_dir=output_dir,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        **precision_args(),
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


def train_in_scratch(
    trainer_class: type, config_class: type, fields: dict[str, Any], **kwargs: Any
):
    """``trainer_class(args=trainer_args(config_class, scratch, **fields), **kwargs)``, trained
    in a scratch output folder that is deleted after (no checkpoints are kept; the stage
    saves the model itself). Returns ``(trainer, train_output)``."""
    with tempfile.TemporaryDirectory(prefix="rlaif-trl-") as scratch:
        trainer = trainer_class(args=trainer_args(config_class, scratch, **fields), **kwargs)
        if is_quantized(trainer.model):
            float32_adapter(trainer.model)
        output = trainer.train()
    return trainer, output


def lora_config(r: int, alpha: int, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type=task_type
    )


def peft_config(config: TrainingStageConfig, task_type: str = "CAUSAL_LM"):
    """The LoRA config of a stage's ``use_lora``/``use_qlora``/``lora_r``/``lora_alpha``; None
    without LoRA (full fine-tuning)."""
    return lora_config(config.lora_r, config.lora_alpha, task_type) if config.trains_lora else None


# --- saving -----------------------------------------------------------------------------------


def merged(model):
    """The plain model: a LoRA adapter merged into its base (the model itself otherwise). A
    QLoRA adapter is merged into a float32 copy of the base (the input is left as it was)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    if not is_quantized(model):
        return model.merge_and_unload()
    from peft import PeftModel

    base = model.get_base_model()
    config = copy.deepcopy(base.config)  # keeps num_labels and pad_token_id of a reward model
    del config.quantization_config
    full = type(base).from_pretrained(base.name_or_path, config=config, dtype=MASTER_DTYPE)
    with tempfile.TemporaryDirectory(prefix="rlaif-qlora-") as adapter:
        model.save_pretrained(adapter)
        return PeftModel.from_pretrained(full, adapter).merge_and_unload()


def save_for_vllm(
    model,
    tokenizer,
    output_dir: Path,
    extra: dict[str, Any],
    dtype: torch.dtype | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Merge any LoRA adapter and save a plain model folder that vLLM and transformers load.

    ``dtype`` (the checkpoint's, from ``checkpoint_dtype``) is the dtype written; the model
    is cast to it, so call this last. Under torchrun only rank 0 writes; every rank returns
    the folder once it exists. ``extra`` lands in ``rlaif_stage.json`` with the precision
    record; ``files`` (name -> text) are written beside it, in the same atomic rename.
    """
    output_dir = Path(output_dir)
    record = precision_record(model, dtype or MASTER_DTYPE)  # before the merge: trained params
    model = merged(model)
    if is_main_process():
        if dtype is not None:
            model = model.to(dtype)
        # Saved beside the target and renamed into place: a killed run leaves no half model.
        with atomic.replacing(output_dir) as staging:
            staging.mkdir()
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            stage_record = {**extra, "precision": record}
            (staging / "rlaif_stage.json").write_text(
                json.dumps(stage_record, indent=2, default=str)
            )
            for name, text in (files or {}).items():
                (staging / name).write_text(text)
    wait_for_everyone()
    return output_dir


def save_stage(
    model,
    tokenizer,
    output_dir: str | Path,
    base_path: str | Path,
    stage: str,
    config,
    metrics: dict[str, Any],
    files: dict[str, str] | None = None,
) -> Path:
    """``save_for_vllm`` for a training stage: in the dtype of the checkpoint it started from
    (``base_path``), with the stage's name, config and metrics in ``rlaif_stage.json``."""
    extra = {"stage": stage, "config": config.model_dump(), "metrics": metrics}
    dtype = checkpoint_dtype(base_path)
    return save_for_vllm(model, tokenizer, Path(output_dir), extra, dtype=dtype, files=files)


def saved_precision(output_dir: str | Path) -> dict[str, Any]:
    """The precision record a saved stage folder carries (empty if none)."""
    record = Path(output_dir) / "rlaif_stage.json"
    return json.loads(record.read_text()).get("precision", {}) if record.exists() else {}
