"""Any OpenAI-compatible chat server as a backend (e.g. ``vllm serve``)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from alignment.backends import placement
from alignment.backends.endpoint_pool import EndpointPool
from alignment.backends.protocol import Chat, Completion, SamplingConfig, SequenceScore, logsumexp
from alignment.backends.tokens import ResponseTokens


class OpenAIBackend:
    """Any OpenAI-compatible chat server (e.g. vLLM's), or a pool of identical ones
    (``base_url`` a list: least outstanding requests first, failover, health checks; see
    ``endpoint_pool``), with bounded concurrency and retries.

    Option scores come from the first position's ``top_logprobs``; a label missing
    from them is ``None``. Continuing the assistant prefix uses vLLM's
    ``continue_final_message`` extension.
    """

    def __init__(
        self,
        base_url: str | list[str],
        model: str,
        *,
        api_key: str = "EMPTY",
        max_concurrency: int = 8,
        max_retries: int = 4,
        down_after_s: float = 60.0,
        timeout_s: float = 120.0,
        top_logprobs: int = 20,
        model_name: str | None = None,
    ) -> None:
        self.model = model
        self.model_name = model_name or model
        self.max_concurrency = max_concurrency
        self.top_logprobs = top_logprobs
        self.pool = EndpointPool(
            base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            max_retries=max_retries,
            down_after_s=down_after_s,
        )

    def _map(self, bodies: list[dict], path: str = "/chat/completions") -> list[dict]:
        """Send each body through the pool, ``max_concurrency`` at a time, in order."""
        recorder = placement.current()  # the worker threads have no stage of their own
        at_root = path == "/tokenize"  # vLLM's /tokenize sits at the server's root

        def post(body: dict) -> dict:
            return self.pool.post(path, body, recorder, at_root=at_root)

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as threads:
            return list(threads.map(post, bodies))

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
        replies = self._map([{"model": self.model, **body} for body in bodies], "/tokenize")
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
