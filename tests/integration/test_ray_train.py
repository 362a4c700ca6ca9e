"""The loop's training step on 2 Ray Train workers (gloo on CPU) of a real Ray cluster on
127.0.0.1: the same results contract and registration as torchrun, identical weights on both
workers.

One launch (a DPO candidate through ``train_candidate``, the loop's own call) is the cost:
the cluster starts in seconds, then python + torch + TRL on both workers.
"""

from __future__ import annotations

import json

import pytest
from prefect import flow

import flows.training
from alignment.model_ref import ModelRef
from alignment.training.launch import rank_digests, weights_digest
from alignment.training.ray_train import failure_line
from flows.config import ModelConfig, PipelineConfig
from flows.loop import train_candidate
from flows.training import TrainConfig, train_flow
from storage import Store
from tests.integration.loop_helpers import REPO
from tests.integration.test_torchrun import TINY, training_store

pytestmark = pytest.mark.integration

TRAIN_PAIRS = [f"pp{i}" for i in range(8)]  # 2 steps of 2 pairs on each of the 2 workers


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return training_store(tmp_path_factory.mktemp("ray-train") / "store")


def _pipeline(store: Store, **loop) -> PipelineConfig:
    return PipelineConfig(
        store=str(store.root),
        constitution=str(REPO / "constitutions" / "demo.yaml"),
        policy=ModelConfig(model="tiny", kv_cache_gib=0.5, max_model_len=1024),
        loop={"name": "t", "method": "dpo", "train": {"dpo": TINY["dpo"]}, **loop},
    )


@flow
def train_in_a_flow(
    config: PipelineConfig, pairs: list[str] = TRAIN_PAIRS
) -> tuple[str, str | None]:
    """``train_candidate`` as the loop calls it, inside a flow run (iteration 1)."""
    return train_candidate(config, 1, ModelRef("tiny", "tiny"), pairs)


@pytest.fixture(scope="module")
def candidate(store, ray_address, tiny_model, prefect_harness):
    """The loop's DPO candidate trained on 2 Ray Train workers; the digests each reported."""
    seen: list[dict[int, str]] = []

    def recorded(results):
        seen.append(rank_digests(results))
        return seen[-1]

    config = _pipeline(store, nproc_per_node=2, launcher="ray", ray_address=ray_address)
    patch = pytest.MonkeyPatch()
    patch.setattr(flows.training, "rank_digests", recorded)
    try:
        model_id, reward_model = train_in_a_flow(config)
    finally:
        patch.undo()
    assert reward_model is None
    row = store.query("SELECT * FROM models WHERE model_id = ?", [model_id])[0]
    return row, seen


def test_the_loop_trains_on_two_ray_workers_with_identical_weights(store, candidate, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    row, seen = candidate
    assert (row["stage"], row["world_size"], row["iteration"], row["examples"]) == ("dpo", 2, 1, 8)
    assert json.loads(row["metrics"])["steps"] == 2  # 8 pairs, 2 a step on each of 2 workers
    [digests] = seen
    assert sorted(digests) == [0, 1] and digests[0] == digests[1]
    saved = AutoModelForCausalLM.from_pretrained(row["path"], dtype=torch.float32)
    assert weights_digest(saved) == digests[0]  # what worker 0 saved
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert digests[0] != weights_digest(base)  # and training moved it
    assert not any((store.root / "launches").iterdir())  # the scratch folder is gone


def test_the_launcher_is_not_part_of_the_model_id(store, candidate, prefect_harness):
    """The same training through torchrun is the registered model: found, not trained."""
    row, _ = candidate
    config = _pipeline(store, nproc_per_node=2, launcher="torchrun")
    fields = {**config.loop.train.model_dump(), "store": str(store.root), "iteration": 1}
    data = {"pairs": TRAIN_PAIRS, "split": "train"}
    torchrun = TrainConfig(**fields, data=data, nproc_per_node=2, launcher="torchrun")
    assert train_flow(config=torchrun, stage="dpo") == row["model_id"]
    assert store.count("models") == 1


def test_the_loop_trains_through_torchrun_too(store, candidate, prefect_harness):
    """The loop's default launcher, torchrun on this machine, on other pairs (another
    model): registered only when both processes ended with the same weights."""
    config = _pipeline(store, nproc_per_node=2, launcher="torchrun")
    model_id, _ = train_in_a_flow(config, TRAIN_PAIRS[:4])
    assert model_id != candidate[0]["model_id"]
    row = store.query("SELECT * FROM models WHERE model_id = ?", [model_id])[0]
    assert (row["stage"], row["world_size"], row["examples"]) == ("dpo", 2, 4)


def test_a_failed_worker_ends_the_launch_with_one_line_naming_it():
    from ray.train import WorkerGroupError

    cause = FileNotFoundError("this worker's node cannot read ['/s/spec.json']")
    error = WorkerGroupError(f"[Rank 1 Error Snippet]:\nTraceback...\n{cause!r}", {1: cause})
    line = failure_line(error, 2, "/tmp/ray/session_1/logs")
    assert line.startswith("Ray Train on 2 workers failed: FileNotFoundError(")
    assert "cannot read" in line and line.endswith("(logs: /tmp/ray/session_1/logs on each node)")


def test_a_failed_ray_launch_registers_nothing_and_quotes_the_failure(tmp_path, monkeypatch):
    from alignment.training.launch import StageJob
    from flows.training import launch_stage

    commands = []

    def failed(command, timeout_s, log):
        commands.append(command)
        log("Ray Train on 2 workers failed: KeyError: 'chosen' (logs: /r/logs on each node)")
        return 1

    monkeypatch.setattr(flows.training, "run_logged", failed)
    job = StageJob("dpo", "/base", [{"prompt": "p"}], {}, str(tmp_path / "out"))
    folder = tmp_path / "launch"
    with pytest.raises(RuntimeError, match="dpo training on 2 Ray Train workers failed") as error:
        launch_stage(job, folder, 2, 60, print, "ray", "10.0.0.1:6379")
    assert "KeyError: 'chosen' (logs: /r/logs" in str(error.value) and str(folder) in str(
        error.value
    )
    [command] = commands
    assert command[2:] == [
        "alignment.training.ray_train",
        "--num-workers", "2", "--address", "10.0.0.1:6379", str(folder / "spec.json"),
    ]  # fmt: skip
