"""bench/gpu.py on CPU: the GPU check's model shapes at tiny size, its dtype checks and one
training step through rlaif's stages, and its report section. No GPU figure is claimed here."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
NO_CUDA = not torch.cuda.is_available()


def bench_module(name: str) -> ModuleType:
    """bench/<name>.py, imported as the bench scripts are (with bench/ on sys.path), leaving
    the test session's environment and path as they were (bench/common.py sets some)."""
    environ, path = dict(os.environ), list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded
        spec.loader.exec_module(loaded)
        return loaded
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    return bench_module("gpu")


@pytest.fixture(scope="module")
def tiny_result(gpu: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("gpu-check")
    result = gpu.run("tiny", parts=("models", "checkpoint", "sft", "ppo"), work=work)
    return json.loads(json.dumps(result, default=str))


def test_tiny_shapes_keep_the_real_ones(gpu: ModuleType) -> None:
    for role in ("policy", "judge"):
        full, tiny = gpu.SHAPES["full"][role], gpu.SHAPES["tiny"][role]
        head_dim = full.hidden_size // full.num_attention_heads
        assert tiny.hidden_size // tiny.num_attention_heads == head_dim
        assert tiny.num_key_value_heads < tiny.num_attention_heads  # grouped KV heads
        assert tiny.tokenizer_vocab < tiny.vocab_size  # a padded vocabulary, as Qwen's
        assert tiny.tie_word_embeddings == full.tie_word_embeddings
    assert gpu.SHAPES["full"]["policy"] == gpu.Shape(896, 24, 14, 2, 4864, 151936, 8192)
    judge = gpu.SHAPES["full"]["judge"]
    assert (judge.hidden_size, judge.num_hidden_layers, judge.intermediate_size) == (1536, 28, 8960)
    assert (judge.num_attention_heads, judge.num_key_value_heads) == (12, 2)


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_without_cuda_only_tiny_runs(gpu: ModuleType) -> None:
    with pytest.raises(SystemExit, match="--tiny"):
        gpu.run("full", parts=())


def test_tiny_check_on_cpu(tiny_result: dict) -> None:
    result, parts = tiny_result, tiny_result["parts"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(parts, "ok"), parts
    assert result["size"] == "tiny" and result["gpu_figures"] is False
    if NO_CUDA:
        assert result["device"] == "cpu" and "claims no GPU figures" in result["note"]

    for role in ("policy", "judge"):
        vocab = parts["models"][role]["vocab"]
        assert vocab["ok"] and vocab["tokenizer_tokens"] <= vocab["config_vocab_size"]
        assert vocab["highest_id_seen"] < vocab["config_vocab_size"]

    checkpoint = parts["checkpoint"]
    assert checkpoint["checkpoint_dtype"] == "bfloat16"
    assert checkpoint["judge_checkpoint_dtype"] == "bfloat16"
    assert checkpoint["from_pretrained_auto"] == "bfloat16"  # why load_for_training exists
    assert checkpoint["load_for_training"] == "float32"

    expected_autocast = ["none"] if NO_CUDA else ["bfloat16"]
    sft = parts["sft"]
    for side in ("rlaif", "raw_trl"):
        run = sft[side]
        assert run["trainable_dtypes"] == ["float32"], side
        assert run["autocast"] == expected_autocast, side
        assert run["losses_finite"] and run["steps"] >= 1, side
        assert run["tokens_per_s"] > 0, side
    assert sft["rlaif"]["saved_dtype"] == "bfloat16"
    assert sft["rlaif"]["saved_precision"]["master_dtype"] == "float32"

    ppo = parts["ppo"]
    assert ppo["trainable_dtypes"] == ["float32"] and ppo["master_dtype"] == "float32"
    assert ppo["autocast"] == expected_autocast
    assert ppo["losses_finite"] and ppo["tokens_per_s"] > 0

    assert result["checks"]["failed"] == [] and result["checks"]["errors"] == []
    assert result["checks"]["passed"] == result["checks"]["total"] > 10


def test_markdown_and_report_section(gpu: ModuleType, tiny_result: dict, tmp_path: Path) -> None:
    section = gpu.markdown(tiny_result)
    assert "No GPU figures" in section
    assert "| sft | ok | float32 / none |" in section or not NO_CUDA
    assert f"{tiny_result['checks']['total']} of {tiny_result['checks']['total']} passed" in section

    report = bench_module("report")
    doc = "# Benchmarks\n\n<!-- bench:gpu -->\nSTALE\n<!-- /bench:gpu -->\n"
    results = tmp_path / "results"
    results.mkdir()
    not_run = report.render(doc, results)
    assert "<!-- bench:gpu -->\nnot run: no device was lent to this session\n" in not_run
    (results / "gpu.json").write_text(json.dumps(tiny_result))
    rendered = report.render(doc, results)
    assert "### GPU check (bench/gpu.py)" in rendered and "STALE" not in rendered


def test_cli_writes_json_and_markdown(
    gpu: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.utils import logging as transformers_logging

    for quiet in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # main sets them
        monkeypatch.setenv(quiet, "1")
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    try:
        gpu.main(["--tiny", "--parts", "models", "--out", str(out), "--md", str(md)])
    finally:
        transformers_logging.enable_progress_bar()
    result = json.loads(out.read_text())
    assert list(result["parts"]) == ["models"] and result["parts"]["models"]["status"] == "ok"
    assert result["gpu_figures"] is False
    assert md.read_text().startswith("### GPU check")
