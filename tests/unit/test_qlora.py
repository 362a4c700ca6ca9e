"""QLoRA's switch (``use_qlora``): the 4-bit NF4 quantisation it loads with, that it trains
LoRA in every stage, and when it is refused: through `rlaif train`, one `FILE:LINE:` line,
exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alignment.training import common
from alignment.training.dpo import DPOStageConfig
from alignment.training.online_rl import OnlineRLConfig
from alignment.training.ppo import PPOConfig
from alignment.training.reward import RewardStageConfig
from alignment.training.sft import SFTStageConfig

STAGE_CONFIGS = [SFTStageConfig, RewardStageConfig, DPOStageConfig, OnlineRLConfig, PPOConfig]


def test_the_base_is_nf4_with_double_quantisation() -> None:
    config = common.quantization_config()
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32  # this machine: no bf16 autocast


def test_matmuls_run_in_bf16_where_training_autocasts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "bf16_autocast", lambda: True)
    assert common.quantization_config().bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "found, cuda, says",
    [
        (None, False, "QLoRA needs bitsandbytes, which is not installed here"),
        (None, True, "QLoRA needs bitsandbytes, which is not installed here"),
        ("0.45.0", False, "needs bitsandbytes >= 0.49 (its CPU backend); found bitsandbytes "
         "0.45.0 and no CUDA GPU"),
        ("0.45.0", True, None),  # CUDA has had 4-bit since 0.39
        ("0.49.0", False, None),
        ("0.50.2", False, None),
    ],
)  # fmt: skip
def test_qlora_is_refused_only_where_bitsandbytes_cannot_train(
    found: str | None, cuda: bool, says: str | None
) -> None:
    problem = common.qlora_problem(found, cuda)
    if says is None:
        assert problem is None
    else:
        assert says in problem and "pip install -e '.[qlora]'" in problem


@pytest.mark.parametrize("config_class", STAGE_CONFIGS)
def test_qlora_trains_lora_in_every_stage(
    config_class: type[common.TrainingStageConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "bitsandbytes_version", lambda: "0.50.2")
    plain, qlora = config_class(), config_class(use_qlora=True, lora_r=4)
    assert (plain.trains_lora, common.peft_config(plain)) == (False, None)
    assert qlora.trains_lora and not qlora.use_lora
    assert common.peft_config(qlora).r == 4


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "rloo", "grpo"])
def test_rlaif_train_refuses_qlora_without_bitsandbytes(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import main

    monkeypatch.setattr(common, "bitsandbytes_version", lambda: None)
    config = tmp_path / "train.yaml"
    config.write_text(f"store: {tmp_path / 'store'}\n{stage}:\n  lora_r: 8\n  use_qlora: true\n")
    result = CliRunner().invoke(main, ["train", stage, "--config", str(config)])
    assert (result.exit_code, result.stdout) == (2, "")
    assert "Traceback" not in result.output
    assert result.stderr == (
        f"{config}:4: {stage}.use_qlora: QLoRA needs bitsandbytes, which is not installed "
        "here: pip install -e '.[qlora]'\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.yaml"]


def test_use_qlora_false_keeps_the_ids_of_models_trained_before_it() -> None:
    from alignment.ids import content_id
    from alignment.model_ref import trained_model_id

    before = {"use_lora": True, "lora_r": 8}  # a stage's settings before the field existed
    old_id = content_id("model", "dpo", "tiny", ["r1"], None, before)
    assert trained_model_id("dpo", "tiny", ["r1"], None, before | {"use_qlora": False}) == old_id
    assert trained_model_id("dpo", "tiny", ["r1"], None, before | {"use_qlora": True}) != old_id
