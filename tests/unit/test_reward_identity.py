"""An RL stage's model id hashes the reward model it learns from, resolved, never "latest"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.training import TrainConfig, resolve_reward_model
from storage import Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def register(store: Store, model_id: str, minutes: int) -> None:
    row = {
        "model_id": model_id, "stage": "reward", "path": f"/models/{model_id}",
        "base_model": "tiny", "iteration": 0, "metrics": {}, "promoted": False,
        "created_at": T0 + timedelta(minutes=minutes),
    }  # fmt: skip
    store.write("models", [row], f"train-{model_id}")


def test_latest_reward_model_is_resolved_to_its_id(tmp_path: Path) -> None:
    store = Store(tmp_path)
    config = TrainConfig(store=str(tmp_path))
    with pytest.raises(ValueError, match="no reward model registered"):
        resolve_reward_model(store, config)
    register(store, "rm-old", 0)
    assert resolve_reward_model(store, config) == ("/models/rm-old", "rm-old")
    register(store, "rm-new", 5)
    # A newer reward model is another input, so the PPO model trained from it is another id.
    assert resolve_reward_model(store, config) == ("/models/rm-new", "rm-new")
    named = TrainConfig(store=str(tmp_path), reward_model="rm-old")
    assert resolve_reward_model(store, named) == ("/models/rm-old", "rm-old")
