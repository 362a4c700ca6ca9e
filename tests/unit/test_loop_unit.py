"""The loop without vLLM or a Prefect server: the store claim, CLI refusals, and config copies.

A claim is an OS file lock (flock), so the holder in most tests is another process: it takes
the claim, prints "held", and sleeps until it is killed.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import flows.loop
from alignment.model_ref import ModelRef
from flows.cli import OFFLINE_ENV, main
from flows.config import ModelConfig, PipelineConfig
from flows.loop import (
    Session,
    eval_config,
    iteration_config,
    last_iteration,
    session_id,
    unfinished_session,
)
from storage import Store, StoreBusy

REPO = Path(__file__).resolve().parents[2]
CONSTITUTION = REPO / "constitutions" / "demo.yaml"
HOLDER = "test holder pid 1"

HOLD_SCRIPT = """
import sys, time
from storage import Store
with Store(sys.argv[1]).claim(sys.argv[2], sys.argv[3]):
    print("held", flush=True)
    time.sleep(float(sys.argv[4]))
print("released", flush=True)
"""


@pytest.fixture
def hold() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a process that holds a claim; every one started is killed after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(
        root: Path, purpose: str = "loop", holder: str = HOLDER, seconds: float = 120.0
    ) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_SCRIPT, str(root), purpose, holder, str(seconds)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


# --- Store.claim ----------------------------------------------------------------------------


def test_claim_creates_the_store_folder_and_releases(tmp_path: Path) -> None:
    store = Store(tmp_path / "new")
    with store.claim("loop", "me"):
        assert (store.root / ".loop.claim").read_text() == "me"
    assert (store.root / ".loop.claim").read_text() == ""  # the holder is cleared on release
    with store.claim("loop", "me again"):  # and it can be taken again
        pass


def test_claim_held_by_another_process_is_busy(tmp_path: Path, hold) -> None:
    store = Store(tmp_path / "store")
    hold(store.root)
    with pytest.raises(StoreBusy) as busy, store.claim("loop", "second"):
        pytest.fail("a second claim got in while the first was held")
    assert (busy.value.holder, busy.value.purpose, busy.value.root) == (HOLDER, "loop", store.root)
    message = str(busy.value)
    assert HOLDER in message
    assert str(store.root) in message
    assert message.startswith(f"a loop is already running on the store {store.root} ({HOLDER})")
    # the refused claim did not overwrite the holder's name
    assert (store.root / ".loop.claim").read_text() == HOLDER


def test_second_open_in_the_same_process_conflicts(tmp_path: Path) -> None:
    # flock belongs to the open file description: a nested claim opens the file again
    store = Store(tmp_path / "store")
    with (
        store.claim("loop", "outer"),
        pytest.raises(StoreBusy, match=r"\(outer\)"),
        store.claim("loop", "inner"),
    ):
        pytest.fail("a nested claim got in")
    with store.claim("loop", "after"):
        pass


def test_holder_unknown_when_the_file_is_empty(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.root.mkdir()
    with open(store.root / ".loop.claim", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreBusy, match=r"\(holder unknown\)"), store.claim("loop", "x"):
            pytest.fail("claimed a locked file")


def test_a_different_purpose_does_not_conflict(tmp_path: Path, hold) -> None:
    store = Store(tmp_path / "store")
    hold(store.root, purpose="loop")
    with store.claim("export", "me"):
        assert (store.root / ".export.claim").read_text() == "me"


def test_wait_gives_up_after_wait_s(tmp_path: Path, hold) -> None:
    store = Store(tmp_path / "store")
    hold(store.root)
    start = time.monotonic()
    with pytest.raises(StoreBusy, match=HOLDER), store.claim("loop", "me", wait_s=0.6):
        pytest.fail("claimed a held store")
    assert 0.5 <= time.monotonic() - start < 5


def test_wait_succeeds_once_the_holder_releases(tmp_path: Path, hold) -> None:
    store = Store(tmp_path / "store")
    proc = hold(store.root, seconds=1.0)
    with pytest.raises(StoreBusy), store.claim("loop", "me"):
        pytest.fail("claimed a held store")
    start = time.monotonic()
    with store.claim("loop", "me", wait_s=30):
        assert (store.root / ".loop.claim").read_text() == "me"
        assert proc.stdout is not None
        assert proc.stdout.readline() == "released\n"
    assert time.monotonic() - start < 10


def test_a_killed_holder_frees_the_claim(tmp_path: Path, hold) -> None:
    store = Store(tmp_path / "store")
    proc = hold(store.root)
    with pytest.raises(StoreBusy), store.claim("loop", "me"):
        pytest.fail("claimed a held store")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    # no wait: the OS released the lock with the process; the stale name is replaced
    with store.claim("loop", "me"):
        assert (store.root / ".loop.claim").read_text() == "me"


# --- rlaif self-improve refusals ------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run in tmp_path, offline, and fail if the flow (Prefect) is ever started."""
    monkeypatch.chdir(tmp_path)
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)

    def self_improve(**kwargs: object) -> None:
        raise AssertionError("`rlaif self-improve` started the flow instead of refusing")

    monkeypatch.setattr(flows.loop, "self_improve", self_improve)


def rlaif(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="rlaif")


def assert_refused(result: Result) -> str:
    """Exit 2, one line on stderr, nothing on stdout, no traceback; the line."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert result.stderr.endswith("\n")
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr.rstrip("\n")


def demo_config(store: Path) -> str:
    text = (REPO / "configs" / "demo.yaml").read_text()
    assert "\nstore: rlaif-data\n" in text
    assert "\nconstitution: constitutions/demo.yaml\n" in text
    text = text.replace("\nstore: rlaif-data\n", f"\nstore: {store}\n")
    return text.replace(
        "\nconstitution: constitutions/demo.yaml\n", f"\nconstitution: {CONSTITUTION}\n"
    )


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.usefixtures("cli_env")
def test_self_improve_refuses_while_a_loop_holds_the_store(tmp_path: Path, hold) -> None:
    store = tmp_path / "store"
    config = tmp_path / "loop.yaml"
    config.write_text(demo_config(store))
    hold(store)
    before = files_under(store)
    assert before == {".loop.claim": len(HOLDER)}

    line = assert_refused(rlaif("self-improve", "--config", str(config)))
    assert line.startswith("error: a loop is already running on the store ")
    assert str(store.resolve()) in line
    assert f"({HOLDER})" in line

    assert files_under(store) == before  # no parquet shards, no rlaif.duckdb
    assert not list(store.rglob("*.parquet"))
    assert not (store / "rlaif.duckdb").exists()
    assert (store / ".loop.claim").read_text() == HOLDER


@pytest.mark.usefixtures("cli_env")
def test_self_improve_store_option_is_the_claimed_store(tmp_path: Path, hold) -> None:
    other = tmp_path / "other"
    config = tmp_path / "loop.yaml"
    config.write_text(demo_config(tmp_path / "store"))
    hold(other)
    line = assert_refused(rlaif("self-improve", "--config", str(config), "--store", str(other)))
    assert str(other.resolve()) in line and HOLDER in line
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("loop", "message"),
    [
        ("iterations: -1", "loop.iterations: Input should be greater than or equal to 0 (got -1)"),
        (
            'name: "Bad Name"',
            "loop.name: String should match pattern '^[a-z0-9][a-z0-9-]*$' (got 'Bad Name')",
        ),
        (
            'method: "sft"',
            "loop.method: Input should be 'dpo', 'ppo', 'rloo', 'grpo' or 'spin' (got 'sft')",
        ),
    ],
)
@pytest.mark.usefixtures("cli_env")
def test_self_improve_refuses_a_bad_loop_config(tmp_path: Path, loop: str, message: str) -> None:
    Path("bad.yaml").write_text(f"store: store\nconstitution: {CONSTITUTION}\nloop:\n  {loop}\n")
    line = assert_refused(rlaif("self-improve", "--config", "bad.yaml"))
    assert line == f"bad.yaml:4: {message}"
    assert not (tmp_path / "store").exists()


@pytest.mark.usefixtures("cli_env")
def test_self_improve_refuses_a_policy_it_cannot_swap_weights_into(tmp_path: Path) -> None:
    Path("bad.yaml").write_text(
        f"store: store\nconstitution: {CONSTITUTION}\npolicy:\n  model: tiny\n"
        "  backend: openai\n  base_url: http://127.0.0.1:9/v1\n"
    )
    line = assert_refused(rlaif("self-improve", "--config", "bad.yaml"))
    assert line.startswith("bad.yaml:5: policy.backend: the loop samples every new checkpoint")
    assert not (tmp_path / "store").exists()


# --- iteration and eval configs -------------------------------------------------------------


def pipeline(**updates: object) -> PipelineConfig:
    return PipelineConfig(
        constitution=str(CONSTITUTION),
        seed=5,
        policy=ModelConfig(model="tiny", max_model_len=512, kv_cache_gib=0.25),
        **updates,
    )


INCUMBENT = ModelRef("cand-3", "/models/cand-3", content_id="cand-3")


def test_iteration_config_samples_with_the_incumbent_and_judges_with_the_start() -> None:
    config = pipeline()
    data = iteration_config(config, 3, INCUMBENT)
    assert data.seed == 8  # seed + k: fresh samples every iteration
    assert data.iteration == 3
    assert (data.policy.model, data.policy.name) == ("/models/cand-3", "cand-3")
    # the incumbent keeps the policy's engine settings
    assert (data.policy.max_model_len, data.policy.kv_cache_gib) == (512, 0.25)
    assert data.judge_model == config.policy  # the starting model judges
    assert data.judge_model.model == "tiny"
    # everything else is the loop's config; the original is untouched
    assert data.model_copy(update={"seed": 5, "iteration": 0, "policy": config.policy,
                                   "judge_model": None}) == config  # fmt: skip
    assert (config.seed, config.iteration, config.judge_model) == (5, 0, None)


def test_iteration_config_keeps_a_configured_judge() -> None:
    judge = ModelConfig(model="tiny", name="the-judge")
    data = iteration_config(pipeline(judge_model=judge), 1, INCUMBENT)
    assert data.judge_model == judge
    assert data.policy.name == "cand-3"


@pytest.mark.parametrize("k", [1, 2, 7])
def test_eval_config_keeps_the_seed_and_fixes_the_judge(k: int) -> None:
    config = pipeline()
    evaluation = eval_config(config, k)
    assert evaluation.seed == 5  # the same samples in every iteration
    assert evaluation.iteration == k
    assert evaluation.policy == config.policy
    assert evaluation.judge_model == config.policy
    assert iteration_config(config, k, INCUMBENT).judge_model == evaluation.judge_model


def test_eval_config_keeps_a_configured_judge() -> None:
    judge = ModelConfig(model="tiny", name="the-judge")
    assert eval_config(pipeline(judge_model=judge), 2).judge_model == judge


def test_session_id() -> None:
    assert session_id("demo", 1) == "loop-demo-0001"
    assert session_id("nightly-2", 42) == "loop-nightly-2-0042"
    assert session_id("demo", 12345) == "loop-demo-12345"
    assert list(Session("loop-demo-0004", 4, 6, False).iterations) == [4, 5, 6]


# --- loop state read from the store ---------------------------------------------------------

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def run_event(run_id: str, iteration: int, status: str, minute: int) -> dict[str, object]:
    at = T0 + timedelta(minutes=minute)
    return {
        "event_id": f"{run_id}:{status}", "run_id": run_id, "iteration": iteration,
        "status": status, "started_at": T0, "updated_at": at,
        "finished_at": at if status == "completed" else None,
    }  # fmt: skip


def test_no_store_means_no_session_and_iteration_zero(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    assert unfinished_session(store, "demo") is None
    assert last_iteration(store, "demo") == 0
    assert not store.root.exists()  # reading state creates nothing


def test_unfinished_session_is_resumed(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.write("runs", [run_event("loop-demo-0001", 3, "running", 0)], "loop-demo-0001")
    store.write("runs", [run_event("loop-other-0009", 9, "running", 5)], "loop-other-0009")
    store.write("runs", [run_event("loop-demo-2-0004", 4, "running", 6)], "loop-demo-2-0004")
    assert unfinished_session(store, "demo") == Session("loop-demo-0001", 1, 3, resumed=True)
    assert unfinished_session(store, "demo-2") == Session("loop-demo-2-0004", 4, 4, True)

    store.write("runs", [run_event("loop-demo-0001", 3, "completed", 10)], "loop-demo-0001")
    assert unfinished_session(store, "demo") is None


@pytest.mark.parametrize("method", ["dpo", "ppo"])
def test_each_iteration_trains_on_the_loops_processes(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """loop.nproc_per_node reaches every stage an iteration trains (the reward model too)."""
    asked: list[tuple[str, int]] = []

    def train_stage(config, stage):
        asked.append((stage, config.nproc_per_node))
        return f"{stage}-model"

    monkeypatch.setattr(flows.loop, "train_stage", train_stage)
    config = pipeline(loop={"name": "t", "method": method, "nproc_per_node": 2})
    flows.loop.train_candidate(config, 1, INCUMBENT, ["pair-1"])
    stages = ["reward", method] if method != "dpo" else ["dpo"]
    assert asked == [(stage, 2) for stage in stages]
