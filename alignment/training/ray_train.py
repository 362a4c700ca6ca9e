"""Launched training on a Ray cluster: N Ray Train workers run what torchrun's ranks run.

    python -m alignment.training.ray_train --num-workers 2 [--address HOST:PORT] SPEC.json ...

This process is the Ray driver: it connects to the cluster (``--address``, else
``RAY_ADDRESS``, else a cluster of its own on this machine), starts Ray Train's
``TorchTrainer`` with N workers (one GPU each over NCCL where the cluster has GPUs, else one
CPU each over gloo) and waits for it. Ray Train sets up ``torch.distributed`` and the
torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) before each worker runs
``launch.run_specs``, so a worker trains, fingerprints and writes ``result.json`` exactly as
a torchrun rank does, and the driver in ``flows/training.py`` checks and registers it the
same way. Stopping this process (the launch timeout) ends the job, and Ray stops its workers.

The spec, its rows, the results folder and the model's output folder are plain paths: every
node that runs a worker must see them at the same path (on one node, any local folder; on N
nodes, a store on a shared filesystem), and every node needs this package installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
SOCKET_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# By name (Ray keeps a run's runtime_env as JSON), not __name__ (``__main__`` under -m).
LOOPBACK_HOOK = "alignment.training.ray_train.keep_rendezvous_on_loopback"


def on_loopback(address: str | None) -> bool:
    """Whether the cluster at ``address`` is on 127.0.0.1 (then it is one node)."""
    return bool(address) and address.rsplit(":", 1)[0] in LOOPBACK_HOSTS


def worker_runtime_env(address: str | None) -> dict[str, Any]:
    """The job's runtime_env, which its Ray Train workers run in: the driver's gloo/NCCL
    interface choice; on a loopback cluster every socket on 127.0.0.1 (collectives on
    ``lo``, the rendezvous store bound by ``keep_rendezvous_on_loopback``).

    >>> worker_runtime_env("127.0.0.1:6379")["env_vars"]["GLOO_SOCKET_IFNAME"]
    'lo'
    """
    env = {name: os.environ[name] for name in SOCKET_ENV if name in os.environ}
    if not on_loopback(address):
        return {"env_vars": env}
    env = {name: "lo" for name in SOCKET_ENV} | env
    return {"env_vars": env, "worker_process_setup_hook": LOOPBACK_HOOK}


def keep_rendezvous_on_loopback() -> None:
    """Make the TCPStore that rank 0 hosts for ``torch.distributed`` listen on 127.0.0.1
    only (it binds every interface whatever the master address): it gets a socket already
    bound there, as ``launch.torchrun_on_loopback`` does for torchrun. Runs as each worker
    process starts, before Ray Train sets up the process group."""
    import importlib
    import socket

    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # not the function

    tcp_store = rendezvous.TCPStore

    def loopback_store(host_name: str, port: int, *args: Any, **kwargs: Any):
        if kwargs.get("is_master") and "master_listen_fd" not in kwargs:
            kwargs["master_listen_fd"] = socket.create_server(("127.0.0.1", port)).detach()
        return tcp_store(host_name, port, *args, **kwargs)

    rendezvous.TCPStore = loopback_store


def train_worker(config: dict) -> None:
    """One Ray Train worker: the specs' stages, as one torchrun rank runs them."""
    from alignment.training.launch import run_specs

    unseen = [spec for spec in config["specs"] if not Path(spec).is_file()]
    if unseen:
        raise FileNotFoundError(
            f"this worker's node cannot read {unseen}: with workers on several nodes the store "
            "must be on storage every node mounts at the same path"
        )
    run_specs(config["specs"])


def connect(address: str | None) -> str:
    """Join the Ray cluster at ``address`` (None: ``RAY_ADDRESS``, else start one here);
    the folder its logs are in on this node."""
    import ray

    context = ray.init(
        address=address or os.environ.get("RAY_ADDRESS"),
        ignore_reinit_error=True,
        log_to_driver=True,  # the workers' output becomes this process's
        runtime_env=worker_runtime_env(address),  # a setup hook is only taken at job level
    )
    return str(Path(context.address_info["session_dir"]) / "logs")


def train_on_ray(specs: list[str], num_workers: int, address: str | None) -> None:
    """Run ``specs`` on ``num_workers`` Ray Train workers of the cluster joined by
    ``connect``: one GPU each over NCCL where the cluster has GPUs, else one CPU each over
    gloo. Raises what the workers raised."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"specs": [str(Path(spec).resolve()) for spec in specs]},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": 1},
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(Path(specs[0]).resolve().parent / "ray"),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


def failure_line(error: BaseException, num_workers: int, logs: str | None) -> str:
    """The one line a failed launch ends with: the error's last line (for a worker's
    failure, the exception it raised) and where the logs are.

    >>> failure_line(ValueError("Training failed:\\nKeyError: 'x'"), 2, "/tmp/ray/logs")
    "Ray Train on 2 workers failed: KeyError: 'x' (logs: /tmp/ray/logs on each node)"
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = lines[-1] if lines else type(error).__name__
    where = f"{logs} on each node" if logs else "the Ray cluster could not be joined"
    return f"Ray Train on {num_workers} workers failed: {cause} (logs: {where})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.training.ray_train")
    parser.add_argument("--num-workers", type=int, required=True)
    parser.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS)")
    parser.add_argument("specs", nargs="+")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("--num-workers must be at least 1")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # plain text in the stage's log
    logs = None
    try:
        logs = connect(args.address)
        print(f"Ray Train: {args.num_workers} workers; logs in {logs}", flush=True)
        train_on_ray(args.specs, args.num_workers, args.address)
    except Exception as error:
        import ray

        ray.shutdown()  # the workers' last lines are printed before the summary
        print(failure_line(error, args.num_workers, logs), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
