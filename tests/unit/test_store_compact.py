"""Compaction and the key index: every row kept once with its key and run_id, queries
unchanged, levels, the run-folder layout of older stores moved up, kill -9 at random
moments mid-compaction, readers during compaction."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

from click.testing import CliRunner

from flows.cli import main
from storage import Store
from storage import store as store_module
from storage.shards import STAGING_PREFIX, TMP_SUFFIX, level

PROJECT = Path(__file__).resolve().parents[2]
QUERY = "SELECT prompt_id, run_id, text FROM prompts ORDER BY prompt_id"


def batch(b: int, rows: int = 5, width: int = 20) -> list[dict]:
    rng = random.Random(b)
    return [
        {"prompt_id": f"p{b}-{i}", "text": rng.randbytes(width).hex(), "source": "seed"}
        for i in range(rows)
    ]


def fill(store: Store, batches: range, runs: int = 3, **kw: int) -> None:
    for b in batches:
        store.write("prompts", batch(b, **kw), f"run{b % runs}")


def shards(store: Store) -> list[Path]:
    return sorted((store.root / "parquet" / "prompts").glob("*.parquet"))


def strays(store: Store) -> list[Path]:
    parquet = store.root / "parquet"
    return [*parquet.glob(f"{STAGING_PREFIX}*"), *parquet.glob(f"prompts/.*{TMP_SUFFIX}")]


def check_once(store: Store, batches: range, rows: int = 5, runs: int = 3) -> None:
    """Every row of `batches` stored exactly once, in its run."""
    got = store.query("SELECT prompt_id, run_id FROM prompts")
    assert len(got) == len({r["prompt_id"] for r in got})
    assert {(r["prompt_id"], r["run_id"]) for r in got} == {
        (f"p{b}-{i}", f"run{b % runs}") for b in batches for i in range(rows)
    }


def test_compact_keeps_rows_keys_runs_and_answers(tmp_path: Path) -> None:
    store = Store(tmp_path)
    fill(store, range(12))
    before = store.query(QUERY)
    by_run = store.query("SELECT run_id, count(*) AS n FROM prompts GROUP BY 1 ORDER BY 1")
    [result] = store.compact("prompts")
    assert (result.merges, result.shards_before, result.shards_after) == (1, 12, 1)
    assert store.query(QUERY) == before
    assert store.query("SELECT run_id, count(*) AS n FROM prompts GROUP BY 1 ORDER BY 1") == by_run
    assert [level(p) for p in shards(store)] == [1]
    # the key index still knows every key, in this process and a fresh one
    assert store.write("prompts", batch(0), "run0").written == 0
    assert Store(tmp_path).write("prompts", batch(1), "other").written == 0
    assert store.compact("prompts")[0].merges == 0  # nothing left to merge
    assert [r.table for r in store.compact()] == store.tables()


def test_write_merges_small_shards_then_levels(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "COMPACT_AT", 6)
    monkeypatch.setattr(store_module, "FANOUT", 2)
    store = Store(tmp_path, background=False)  # each merge inside the write that is due
    fill(store, range(5))
    assert [level(p) for p in shards(store)] == [0] * 5  # below the threshold: untouched
    fill(store, range(5, 20))
    # writes 6 and 18 made a level-1 shard each; write 12 a second one, and the two a level 2
    assert sorted(level(p) for p in shards(store)) == [0, 0, 1, 2]
    check_once(store, range(20))
    assert not strays(store)


def test_shards_of_many_runs_merge_into_one(tmp_path: Path, monkeypatch) -> None:
    """A nightly loop writes a few shards per run: merging across runs is what keeps a
    year of runs at a few files per table."""
    monkeypatch.setattr(store_module, "COMPACT_AT", 6)
    store = Store(tmp_path)
    fill(store, range(6), runs=6)  # six runs, one shard each
    store.settle()  # the sixth write started a merge in the background
    assert [level(p) for p in shards(store)] == [1]
    check_once(store, range(6), runs=6)
    assert store.query("SELECT count(DISTINCT run_id) AS n FROM prompts") == [{"n": 6}]


def test_background_merges_keep_every_row_once_while_writes_go_on(
    tmp_path: Path, monkeypatch
) -> None:
    """Merges run on another thread and swap in under the write lock: whatever order they
    and the writes take, every row is stored once, and once settled no level is due."""
    monkeypatch.setattr(store_module, "COMPACT_AT", 4)
    monkeypatch.setattr(store_module, "FANOUT", 2)
    store, other = Store(tmp_path), Store(tmp_path)  # two writers, each merging
    for b in range(60):
        (store if b % 3 else other).write("prompts", batch(b), f"run{b % 3}")
        if b % 7 == 0:
            check_once(Store(tmp_path), range(b + 1))
    store.settle()
    other.settle()
    check_once(store, range(60))
    levels = Counter(level(p) for p in shards(store))
    assert levels[0] < 4 and all(n < 2 for k, n in levels.items() if k > 0), levels
    assert not strays(store)
    assert store.write("prompts", batch(3), "run0").written == 0


def test_key_index_is_completed_and_rebuilt_from_the_shards(tmp_path: Path) -> None:
    a, b = Store(tmp_path), Store(tmp_path)
    a.write("prompts", batch(0), "run0")
    b.write("prompts", batch(1), "run1")  # a's index has not seen this shard
    assert a.write("prompts", batch(1), "run1").written == 0
    b.compact()  # a's shards vanish under it
    assert a.existing_keys("prompts", ["p0-0", "p1-4", "nope"]) == {"p0-0", "p1-4"}
    for shard in shards(a):  # rows deleted behind its back are written again
        shard.unlink()
    assert a.write("prompts", batch(0), "run0").written == 5


def test_cli_store_compact(tmp_path: Path) -> None:
    store = Store(tmp_path)
    fill(store, range(4), runs=1)
    result = CliRunner().invoke(main, ["store", "compact", "--store", str(tmp_path), "--table",
                                       "prompts"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output == "prompts: 4 -> 1 shards\n"
    missing = CliRunner().invoke(main, ["store", "compact", "--store", str(tmp_path / "no")])
    assert missing.exit_code == 2 and "No rlaif database" in missing.output


COMPACTOR = textwrap.dedent(
    """
    import sys
    from storage import Store
    store = Store(sys.argv[1])
    print("start", flush=True)
    store.compact("prompts")
    print("done", flush=True)
    """
)


def test_kill_9_mid_compaction_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rng = random.Random(7)
    written, killed, mid = 0, 0, 0
    for _ in range(8):
        fill(store, range(written, written + 24), rows=40, width=200)
        store.settle()
        written += 24
        child = subprocess.Popen(
            [sys.executable, "-c", COMPACTOR, str(tmp_path)],
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline() == "start\n"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        killed += child.wait() == -signal.SIGKILL
        mid += bool(strays(store))  # killed with a staging folder on disk
        check_once(Store(tmp_path), range(written), rows=40)
    print({"killed": killed, "mid_compaction": mid})
    assert killed >= 4 and mid >= 1, (killed, mid)
    store.write("prompts", batch(10_000), "run0")  # the next write clears what was left
    store.settle()
    assert not strays(store)
    Store(tmp_path).compact("prompts")
    got = store.query("SELECT count(*) AS n, count(DISTINCT prompt_id) AS k FROM prompts")
    assert got == [{"n": written * 40 + 5, "k": written * 40 + 5}]
    assert len(shards(store)) == 1


def test_readers_never_see_a_wrong_count_during_compaction(tmp_path: Path) -> None:
    store = Store(tmp_path)
    reader, expected, seen, stop = Store(tmp_path), [0], [], threading.Event()
    paused, idle = threading.Event(), threading.Event()

    def read() -> None:
        while not stop.is_set():
            if paused.is_set():
                idle.set()
                time.sleep(0.001)
                continue
            idle.clear()
            seen.append((expected[0], reader.count("prompts")))

    thread = threading.Thread(target=read)
    paused.set()
    thread.start()
    try:
        for r in range(4):
            idle.clear()
            paused.set()
            idle.wait()  # the reader finished its last count before the rows change
            fill(store, range(r * 30, r * 30 + 30), rows=20, width=100)
            expected[0] = store.count("prompts")
            paused.clear()
            store.compact("prompts")
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 4
    assert all(want == got for want, got in seen)
