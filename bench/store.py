"""The store against its anchors: rlaif's Store.write / Store.query against raw pyarrow writes
and raw DuckDB over the same files, on synthetic `preference_pairs` rows (docs/benchmarks.md).

Each case runs in its own subprocess, so its peak memory (ru_maxrss) is its own:

- ingest: S shards x R rows, one Store.write (or one pa.Table.from_pylist + pq.write_table,
  the raw anchor) per shard, spread over 100 runs; rows/s and each write's latency.
- queries: group-by principle, flipped-on-swap and the lineage join (eval -> iteration ->
  run_rows -> pairs), through Store.query, through raw DuckDB over the same shards, and
  through raw DuckDB over one compacted file per table.

Run it under the heavy-work lock, so that model runs do not disturb the figures:

    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/store.py            # full sizes
    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/store.py --quick    # about a minute
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from storage import Store  # noqa: E402
from storage.schemas import TABLES  # noqa: E402

RUNS = 100  # every size is spread over this many runs (a year of nightly loops has many)
PRINCIPLES = [f"principle-{i}" for i in range(16)]
FULL = [(100, 10_000), (2_000, 100)]
BIG = (10_000, 100)  # 1M pairs after 10,000 small writes (goal 4)
QUICK = [(20, 2_000), (400, 50)]
QUERY_REPEATS = 5

# The typical queries, over the views (the store) or over read_parquet (raw DuckDB).
QUERIES = {
    "group_by_principle": (
        "SELECT p AS principle_id, count(*) AS pairs, avg(p_chosen) AS p_chosen "
        "FROM preference_pairs, unnest(principle_ids) AS t(p) GROUP BY p ORDER BY p"
    ),
    "flipped_on_swap": (
        "SELECT principle_id, count(*) AS flipped FROM judgments "
        "WHERE status = 'ok' AND NOT position_consistent GROUP BY principle_id ORDER BY 1"
    ),
    "lineage_join": (
        "SELECT e.eval_id, count(*) AS pairs, avg(pp.p_chosen) AS p_chosen "
        "FROM evals e JOIN iterations i ON i.eval_run_id = e.run_id "
        "JOIN run_rows r ON r.run_id = i.data_run_id AND r.table_name = 'preference_pairs' "
        "JOIN preference_pairs pp ON pp.pair_id = r.row_id "
        "WHERE e.metric = 'win_rate' AND e.run_id = 'eval-0' GROUP BY e.eval_id"
    ),
}
QUERY_TABLES = ("preference_pairs", "judgments", "evals", "iterations", "run_rows")


def _hash(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def pairs(batch: int, rows: int) -> list[dict]:
    """`rows` synthetic preference pairs, distinct across batches."""
    out = []
    for i in range(rows):
        n = batch * rows + i
        out.append(
            {
                "pair_id": _hash("pair", batch, i),
                "prompt_id": _hash("prompt", n // 4),
                "prompt": f"Prompt {n}: explain why the sky looks blue at noon. " * 3,
                "chosen": f"Chosen answer {n}: Rayleigh scattering favours short waves. " * 6,
                "rejected": f"Rejected answer {n}: because the sea reflects it. " * 6,
                "chosen_response_id": _hash("resp", n, 0),
                "rejected_response_id": _hash("resp", n, 1),
                "p_chosen": 0.5 + (n % 50) / 100,
                "principle_ids": [PRINCIPLES[n % len(PRINCIPLES)]],
                "judgment_ids": [_hash("judgment", batch, i)],
                "constitution_id": _hash("constitution"),
                "policy_model": "tiny",
                "judge_model": "tiny",
                "iteration": n % 7,
                "split": "train",
            }
        )
    return out


def run_of(write: int, shards: int) -> str:
    return f"data-{write * RUNS // shards}"


def ingest(root: Path, shards: int, rows: int, raw: bool) -> dict:
    """Write `shards` batches of `rows` pairs; time only the writes."""
    store = Store(root)
    schema = TABLES["preference_pairs"].schema
    latencies = []
    for b in range(shards):
        batch = pairs(b, rows)
        run_id = run_of(b, shards)
        start = time.perf_counter()
        if raw:
            for row in batch:
                row["run_id"] = run_id
            folder = root / "parquet" / "preference_pairs" / f"run_id={run_id}"
            folder.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pylist(batch, schema=schema)
            pq.write_table(table, folder / f"part-{b:06d}.parquet", compression="zstd")
        else:
            store.write("preference_pairs", batch, run_id)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    if not raw:
        store.settle()  # the background merges count: the ingest ends when they are done
    settling = time.perf_counter() - start
    tenth = max(1, shards // 10)
    return {
        "rows_per_s": shards * rows / (sum(latencies) + settling),
        "seconds": sum(latencies) + settling,
        "settle_s": settling,
        "write_ms_first_10pct": 1000 * statistics.median(latencies[:tenth]),
        "write_ms_last_10pct": 1000 * statistics.median(latencies[-tenth:]),
        "files": len(list((root / "parquet" / "preference_pairs").rglob("*.parquet"))),
    }


def side_tables(root: Path, shards: int, rows: int) -> None:
    """Judgments, run_rows, iterations and evals for the pairs `ingest` wrote, in big writes."""
    store = Store(root)
    chunk = max(1, 100_000 // rows)
    for start in range(0, shards, chunk):
        judgments, members = [], []
        for b in range(start, min(shards, start + chunk)):
            run_id = run_of(b, shards)
            for i in range(rows):
                n = b * rows + i
                judgments.append(
                    {
                        "judgment_id": _hash("judgment", b, i),
                        "prompt_id": _hash("prompt", n // 4),
                        "principle_id": PRINCIPLES[n % len(PRINCIPLES)],
                        "p_a": 0.6,
                        "position_consistent": n % 3 != 0,
                        "status": "ok" if n % 11 else "refused",
                        "judge_model": "tiny",
                        "mode": "pairwise",
                    }
                )
                row_id = _hash("pair", b, i)
                members.append(
                    {
                        "member_id": f"{run_id}/preference_pairs/{row_id}",
                        "table_name": "preference_pairs",
                        "row_id": row_id,
                        "run_id": run_id,
                    }
                )
        store.write("judgments", judgments, "judge")
        by_run: dict[str, list[dict]] = {}
        for m in members:
            by_run.setdefault(m.pop("run_id"), []).append(m)
        for run_id, batch in by_run.items():
            store.write("run_rows", batch, run_id)
    iterations = [
        {"iteration_id": f"it-{k}", "iteration": k, "data_run_id": f"data-{k}",
         "eval_run_id": f"eval-{k}", "loop": "bench", "method": "dpo"}
        for k in range(RUNS)
    ]  # fmt: skip
    store.write("iterations", iterations, "loop")
    for k in range(RUNS):
        evals = [
            {"eval_id": f"ev-{k}-{m}", "model_id": f"m{k}", "metric": m, "value": 0.5, "n": 100}
            for m in ("win_rate", "reward")
        ]
        store.write("evals", evals, f"eval-{k}")


def timed(run_query) -> float:
    """Median milliseconds of QUERY_REPEATS runs, after one warm-up run."""
    run_query()
    times = []
    for _ in range(QUERY_REPEATS):
        start = time.perf_counter()
        run_query()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def raw_connection(root: Path, single: Path | None) -> duckdb.DuckDBPyConnection:
    """Raw DuckDB: one view per table over the shards, or over one file per table."""
    con = duckdb.connect()
    for table in QUERY_TABLES:
        if single is not None:
            source = f"read_parquet('{single / table}.parquet')"
        else:
            glob = root / "parquet" / table / "*.parquet"
            source = f"read_parquet('{glob}', union_by_name = true)"
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM {source}")
    return con


def queries(root: Path, mode: str) -> dict:
    """Time the typical queries through `mode`: store, raw (same shards) or single (one file)."""
    if mode == "store":
        store = Store(root)
        run = {name: (lambda q=q: store.query(q)) for name, q in QUERIES.items()}
    else:
        single = root.parent / "single" if mode == "single" else None
        con = raw_connection(root, single)
        run = {name: (lambda q=q: con.execute(q).fetchall()) for name, q in QUERIES.items()}
    result = {name: timed(fn) for name, fn in run.items()}
    result["answers"] = {name: len(fn()) for name, fn in run.items()}
    return result


def make_single(root: Path) -> None:
    """One compacted file per table, written by DuckDB, for the 'raw over one file' anchor."""
    single = root.parent / "single"
    single.mkdir(exist_ok=True)
    con = raw_connection(root, None)
    for table in QUERY_TABLES:
        con.execute(f"COPY (SELECT * FROM {table}) TO '{single / table}.parquet' (FORMAT parquet)")


def case(args: argparse.Namespace) -> dict:
    root = Path(args.root)
    if args.case in ("ingest", "ingest-raw"):
        out = ingest(root, args.shards, args.rows, raw=args.case == "ingest-raw")
    elif args.case == "side":
        side_tables(root, args.shards, args.rows)
        out = {}
    elif args.case == "compact":
        start = time.perf_counter()
        Store(root).compact()
        out = {"seconds": time.perf_counter() - start}
    elif args.case == "single":
        make_single(root)
        out = {}
    else:
        out = queries(root, args.case.removeprefix("query-"))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def sub(name: str, root: Path, shards: int, rows: int) -> dict:
    """Run one case in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, __file__, "--case", name, "--root", str(root)]
    cmd += ["--shards", str(shards), "--rows", str(rows)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=PROJECT)
    result = json.loads(done.stdout.splitlines()[-1])
    print(f"  {name:<14} {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def size(work: Path, shards: int, rows: int, query: bool, compact: bool) -> dict:
    print(f"{shards} x {rows}", file=sys.stderr, flush=True)
    out: dict = {"shards": shards, "rows_per_shard": rows}
    raw_root = work / f"raw-{shards}x{rows}" / "store"
    root = work / f"rlaif-{shards}x{rows}" / "store"
    out["raw_pyarrow"] = sub("ingest-raw", raw_root, shards, rows)
    shutil.rmtree(raw_root.parent)
    out["rlaif"] = sub("ingest", root, shards, rows)
    out["ingest_ratio"] = out["rlaif"]["rows_per_s"] / out["raw_pyarrow"]["rows_per_s"]
    if query:
        sub("side", root, shards, rows)
        out["query_raw_duckdb"] = sub("query-raw", root, shards, rows)
        out["query_rlaif"] = sub("query-store", root, shards, rows)
        if compact and hasattr(Store, "compact"):
            out["compact"] = sub("compact", root, shards, rows)
            out["query_rlaif_compacted"] = sub("query-store", root, shards, rows)
        sub("single", root, shards, rows)
        out["query_raw_one_file"] = sub("query-single", root, shards, rows)
    shutil.rmtree(root.parent)
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "pyarrow": pa.__version__,
        "note": "shared machine; run under flock /tmp/rlaif-heavy.lock",
    }


def markdown(data: dict) -> str:
    """The before/after table of docs/benchmarks.md, from the JSON file."""
    lines = [
        "| version | shards × rows | rlaif ingest (ratio to raw pyarrow) | per write, first → "
        "last 10 % (raw) | shard files | group-by / flipped / lineage: rlaif as written, after "
        "compact (raw DuckDB same files; one file) | peak RSS ingest |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in data.items():
        for s in run.get("sizes", []) if label != "machine" else []:
            rl, raw = s["rlaif"], s["raw_pyarrow"]
            q, qc = s.get("query_rlaif", {}), s.get("query_rlaif_compacted", {})
            qr, q1 = s.get("query_raw_duckdb", {}), s.get("query_raw_one_file", {})
            ms = " / ".join(
                f"{q[k]:.0f}, {qc[k]:.0f} ({qr[k]:.0f}; {q1[k]:.0f})"
                if k in qc
                else f"{q[k]:.0f} ({qr[k]:.0f}; {q1[k]:.0f})"
                for k in ("group_by_principle", "flipped_on_swap", "lineage_join")
            )
            lines.append(
                f"| {label} | {s['shards']:,} × {s['rows_per_shard']:,} | "
                f"{rl['rows_per_s']:,.0f} rows/s ({s['ingest_ratio']:.2f}) | "
                f"{rl['write_ms_first_10pct']:.1f} → {rl['write_ms_last_10pct']:.1f} ms "
                f"({raw['write_ms_first_10pct']:.1f} → {raw['write_ms_last_10pct']:.1f}) | "
                f"{rl['files']:,} | {ms} ms | {rl['peak_rss_mb']:.0f} MB "
                f"(raw {raw['peak_rss_mb']:.0f}) |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--big", action="store_true", help="also 10,000 x 100 (1M pairs)")
    parser.add_argument("--out", default=str(PROJECT / "bench/results/store.json"))
    parser.add_argument("--label", default="now", help="key of this run in the JSON file")
    parser.add_argument("--table", action="store_true", help="print the docs table and exit")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args)))
        return
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())), end="")
        return
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="rlaif-bench-") as tmp:
        results = [size(Path(tmp), s, r, query=True, compact=True) for s, r in sizes]
        if args.big:
            results.append(size(Path(tmp), *BIG, query=True, compact=True))
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data["machine"] = machine()
    data[args.label] = {"quick": args.quick, "sizes": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data[args.label], indent=2))


if __name__ == "__main__":
    main()
