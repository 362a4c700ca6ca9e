"""A bfloat16 checkpoint, trained on CPU as it would be on a GPU: every stage steps float32
master weights, its small updates survive (the same as from a float32 copy of the
checkpoint), and the saved folder is bfloat16 again with a precision record.

Pure-bf16 training rounds an Adam step of ~lr off most weights (bf16 keeps 8 bits of
mantissa: a 1e-5 step vanishes on any weight above about 4e-3), so at LR below the
bf16-start run's update would be mostly zeros and these tests fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.precision_models import stored_dtype

pytestmark = pytest.mark.integration

LR = 1e-5
PROMPTS = ["Tell me about tea.", "How do rivers form?", "Why is bread soft?", "Name a chess move."]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


PAIRS = [
    {
        "prompt": user(p),
        "chosen": assistant("Sure, please enjoy it; it is simple."),
        "rejected": assistant("No. I will never talk about that, never."),
        "p_chosen": 0.9,
    }
    for p in PROMPTS
]


class OptimizerSteps:
    """Watches every optimizer step while active (torch's global step hooks): the dtypes
    of the parameters it steps, and those parameters (float32 copies, one flat vector)
    before the first step and after the last."""

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()
        self.before: torch.Tensor | None = None
        self.after: torch.Tensor | None = None

    def __enter__(self) -> OptimizerSteps:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._hooks = [
            register_optimizer_step_pre_hook(self._pre),
            register_optimizer_step_post_hook(self._post),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()

    @staticmethod
    def _flat(optimizer) -> torch.Tensor:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return torch.cat([p.detach().float().flatten() for p in params])

    def _pre(self, optimizer, args, kwargs) -> None:
        self.dtypes |= {p.dtype for group in optimizer.param_groups for p in group["params"]}
        if self.before is None:
            self.before = self._flat(optimizer)

    def _post(self, optimizer, args, kwargs) -> None:
        self.after = self._flat(optimizer)

    @property
    def update(self) -> torch.Tensor:
        assert self.before is not None and self.after is not None, "no optimizer step ran"
        return self.after - self.before


@pytest.fixture(scope="module")
def fp32_model(bf16_model: Path, tmp_path_factory) -> Path:
    """The same checkpoint stored in float32 (the same values: bf16 is exact in fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("fp32") / "model"
    model = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.float32)
    model.save_pretrained(folder)  # with the bf16 folder's generation config
    AutoTokenizer.from_pretrained(bf16_model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_model(tiny_model: Path, tmp_path_factory) -> Path:
    """A reward model with its statistics, for RLOO/GRPO (one step from the tiny model)."""
    from alignment.training.reward import RewardStageConfig, train_reward_model

    config = RewardStageConfig(learning_rate=1e-3, per_device_train_batch_size=4, max_length=128)
    folder = tmp_path_factory.mktemp("rm") / "rm"
    return train_reward_model(tiny_model, None, PAIRS, [], None, config, folder).path


def sft(start: Path, out: Path, reward_model: Path) -> Path:
    from alignment.training.sft import SFTStageConfig, train_sft

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in PAIRS]
    config = SFTStageConfig(learning_rate=LR, per_device_train_batch_size=4, max_length=64)
    return train_sft(start, rows, config, out).path


def reward(start: Path, out: Path, reward_model: Path) -> Path:
    from alignment.training.reward import RewardStageConfig, train_reward_model

    config = RewardStageConfig(learning_rate=LR, per_device_train_batch_size=4, max_length=128)
    return train_reward_model(start, None, PAIRS, [], None, config, out).path


def dpo(start: Path, out: Path, reward_model: Path) -> Path:
    from alignment.training.dpo import DPOStageConfig, train_dpo

    config = DPOStageConfig(learning_rate=LR, per_device_train_batch_size=4, max_length=64)
    return train_dpo(start, PAIRS, [], config, out).path


def online(algorithm: str):
    def run(start: Path, out: Path, reward_model: Path) -> Path:
        from alignment.training.online_rl import OnlineRLConfig, train_online_rl

        config = OnlineRLConfig(
            learning_rate=LR,
            max_steps=1,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=8,
        )
        rows = [{"prompt": user(p)} for p in PROMPTS[:2]]
        return train_online_rl(algorithm, start, reward_model, rows, config, out).path

    return run


STAGES = {"sft": sft, "reward": reward, "dpo": dpo, "rloo": online("rloo"), "grpo": online("grpo")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_bf16_checkpoint_trains_float32_masters_and_saves_bf16(
    stage, bf16_model, fp32_model, reward_model, tmp_path
):
    from safetensors import safe_open

    train = STAGES[stage]
    with OptimizerSteps() as from_bf16:
        folder = train(bf16_model, tmp_path / "from-bf16", reward_model)
    with OptimizerSteps() as from_fp32:
        train(fp32_model, tmp_path / "from-fp32", reward_model)

    # (a) the optimizer steps float32 weights, though the checkpoint is bfloat16
    assert from_bf16.dtypes == {torch.float32}

    # (b) the update is the one the float32 checkpoint gets, not rounded to bf16's grid
    update, expected = from_bf16.update, from_fp32.update
    assert expected.norm() > 0
    assert (update - expected).norm() <= 0.01 * expected.norm(), (
        f"update differs from the float32 run's by "
        f"{((update - expected).norm() / expected.norm()).item():.3f} of its norm; "
        f"{(update == 0).float().mean().item():.2f} of the weights did not move"
    )

    # (c) saved in the checkpoint's dtype, and says so
    assert stored_dtype(folder) == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as tensors:
        assert {tensors.get_slice(k).get_dtype() for k in tensors.keys()} == {"BF16"}  # noqa: SIM118
    record = json.loads((folder / "rlaif_stage.json").read_text()).get("precision")
    assert record is not None, "rlaif_stage.json has no precision record"
    assert record["master_dtype"] == "float32" and record["saved_dtype"] == "bfloat16"
