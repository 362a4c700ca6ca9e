"""Training steps: rlaif's SFT, reward, DPO and PPO against plain TRL (issue 10, figure 5).

Every ratio compares runs made in the same process, alternating rlaif, raw, raw, rlaif, on
the same model folder, rows, batch size, max length, seed and step count; each side's figure
is its fastest run, and every run records how many cores other processes kept busy meanwhile
(read from /proc/stat), since this machine is shared:

- ``sft``, ``reward``, ``dpo``: rlaif's stage functions, called as ``flows/training.py``
  calls them (``train_sft``; ``train_reward_model`` with held-out rows and the training
  rows as the normalisation reference; ``train_dpo`` with held-out rows), each with its
  default config but for batch size, max length and learning rate, against the plain TRL
  trainer a user would write instead (``SFTTrainer`` / ``RewardTrainer`` / ``DPOTrainer``
  given the model folder, TRL defaults and the default loss, ``bf16=False``). A callback
  added to every ``Trainer.train`` call times each optimiser step; a wrapper around
  ``training_step`` counts the non-padding tokens fed (prompt + completion; chosen and
  rejected both count for pairs). tokens/s and s/step are over the steps after the
  warm-up steps: forward, backward, optimiser step, logging and the next batch's
  collation. Setup (model load, tokenising) and what comes after the loop (rlaif:
  held-out evaluation, reward statistics, saving for vLLM) are reported apart.
- ``ppo``: ``alignment.training.ppo.PPOTrainer`` as ``flows/training.py`` builds it, with
  the reward model the rlaif reward stage just trained. Its own ``time/batch_seconds``
  is the step time; wrappers around ``generate``, the reward function, ``rollout`` and
  ``ppo_update`` split it into generation, scoring (reward model, then the policy's and
  reference's log-probs and values), the optimisation epochs and the rest (GAE, metrics).
  tokens/s counts the batch's non-padding prompt + response tokens. TRL 1.16 has no PPO.

Models: ``tiny`` and ``smollm2`` (float32 on CPU); rows from the builtin gold preference
set (``alignment/data/judge_gold.jsonl``) as conversational rows, SFT on the chosen side.

Run it under the heavy-work lock (it trains models); --quick is a ~3 minute version:

    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/training.py
    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/training.py --quick --md /tmp/t.md

Writes bench/results/training.json (``--out``) and, with ``--md``, a markdown section.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import REPO, bench_parser, machine, timed, write_results  # noqa: F401  (first: the offline settings)
from transformers import Trainer, TrainerCallback  # noqa: E402

from alignment.judge_eval import load_preference_set  # noqa: E402
from flows.models import smollm2_model_path, tiny_model_path  # noqa: E402

# rlaif's default learning rates, used by both sides (they do not change the speed).
LEARNING_RATES = {"sft": 2e-5, "reward": 1e-5, "dpo": 1e-6}


@dataclass(frozen=True)
class Sizes:
    batch: int
    max_length: int
    warmup: int  # optimiser steps left out of the timed figures
    steps: int  # timed steps; one epoch over batch * (warmup + steps) rows
    eval_rows: int  # rlaif's held-out pairs (reward, DPO)
    reps: int  # rlaif/raw runs per stage, in the order rlaif, raw, raw, rlaif
    ppo_batch: int
    ppo_mini_batch: int
    ppo_batches: int  # timed, after ppo_warmup
    ppo_warmup: int = 1
    ppo_epochs: int = 4
    ppo_max_new_tokens: int = 32

    @property
    def rows(self) -> int:
        return self.batch * (self.warmup + self.steps)


SIZES = {  # (quick, model)
    (False, "tiny"): Sizes(batch=8, max_length=256, warmup=2, steps=16, eval_rows=8, reps=2,
                           ppo_batch=16, ppo_mini_batch=8, ppo_batches=3),
    (False, "smollm2"): Sizes(batch=4, max_length=256, warmup=1, steps=4, eval_rows=4, reps=2,
                              ppo_batch=8, ppo_mini_batch=4, ppo_batches=2),
    (True, "tiny"): Sizes(batch=8, max_length=256, warmup=1, steps=4, eval_rows=8, reps=1,
                          ppo_batch=16, ppo_mini_batch=8, ppo_batches=2),
    (True, "smollm2"): Sizes(batch=4, max_length=256, warmup=1, steps=2, eval_rows=4, reps=1,
                             ppo_batch=8, ppo_mini_batch=4, ppo_batches=1),
}  # fmt: skip
MODEL_PATHS: dict[str, Callable[[], Path]] = {
    "tiny": tiny_model_path,
    "smollm2": smollm2_model_path,
}


# --- Step clock: a callback and a token counter added to every Trainer.train call -----------


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process) since boot / start."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_load(before: tuple[float, float], after: tuple[float, float], wall: float) -> float:
    """Cores kept busy by other processes between two ``cpu_seconds`` readings."""
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall


class StepClock(TrainerCallback):
    """When one ``Trainer.train`` call began and ended, when each optimiser step ended, and
    the non-padding tokens of each batch fed to ``training_step``."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.begin = self.end = 0.0
        self.step_ends: list[float] = []
        self.tokens: list[int] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]  # as the loop runs it: gradient checkpointing is on by now
        self.settings = {
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "logging_steps": args.logging_steps,
            "save_strategy": str(args.save_strategy).rsplit(".", 1)[-1].lower(),
            "use_cpu": args.use_cpu,
        }
        self.begin = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends.append(time.perf_counter())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end = time.perf_counter()


CLOCKS: list[StepClock] = []


def fed_tokens(inputs: dict[str, Any]) -> int:
    mask = inputs.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(inputs["input_ids"].numel())  # padding-free batches carry no padding


def install_step_clock() -> None:
    original = Trainer.train

    def train(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        clock = StepClock()
        self.add_callback(clock)
        step = self.training_step

        def counted(model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            clock.tokens.append(fed_tokens(inputs))
            return step(model, inputs, *rest, **kw)

        self.training_step = counted  # type: ignore[method-assign]
        CLOCKS.append(clock)
        return original(self, *args, **kwargs)

    Trainer.train = train  # type: ignore[method-assign]


def measure(fn: Callable[[], Any], warmup: int) -> tuple[Any, dict[str, Any]]:
    """Runs one stage (one ``Trainer.train`` inside) and reads its clock."""
    CLOCKS.clear()
    cpu_before, start = cpu_seconds(), time.perf_counter()
    result = fn()
    stop, cpu_after = time.perf_counter(), cpu_seconds()
    if len(CLOCKS) != 1:
        raise RuntimeError(f"expected one Trainer.train call, saw {len(CLOCKS)}")
    clock = CLOCKS[0]
    ends, tokens = clock.step_ends, clock.tokens
    if len(ends) <= warmup or len(tokens) != len(ends):
        raise RuntimeError(f"{len(ends)} steps and {len(tokens)} batches; warm-up is {warmup}")
    timed_s = ends[-1] - ends[warmup - 1] if warmup else ends[-1] - clock.begin
    timed_tokens = sum(tokens[warmup:])
    steps = len(ends) - warmup
    return result, {
        **clock.settings,
        "steps": len(ends),
        "timed_steps": steps,
        "timed_tokens": timed_tokens,
        "tokens_per_step": round(timed_tokens / steps, 1),
        "s_per_step": round(timed_s / steps, 4),
        "tokens_per_s": round(timed_tokens / timed_s, 1),
        "setup_s": round(clock.begin - start, 3),
        "steps_s": round(ends[-1] - clock.begin, 3),
        "loop_end_s": round(clock.end - ends[-1], 3),  # last log; TRL's default end checkpoint
        "after_loop_s": round(stop - clock.end, 3),
        "total_s": round(stop - start, 3),
        "first_step_s": round(ends[0] - clock.begin, 3),
        "other_load_cores": round(other_load(cpu_before, cpu_after, stop - start), 2),
    }


# --- Rows ---------------------------------------------------------------------------------


def preference_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """Gold pairs as flows.training_rows shapes them, with p_chosen spread over [0.6, 1]."""
    pairs = load_preference_set("builtin", None)[offset : offset + n]
    if len(pairs) < n:
        raise ValueError(f"the gold set has {offset + len(pairs)} pairs; asked for {offset + n}")
    return [
        {
            "prompt": [{"role": "user", "content": p.prompt}],
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
            "p_chosen": 0.6 + 0.1 * (i % 5),
        }
        for i, p in enumerate(pairs)
    ]


def sft_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs]


def without_p_chosen(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "p_chosen"} for r in rows]


# --- SFT, reward, DPO: rlaif's stage against plain TRL -------------------------------------


def rlaif_stage(stage: str, path: Path, sizes: Sizes, scratch: Path) -> Callable[[], Any]:
    from alignment.training.dpo import DPOStageConfig, train_dpo
    from alignment.training.reward import RewardStageConfig, train_reward_model
    from alignment.training.sft import SFTStageConfig, train_sft

    rows = preference_rows(sizes.rows)
    held_out = preference_rows(sizes.eval_rows, offset=sizes.rows)
    common = {
        "per_device_train_batch_size": sizes.batch,
        "max_length": sizes.max_length,
        "learning_rate": LEARNING_RATES[stage],
    }
    out = scratch / f"rlaif-{stage}"
    if stage == "sft":
        return lambda: train_sft(path, sft_rows(rows), SFTStageConfig(**common), out)
    if stage == "reward":
        config = RewardStageConfig(**common)
        return lambda: train_reward_model(path, None, rows, held_out, rows, config, out)
    return lambda: train_dpo(path, rows, held_out, DPOStageConfig(**common), out)


def raw_trl(stage: str, path: Path, sizes: Sizes, scratch: Path) -> Callable[[], Any]:
    import datasets
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    rows = without_p_chosen(preference_rows(sizes.rows))
    config_class, trainer_class = {
        "sft": (SFTConfig, SFTTrainer),
        "reward": (RewardConfig, RewardTrainer),
        "dpo": (DPOConfig, DPOTrainer),
    }[stage]

    def run() -> Any:
        args = config_class(
            output_dir=str(scratch / f"raw-{stage}"),
            bf16=False,
            per_device_train_batch_size=sizes.batch,
            max_length=sizes.max_length,
            num_train_epochs=1,
            learning_rate=LEARNING_RATES[stage],
            seed=0,  # rlaif's default seed: both sides see the same batches
        )
        data = datasets.Dataset.from_list(sft_rows(rows) if stage == "sft" else rows)
        trainer = trainer_class(model=str(path), args=args, train_dataset=data)
        return trainer.train()

    return run


def stage_figures(stage: str, model: str, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    path = MODEL_PATHS[model]()
    runs: dict[str, list[dict[str, Any]]] = {"rlaif": [], "raw_trl": []}
    order = ["rlaif", "raw_trl", "raw_trl", "rlaif"] * sizes.reps
    for variant in order[: 2 * sizes.reps]:
        make = rlaif_stage if variant == "rlaif" else raw_trl
        _, figures = measure(make(stage, path, sizes, scratch), sizes.warmup)
        runs[variant].append(figures)
        print(f"{stage} {model} {variant}: {json.dumps(figures)}", flush=True)
    steps = {r["steps"] for rs in runs.values() for r in rs}
    tokens = {r["timed_tokens"] for rs in runs.values() for r in rs}
    if len(steps) != 1 or len(tokens) != 1:
        raise RuntimeError(f"{stage} {model}: the two sides trained on different batches")
    # Each side's fastest run: other processes on the machine only ever slow a run down.
    rate = {k: max(r["tokens_per_s"] for r in rs) for k, rs in runs.items()}
    per_step = {k: min(r["s_per_step"] for r in rs) for k, rs in runs.items()}
    mean = {k: statistics.fmean(r["tokens_per_s"] for r in rs) for k, rs in runs.items()}
    return {
        "stage": stage,
        "model": model,
        "model_folder": path.name,
        "dtype": runs["rlaif"][0]["dtype"],
        "rows": sizes.rows,
        "max_length": sizes.max_length,
        "batch": sizes.batch,
        "warmup_steps": sizes.warmup,
        "reps": sizes.reps,
        "rlaif_tokens_per_s": round(rate["rlaif"], 1),
        "raw_tokens_per_s": round(rate["raw_trl"], 1),
        "ratio": round(rate["rlaif"] / rate["raw_trl"], 3),
        "ratio_of_mean_rates": round(mean["rlaif"] / mean["raw_trl"], 3),
        "rlaif_s_per_step": round(per_step["rlaif"], 4),
        "raw_s_per_step": round(per_step["raw_trl"], 4),
        "tokens_per_step": runs["rlaif"][0]["tokens_per_step"],
        "runs": runs,
    }


# --- PPO ----------------------------------------------------------------------------------


class Stopwatch:
    """Seconds spent inside wrapped callables, per name, one entry per call."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.results: dict[str, list[Any]] = {}

    def wrap(self, owner: Any, attribute: str, name: str, keep: bool = False) -> None:
        inner = getattr(owner, attribute)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result, seconds = timed(lambda: inner(*args, **kwargs))
            self.seconds.setdefault(name, []).append(seconds)
            if keep:
                self.results.setdefault(name, []).append(result)
            return result

        setattr(owner, attribute, wrapped)


def ppo_figures(model: str, sizes: Sizes, reward_path: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from alignment.training.ppo import PPOConfig, PPOTrainer, reward_model_fn

    path = MODEL_PATHS[model]()
    config = PPOConfig(
        num_batches=sizes.ppo_warmup + sizes.ppo_batches,
        batch_size=sizes.ppo_batch,
        mini_batch_size=sizes.ppo_mini_batch,
        ppo_epochs=sizes.ppo_epochs,
        max_new_tokens=sizes.ppo_max_new_tokens,
    )
    prompts = sorted({r["prompt"][0]["content"] for r in preference_rows(64)})
    tokenizer = AutoTokenizer.from_pretrained(path)
    (trainer, setup_s) = timed(
        lambda: PPOTrainer(config, str(path), tokenizer, reward_model_fn(reward_path), prompts)
    )
    watch = Stopwatch()
    watch.wrap(trainer.accelerator.unwrap_model(trainer.model).lm, "generate", "generation")
    watch.wrap(trainer, "reward_fn", "reward_model")
    watch.wrap(trainer, "rollout", "rollout", keep=True)
    watch.wrap(trainer, "ppo_update", "optimisation")
    cpu_before = cpu_seconds()
    history, train_s = timed(trainer.train)
    load = other_load(cpu_before, cpu_seconds(), train_s)

    w = sizes.ppo_warmup
    batch_s = [m["time/batch_seconds"] for m in history][w:]
    step_s = sum(batch_s)

    def share(name: str) -> float:
        return sum(watch.seconds[name][w:]) / step_s

    rollouts = watch.results["rollout"][w:]
    tokens = sum(int(b["attention_mask"].sum()) for b in rollouts)
    generated = sum(int(b["mask"].sum()) for b in rollouts)
    generation_s = sum(watch.seconds["generation"][w:])
    shares = {
        "generation": share("generation"),
        "reward_model": share("reward_model"),
        "logprobs_values": share("rollout") - share("generation") - share("reward_model"),
        "optimisation": share("optimisation"),
    }
    shares["other"] = 1 - sum(shares.values())
    row = {
        "model": model,
        "model_folder": path.name,
        "reward_model": "rlaif reward stage output on the same model (this run)",
        "prompts": len(prompts),
        "config": config.model_dump(),
        "warmup_batches": w,
        "timed_batches": len(batch_s),
        "tokens_per_batch": round(tokens / len(batch_s), 1),
        "response_tokens_per_batch": round(generated / len(batch_s), 1),
        "s_per_step": round(step_s / len(batch_s), 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "generated_tokens_per_generation_s": round(generated / generation_s, 1),
        "shares": {k: round(v, 4) for k, v in shares.items()},
        "rollout_share": round(shares["generation"], 4),
        "scoring_share": round(shares["reward_model"] + shares["logprobs_values"], 4),
        "optimisation_share": round(shares["optimisation"], 4),
        "setup_s": round(setup_s, 3),
        "train_s": round(train_s, 3),
        "other_load_cores": round(load, 2),
        "all_batch_seconds": [round(m["time/batch_seconds"], 3) for m in history],
    }
    print(f"ppo {model}: {json.dumps({k: v for k, v in row.items() if k != 'config'})}", flush=True)
    return row


# --- Report -------------------------------------------------------------------------------


def _parts(r: dict[str, Any]) -> str:
    return (
        f"{r['setup_s']:.1f} + {r['steps_s']:.1f} + {r['loop_end_s']:.1f} + "
        f"{r['after_loop_s']:.1f} = {r['total_s']:.1f}"
    )


def _settings(runs: list[dict[str, Any]]) -> str:
    r = runs[0]
    checkpointing = "on" if r["gradient_checkpointing"] else "off"
    return (
        f"logging every {r['logging_steps']:g}, save {r['save_strategy']}, "
        f"checkpointing {checkpointing}"
    )


def _disturbed(result: dict[str, Any], above: float = 0.25) -> str:
    """The runs during which other processes used more than ``above`` cores, as a sentence."""
    named = [
        f"{s['stage']} {s['model']} {side} run {i + 1} ({r['other_load_cores']:.2f})"
        for s in result["stages"]
        for side, rs in s["runs"].items()
        for i, r in enumerate(rs)
        if r["other_load_cores"] > above
    ] + [
        f"ppo {p['model']} ({p['other_load_cores']:.2f})"
        for p in result["ppo"]
        if p["other_load_cores"] > above
    ]
    return f" Runs disturbed by them (cores): {', '.join(named)}." if named else ""


def _other_load(result: dict[str, Any]) -> list[float]:
    runs = [r for s in result["stages"] for rs in s["runs"].values() for r in rs]
    return [r["other_load_cores"] for r in runs] + [p["other_load_cores"] for p in result["ppo"]]


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    load = _other_load(result)
    lines = [
        "### 5. Training (bench/training.py)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}. "
        f"{'Quick run. ' if result['quick'] else ''}Total {result['seconds']:.0f} s. "
        f"Other processes kept {statistics.fmean(load):.2f} cores busy on average during the "
        f"runs (at most {max(load):.2f} in one run).{_disturbed(result)}",
        "",
        "Train tokens/s: non-padding tokens fed per optimiser step (prompt + completion; both "
        "sides of a pair) over the steps after the warm-up, a step being forward, backward, "
        "optimiser step, logging and the next batch's collation. rlaif: the stage function with "
        "its defaults (reward: margin loss from p_chosen; DPO: sigmoid loss, reference copy); "
        "raw: the TRL trainer given the model folder, TRL defaults, default loss. Same rows, "
        "batch, max length, seed and steps; float32. Runs alternate rlaif, raw, raw, rlaif; "
        "each side's figure is its fastest run (the JSON has every run, and the ratio of the "
        "means).",
        "",
        "| stage | model | rows × max len × batch | rlaif tokens/s | raw TRL tokens/s | ratio "
        "| s/step (rlaif / raw) | runs each |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["stages"]:
        lines.append(
            f"| {s['stage']} | {s['model']} | {s['rows']} × {s['max_length']} × {s['batch']} "
            f"| {s['rlaif_tokens_per_s']:,.0f} | {s['raw_tokens_per_s']:,.0f} | {s['ratio']:.2f} "
            f"| {s['rlaif_s_per_step']:.3f} / {s['raw_s_per_step']:.3f} | {s['reps']} |"
        )
    lines += [
        "",
        "Whole call, seconds (first run of each): setup (model and reference load, tokenising) "
        "+ steps + loop end (last log; plain TRL's default end-of-training checkpoint, model "
        "and optimiser state) + after the loop (rlaif: held-out evaluation, reward "
        "statistics, merged save for vLLM).",
        "",
        "| stage | model | rlaif | raw TRL | rlaif trainer settings | raw trainer settings |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["stages"]:
        rlaif, raw = s["runs"]["rlaif"], s["runs"]["raw_trl"]
        lines.append(
            f"| {s['stage']} | {s['model']} | {_parts(rlaif[0])} | {_parts(raw[0])} "
            f"| {_settings(rlaif)} | {_settings(raw)} |"
        )
    lines += [
        "",
        "PPO (`alignment/training/ppo.py`; TRL 1.16 has none), reward model from this run's "
        "rlaif reward stage: shares of the step time (`time/batch_seconds`, warm-up batch left "
        "out). Rollout: `generate`; scoring: the reward model, then the policy's and "
        "reference's log-probs and values; optimisation: `ppo_update` (all epochs); other: "
        "GAE, KL, metrics. tokens/s: the batch's non-padding prompt + response tokens per "
        "second of step.",
        "",
        "| model | batch × mini × epochs × new tokens | tokens/s | s/step | rollout % | scoring % "
        "(reward model + log-probs) | optimisation % | other % | generated tok/s in rollout |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["ppo"]:
        c, sh = p["config"], p["shares"]
        lines.append(
            f"| {p['model']} | {c['batch_size']} × {c['mini_batch_size']} × {c['ppo_epochs']} × "
            f"{c['max_new_tokens']} | {p['tokens_per_s']:,.0f} | {p['s_per_step']:.2f} | "
            f"{sh['generation']:.0%} | {p['scoring_share']:.0%} ({sh['reward_model']:.0%} + "
            f"{sh['logprobs_values']:.0%}) | {sh['optimisation']:.0%} | {sh['other']:.0%} | "
            f"{p['generated_tokens_per_generation_s']:,.0f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, "training", quick="fewer steps (~3 minutes)")
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated models")
    args = parser.parse_args()
    start = time.monotonic()
    install_step_clock()
    scratch = Path(tempfile.mkdtemp(prefix="bench-training-", dir="/tmp"))
    # rlaif's stages and TRL make their own temporary folders: keep them inside scratch.
    tempfile.tempdir = str(scratch)
    result: dict[str, Any] = {"machine": machine(), "quick": args.quick, "stages": [], "ppo": []}
    try:
        for model in args.models.split(","):
            sizes = SIZES[(args.quick, model)]
            result.setdefault("sizes", {})[model] = asdict(sizes)
            for stage in ("sft", "reward", "dpo"):
                result["stages"].append(stage_figures(stage, model, sizes, scratch / model))
            result["ppo"].append(ppo_figures(model, sizes, scratch / model / "rlaif-reward"))
    finally:
        tempfile.tempdir = None
        shutil.rmtree(scratch, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - start, 1)
    write_results(result, args.out, args.md, markdown)


if __name__ == "__main__":
    main()
