"""One training stage as a worker: in this process, or on every rank of a launcher.

    python -m alignment.training.launch --nproc-per-node 2 SPEC.json [SPEC.json ...]
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29511 \\
        -m alignment.training.launch SPEC.json
    accelerate launch --multi_gpu --num_processes 2 --main_process_ip 127.0.0.1 \\
        --main_process_port 29511 -m alignment.training.launch SPEC.json

The first is the second with every socket on 127.0.0.1 (``torchrun_on_loopback``). On CPU
the ranks talk over gloo; ``accelerate launch --cpu --num_processes 2`` starts one process.
Ray Train's workers (``alignment.training.ray_train``) run the same per-rank body,
``run_specs``.

The store has one writer, the driver (``flows/training.py``), so a worker never opens it:
the driver writes a spec (``write_spec``: the stage, its starting model, its config, the
reward model of ppo/rloo/grpo, where to save) and the rows as JSONL files, launches this
module, then registers what ``result.json`` says. Several specs run one after the other
in one process group (each start-up of python + torch + TRL on every rank costs seconds).

Per spec, in its ``results`` folder:
- ``result.json`` (rank 0): ``{"stage", "path", "metrics", "world_size"}``;
- ``weights-rank<R>.sha256`` (every rank): ``weights_digest`` of the final weights that rank
  holds, taken before saving (which may cast rank 0's copy to the checkpoint's dtype).
  Data-parallel ranks must end identical; ``rank_digests`` reads them back.

Example: ``python -m alignment.training.launch runs/dpo/spec.json`` is the one-process run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment import atomic

STAGES = ("sft", "reward", "dpo", "ppo", "rloo", "grpo")
REWARD_STAGES = ("ppo", "rloo", "grpo")  # the stages that learn from a reward model
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class StageJob:
    """Everything one stage needs, without the store."""

    stage: str
    base_model: str  # folder of the starting model
    rows: list[dict[str, Any]]  # training rows (ppo/rloo/grpo: one per prompt)
    config: dict[str, Any]  # the stage's config, as ``model_dump(mode="json")`` gives it
    output: str  # folder the trained model is saved to
    eval_rows: list[dict[str, Any]] | None = None  # reward, dpo: held-out pairs
    reference_rows: list[dict[str, Any]] | None = None  # reward: normalisation set; None: rows
    reward_model: str | None = None  # ppo, rloo, grpo: the reward model's folder
    results: str | None = None  # folder for result.json and the digests

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {list(STAGES)}")
        if (self.stage in REWARD_STAGES) != (self.reward_model is not None):
            wanted = "needs" if self.stage in REWARD_STAGES else "takes no"
            raise ValueError(f"stage {self.stage} {wanted} reward_model")


# --- spec files -------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return path.name


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_spec(job: StageJob, folder: str | Path) -> Path:
    """Write ``job`` as ``folder/spec.json`` plus its rows as JSONL; returns the spec's path.

    Row files are named relative to the spec, so the folder can move. Rows must be JSON
    (anything else is written with ``str``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "stage": job.stage,
        "base_model": str(job.base_model),
        "rows": _write_jsonl(folder / "rows.jsonl", job.rows),
        "eval_rows": (
            _write_jsonl(folder / "eval_rows.jsonl", job.eval_rows)
            if job.eval_rows is not None
            else None
        ),
        "reference_rows": (
            _write_jsonl(folder / "reference_rows.jsonl", job.reference_rows)
            if job.reference_rows is not None
            else None
        ),
        "config": job.config,
        "reward_model": job.reward_model,
        "output": str(job.output),
        "results": str(job.results or folder / "results"),
    }
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, indent=2, default=str))
    return path


def read_spec(path: str | Path) -> StageJob:
    path = Path(path)
    spec = json.loads(path.read_text())
    rows = {
        key: _read_jsonl(path.parent / spec[key]) if spec.get(key) else None
        for key in ("rows", "eval_rows", "reference_rows")
    }
    return StageJob(**{**spec, **rows})


# --- weights ----------------------------------------------------------------------------------


def weights_digest(model) -> str:
    """sha256 over a model's state_dict: names in sorted order, each tensor's dtype, shape
    and bytes. Equal digests mean bit-identical weights."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def _fingerprinted_saves(digests: list[str] | None) -> Iterator[None]:
    """Record ``weights_digest`` of the model each TRL stage hands to ``save_for_vllm``
    (nothing when ``digests`` is None).

    That call (through ``save_stage``) is the one place every rank holds the final model
    (only rank 0 writes it), so it is wrapped here, for the time of one stage.
    """
    from alignment.training import common

    if digests is None:
        yield
        return
    original = common.save_for_vllm

    def save(model, *args, **kwargs):
        digests.append(weights_digest(model))
        return original(model, *args, **kwargs)

    common.save_for_vllm = save
    try:
        yield
    finally:
        common.save_for_vllm = original


# --- stages -----------------------------------------------------------------------------------


def _ppo(job: StageJob, digests: list[str] | None) -> tuple[Path, dict[str, Any]]:
    from transformers import AutoTokenizer

    from alignment.training.ppo import PPOConfig, PPOTrainer, reward_model_fn

    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    # A one-turn chat is its text (as before conversations); a longer one stays whole.
    prompts = [
        row["prompt"][0]["content"] if len(row["prompt"]) == 1 else tuple(row["prompt"])
        for row in job.rows
    ]
    reward_fn = reward_model_fn(job.reward_model)
    trainer = PPOTrainer(PPOConfig(**job.config), job.base_model, tokenizer, reward_fn, prompts)
    history = trainer.train()
    if digests is not None:
        digests.append(weights_digest(trainer.accelerator.unwrap_model(trainer.model).lm))
    path = trainer.save(job.output)
    return path, {"reward_model": job.reward_model, "first": history[0], "last": history[-1]}


def run_stage(job: StageJob, fingerprint: bool = True) -> tuple[Path, dict[str, Any], str | None]:
    """Train one stage: (saved folder, metrics, digest of this rank's final weights; None
    without ``fingerprint``)."""
    digests: list[str] | None = [] if fingerprint else None
    with _fingerprinted_saves(digests):
        if job.stage == "sft":
            from alignment.training.sft import SFTStageConfig, train_sft

            result = train_sft(job.base_model, job.rows, SFTStageConfig(**job.config), job.output)
            path, metrics = result.path, result.metrics
        elif job.stage == "reward":
            from alignment.training.reward import RewardStageConfig, train_reward_model

            result = train_reward_model(
                job.base_model,
                None,
                job.rows,
                job.eval_rows,
                job.rows if job.reference_rows is None else job.reference_rows,
                RewardStageConfig(**job.config),
                job.output,
            )
            path, metrics = result.path, result.metrics
        elif job.stage == "dpo":
            from alignment.training.dpo import DPOStageConfig, train_dpo

            config = DPOStageConfig(**job.config)
            result = train_dpo(job.base_model, job.rows, job.eval_rows, config, job.output)
            path, metrics = result.path, result.metrics
        elif job.stage == "ppo":
            path, metrics = _ppo(job, digests)
        else:
            from alignment.training.online_rl import OnlineRLConfig, train_online_rl

            result = train_online_rl(
                job.stage,
                job.base_model,
                job.reward_model,
                job.rows,
                OnlineRLConfig(**job.config),
                job.output,
            )
            path, metrics = result.path, {"reward_model": job.reward_model, **result.metrics}
    return Path(path), metrics, digests[-1] if digests else None


# --- results ----------------------------------------------------------------------------------


def write_results(job: StageJob, path: Path, metrics: dict[str, Any], digest: str | None) -> None:
    """This rank's digest file; on rank 0 also result.json (written last, renamed into place,
    so its presence means the stage finished)."""
    from alignment.training.common import is_main_process, rank, wait_for_everyone, world_size

    results = Path(job.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"weights-rank{rank()}.sha256").write_text(f"{digest or ''}\n")
    wait_for_everyone()
    if is_main_process():
        record = {
            "stage": job.stage,
            "path": str(path),
            "metrics": metrics,
            "world_size": world_size(),
        }
        atomic.write_text(results / RESULT_FILE, json.dumps(record, indent=2, default=str))


def read_result(results: str | Path) -> dict[str, Any]:
    """result.json of a finished stage (FileNotFoundError if it did not finish)."""
    return json.loads((Path(results) / RESULT_FILE).read_text())


def rank_digests(results: str | Path) -> dict[int, str]:
    """{rank: digest of its final weights} from a results folder."""
    return {
        int(p.name.removeprefix("weights-rank").removesuffix(".sha256")): p.read_text().strip()
        for p in sorted(Path(results).glob("weights-rank*.sha256"))
    }


# --- launching -------------------------------------------------------------------------------


def run_specs(spec_paths: list[str]) -> None:
    """What every rank of a launch runs (torchrun, accelerate launch, a Ray Train worker):
    each spec's stage in turn, then its results."""
    for spec_path in spec_paths:
        job = read_spec(spec_path)
        path, metrics, digest = run_stage(job)
        write_results(job, path, metrics, digest)


def torchrun_on_loopback(nproc_per_node: int, specs: list[str]) -> None:
    """``torchrun --nproc_per_node N --master_addr 127.0.0.1 --master_port P -m
    alignment.training.launch SPECS`` on this machine, every socket on 127.0.0.1.

    torchrun's rendezvous store listens on every interface whatever ``--master_addr`` says;
    here it is handed a socket already bound to 127.0.0.1 (``master_listen_fd``), which also
    picks the free port with no race. Gloo and NCCL are held to the loopback interface.
    """
    import socket

    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous
    from torch.distributed.run import main as torchrun

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    tcp_store = static_tcp_rendezvous.TCPStore

    def loopback_store(host, port, world_size, is_master, timeout, **kwargs):
        if is_master:
            kwargs["master_listen_fd"] = listener.detach()  # the store owns it from here
        return tcp_store(host, port, world_size, is_master, timeout, **kwargs)

    static_tcp_rendezvous.TCPStore = loopback_store
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    torchrun(
        [
            f"--nproc_per_node={nproc_per_node}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "alignment.training.launch",
            *specs,
        ]
    )


USAGE = """usage: python -m alignment.training.launch [--nproc-per-node N] SPEC.json [SPEC.json ...]

Runs each spec's training stage in turn. Under torchrun / accelerate launch every rank runs
this; --nproc-per-node N starts N ranks on this machine itself (torchrun on 127.0.0.1)."""


def main(argv: list[str]) -> int:
    nproc = 1
    if argv[:1] == ["--nproc-per-node"] and len(argv) > 1 and argv[1].isdigit():
        nproc, argv = int(argv[1]), argv[2:]
    if not argv or any(arg.startswith("-") for arg in argv) or nproc < 1:
        print(USAGE, file=sys.stderr)
        return 2
    if nproc > 1:
        torchrun_on_loopback(nproc, argv)
    else:
        run_specs(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
