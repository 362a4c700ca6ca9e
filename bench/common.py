"""What the model benchmarks share: offline settings, set on import before vLLM or Prefect
load; the machine's description; a timer. `import common` first in a bench script."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Offline, and Prefect's ephemeral server keeps its state in a throwaway folder.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="rlaif-bench-prefect-")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import torch
    import transformers
    import trl
    import vllm

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "vllm": vllm.__version__,
        "python": platform.python_version(),
    }


def bench_parser(doc: str | None, name: str, quick: str) -> argparse.ArgumentParser:
    """The options of every model benchmark: --quick (what it does: ``quick``), --out
    (bench/results/NAME.json) and --md (the markdown section, also written there)."""
    parser = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / f"{name}.json"))
    parser.add_argument("--md", default=None, help="also write the markdown section here")
    return parser


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def write_results(
    result: dict[str, Any], out: str, md: str | None, markdown: Callable[[dict], str]
) -> None:
    """The run's JSON file and, when asked, its markdown section."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    if md:
        Path(md).write_text(markdown(result) + "\n")
        print(f"wrote {md}")
