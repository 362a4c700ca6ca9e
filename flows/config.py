"""The pipeline config: one pydantic model, loaded from YAML, refused with ``file:line``.

Stage configs (judge, critique) live beside their methods in ``alignment/``; this
file only composes them with the run-level settings the flow needs.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from alignment.critique import CritiqueConfig
from alignment.evaluation import EvalConfig
from alignment.gates import GateConfig
from alignment.judge_config import JudgeConfig
from alignment.merge import LoopMergeConfig
from alignment.spin import SpinConfig
from alignment.training.dpo import DPOStageConfig
from alignment.training.online_rl import OnlineRLConfig
from alignment.training.ppo import PPOConfig
from alignment.training.reward import RewardStageConfig
from alignment.training.sft import SFTStageConfig
from alignment.yaml_spec import LocatedYaml, Problem, SpecError, load_yaml, show_value
from flows.model_checks import EMBEDDED_MODELS as EMBEDDED_MODELS
from flows.model_checks import HUB_ID as HUB_ID
from flows.model_checks import QWEN_CODER as QWEN_CODER
from flows.model_checks import SMOLLM2 as SMOLLM2
from flows.model_checks import (
    TINY,
    judge_label_problem,
    long_context_ok,
    model_context,
    model_problem,
)

M = TypeVar("M", bound=BaseModel)


class RayEnginesConfig(BaseModel):
    """Where a model's vLLM engines run when they run on a Ray cluster (docs/scale.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(
        None,
        description="The Ray cluster: 'auto', '127.0.0.1:6379', 'ray://head:10001'; null: "
        "RAY_ADDRESS, else a cluster started for this process.",
    )
    actors: int = Field(2, gt=0, description="Engines (one Ray actor each) for this model.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each engine actor reserves.")
    gpus_per_actor: float | None = Field(
        None,
        ge=0,
        description="GPUs each engine actor reserves (null: tensor x pipeline parallel size "
        "on a GPU cluster, 0 on CPU).",
    )
    batch_size: int = Field(
        8, gt=0, description="Requests per actor call: the unit that is retried elsewhere."
    )
    max_restarts: int = Field(1, ge=0, description="Times Ray restarts an engine actor that died.")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = Field(
        "PACK", description="Placement group strategy of the engine actors."
    )


# Where a model runs, not what it computes: left out of run ids, so the same config run
# on one machine, a Ray cluster or an endpoint pool stores the same rows.
PLACEMENT_FIELDS = frozenset(
    {"ray", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"}
)


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
    base_url: str | list[str] | None = Field(
        None,
        description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1, or a list "
        "of them: a pool (least outstanding requests first, failover, health checks).",
    )
    max_model_len: int = Field(1024, gt=0, description="Context length the engine reserves.")
    kv_cache_gib: float = Field(0.5, gt=0, description="KV-cache memory of the vLLM engine.")
    dtype: str = Field("auto", description="Weights dtype for vLLM (auto, float32, bfloat16).")
    max_concurrency: int = Field(8, gt=0, description="Parallel requests (openai backend).")
    name: str | None = Field(
        None, description="Name recorded in lineage (default: the model string)."
    )
    ray: RayEnginesConfig | None = Field(
        None,
        description="Run this model's vLLM engines in Ray actors (backend vllm only); "
        "null: one engine in this process.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs one engine spans.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: pipeline stages.")
    data_parallel_size: int = Field(1, ge=1, description="vLLM: engine replicas (GPU).")

    @model_validator(mode="after")
    def _backend_needs_url(self) -> ModelConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.backend == "openai" and self.ray is not None:
            raise ValueError("ray runs vLLM engines: it needs backend 'vllm', not 'openai'")
        if self.data_parallel_size > 1:
            message = (
                "data_parallel_size > 1: one offline vLLM engine holds no replicas; run "
                "replicas as engine actors (ray: {actors: N}) or as servers in a base_url list"
            )
            raise PydanticCustomError("data_parallel", message, {"field": "data_parallel_size"})
        return self

    def identity(self) -> dict[str, Any]:
        """What decides this model's outputs: the settings less where it runs (a pool's
        member list included: endpoints come and go)."""
        kept = self.model_dump(mode="json", exclude=set(PLACEMENT_FIELDS))
        if isinstance(self.base_url, list):
            del kept["base_url"]
        return kept

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
        if context is not None and self.max_model_len > context[0] and not long_context_ok():
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


class PromptsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        "builtin",
        description="'builtin' (the shipped seed set), 'builtin-two-turn' (two-turn "
        "conversations), a .jsonl or .parquet file, or a local Hugging Face dataset folder; "
        "a row's prompt may be a conversation (a list of messages ending with a user turn).",
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
        from alignment.prompts import BUILTIN_SOURCES

        if source not in BUILTIN_SOURCES and not Path(source).expanduser().exists():
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


LoopMethod = Literal["dpo", "ppo", "rloo", "grpo", "spin"]


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
        "dpo",
        description="dpo, or ppo / rloo / grpo on a reward model trained first, or spin "
        "(DPO of reference answers over the incumbent's own samples; see loop.spin).",
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
    merge: LoopMergeConfig | None = Field(
        None,
        description="Also evaluate merges of the incumbent and each candidate (e.g. {method: "
        "slerp, weights: [0.3, 0.5]}) with the same eval and gates, and promote the best "
        "that passes (by length-controlled win rate); null: the candidate alone.",
    )
    spin: SpinConfig = Field(
        default_factory=SpinConfig,
        description="method spin: the reference set and the stop rule (docs/spin.md).",
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
    launcher: Literal["torchrun", "ray"] = Field(
        "torchrun",
        description="How nproc_per_node > 1 processes start: torchrun on this machine, or "
        "Ray Train's TorchTrainer with nproc_per_node workers on a Ray cluster (any node).",
    )
    ray_address: str | None = Field(
        None, description="launcher ray: the cluster (null: RAY_ADDRESS, else a local one)."
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
        kept = self.model_dump(mode="json", exclude={"store", "eval", "loop"})
        kept["policy"] = self.policy.identity()
        if self.judge_model is not None:
            kept["judge_model"] = self.judge_model.identity()
        return kept


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
