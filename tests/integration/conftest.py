"""Shared heavy fixtures: one tiny model, one vLLM engine, one OpenAI server, one Prefect."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alignment.backends import CPU_ENGINE_ENV, VLLMBackend, release_engines
from flows.config import GenerationConfig, ModelConfig, PipelineConfig, PromptsConfig
from flows.models import make_backend, smollm2_model_path, tiny_model_path
from flows.pipeline import collect_preferences
from storage import Store

REPO = Path(__file__).resolve().parents[2]


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(server: subprocess.Popen, root: str, log: Path, deadline: float) -> None:
    """Until the vLLM server at ``root`` (http://127.0.0.1:PORT) answers /health: an
    error naming its log when it exits or is not up by ``deadline`` (monotonic)."""
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {server.returncode}; see {log}")
        try:
            if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM server not healthy in time; see {log}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def openai_server(tiny_model: Path):
    """A real vLLM OpenAI-compatible server of the tiny model on 127.0.0.1."""
    port = _free_port()
    log = open(Path(os.environ["PREFECT_HOME"]) / "vllm-server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_model),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "1024",
            "--enforce-eager",
            "--seed",
            "0",
            "--dtype",
            "float32",  # the offline engine's dtype here (flows.models.engine_dtype)
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # One process (no engine-core child): the same answers, started ~10 s sooner.
        env={
            **os.environ,
            **CPU_ENGINE_ENV,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, url, Path(log.name), time.monotonic() + 300)
        yield f"{url}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


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
