"""A small loop config and store snapshots shared by the loop and deployment tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage import TABLES, Store

REPO = Path(__file__).resolve().parents[2]
RLAIF = str(Path(sys.executable).parent / "rlaif")


DPO = "{dpo: {learning_rate: 1.0e-3, num_train_epochs: 1, max_length: 128}}"


def write_loop_config(
    path: Path, store: Path, name: str = "t", batch_size: int = 2, **loop: Any
) -> Path:
    """A loop as small as the tiny model allows: 10 seed + 2 synthetic prompts, n=3."""
    train = loop.pop("train", DPO)
    lines = [
        f"store: {store}",
        f"constitution: {REPO / 'constitutions' / 'demo.yaml'}",
        "seed: 0",
        f"batch_size: {batch_size}",
        "prompts: {limit: 10, synthetic: 2}",
        "policy: {model: tiny, kv_cache_gib: 0.5, max_model_len: 1024}",
        "generation: {n: 3, max_tokens: 40}",
        "critique: {max_tokens: 16}",
        "judge: {min_confidence: 0.51}",
        "eval: {max_prompts: 8, max_tokens: 40}",
        "loop:",
        f"  name: {name}",
        f"  iterations: {loop.pop('iterations', 1)}",
        f"  cron: {loop.pop('cron', 'null')}",
        f"  train: {train}",
        "  judge_audit_limit: 16",
        "  gates: {min_win_rate: null, min_position_consistency: null, "
        "max_violation_increase: 0.0, max_length_growth: 1.2, max_kl: 30.0}",
    ]
    assert not loop, f"unknown loop settings {loop}"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tiny_loop(
    path: Path, store: Path, prompts: str, loop: list[str], dpo_max_length: int
) -> Path:
    """A loop of 2 answers of 24 tokens a prompt on the tiny model, evaluated on 4 prompts,
    with no judge audit and the judge gates off (the tiny judge is noise; the collapse
    gates stay on). ``loop``: the loop section's own lines (name, method, merge, spin...)."""
    lines = [
        f"store: {store}",
        f"constitution: {REPO / 'constitutions' / 'demo.yaml'}",
        "seed: 0",
        "batch_size: 8",
        f"prompts: {prompts}",
        "policy: {model: tiny, kv_cache_gib: 0.5, max_model_len: 1024}",
        "generation: {n: 2, max_tokens: 24}",
        "critique: {enabled: false}",
        "judge: {min_confidence: 0.51}",
        "eval: {max_prompts: 4, max_tokens: 24}",
        "loop:",
        *(f"  {line}" for line in loop),
        "  judge_audit: null",
        "  train: {dpo: {learning_rate: 1.0e-3, num_train_epochs: 1, "
        f"max_length: {dpo_max_length}}}}}",
        "  gates: {min_win_rate: null, promotion_alpha: null, "
        "min_position_consistency: null, max_kl: 30.0}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot(store: Store) -> dict[str, Any]:
    """What a run leaves behind, free of timestamps and file names: every table's keys,
    the sampled texts and the judge's labels."""
    shot: dict[str, Any] = {}
    for table, spec in TABLES.items():
        view = spec.view or table
        keys = [row["k"] for row in store.query(f"SELECT {spec.key} AS k FROM {view}")]
        assert len(keys) == len(set(keys)), f"duplicate keys in {table}"
        shot[table] = set(keys)
    shot["seed prompts"] = {
        r["prompt_id"] for r in store.query("SELECT * FROM prompts WHERE source = 'seed'")
    }
    shot["response texts"] = {
        r["response_id"]: (r["prompt_id"], r["text"])
        for r in store.query("SELECT * FROM responses")
    }
    shot["judgment labels"] = {
        r["judgment_id"]: (r["response_a_id"], r["status"], r["p_a"])
        for r in store.query("SELECT * FROM judgments")
    }
    shot["decisions"] = [r["iteration"] for r in store.query("SELECT * FROM iterations")]
    return shot


def assert_same_run(resumed: dict[str, Any], clean: dict[str, Any]) -> None:
    """A resumed run stored what a clean run stores, as far as any CPU can promise.

    Ids hash inputs, not outputs, so the rows of the seed prompts (fixed text) have the
    same ids on every machine: those must match exactly. Sampled text and the judge's
    numbers come from float kernels whose rounding may depend on the batch a request
    shared (AVX-512 vs AVX2): they must agree on nearly every row, not bit for bit, and a
    self-instruct prompt (sampled text, so its id) may differ with them.
    """
    for table in ("prompts", "responses", "critiques", "judgments", "iterations", "models"):
        assert len(resumed[table]) == len(clean[table]), table  # nothing missing or doubled
    assert resumed["decisions"] == clean["decisions"]
    assert resumed["seed prompts"] == clean["seed prompts"]
    seeded = {
        response_id
        for response_id, (prompt_id, _) in clean["response texts"].items()
        if prompt_id in clean["seed prompts"]
    }
    assert seeded <= resumed["responses"]
    seeded_judgments = {j for j, (a, _, _) in clean["judgment labels"].items() if a in seeded}
    assert seeded_judgments <= resumed["judgments"]
    same_text = [resumed["response texts"][r][1] == clean["response texts"][r][1] for r in seeded]
    assert sum(same_text) >= 0.9 * len(same_text)
    close = [
        resumed["judgment labels"][j][1] == clean["judgment labels"][j][1]
        and abs((resumed["judgment labels"][j][2] or -1) - (clean["judgment labels"][j][2] or -1))
        < 0.02
        for j in seeded_judgments
    ]
    assert sum(close) >= 0.9 * len(close)


def run_until(
    args: list[str],
    log: Path,
    ready: Callable[[], bool],
    timeout_s: float = 400,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start `rlaif ARGS` in its own process group and SIGKILL it once `ready()` holds."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            [RLAIF, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=env,
        )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"rlaif ended ({process.returncode}) before the kill point:\n"
                                 + log.read_text()[-3000:])  # fmt: skip
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("kill point not reached:\n" + log.read_text()[-3000:])
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the engine's processes die with it
    process.wait()
    return process


def shards(store: Store, table: str) -> list[Path]:
    return sorted((store.root / "parquet" / table).glob("*.parquet"))
