"""Self-preference of the two embedded judges, offline (docs/judge-models.md).

SmolLM2-135M-Instruct (the demo's policy and judge) and Qwen2.5-Coder-0.5B-Instruct
(``qwen-coder-0.5b``) each answer the same prompts, the 41 of the builtin eval split and
then train ones up to ``--prompts``, with the demo's eval sampling (T=0.7, 64 tokens,
seed 0). Each judge then compares SmolLM2's answer with Qwen's on every prompt, with the
demo's judge settings (contrast: no option order), under one principle per comparison
drawn by weight as the loop draws it, from the demo constitution's model-judged
principles (a principle decided by checks gives both judges the same verdict).

Reported, per judge: its win rate for its own model's answers (hard: p > 0.5 wins, a tie
counts half, Wilson interval; soft: the mean p, bootstrap interval). On the same pairs,
the self-preference: how much more SmolLM2's judge prefers SmolLM2's answers than Qwen's
judge does. That is also how much more Qwen's judge prefers Qwen's answers than
SmolLM2's judge does (two judges on the same pairs give one number); a paired bootstrap
over prompts gives its interval. Positive: the judges lean to their own models (together;
which of the two leans more needs a third judge or gold labels).

Run it under the heavy-work lock (two engines, about 5 minutes on 2 cores):

    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/self_preference.py
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from typing import Any

import numpy as np
from common import REPO, machine, timed, write_results  # first: the offline settings

from alignment.asking import Comparison  # noqa: E402
from alignment.backends import SamplingConfig  # noqa: E402
from alignment.constitution import load_constitution  # noqa: E402
from alignment.evaluation import wilson_interval  # noqa: E402
from alignment.judge import judge_comparisons  # noqa: E402
from alignment.prompts import load_prompts  # noqa: E402
from flows.config import QWEN_CODER, SMOLLM2, load_config  # noqa: E402
from flows.models import make_backend  # noqa: E402

MODELS = (SMOLLM2, QWEN_CODER)  # a comparison's a, b
RESAMPLES = 10_000


def pick_prompts(n: int) -> list[str]:
    """The eval split first, then train prompts, ``n`` in all."""
    prompts = load_prompts("builtin")
    ordered = [p for p in prompts if p.split == "eval"] + [p for p in prompts if p.split == "train"]
    return [p.text for p in ordered[:n]]


def bootstrap(values: np.ndarray, seed: int = 0) -> list[float]:
    """95 % percentile interval of the mean over prompts."""
    rows = np.random.default_rng(seed).integers(0, len(values), (RESAMPLES, len(values)))
    means = values[rows].mean(axis=1)
    return [round(float(x), 4) for x in np.percentile(means, [2.5, 97.5])]


def hard(p: np.ndarray) -> np.ndarray:
    """1 when a (SmolLM2's answer) wins, 0 when b wins, 0.5 for a tie."""
    return np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))


def own_win_rate(p_own: np.ndarray) -> dict[str, Any]:
    """A judge's preference for its own model's answers; ``p_own`` = P(own answer wins)."""
    wins = hard(p_own)
    low, high = wilson_interval(float(wins.sum()), len(wins))
    return {
        "hard": round(float(wins.mean()), 4),
        "hard_interval": [round(low, 4), round(high, 4)],
        "soft": round(float(p_own.mean()), 4),
        "soft_interval": bootstrap(p_own),
    }


def summarise(p_by_judge: dict[str, np.ndarray], principles: list[str]) -> dict[str, Any]:
    """Each judge's own-model win rate and the judges' difference on the same pairs."""
    p_s, p_q = p_by_judge[SMOLLM2], p_by_judge[QWEN_CODER]  # both: P(SmolLM2's answer wins)
    d_hard, d_soft = hard(p_s) - hard(p_q), p_s - p_q
    by_principle = {
        name: {
            "n": int(mask.sum()),
            "self_preference_hard": round(float(d_hard[mask].mean()), 4),
            "self_preference_soft": round(float(d_soft[mask].mean()), 4),
        }
        for name in sorted(set(principles))
        if (mask := np.array([p == name for p in principles])).any()
    }
    return {
        "n": len(p_s),
        "own_win_rate": {SMOLLM2: own_win_rate(p_s), QWEN_CODER: own_win_rate(1 - p_q)},
        "self_preference": {
            "hard": round(float(d_hard.mean()), 4),
            "hard_interval": bootstrap(d_hard),
            "soft": round(float(d_soft.mean()), 4),
            "soft_interval": bootstrap(d_soft),
        },
        "agreement": round(float((hard(p_s) == hard(p_q)).mean()), 4),
        "by_principle": by_principle,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts answered and judged")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "self_preference.json"))
    args = parser.parse_args()

    constitution_path = REPO / "constitutions" / "demo.yaml"
    demo = load_config(REPO / "configs" / "demo.yaml", {"constitution": str(constitution_path)})
    constitution = load_constitution(constitution_path)
    judged = replace(
        constitution, principles=tuple(p for p in constitution.principles if not p.checks)
    )
    sampling = SamplingConfig(
        temperature=demo.eval.temperature, max_tokens=demo.eval.max_tokens, seed=demo.seed
    )
    prompts = pick_prompts(args.prompts)
    backends = {
        name: make_backend(demo.policy.model_copy(update={"model": name}), seed=demo.seed)
        for name in MODELS
    }

    seconds: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    for name, backend in backends.items():  # engines start here, on first use
        chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
        done, seconds[f"generate/{name}"] = timed(lambda: backend.generate(chats, sampling))  # noqa: B023
        answers[name] = [samples[0].text for samples in done]

    principles = [
        judged.sample_principle(f"self-preference:{i}", demo.seed) for i in range(len(prompts))
    ]
    comparisons = [
        Comparison(prompt, a, b, principle)
        for prompt, a, b, principle in zip(
            prompts, answers[SMOLLM2], answers[QWEN_CODER], principles, strict=True
        )
    ]
    labels = {}
    for name, backend in backends.items():
        labels[name], seconds[f"judge/{name}"] = timed(
            lambda: judge_comparisons(backend, comparisons, demo.judge)  # noqa: B023
        )
    ok = [i for i in range(len(prompts)) if all(labels[j][i].status == "ok" for j in MODELS)]
    p_by_judge = {j: np.array([labels[j][i].p_a for i in ok], dtype=float) for j in MODELS}

    result = {
        "machine": machine(),
        "models": {name: backend.model_name for name, backend in backends.items()},
        "settings": {
            "prompts": "builtin: the eval split, then train prompts",
            "sampling": sampling.as_json(),
            "judge": demo.judge.model_dump(mode="json"),
            "principles": [p.id for p in judged.principles],
            "constitution": "constitutions/demo.yaml (its model-judged principles)",
            "bootstrap_resamples": RESAMPLES,
        },
        "seconds": {key: round(value, 1) for key, value in seconds.items()},
        "answer_words": {
            name: round(statistics.mean(len(a.split()) for a in answers[name]), 1)
            for name in MODELS
        },
        "not_ok": len(prompts) - len(ok),
        **summarise(p_by_judge, [principles[i].id for i in ok]),
        "pairs": [
            {
                "prompt": prompts[i],
                "principle": principles[i].id,
                SMOLLM2: answers[SMOLLM2][i],
                QWEN_CODER: answers[QWEN_CODER][i],
                **{f"p_{SMOLLM2}_by_{j}": labels[j][i].p_a for j in MODELS},
            }
            for i in range(len(prompts))
        ],
    }
    write_results(result, args.out, None, lambda _: "")
    mine = result["own_win_rate"]
    for name in MODELS:
        print(f"judge {name}: own answers win {mine[name]['hard']} {mine[name]['hard_interval']}")
    print(f"self-preference {result['self_preference']}")


if __name__ == "__main__":
    main()
