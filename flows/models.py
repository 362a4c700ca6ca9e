"""Turn a ModelConfig into a backend; build the embedded tiny model when it is named."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from alignment.backends import Backend, OpenAIBackend, VLLMBackend
from alignment.constitution import load_constitution
from alignment.prompts import load_prompts
from alignment.tiny_model import TinyModelConfig, build_tiny_model, corpus_chats
from flows.config import TINY, ModelConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The tiny model learns from the shipped text only, so editing your own
# constitution does not rebuild it.
TINY_CORPUS_CONSTITUTIONS = ("constitutions/default.yaml", "constitutions/demo.yaml")


@functools.cache
def _tiny_corpus() -> list[list[dict]]:
    """The shipped text as chats; every task asks for the model, so it is read once."""
    principles = [
        (p.text, p.critique, p.revision)
        for path in TINY_CORPUS_CONSTITUTIONS
        for p in load_constitution(PROJECT_ROOT / path).principles
    ]
    prompts = [p.text for p in load_prompts("builtin")]
    return corpus_chats(prompts, principles, seed=TinyModelConfig().seed)


def tiny_model_path(
    cache_dir: Path | None = None, progress: Callable[[int, int, float], None] | None = None
) -> Path:
    """The embedded model's folder, built on first use (about a minute on 2 cores)."""
    return build_tiny_model(
        _tiny_corpus(), TinyModelConfig(), cache_dir=cache_dir, progress=progress
    )


def model_location(config: ModelConfig) -> tuple[str, str]:
    """(what the engine loads, the name recorded in lineage)."""
    if config.model == TINY:
        path = tiny_model_path()
        return str(path), config.name or path.name  # the folder name is a content hash
    location = Path(config.model).expanduser()
    return str(location) if location.exists() else config.model, config.name or config.model


def make_backend(config: ModelConfig, seed: int) -> Backend:
    if config.backend == "openai":
        assert config.base_url is not None  # the config validator guarantees it
        return OpenAIBackend(config.base_url, config.model, max_concurrency=config.max_concurrency)
    location, name = model_location(config)
    return VLLMBackend(
        location,
        seed=seed,
        max_model_len=config.max_model_len,
        kv_cache_gib=config.kv_cache_gib,
        dtype=config.dtype,
        model_name=name,
    )
