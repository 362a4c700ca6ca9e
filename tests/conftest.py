"""Test-session environment: offline, quiet, and a Prefect home of its own."""

import os
import tempfile

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(key, value)
# Prefect's cache records and database must not leak between test sessions.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="rlaif-prefect-")
os.environ.pop("PREFECT_API_URL", None)
