"""Content-addressed ids: the same inputs always give the same id, so reruns write nothing twice."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_id(kind: str, *parts: Any) -> str:
    """32 hex chars of sha256 over the kind and the JSON of the parts (order matters)."""
    payload = json.dumps([kind, *parts], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def collection_run_id(
    settings: dict[str, Any], constitution_id: str, policy: str, judge: str
) -> str:
    """A preference-collection run's id: the settings that decide its data, the
    constitution, and the names of its policy and judge models."""
    return content_id("run", settings, constitution_id, policy, judge)


def iteration_id(loop: str, iteration: int) -> str:
    """A self-improvement iteration's id: its loop's name and its number."""
    return content_id("iteration", loop, iteration)
