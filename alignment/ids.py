"""Content-addressed ids: the same inputs always give the same id, so reruns write nothing twice."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_id(kind: str, *parts: Any) -> str:
    """32 hex chars of sha256 over the kind and the JSON of the parts (order matters)."""
    payload = json.dumps([kind, *parts], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]
