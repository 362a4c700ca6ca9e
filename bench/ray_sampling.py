"""Sampling through vLLM engines in Ray actors against one local engine (issue 20).

The same prompts and sampling settings on ``tiny``: one ``VLLMBackend`` in this process
(all cores), then a ``RayBackend`` of 2 actors with 1 CPU each on a Ray cluster started
here on 127.0.0.1 with as many CPUs as the machine has. Each is warmed up with one call,
then timed over ``--rounds`` calls; the figure is the ratio of the best tokens/s (goal:
ray / local >= 0.9), at each actor batch size. The texts must be identical.

    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/ray_sampling.py

Writes bench/results/ray_sampling.json (``--out``) and, with ``--md``, a markdown section.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from common import REPO, bench_parser, machine, timed, write_results  # noqa: F401  (first: the offline settings)

from alignment.backends import Backend, SamplingConfig, placement, release_pools  # noqa: E402
from alignment.conversation import as_chat  # noqa: E402
from alignment.prompts import load_prompts  # noqa: E402
from flows.config import ModelConfig, RayEnginesConfig  # noqa: E402
from flows.models import make_backend  # noqa: E402

sys.path.insert(0, str(REPO))  # the tests' loopback-only Ray cluster
from tests.integration.ray_cluster import local_ray_cluster  # noqa: E402

ACTORS = 2


def run_rounds(backend: Backend, chats: list, sampling: SamplingConfig, rounds: int) -> dict:
    """Warm-up call, then ``rounds`` timed calls: the best tokens/s, the texts, and the
    batches of the last call (which actor ran each, its seconds: do they overlap?)."""
    out = backend.generate(chats, sampling)
    tokens = sum(c.num_tokens for samples in out for c in samples)
    seconds = []
    for _ in range(rounds):
        with placement.recording() as recorder:
            seconds.append(timed(lambda: backend.generate(chats, sampling))[1])
    return {
        "tokens": tokens,
        "seconds": [round(s, 3) for s in seconds],
        "tokens_per_s": round(tokens / min(seconds), 1),
        "batches": [
            {"where": n.where, "requests": n.requests, "seconds": round(n.seconds, 3)}
            for n in recorder.placements
        ],
        "texts": [c.text for samples in out for c in samples],
    }


def main() -> None:
    parser = bench_parser(__doc__, "ray_sampling", "16 prompts, 1 round")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    args = parser.parse_args()
    # `timeout` sends SIGTERM: exit through the cluster's clean-up, not around it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    prompts, rounds = (16, 1) if args.quick else (args.prompts, args.rounds)
    chats = [as_chat(p.text) for p in load_prompts("builtin")[:prompts]]
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=48, seed=0)
    config = ModelConfig(model=args.model, max_model_len=2048 if args.model == "smollm2" else 1024)

    local = run_rounds(make_backend(config, 0), chats, sampling, rounds)
    print(f"local engine: {local['tokens_per_s']} tokens/s")
    results: dict[str, Any] = {"local": local, "ray": {}}
    with local_ray_cluster(num_cpus=os.cpu_count() or 2) as address:
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            ray = RayEnginesConfig(address=address, actors=ACTORS, cpus_per_actor=1.0,
                                   batch_size=batch_size)  # fmt: skip
            backend = make_backend(config.model_copy(update={"ray": ray}), 0)
            figure = run_rounds(backend, chats, sampling, rounds)
            figure["ratio"] = round(figure["tokens_per_s"] / local["tokens_per_s"], 3)
            figure["same_texts"] = figure.pop("texts") == local["texts"]
            results["ray"][str(batch_size)] = figure
            print(f"ray, {ACTORS} actors, batch {batch_size}: {figure['tokens_per_s']} tokens/s, "
                  f"ratio {figure['ratio']}, same texts {figure['same_texts']}")  # fmt: skip
        release_pools()
    local.pop("texts")
    result = {
        "machine": machine(),
        "model": args.model,
        "prompts": len(chats),
        "sampling": sampling.as_json(),
        "actors": ACTORS,
        "goal": "ray / local tokens/s >= 0.9",
        **results,
    }
    write_results(result, args.out, args.md, markdown)


def markdown(result: dict) -> str:
    lines = [
        "| engines | batch | tokens/s | ray / local | same texts |",
        "|---|---|---|---|---|",
        f"| 1 local engine | all | {result['local']['tokens_per_s']} | 1 | |",
    ]
    for batch, figure in result["ray"].items():
        lines.append(
            f"| {result['actors']} Ray actors, 1 CPU each | {batch} | {figure['tokens_per_s']} "
            f"| {figure['ratio']} | {figure['same_texts']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
