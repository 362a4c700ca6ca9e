"""Every training stage under torchrun: 2 processes on CPU (gloo), with the same results and
registration as one process, and identical weights on both ranks.

Start-up (python + torch + TRL on both ranks) is most of the cost on 2 cores, so there are two
launches: the reward model through ``train_flow`` (registration), then the five other stages
as five specs of one launch, each on rows the driver reads from the store as ``train_stage``
does.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import flows.training
from alignment.training.launch import rank_digests, read_result, weights_digest, write_spec
from flows.training import (
    STAGES,
    DataConfig,
    StageRun,
    TrainConfig,
    run_logged,
    stage_job,
    train_flow,
)
from storage import Store

pytestmark = pytest.mark.integration

RUN = "run-torchrun"
TOPICS = ["tea", "rain", "maps", "owls", "bread", "chess", "salt", "kites", "snow", "jazz"]
# 8 train pairs: 2 steps of 2 rows on each of the 2 ranks; 2 eval pairs.
TINY = {
    "sft": {"learning_rate": 1e-3, "max_length": 64, "per_device_train_batch_size": 2},
    "reward": {"learning_rate": 1e-3, "max_length": 64, "per_device_train_batch_size": 2},
    "dpo": {
        "learning_rate": 5e-4,
        "max_length": 64,
        "per_device_train_batch_size": 2,
        "soft_labels": True,
    },
    "ppo": {
        "num_batches": 1,
        "batch_size": 4,
        "mini_batch_size": 2,
        "ppo_epochs": 1,
        "max_new_tokens": 4,
    },
    "rloo": {
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 4,
    },
    "grpo": {
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 4,
    },
}
LAUNCHED = ["sft", "dpo", "ppo", "rloo", "grpo"]


def _rows(i: int, topic: str) -> dict[str, list[dict]]:
    split = "eval" if i >= 8 else "train"
    prompt, response = f"p{i}", f"r{i}"
    chosen, rejected = f"Sure, {topic} is nice.", f"No. Never {topic}, never, it is bad."
    return {
        "prompts": [{"prompt_id": prompt, "text": f"Tell me about {topic}.", "split": split}],
        "responses": [{"response_id": response, "prompt_id": prompt, "text": rejected}],
        "critiques": [
            {
                "critique_id": f"k{i}",
                "response_id": response,
                "principle_id": "kind",
                "constitution_id": "c1",
                "round": 1,
                "revision": chosen,
                "model": "tiny",
            }
        ],
        "preference_pairs": [
            {
                "pair_id": f"pp{i}",
                "prompt_id": prompt,
                "prompt": f"Tell me about {topic}.",
                "chosen": chosen,
                "rejected": rejected,
                "p_chosen": 0.8,
                "principle_ids": ["kind"],
                "constitution_id": "c1",
                "iteration": 0,
                "split": split,
            }
        ],
    }


def training_store(root: Path) -> Store:
    """Prompts, one critiqued response each (SFT rows) and one pair each (the others)."""
    db = Store(root)
    db.write("runs", [{"event_id": "e1", "iteration": 0, "status": "completed"}], RUN)
    for table in ("prompts", "responses", "critiques", "preference_pairs"):
        db.write(table, [r for i, t in enumerate(TOPICS) for r in _rows(i, t)[table]], RUN)
    return db


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return training_store(tmp_path_factory.mktemp("torchrun") / "store")


def _config(store: Store, **fields) -> TrainConfig:
    return TrainConfig(store=str(store.root), data=DataConfig(split="train"), **TINY, **fields)


@pytest.fixture(scope="module")
def registered_reward(store, tiny_model, prefect_harness):
    """The reward model trained through ``train_flow`` on 2 processes; the digests each rank
    reported to the driver."""
    seen: list[dict[int, str]] = []

    def recorded(results):
        seen.append(rank_digests(results))
        return seen[-1]

    patch = pytest.MonkeyPatch()
    patch.setattr(flows.training, "rank_digests", recorded)
    try:
        model_id = train_flow(config=_config(store, nproc_per_node=2), stage="reward")
    finally:
        patch.undo()
    row = store.query("SELECT * FROM models WHERE model_id = ?", [model_id])[0]
    return row, seen


@pytest.fixture(scope="module")
def launched(store, tiny_model, registered_reward, tmp_path_factory) -> dict[str, Path]:
    """sft, dpo, ppo, rloo and grpo in one launch of 2 processes; each stage's results."""
    reward_path = registered_reward[0]["path"]
    config = _config(store, reward_model=reward_path)
    root = tmp_path_factory.mktemp("launched")
    specs, results = [], {}
    for stage in LAUNCHED:
        run = StageRun(store, config, str(tiny_model), root / stage / "model")
        rows = STAGES[stage](run)
        reward = reward_path if stage in ("ppo", "rloo", "grpo") else None
        job = stage_job(run, stage, rows, reward)
        specs.append(str(write_spec(job, root / stage)))
        results[stage] = root / stage / "results"
    log: list[str] = []
    command = [sys.executable, "-m", "alignment.training.launch", "--nproc-per-node", "2"]
    code = run_logged([*command, *specs], 600, log.append)
    assert code == 0, "\n".join(log[-40:])
    return results


def _load(path: str | Path, stage: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_class = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    return model_class.from_pretrained(path, dtype=torch.float32)


def test_reward_on_two_processes_registers_world_size_2(store, registered_reward, tiny_model):
    from alignment.training.reward import RewardScorer

    row, seen = registered_reward
    assert (row["stage"], row["world_size"], row["examples"]) == ("reward", 2, 8)
    metrics = json.loads(row["metrics"])
    assert metrics["train_pairs"] == 8 and metrics["eval_pairs"] == 2 and metrics["steps"] == 2
    [digests] = seen
    assert sorted(digests) == [0, 1] and digests[0] == digests[1]
    assert weights_digest(_load(row["path"], "reward")) == digests[0]  # what rank 0 saved
    scores = RewardScorer(row["path"])(["Tell me about tea."], ["Sure, tea is nice."])
    assert math.isfinite(scores[0])
    assert not (store.root / "launches").exists() or not any((store.root / "launches").iterdir())
    # asked again: found, not trained again; one process is another model
    assert train_flow(config=_config(store, nproc_per_node=2), stage="reward") == row["model_id"]
    assert store.count("models") == 1


@pytest.mark.parametrize("stage", LAUNCHED)
def test_stage_on_two_processes_ends_with_identical_weights(stage, launched, tiny_model):
    result = read_result(launched[stage])
    assert (result["stage"], result["world_size"]) == (stage, 2)
    digests = rank_digests(launched[stage])
    assert sorted(digests) == [0, 1] and digests[0] == digests[1]
    assert weights_digest(_load(result["path"], stage)) == digests[0]  # the folder loads
    assert digests[0] != weights_digest(_load(tiny_model, stage))  # and training moved it
    metrics = result["metrics"]
    if stage == "ppo":
        assert metrics["last"]["episodes"] == 8  # 4 rollouts on each rank
    else:
        assert metrics["steps"] == (1 if stage in ("rloo", "grpo") else 2)


def test_models_registered_before_world_size_still_read(tmp_path):
    """A `models` shard written before the column existed reads with world_size null,
    beside new rows and after compaction."""
    db = Store(tmp_path / "store")
    row = {"model_id": "m-old", "stage": "dpo", "path": "/m", "examples": 1}
    shard = db.write("models", [row], RUN).path
    old = pq.read_table(shard)
    pq.write_table(old.drop_columns(["world_size"]), shard)
    db = Store(db.root)  # as the next version opens it
    assert db.query("SELECT world_size FROM models") == [{"world_size": None}]
    db.write("models", [{**row, "model_id": "m-new", "world_size": 2}], RUN)
    query = "SELECT model_id, world_size FROM models ORDER BY model_id"
    expected = [{"model_id": "m-new", "world_size": 2}, {"model_id": "m-old", "world_size": None}]
    assert db.query(query) == expected
    db.compact("models")
    assert db.query(query) == expected


def _fake_launch(folder: Path, world_size: int, digests: list[str]):
    """A run_logged that leaves the results a launch with these ranks would leave."""

    def run(command, timeout_s, log):
        results = folder / "results"
        results.mkdir(parents=True)
        record = {"stage": "dpo", "path": "/m", "metrics": {}, "world_size": world_size}
        (results / "result.json").write_text(json.dumps(record))
        for rank, digest in enumerate(digests):
            (results / f"weights-rank{rank}.sha256").write_text(digest + "\n")
        return 0

    return run


@pytest.mark.parametrize(
    ("world_size", "digests", "message"),
    [
        (2, ["a", "b"], "ended with different weights on its ranks"),
        (2, ["", ""], "ended with different weights on its ranks"),  # no digest taken
        (1, ["a"], "asked for 2 processes but ran on 1"),
    ],
)
def test_a_launch_whose_ranks_disagree_registers_nothing(
    tmp_path, monkeypatch, world_size, digests, message
):
    from alignment.training.launch import StageJob
    from flows.training import launch_stage

    folder = tmp_path / "launch"
    monkeypatch.setattr(flows.training, "run_logged", _fake_launch(folder, world_size, digests))
    job = StageJob("dpo", "/base", [{"prompt": "p"}], {}, str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match=message):
        launch_stage(job, folder, 2, 60, print)
    assert (folder / "spec.json").is_file()  # kept for a look


def test_a_launch_past_its_time_is_stopped():
    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    log: list[str] = []
    assert run_logged(sleeper, 4, log.append) == -15  # SIGTERM to its process group
    assert log[0] == "up" and log[-1].startswith("stopping")
