"""vLLM engines in long-lived Ray actors, as one backend.

A pool of N actors is placed with one placement group and cached per process by (Ray
address, model architecture, engine settings, actor settings), as ``vllm_backend`` caches
its engines, so every ``make_backend`` of a run reuses the same actors. Each actor runs a
``VLLMBackend``; every call names the weights folder it wants, so a new checkpoint of the
same architecture (a promoted candidate) is swapped into each actor's engine in place.

The driver cuts a call's requests into batches of ``batch_size``, sends each to the live
actor with the fewest outstanding batches and puts the results back in order. A batch
whose actor dies is sent to another actor; Ray restarts the dead one (``max_restarts``)
and it rejoins the pool once it answers. Every request carries its own seed
(``request_seed``), so the rows do not depend on which actor ran which batch.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from alignment.backends import placement
from alignment.backends.protocol import Chat, Completion, SamplingConfig, SequenceScore
from alignment.backends.vllm_backend import (
    CPU_ENGINE_ENV,
    VLLMBackend,
    architecture_signature,
    resolve_dtype,
)

log = logging.getLogger(__name__)

# Inside an actor the engine runs in the actor's own process: vLLM's default of an
# engine-core process per engine took 48-275 s to start under load, this 12.5 s.
ACTOR_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **CPU_ENGINE_ENV}
CORES_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # an actor's cores on its node: pin_to_cores
PLACEMENT_TIMEOUT_S = 120.0
PROBE_WAIT_S = 1.0
PROBES = 5  # where() calls to an actor that died before it counts as gone


@dataclass(frozen=True)
class EngineSettings:
    """What an actor's engine is built with: the local engine's settings, so the same
    requests give the same rows wherever they run."""

    seed: int = 0
    max_model_len: int = 1024
    kv_cache_gib: float = 0.5
    dtype: str = "auto"
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1


@dataclass(frozen=True)
class ActorSettings:
    """How many actors, what each reserves, and how they are placed (RayEnginesConfig)."""

    address: str | None = None
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    batch_size: int = 8
    max_restarts: int = 1
    strategy: str = "PACK"


class EngineActor:
    """One vLLM engine in a Ray actor (made remote by ``EnginePool``)."""

    def __init__(self, settings: dict[str, Any], executor: str | None) -> None:
        self.settings = settings
        self.executor = executor
        self.backends: dict[str, VLLMBackend] = {}
        cores = os.environ.get(CORES_ENV, "")
        if cores and cores not in ("auto", "nobind"):
            pin_to_cores(core_ids(cores))

    def where(self) -> dict[str, Any]:
        """The node this actor runs on and its process id."""
        import ray

        return {
            "node": placement.this_node(),
            "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
        }

    def _backend(self, location: str) -> VLLMBackend:
        # VLLMBackend shares one engine per architecture in this process: a new folder of
        # the same architecture only swaps its weights in.
        if location not in self.backends:
            settings = self.settings | {"dtype": resolve_dtype(self.settings["dtype"])}
            self.backends[location] = VLLMBackend(
                location, distributed_executor_backend=self.executor, **settings
            )
        return self.backends[location]

    def generate(
        self, location: str, sampling: SamplingConfig, chats: Sequence[Chat]
    ) -> list[list[Completion]]:
        return self._backend(location).generate(chats, sampling)

    def score_options(
        self, location: str, options: Sequence[str], chats: Sequence[Chat]
    ) -> list[dict[str, float | None]]:
        return self._backend(location).score_options(chats, options)

    def score_sequences(self, location: str, chats: Sequence[Chat]) -> list[SequenceScore | None]:
        return self._backend(location).score_sequences(chats)


def core_ids(spec: str) -> list[int]:
    """The cores of a binding such as "0", "2-3" or "0,4-5".

    >>> core_ids("0,4-5")
    [0, 4, 5]
    """
    ids: list[int] = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def pin_to_cores(cores: list[int]) -> None:
    """Keep every thread of this process, and each it starts later, on ``cores``, with as
    many torch threads. vLLM binds a CPU engine's OpenMP threads only when it spawns an
    engine process; an actor's engine runs in the actor itself (the uni executor), so
    unpinned its threads float over every core and two actors on one node slow each other
    down (2.4 x per batch, measured with SmolLM2 on 2 cores)."""
    import torch

    for thread in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread), cores)
    torch.set_num_threads(len(cores))


@dataclass
class Slot:
    """One actor of a pool, as the driver sees it."""

    index: int
    handle: Any
    node: str = "?"
    pid: int | None = None
    outstanding: int = 0
    live: bool = True
    deaths: int = 0
    probe: Any = None  # a where() call sent to a dead actor: it answers once Ray restarts it
    probes_left: int = 0

    @property
    def name(self) -> str:
        return f"actor-{self.index}"


def resolve(ref: Any) -> Any:
    """The value of an actor call (blocks)."""
    import ray

    return ray.get(ref)


def is_ready(ref: Any) -> bool:
    """Whether an actor call has finished (or failed), without waiting."""
    import ray

    return bool(ray.wait([ref], timeout=0)[0])


def actor_errors() -> tuple[type[BaseException], ...]:
    """What a call to an actor that died raises (ActorDiedError is a RayActorError)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return (RayActorError, ActorUnavailableError)


@dataclass
class EnginePool:
    """N engine actors in one placement group, and the bookkeeping of their load."""

    settings: ActorSettings
    slots: list[Slot]
    group: Any
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def start(cls, settings: ActorSettings, engine: EngineSettings) -> EnginePool:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = engine.tensor_parallel_size * engine.pipeline_parallel_size
        gpus = settings.gpus_per_actor
        if gpus is None:
            gpus = float(world) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        # An engine over several GPUs: one bundle per GPU, so that vLLM's own Ray workers
        # each take one (VLLM_RAY_BUNDLE_INDICES); the actor itself holds the CPUs.
        split = gpus > 1 and world > 1
        per_actor = world if split else 1
        if split:
            bundles = [{"CPU": settings.cpus_per_actor, "GPU": 1.0}]
            bundles += [{"GPU": 1.0}] * (world - 1)
        else:
            bundles = [{"CPU": settings.cpus_per_actor, **({"GPU": gpus} if gpus else {})}]
        group = placement_group(bundles * settings.actors, strategy=settings.strategy)
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(group)
            raise RuntimeError(
                f"{settings.actors} engine actors of {bundles} each do not fit the Ray "
                f"cluster ({ray.cluster_resources()}) within {PLACEMENT_TIMEOUT_S:.0f} s: "
                "lower ray.actors, cpus_per_actor or gpus_per_actor"
            )
        executor = "ray" if split else ("uni" if not gpus else None)
        cores = _core_binding(group, settings.cpus_per_actor) if not gpus else None
        remote = ray.remote(EngineActor)
        slots = []
        for index in range(settings.actors):
            first = index * per_actor
            env = dict(ACTOR_ENGINE_ENV)
            if cores is not None:
                env[CORES_ENV] = cores[first]
            if split:
                env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, range(first, first + world)))
            handle = remote.options(
                num_cpus=settings.cpus_per_actor,
                num_gpus=0 if split else gpus,
                max_restarts=settings.max_restarts,
                max_task_retries=0,  # the driver retries a batch on another actor
                runtime_env={"env_vars": {**env, **_explicit_env(env)}},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group,
                    placement_group_bundle_index=first,
                    placement_group_capture_child_tasks=True,
                ),
            ).remote(asdict(engine), executor)
            slots.append(Slot(index, handle))
        answers = ray.get([s.handle.where.remote() for s in slots])
        for slot, where in zip(slots, answers, strict=True):
            slot.node, slot.pid = where["node"], where["pid"]
        log.info(
            "%d engine actors on %s (%s)",
            len(slots),
            sorted({s.node for s in slots}),
            settings.strategy,
        )
        return cls(settings, slots, group)

    def run(self, method: str, args: tuple, items: Sequence[Any], size: int) -> list[Any]:
        """``method(*args, batch)`` on the actors over ``items`` in batches of ``size``;
        the results of the batches concatenated in order."""
        batches = [list(items[i : i + size]) for i in range(0, len(items), size)]
        if not batches:
            return []
        recorder = placement.current()
        # Two batches per actor in flight: one running, the next already queued there.
        with ThreadPoolExecutor(max_workers=min(len(batches), 2 * len(self.slots))) as workers:
            futures = [
                workers.submit(self._call, recorder, method, args, batch) for batch in batches
            ]
            return [row for future in futures for row in future.result()]

    def _call(
        self, recorder: placement.Recorder, method: str, args: tuple, batch: list[Any]
    ) -> list[Any]:
        while True:
            slot = self._acquire()
            try:
                with placement.timed(recorder, "actor", slot.name, slot.node, len(batch)):
                    return resolve(getattr(slot.handle, method).remote(*args, batch))
            except actor_errors() as error:
                log.warning("%s on %s died (%s); its batch goes to another", slot.name,
                            slot.node, type(error).__name__)  # fmt: skip
                self._lost(slot)
            finally:
                self._release(slot)

    def _acquire(self) -> Slot:
        """The live actor with the fewest outstanding batches (waits while every actor is
        restarting; raises when none is left)."""
        with self._changed:
            while True:
                self._check_probes()
                live = [s for s in self.slots if s.live]
                if live:
                    slot = min(live, key=lambda s: (s.outstanding, s.index))
                    slot.outstanding += 1
                    return slot
                if not any(s.probe is not None for s in self.slots):
                    raise RuntimeError(
                        f"every engine actor died ({self.settings.max_restarts} restarts "
                        "each); see the Ray logs of the cluster"
                    )
                self._changed.wait(PROBE_WAIT_S)

    def _release(self, slot: Slot) -> None:
        with self._changed:
            slot.outstanding -= 1
            self._changed.notify_all()

    def _lost(self, slot: Slot) -> None:
        with self._changed:
            if not slot.live:
                return  # another of its batches already reported it
            slot.live = False
            slot.deaths += 1
            if slot.deaths <= self.settings.max_restarts:
                slot.probe, slot.probes_left = slot.handle.where.remote(), PROBES

    def _check_probes(self) -> None:
        """Bring back each restarted actor that answered its probe (under the lock)."""
        for slot in self.slots:
            if slot.probe is None or not is_ready(slot.probe):
                continue
            try:
                where = resolve(slot.probe)
            except actor_errors():
                # Sent before Ray saw the death, or while it restarts: ask again, a few times.
                slot.probes_left -= 1
                slot.probe = slot.handle.where.remote() if slot.probes_left > 0 else None
                continue
            slot.probe, slot.live = None, True
            slot.node, slot.pid = where["node"], where["pid"]
            log.info("%s is back on %s", slot.name, slot.node)

    def stop(self) -> None:
        import ray

        for slot in self.slots:
            ray.kill(slot.handle, no_restart=True)
        ray.util.remove_placement_group(self.group)


def _explicit_env(env: dict[str, str]) -> dict[str, str]:
    """The driver's own settings of these variables win, as they do for a local engine;
    not its cores, which are each actor's own."""
    return {name: os.environ[name] for name in env if name in os.environ and name != CORES_ENV}


def _core_binding(group: Any, cpus_per_actor: float) -> list[str]:
    """Each bundle's own cores on its node ("0", "1", "2-3"), which its actor pins itself
    to (``pin_to_cores``)."""
    import ray
    from ray.util.placement_group import placement_group_table

    width = max(1, math.ceil(cpus_per_actor))
    node_cores = {n["NodeID"]: int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"]}
    on_node: dict[str, int] = {}
    binding = []
    for _, node in sorted(placement_group_table(group)["bundles_to_node_id"].items()):
        rank = on_node.get(node, 0)
        on_node[node] = rank + 1
        first = (rank * width) % max(1, node_cores.get(node, width))
        binding.append(str(first) if width == 1 else f"{first}-{first + width - 1}")
    return binding


# --- The pools of this process, and the backend ----------------------------------------

_POOLS: dict[tuple, EnginePool] = {}
_POOLS_LOCK = threading.Lock()


def connect(address: str | None) -> None:
    """Join the Ray cluster once per process: ``address``, else RAY_ADDRESS, else a local
    cluster started for this process."""
    import ray

    if ray.is_initialized():
        return
    _loopback_setting()
    where = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=where, ignore_reinit_error=True, log_to_driver=False)
    log.info("connected to the Ray cluster at %s", where or "a new local cluster")


def _loopback_setting() -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported, and
    ``from vllm import LLM`` imports it: a driver that set it later would turn a
    127.0.0.1 address into its eth0 address and never reach a loopback-only cluster."""
    from ray._private import ray_constants

    setting = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    if setting is not None:
        ray_constants.ENABLE_RAY_CLUSTER = setting.strip().lower() in ("1", "true")


def engine_pool(location: str, engine: EngineSettings, settings: ActorSettings) -> EnginePool:
    """The pool of actors for this architecture and these settings, started once."""
    # The batch size is the driver's, and every request carries its own seed (as in
    # vllm_backend's key): backends that differ only in these share the actors.
    key = (
        replace(settings, batch_size=0),
        architecture_signature(location),
        replace(engine, seed=0),
    )
    with _POOLS_LOCK:
        if key not in _POOLS:
            connect(settings.address)
            _POOLS[key] = EnginePool.start(settings, engine)
        return _POOLS[key]


def release_pools() -> None:
    """Stop every engine actor this process started and free their placement groups."""
    with _POOLS_LOCK:
        while _POOLS:
            _, pool = _POOLS.popitem()
            pool.stop()


class RayBackend:
    """The Backend protocol over a pool of engine actors."""

    def __init__(
        self,
        model: str,
        settings: ActorSettings,
        engine: EngineSettings,
        model_name: str | None = None,
    ) -> None:
        self.model_path = str(model)
        self.model_name = model_name or self.model_path
        self.batch_size = settings.batch_size
        self.pool = engine_pool(self.model_path, engine, settings)

    def _run(self, method: str, args: tuple, chats: Sequence[Chat]) -> list[Any]:
        chats = [list(chat) for chat in chats]
        return self.pool.run(method, (self.model_path, *args), chats, self.batch_size)

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[list[Completion]]:
        return self._run("generate", (sampling,), chats)

    def score_options(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float | None]]:
        return self._run("score_options", (list(options),), chats)

    def score_sequences(self, chats: Sequence[Chat]) -> list[SequenceScore | None]:
        return self._run("score_sequences", (), chats)
