"""Training stages from the store: export, SFT, registration, and vLLM loading the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.backends import SamplingConfig
from flows.models import tiny_model_path
from flows.training import DataConfig, TrainConfig, train_flow
from flows.training_rows import DataFilter, export_rows, preference_rows, sft_rows

pytestmark = pytest.mark.integration


def test_exported_pairs_are_what_trl_reads(collected, tmp_path):
    import datasets

    _, store, run_id = collected
    rows = preference_rows(store, DataFilter(split=None))
    assert len(rows) == store.count("preference_pairs")
    folder = export_rows(rows, "hf", tmp_path / "pairs")
    loaded = datasets.load_from_disk(str(folder))
    assert loaded.num_rows == len(rows)
    first = loaded[0]
    assert first["prompt"][0]["role"] == "user" and first["chosen"][0]["role"] == "assistant"
    assert {"p_chosen", "pair_id", "principle_ids", "constitution_id", "run_id"} <= set(first)
    jsonl = export_rows(rows, "jsonl", tmp_path / "pairs.jsonl")
    assert len(jsonl.read_text().splitlines()) == len(rows)
    parquet = export_rows(rows, "parquet", tmp_path / "pairs.parquet")
    assert datasets.Dataset.from_parquet(str(parquet)).num_rows == len(rows)

    # TRL's own trainers take the exported folder unchanged, lineage columns and all
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    tiny = str(tiny_model_path())
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    args = {
        "output_dir": str(tmp_path / "trl"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "bf16": False,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
    }
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    RewardTrainer(
        model=reward_model,
        args=RewardConfig(**args),
        train_dataset=loaded,
        processing_class=tokenizer,
    ).train()
    DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny),
        args=DPOConfig(**args),
        train_dataset=loaded,
        processing_class=tokenizer,
    ).train()


def test_sft_trains_registers_and_loads_in_vllm(collected, prefect_harness, vllm_backend):
    config_, store, run_id = collected
    config = TrainConfig(
        store=str(store.root),
        data=DataConfig(split="train"),
        sft={"learning_rate": 1e-3, "max_length": 128, "per_device_train_batch_size": 8},
    )
    model_id = train_flow(config=config, stage="sft")
    row = store.query("SELECT * FROM models WHERE model_id = ?", [model_id])[0]
    rows = sft_rows(store, DataFilter(split="train"))
    assert row["stage"] == "sft" and row["examples"] == len(rows) > 0
    assert row["data_runs"] == [run_id]
    assert row["constitution_ids"] == [
        store.query("SELECT constitution_id FROM constitutions")[0]["constitution_id"]
    ]
    assert row["base_model"] == tiny_model_path().name and row["parent_model_id"] is None
    metrics = json.loads(row["metrics"])
    assert metrics["examples"] == len(rows) and metrics["steps"] > 0

    assert train_flow(config=config, stage="sft") == model_id  # registered: not trained again
    assert store.count("models") == 1

    chats = [[{"role": "user", "content": "How do I boil an egg?"}]]
    greedy = SamplingConfig(max_tokens=8, temperature=0.0)
    base_path, base_name = vllm_backend.model_path, vllm_backend.model_name
    try:
        vllm_backend.load_weights(row["path"], model_name=model_id)
        assert vllm_backend.generate(chats, greedy)[0][0].num_tokens > 0
    finally:
        vllm_backend.load_weights(base_path, model_name=base_name)


TINY_STAGES = {
    "reward": {"learning_rate": 1e-3, "max_length": 128},
    "dpo": {"learning_rate": 5e-4, "max_length": 128, "soft_labels": True},
    "ppo": {"num_batches": 2, "batch_size": 8, "mini_batch_size": 4, "max_new_tokens": 8},
    "rloo": {
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 8,
    },
    "grpo": {
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 8,
    },
}


@pytest.mark.parametrize("stage", list(TINY_STAGES))
def test_every_stage_trains_from_the_store_and_registers(
    stage, collected, prefect_harness, vllm_backend
):
    _, store, run_id = collected
    config = TrainConfig(store=str(store.root), data=DataConfig(split=None), **TINY_STAGES)
    model_id = train_flow(config=config, stage=stage)
    row = store.query("SELECT * FROM models WHERE model_id = ?", [model_id])[0]
    assert row["stage"] == stage and row["data_runs"] == [run_id] and row["examples"] > 0
    expected = getattr(TrainConfig(**TINY_STAGES), stage).model_dump(mode="json")
    assert row["constitution_ids"] and json.loads(row["config"]) == expected
    if stage == "reward":
        stats = json.loads((Path(row["path"]) / "rlaif_reward_stats.json").read_text())
        assert stats["std"] > 0
        return
    if stage in ("ppo", "rloo", "grpo"):
        assert json.loads(row["metrics"])["reward_model"].endswith(
            store.query("SELECT path FROM models WHERE stage = 'reward'")[0]["path"].split("/")[-1]
        )
    # every policy checkpoint loads in vLLM and samples
    base_path, base_name = vllm_backend.model_path, vllm_backend.model_name
    try:
        vllm_backend.load_weights(row["path"], model_name=model_id)
        out = vllm_backend.generate(
            [[{"role": "user", "content": "Hi"}]], SamplingConfig(max_tokens=4, temperature=0.0)
        )
        assert out[0][0].num_tokens > 0
    finally:
        vllm_backend.load_weights(base_path, model_name=base_name)


def test_dpo_moves_vllm_samples_toward_the_preferred_answers(vllm_backend, tmp_path):
    """Chosen answers are short, rejected ones long: after DPO, vLLM's samples are shorter."""
    from alignment.training.dpo import DPOStageConfig, train_dpo
    from tests.integration.test_reward_dpo import synthetic_pairs

    rows = synthetic_pairs(160, seed=5)
    config = DPOStageConfig(learning_rate=2e-3, num_train_epochs=3, max_length=128)
    result = train_dpo(vllm_backend.model_path, rows, rows[:16], config, tmp_path / "dpo")
    assert result.metrics["eval_reward_accuracy"] >= 0.8

    chats = [r["prompt"] for r in synthetic_pairs(16, seed=6)]
    sampling = SamplingConfig(n=8, max_tokens=24, temperature=1.0)

    def mean_words() -> float:
        texts = [c.text for cs in vllm_backend.generate(chats, sampling) for c in cs]
        return sum(len(t.split()) for t in texts) / len(texts)

    before = mean_words()
    base_path, base_name = vllm_backend.model_path, vllm_backend.model_name
    try:
        vllm_backend.load_weights(result.path, model_name="dpo")
        after = mean_words()
    finally:
        vllm_backend.load_weights(base_path, model_name=base_name)
    assert after < 0.8 * before, (before, after)


def test_eval_compares_candidate_with_baseline(collected, prefect_harness, vllm_backend):
    from flows.evaluation import evaluate_flow

    config, store, _ = collected
    sft = store.query("SELECT model_id FROM models WHERE stage = 'sft'")
    assert sft, "runs after the SFT test"
    model_id = sft[0]["model_id"]
    reward = store.query("SELECT model_id FROM models WHERE stage = 'reward' LIMIT 1")
    assert reward, "runs after the reward-model test"
    metrics = {
        m.metric: m
        for m in evaluate_flow(
            config=config, candidate=model_id, baseline="tiny", reward_model=reward[0]["model_id"]
        )
    }
    eval_prompts = store.query("SELECT count(*) AS n FROM prompts WHERE split = 'eval'")[0]["n"]
    assert metrics["win_rate"].n + metrics["judge_not_ok"].value == eval_prompts
    assert metrics["win_rate"].ci_low <= metrics["win_rate"].value <= metrics["win_rate"].ci_high
    expected = {
        "violation_rate/concise",
        "baseline/violation_rate/concise",
        "length",
        "kl",
        "reward",
        "baseline/reward",
    }  # the reward model comes from the stage tests
    assert expected <= set(metrics)
    rows = store.query("SELECT * FROM evals WHERE model_id = ?", [model_id])
    assert {r["metric"] for r in rows} == set(metrics)
    assert {r["baseline_model_id"] for r in rows} == {tiny_model_path().name}
    # every comparison behind the win rate is in the store, among the eval run's rows
    eval_run = rows[0]["run_id"]
    judged = store.query(
        "SELECT count(*) AS n FROM judgments j JOIN responses r ON r.response_id = "
        "j.response_a_id WHERE r.model = ? AND j.judgment_id IN (SELECT row_id FROM run_rows "
        "WHERE run_id = ? AND table_name = 'judgments')",
        [model_id, eval_run],
    )[0]["n"]
    assert judged == eval_prompts
    # Without a reward model of its own, an eval reports no reward (it used to take the
    # newest reward model of the whole store, from any loop). Nothing is sampled again.
    again = {m.metric for m in evaluate_flow(config=config, candidate=model_id, baseline="tiny")}
    assert again == set(metrics) - {"reward", "baseline/reward"}
