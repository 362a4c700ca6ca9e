"""Merging the real tiny model: the merged folder loads in transformers and in the shared
vLLM engine, and a model merged with itself writes what the model itself writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from alignment.backends import SamplingConfig
from alignment.merge import MergeConfig, merge_models
from flows.cli import main
from storage import Store

pytestmark = pytest.mark.integration

TRAIN_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train-demo.yaml"
CHATS = [[{"role": "user", "content": "How do I boil an egg?"}]]


def noisy_copy(model: Path, folder: Path, scale: float = 1e-3) -> Path:
    """`model` with small Gaussian noise on every floating-point tensor."""
    shutil.copytree(model, folder)
    generator = torch.Generator().manual_seed(0)
    tensors = load_file(folder / "model.safetensors")
    noisy = {
        name: tensor + scale * torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in tensors.items()
    }
    save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_merged_tiny_model_loads_and_generates(tiny_model: Path, vllm_backend, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    noisy = noisy_copy(tiny_model, tmp_path / "noisy")
    store = tmp_path / "store"
    args = ["merge", str(tiny_model), str(noisy), "--method", "slerp", "--t", "0.5"]
    result = CliRunner().invoke(
        main, [*args, "--config", str(TRAIN_CONFIG), "--store", str(store)], prog_name="rlaif"
    )
    assert result.exit_code == 0, result.output
    [row] = Store(store).query("SELECT model_id, path, config FROM models")
    merged = Path(row["path"])

    model, info = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = load_file(tiny_model / "model.safetensors")
    for name, tensor in load_file(merged / "model.safetensors").items():
        assert tensor.dtype == original[name].dtype
        assert (tensor - original[name]).abs().max() < 1e-2  # halfway to the noisy copy
    del model

    itself = merge_models([tiny_model, tiny_model], tmp_path / "itself", MergeConfig())
    greedy = SamplingConfig(max_tokens=8, temperature=0.0)
    base_path, base_name = vllm_backend.model_path, vllm_backend.model_name
    try:
        before = vllm_backend.generate(CHATS, greedy)[0][0]
        vllm_backend.load_weights(str(merged), model_name=row["model_id"])
        assert vllm_backend.generate(CHATS, greedy)[0][0].num_tokens > 0
        vllm_backend.load_weights(str(itself), model_name="itself")
        assert vllm_backend.generate(CHATS, greedy)[0][0].text == before.text
    finally:
        vllm_backend.load_weights(base_path, model_name=base_name)
