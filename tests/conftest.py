"""Test-session environment: offline, quiet, and a Prefect home of its own."""

import os
import tempfile

from flows.cli import OFFLINE_ENV

for key, value in OFFLINE_ENV.items():
    os.environ.setdefault(key, value)
# Prefect's cache records and database must not leak between test sessions.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="rlaif-prefect-")
os.environ.pop("PREFECT_API_URL", None)
# Ray reads this when it is first imported (vLLM imports it): every Ray listener a test
# starts, and every address a driver resolves, stays on 127.0.0.1 (NOTES: Ray on loopback).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)
