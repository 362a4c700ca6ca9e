"""QLoRA on the tiny model, on CPU (bitsandbytes' CPU backend): the base is 4-bit NF4, only
the LoRA weights train, and the adapter is merged into the full-precision base for saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.training import common
from alignment.training.dpo import DPOStageConfig, train_dpo

pytestmark = pytest.mark.integration


def test_lora_trains_on_a_4bit_base_and_merges_into_float32(tiny_model: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = DPOStageConfig(use_qlora=True, lora_r=8, lora_alpha=16)
    base = common.load_for_training(AutoModelForCausalLM, tiny_model, qlora=True)
    model = get_peft_model(base, common.peft_config(config))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer.weight).__name__ == "Params4bit"
    assert q_proj.base_layer.weight.dtype == torch.uint8  # two 4-bit codes a byte
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in name for name in before)

    ids = torch.randint(3, 2048, (4, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[name], after[name]) for name in before)

    # merged into the checkpoint's own float32 weights, not into their NF4 rounding
    full = common.merged(model)
    merged_q = full.model.layers[0].self_attn.q_proj
    assert type(merged_q) is torch.nn.Linear and merged_q.weight.dtype == torch.float32
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    delta = q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight * 16 / 8
    expected = original.model.layers[0].self_attn.q_proj.weight + delta
    torch.testing.assert_close(merged_q.weight, expected)
    assert common.is_quantized(model)  # the training model is left as it was


def test_dpo_stage_with_qlora_saves_a_plain_float32_model(tiny_model: Path, tmp_path: Path):
    def turn(role: str, text: str) -> list[dict]:
        return [{"role": role, "content": text}]

    words = ["cats", "dogs", "rain", "tea", "bread", "snow", "books", "trees"]
    pairs = [
        {
            "prompt": turn("user", f"Say something about {w}."),
            "chosen": turn("assistant", f"{w.title()} are lovely."),
            "rejected": turn("assistant", f"No. {w} {w} {w}!"),
        }
        for w in words
    ]
    config = DPOStageConfig(
        use_qlora=True, learning_rate=1e-3, max_length=64, per_device_train_batch_size=4
    )
    result = train_dpo(tiny_model, pairs, [], config, tmp_path / "dpo")

    assert result.metrics["steps"] == 2
    saved = json.loads((result.path / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "float32"
    stage = json.loads((result.path / "rlaif_stage.json").read_text())
    assert stage["config"]["use_qlora"] is True
    assert stage["precision"]["master_dtype"] == "float32"  # not TRL's bf16 QLoRA adapter
