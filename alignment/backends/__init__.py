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

The protocol and its values are in ``protocol``, the token bookkeeping both engines
share in ``tokens``, and the engines in ``vllm_backend`` and ``openai_backend``;
``ray_backend`` runs ``vllm_backend``'s engines in Ray actors. Every public name is
importable from ``alignment.backends``.
"""

from alignment.backends.endpoint_pool import EndpointPool, EndpointsDown
from alignment.backends.openai_backend import OpenAIBackend
from alignment.backends.protocol import (
    Backend,
    Chat,
    Completion,
    Message,
    SamplingConfig,
    SequenceScore,
    logsumexp,
)
from alignment.backends.ray_backend import (
    ActorSettings,
    EngineSettings,
    RayBackend,
    release_pools,
)
from alignment.backends.tokens import (
    LabelTokenError,
    ResponseTokens,
    chat_response_tokens,
    label_context,
    label_token_variants,
    split_response,
)
from alignment.backends.vllm_backend import (
    CPU_ENGINE_ENV,
    VLLMBackend,
    architecture_signature,
    release_engines,
    request_seed,
    resolve_dtype,
)

__all__ = [
    "CPU_ENGINE_ENV",
    "ActorSettings",
    "EngineSettings",
    "RayBackend",
    "Backend",
    "Chat",
    "Completion",
    "EndpointPool",
    "EndpointsDown",
    "LabelTokenError",
    "Message",
    "OpenAIBackend",
    "ResponseTokens",
    "SamplingConfig",
    "SequenceScore",
    "VLLMBackend",
    "architecture_signature",
    "chat_response_tokens",
    "label_context",
    "label_token_variants",
    "logsumexp",
    "release_engines",
    "release_pools",
    "request_seed",
    "resolve_dtype",
    "split_response",
]
