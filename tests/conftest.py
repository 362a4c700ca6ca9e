"""Test-session environment: offline, quiet, and a Prefect home of its own."""

import os
import tempfile

from flows.cli import OFFLINE_ENV

for key, value in OFFLINE_ENV.items():
    os.environ.setdefault(key, value)
# Prefect's cache records and database must not leak between test sessions.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="rlaif-prefect-")
os.environ.pop("PREFECT_API_URL", None)
