"""Ray start/join and cluster sizing: the labeler actor pool, initial actors, decoded bytes in
flight, write tasks at once, and the retry limits of each stage, all from the cluster's
resources (live nodes and autoscaler node types), never from the driver's hardware.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import ConfigError, RayStartError
from .quiet import quiet_ray_logs

log = logging.getLogger(__name__)

# Fault tolerance (see the map_batches calls and init_ray): retries for system failures only
# (lost node, killed worker), bounded so that one input that kills its worker every time fails
# the job after a few attempts instead of looping forever.
DECODE_MAX_RETRIES = 4
ACTOR_MAX_TASK_RETRIES = 4
# Labeler actors that may die while loading the model (e.g. their node is lost) before the
# job fails; Ray Data's default of 0 fails the whole job on the first such death.
ACTOR_INIT_DEATHS_TOLERATED = 3
# Decoded data in flight (see bound_in_flight): batches per labeler actor, and a floor.
IN_FLIGHT_BATCHES_PER_ACTOR = 8
MIN_IN_FLIGHT_BYTES = 256 * 2**20
# Logical CPUs of one Parquet write task, and the most write tasks at once: one per this many
# cluster CPUs, at least MIN_WRITE_TASKS (see the write stage in run_label_job and write_tasks).
WRITE_CPUS_PER_TASK = 0
CPUS_PER_WRITE_TASK = 16
MIN_WRITE_TASKS = 1
# Calls in flight per GPU labeler actor (see actor_pool_strategy).
GPU_CALLS_PER_ACTOR = 2
# An autoscaler node type without a maximum count, when sizing the labeler actor pool.
UNLIMITED_NODES = 64
# Images a CPU labeler actor should have to label before one more is started with the job:
# starting one costs ~8-10 s of a core (torch and transformers imports, model load;
# benchmarks/README.md, "Actor start-up"), about 25 s of ViT-B/32 work on a CPU, so a run of a
# few dozen images gains nothing from a second actor and pays for it on a small machine.
MIN_IMAGES_PER_CPU_ACTOR = 256


class ResourceAsk(Protocol):
    """What one job asks of the cluster, the only settings sizing reads (``config.JobConfig``
    has them): logical GPUs and CPUs per labeler actor, CPUs per decode task, rows per model
    batch, and the ``--concurrency`` bounds ``(min, max)`` of the actor pool (None: sized here)."""

    num_gpus_per_actor: float
    num_cpus_per_actor: float
    decode_cpus_per_task: float
    batch_size: int
    concurrency: tuple[int, int] | None


def init_ray(address: str | None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start an embedded local Ray when neither is set.

    Raises:
        RayStartError: Ray did not start or could not be joined (exit code 3 in the CLI).

    Also sets this driver's Ray Data failure policy (``DataContext``): a few labeler actors may
    die during start-up before the job fails, and no failed block is ever dropped. The
    process's SIGTERM handler is left as the caller set it (``ray.init`` replaces it).
    """
    import ray
    import ray.data

    quiet_ray_logs()
    ctx = ray.data.DataContext.get_current()
    ctx.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS_TOLERATED
    # Never drop a block that failed (rows out == inputs in); a failure fails the job.
    ctx.max_errored_blocks = 0
    # zslabel.progress replaces Ray Data's bars and "Total Progress: 0/?" log lines (also with
    # --quiet). Set before any dataset is built: each dataset copies the context it was made in.
    ctx.enable_progress_bars = False
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True}
    from_env = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        kwargs["address"] = address
        _check_reachable(address)
    elif from_env:
        # ray.init() joins $RAY_ADDRESS by itself: one left over from an earlier `ray start`
        # (its head long gone) made it retry the dead GCS for minutes (ray-project/ray#43070).
        _check_reachable(from_env, source="RAY_ADDRESS")
    else:
        # Embedded: a fresh local instance, never a (possibly stale) `ray start` cluster that
        # plain ray.init() would try to join.
        kwargs["address"] = "local"
        # Its workers (decode tasks, labeler actors) are this command's own work: run them at
        # the command's priority. Ray's default, nice 15, gives them 1/40 of the CPU weight of
        # any other process, so on a shared machine the labeler ran far slower than the same
        # model in a plain process (benchmarks/README.md, "Actor vs plain process"). An
        # explicit RAY_worker_niceness is kept; clusters started by `ray start` keep theirs.
        os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    keep = _sigterm_handler()
    try:
        with _ctrl_c_after_start() as interrupted:
            try:
                ray.init(**kwargs)
                _STARTED_HERE.append(True)
            finally:
                if interrupted:
                    _shutdown_quietly()
    except Exception as exc:  # noqa: BLE001 - Ray raises bare Exception/ConnectionError/TimeoutError here
        _shutdown_quietly()  # a half-started local node (GCS, raylet) must not outlive this process
        target = kwargs.get("address") or os.environ.get("RAY_ADDRESS")
        where = "start a local Ray instance" if target == "local" else f"join the Ray cluster at {target}"
        raise RayStartError(
            f"could not {where}: {type(exc).__name__}: {exc} (a busy machine can make Ray's node start "
            "time out: retry, or start Ray once with `ray start --head` and pass --address)") from exc
    finally:
        _restore_sigterm_handler(keep)


@contextlib.contextmanager
def _ctrl_c_after_start():
    """Within: a first Ctrl-C (SIGINT) waits until the block ends, then raises KeyboardInterrupt
    (the block sees the list it yields become non-empty, to clean up first); a second one
    interrupts at once. A Ctrl-C inside ``ray.init`` stopped it between starting the local
    node's processes and recording them, so nothing could stop them: its dashboard and
    runtime-env agents outlived the command (4 of 5 tries in that window). Only in the main
    thread (where Python delivers signals); elsewhere a plain block.
    """
    interrupted: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def later(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("zslabel: stopping once Ray has started (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, later)
    try:
        yield interrupted
    except Exception:
        if interrupted:  # Ray's processes got the terminal's Ctrl-C too: the start failed for it
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


# Whether init_ray started (or joined) the Ray this process holds; not when a caller had (tests).
_STARTED_HERE: list[bool] = []


def shutdown_started_ray() -> None:
    """Shut down the local Ray (or leave the cluster) that :func:`init_ray` started (or joined)
    in this process, now rather than in Ray's ``atexit`` hook; nothing when the caller started
    it (its own ``ray.init``) or none was started. Best effort, as :func:`_shutdown_quietly`."""
    if _STARTED_HERE:
        _STARTED_HERE.clear()
        _shutdown_quietly()


def _shutdown_quietly() -> None:
    """``ray.shutdown()``, best effort: the start's own error (or Ctrl-C) is what the user needs."""
    import ray

    try:
        ray.shutdown()
    except BaseException:  # noqa: BLE001 - a second Ctrl-C included: the first one is being handled
        pass


def _sigterm_handler() -> Any:
    """This process's Python-level SIGTERM handler, or None when it cannot be read or set here
    (a thread other than the main one, or a handler installed outside Python)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.getsignal(signal.SIGTERM)


def _restore_sigterm_handler(handler: Any) -> None:
    """Put back what :func:`_sigterm_handler` returned, replacing what ``ray.init`` set.

    ``ray.init`` replaces SIGTERM's handling twice (Ray 2.60): a Python handler
    (``sys.exit(15)``), then its core worker's C++ failure-signal handler, which prints a
    ``*** SIGTERM received`` stack and aborts (exit 134), skipping every ``finally`` of the
    job. What SIGTERM does is the caller's choice (the CLI: unwind like Ctrl-C,
    ``errors.Terminated``; a Python API user: whatever they had), so it is restored; setting
    it through ``signal.signal`` replaces the C++ handler too."""
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)


def _check_reachable(address: str, timeout_s: float = 10.0, source: str | None = None) -> None:
    """Fail fast on a ``host:port`` GCS address nothing listens on (``ray.init`` retries for
    minutes). Other forms (``auto``, ``local``, ``ray://``, ``http://``) are left to Ray.
    ``source``: the environment variable the address came from (None: ``--address``), named in
    the message with how to clear it.

    Raises:
        RayStartError: the TCP connection is refused or times out.
    """
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "/" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        if source is None:
            raise RayStartError(f"cannot reach a Ray cluster at {address}: {exc}") from exc
        raise RayStartError(
            f"cannot reach a Ray cluster at {address} (from the {source} environment variable, perhaps "
            f"left by an earlier `ray start`): {exc}; run `unset {source}` to label on a local Ray "
            "instance, or pass --address with a live cluster") from exc


@dataclass(frozen=True)
class ClusterResources:
    """What the cluster holds, read once per job: the logical resources of each live node
    (``ray.nodes()``, e.g. ``{"CPU": 8.0, "GPU": 1.0}``) and the node types the cluster
    autoscaler may still start, as (resources of one node, most nodes; -1 = unlimited) (its
    cluster config in the GCS; none on a fixed cluster). Never the driver's hardware, so a GPU
    cluster whose GPU workers scale from zero is not mistaken for a CPU-only one."""

    nodes: list[dict[str, float]]
    node_types: list[tuple[dict[str, float], int]]

    @classmethod
    def read(cls) -> ClusterResources:
        """The connected cluster's resources (needs ``ray.init``)."""
        import ray

        return cls([dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")], _autoscaler_node_types())

    def actor_pool_size(self, ask: ResourceAsk) -> tuple[int, int]:
        """``(min, max)`` labeler actors for this cluster; see ``plan_actor_pool``.

        Raises:
            ConfigError: as ``plan_actor_pool``.
        """
        return plan_actor_pool(ask, self.nodes, self.node_types)

    def cpus(self) -> float:
        """The CPUs of the live nodes, or of the autoscaler's node types at their maximum counts
        (an unlimited type counts as ``UNLIMITED_NODES`` nodes) when that is more: what sizes the
        blocks of planned inputs (``sources.blocks.rows_per_block``)."""
        live = sum(r.get("CPU", 0.0) for r in self.nodes)
        scalable = sum(r.get("CPU", 0.0) * (UNLIMITED_NODES if k < 0 else k) for r, k in self.node_types)
        return max(live, scalable)


def write_tasks(cluster_cpus: float) -> int:
    """The most Parquet write tasks in flight at once: one per ``CPUS_PER_WRITE_TASK`` CPUs of
    the cluster (``ClusterResources.cpus``), at least ``MIN_WRITE_TASKS``. A write is an encode of
    ``rows_per_file`` label rows (milliseconds) and one upload (tens to hundreds of ms to object
    storage): one write in flight commits ~10,000 rows per second at 100 ms per 1,024-row file."""
    return max(MIN_WRITE_TASKS, math.ceil(cluster_cpus / CPUS_PER_WRITE_TASK))


def initial_actors(ask: ResourceAsk, pool: tuple[int, int], inputs: int | None,
                   nodes: list[dict[str, float]]) -> int:
    """Labeler actors to start with: for CPU actors sized by the cluster, as many as the live
    ``nodes`` (``ClusterResources.nodes``) hold, but no more than gives each two batches and
    ``MIN_IMAGES_PER_CPU_ACTOR`` images of ``inputs``; else ``pool[0]``.

    Ray Data grows an actor pool only while the running actors stay busy with work queued, one
    actor at a time: in benchmarks a 2-core run of 320 images never got its second CPU actor.
    ``inputs`` (None when unknown, e.g. tar shards; for Parquet the footers' row count) keeps a
    run of a few images from paying for a model load per core. GPU pools and ``--concurrency``
    start at their minimum, as configured.
    """
    if ask.concurrency or ask.num_gpus_per_actor:
        return pool[0]
    live = plan_actor_pool(ask, nodes)[1]
    per_actor = max(2 * ask.batch_size, MIN_IMAGES_PER_CPU_ACTOR)
    wanted = live if inputs is None else math.ceil(inputs / per_actor)
    return max(pool[0], min(pool[1], live, wanted))


def actor_pool_strategy(ask: ResourceAsk, pool: tuple[int, int], inputs: int | None,
                        nodes: list[dict[str, float]]):
    """Ray Data's ``ActorPoolStrategy`` for the labeler: ``pool`` sizes, ``initial_actors``, and
    for GPU actors two calls in flight per actor, so that Ray Data batches the next input and
    formats the last output (host work) while the model runs on the device; the model calls
    themselves stay one at a time (``enable_true_multi_threading`` off). Ray versions without
    ``max_concurrent_calls_per_actor`` get the plain strategy."""
    import inspect

    import ray.data

    kwargs: dict[str, Any] = {"min_size": pool[0], "max_size": pool[1],
                              "initial_size": initial_actors(ask, pool, inputs, nodes)}
    params = inspect.signature(ray.data.ActorPoolStrategy.__init__).parameters
    if ask.num_gpus_per_actor and "max_concurrent_calls_per_actor" in params:
        kwargs["max_concurrent_calls_per_actor"] = GPU_CALLS_PER_ACTOR
    return ray.data.ActorPoolStrategy(**kwargs)


def bound_in_flight(ask: ResourceAsk, output_hw: tuple[int, int], pool: tuple[int, int], dataset) -> int:
    """Cap the object store memory this job's dataset may use (Ray Data backpressure) at
    ``IN_FLIGHT_BATCHES_PER_ACTOR`` decoded batches per labeler actor, at least
    ``MIN_IN_FLIGHT_BYTES``; returns the cap in bytes.

    Ray Data's own cap is a fraction of the object store (half of it: ~660 MB on a 24 GB
    machine), which decode tasks fill when the model is slower than decoding, so the peak memory
    of a run grew with its input up to that cap (+20 % PSS from 2,000 to 20,000 images,
    benchmarks/README.md). A few batches per actor keep the actors fed.

    The cap is set on ``dataset``'s own ``DataContext`` (``Dataset.context``, shared by every
    dataset derived from it), which is the one its execution reads: Ray Data copies the current
    context into a dataset when the dataset is created, so a change to the process-wide context
    after the inputs are planned never reaches the run (it executed with no cap: Ray Data's
    debug log of the executed context said ``object_store_memory=inf``). The process-wide
    context is left as it is.
    """
    import ray
    import ray.data

    h, w = output_hw
    cap = max(MIN_IN_FLIGHT_BYTES, IN_FLIGHT_BATCHES_PER_ACTOR * pool[1] * ask.batch_size * h * w * 3)
    # Never above Ray Data's own default (half the cluster's object store), e.g. for a pool
    # sized by an autoscaler's node types that are not up yet.
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    if store:
        cap = int(min(cap, max(MIN_IN_FLIGHT_BYTES, store / 2)))
    options = dataset.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=cap)
    return cap


def _autoscaler_node_types() -> list[tuple[dict[str, float], int]]:
    """(resources of one node, most nodes of that type; -1 = unlimited) per autoscaler node type."""
    try:
        import ray._private.state

        cluster_config = ray._private.state.state.get_cluster_config()
    except Exception as exc:  # noqa: BLE001 - a private API: without it, plan from live nodes only
        log.debug("no autoscaler cluster config: %s", exc)
        return []
    if cluster_config is None:
        return []
    return [({k: float(v) for k, v in g.resources.items()}, int(g.max_count))
            for g in cluster_config.node_group_configs if g.max_count != 0 and g.resources]


def _per_node(shapes: list[dict[str, float]], key: str) -> str:
    return ", ".join(f"{x:g}" for x in sorted({r.get(key, 0.0) for r in shapes})) or "none"


def plan_actor_pool(ask: ResourceAsk, nodes: list[dict[str, float]],
                    node_types: Sequence[tuple[dict[str, float], int]] = ()) -> tuple[int, int]:
    """``(min, max)`` labeler actors: the configured bounds, else what the cluster can hold.

    Args:
        nodes: logical resources of each live node (``{"CPU": 8.0, "GPU": 1.0, ...}``).
        node_types: autoscaler node types as (resources of one node, most nodes; -1 unlimited).

    The largest pool is what the live nodes hold, or what the autoscaler's node types hold
    at their maximum counts (an unlimited type counts as ``UNLIMITED_NODES`` nodes), whichever
    is more. CPU actors leave ``decode_cpus_per_task`` CPUs for decoding, so a small cluster
    cannot deadlock with every CPU held by an actor.

    Raises:
        ConfigError: no node, live or startable, has the GPUs and CPUs one actor asks for, or
            the CPUs one decode task asks for (fails now, instead of waiting forever for
            resources that never come).
    """
    g, c, d = ask.num_gpus_per_actor, ask.num_cpus_per_actor, ask.decode_cpus_per_task
    shapes = list(nodes) + [r for r, _ in node_types]

    def fits(r: dict[str, float]) -> bool:
        return r.get("GPU", 0.0) >= g and r.get("CPU", 0.0) >= c

    if not any(fits(r) for r in shapes):
        where = "no node of this Ray cluster" + (" (nor any node type its autoscaler can start)" if node_types else "")
        if g > 0 and not any(r.get("GPU", 0.0) >= g for r in shapes):
            raise ConfigError(f"--num-gpus-per-actor {g:g} but {where} has {g:g} GPU(s) (GPUs per node: "
                              f"{_per_node(shapes, 'GPU')}); use a cluster with GPU nodes or "
                              "--num-gpus-per-actor 0")
        raise ConfigError(f"one labeler actor asks for {c:g} CPUs" + (f" and {g:g} GPUs" if g else "")
                          + f" but {where} has that much (CPUs per node: {_per_node(shapes, 'CPU')}); "
                          "lower --num-cpus-per-actor")
    if not any(r.get("CPU", 0.0) >= d for r in shapes):
        raise ConfigError(f"--decode-cpus-per-task {d:g} but no node of this Ray cluster has that many CPUs "
                          f"(CPUs per node: {_per_node(shapes, 'CPU')})")
    if ask.concurrency:
        return ask.concurrency

    def capacity(rs: list[dict[str, float]], counts: list[int]) -> int:
        if g > 0:  # GPU actors: per node, as many as its GPUs (and CPUs) allow
            per_node = [math.floor(r.get("GPU", 0.0) / g) for r in rs]
            if c:
                per_node = [min(k, math.floor(r.get("CPU", 0.0) / c)) for k, r in zip(per_node, rs)]
            return sum(n * k for n, k in zip(counts, per_node))
        # CPU actors: what the CPUs hold after one decode task, and no more actors than the
        # nodes have cores for their torch threads (ceil(c) each, ``stages.actor_threads``), so
        # fractional actors leave logical CPUs to decoding without oversubscribing the cores.
        by_cpus = math.floor((sum(n * r.get("CPU", 0.0) for r, n in zip(rs, counts)) - d) / c)
        by_cores = sum(n * math.floor(r.get("CPU", 0.0) / math.ceil(c)) for r, n in zip(rs, counts))
        return min(by_cpus, by_cores)

    most = capacity(nodes, [1] * len(nodes))
    if node_types:
        most = max(most, capacity([r for r, _ in node_types],
                                  [UNLIMITED_NODES if n < 0 else n for _, n in node_types]))
    return 1, max(1, most)


def decode_task_options(ask: ResourceAsk) -> dict:
    """Ray task options of every task stage in front of the labeler (read, drop committed,
    decode): the same resources, strategy and retries, so that Ray Data fuses them into one
    task per block ("ReadPlannedBlocks->MapBatches(drop_committed)->MapBatches(decode_block)").
    Unfused, reading a block took a CPU slot of its own: on 2 cores decoding then ran at half
    rate (benchmarks/README.md, "Decode-bound overhead")."""
    return {
        "num_cpus": ask.decode_cpus_per_task,
        # Decode tasks spread over the cluster (near the data, off the GPU nodes' hot CPUs) and
        # actors pack; the differing strategies also keep Ray Data from fusing decoding into
        # the actors, where it would run serially in front of the model.
        "scheduling_strategy": "SPREAD",
        # Retried only for system failures (node lost, worker killed; Ray Data adds
        # RaySystemError to retry_exceptions): a decode never raises for a bad image. Ray
        # Data's default is -1 (forever), which turns a block that crashes its worker
        # every time into an endless loop; several node losses in a row hitting the
        # same block is that, not bad luck. Lost outputs are rebuilt by lineage
        # re-execution, which counts against this too.
        "max_retries": DECODE_MAX_RETRIES}
