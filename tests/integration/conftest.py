"""Shared heavy fixtures: one tiny model, one vLLM engine, one OpenAI server, one Prefect."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignment.backends import VLLMBackend, release_engines
from flows.config import GenerationConfig, ModelConfig, PipelineConfig, PromptsConfig
from flows.models import make_backend, smollm2_model_path, tiny_model_path
from flows.pipeline import collect_preferences
from storage import Store
from tests.integration.vllm_server import VLLMServer, start_vllm_server

REPO = Path(__file__).resolve().parents[2]

# Every engine of the session runs in the test process, and so does each subprocess's
# (the env is inherited): no EngineCore process to spawn and import vLLM in. On 2 cores the
# tiny engine starts in ~16 s instead of ~37 s and SmolLM2's in ~9 s instead of ~43 s, with
# the same text.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on 2 cores beside a vLLM engine: a second intra-op thread only contends."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_model_path()


@pytest.fixture(scope="session")
def bf16_model(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model as a GPU user's checkpoint: bfloat16 weights, a generation config
    with repetition_penalty 1.3 and two end tokens (tests/precision_models.py)."""
    from tests.precision_models import bf16_checkpoint

    return bf16_checkpoint(tiny_model, tmp_path_factory.mktemp("bf16") / "model")


def shared_engine(config: ModelConfig) -> Iterator[VLLMBackend]:
    """The body of a session fixture that shares one vLLM engine of ``config``."""
    backend = make_backend(config, seed=0)
    assert isinstance(backend, VLLMBackend)
    yield backend
    release_engines()  # shut the engine down while pytest's streams are still open


@pytest.fixture(scope="session")
def policy_config() -> ModelConfig:
    """The engine settings every integration test uses, so they share one engine."""
    return ModelConfig(model="tiny", kv_cache_gib=0.5, max_model_len=1024)


@pytest.fixture(scope="session")
def vllm_backend(tiny_model: Path, policy_config: ModelConfig) -> Iterator[VLLMBackend]:
    yield from shared_engine(policy_config)


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct's folder (`make smollm2` builds it; else built here, ~20 s)."""
    return smollm2_model_path()


@pytest.fixture(scope="session")
def smollm2_backend(smollm2_model: Path) -> Iterator[VLLMBackend]:
    """A second shared engine beside the tiny one (about 20 s to start on 2 cores), for tests
    that need real English; dtype auto means float32 here."""
    yield from shared_engine(ModelConfig(model="smollm2", kv_cache_gib=0.5, max_model_len=2048))


SERVERS = ("openai_server", "pool_server")  # the fixtures of the session's vLLM servers


@pytest.fixture(scope="session", autouse=True)
def vllm_servers(request, tiny_model: Path, tmp_path_factory) -> Iterator[dict[str, VLLMServer]]:
    """The servers the selected tests use, started when the session starts: each boots
    (~30-50 s on 2 cores, mostly one thread importing vLLM) beside the first tests, on the
    core they leave idle, instead of in front of the test that needs it."""
    used = {name for item in request.session.items for name in item.fixturenames}
    folder = tmp_path_factory.mktemp("vllm-servers")
    servers = {
        name: start_vllm_server(tiny_model, folder / f"{name}.log")
        for name in SERVERS
        if name in used
    }
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def openai_server(vllm_servers) -> str:
    """A real vLLM OpenAI-compatible server of the tiny model on 127.0.0.1 (its /v1 url)."""
    return vllm_servers["openai_server"].wait_healthy()


@pytest.fixture(scope="session")
def pool_server(vllm_servers) -> VLLMServer:
    """A second server of the same model, dtype and seed: the endpoint pool's, which its
    test kills."""
    vllm_servers["pool_server"].wait_healthy()
    return vllm_servers["pool_server"]


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One real Ray cluster on 127.0.0.1 (2 CPUs) for the session's Ray tests (engine
    actors, Ray Train), started once, stopped by its process group."""
    from tests.integration.ray_cluster import local_ray_cluster

    with local_ray_cluster(num_cpus=2) as address:
        yield address


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def small_config(store: Path, policy_config) -> PipelineConfig:
    return PipelineConfig(
        store=str(store),
        constitution=str(REPO / "constitutions" / "demo.yaml"),
        batch_size=4,
        prompts=PromptsConfig(limit=10),
        policy=policy_config,
        generation=GenerationConfig(n=3, max_tokens=24),
        critique={"max_tokens": 16},
        # The A/B protocol (both orders) is what test_flow checks; contrast has its own tests.
        judge={"min_confidence": 0.5, "mode": "logprob"},
    )


@pytest.fixture(scope="session")
def collected(tmp_path_factory, prefect_harness, vllm_backend, policy_config):
    root = tmp_path_factory.mktemp("store")
    config = small_config(root, policy_config)
    run_id = collect_preferences(config=config).run_id
    return config, Store(root), run_id
