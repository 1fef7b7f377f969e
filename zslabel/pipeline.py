"""The one place that composes the Ray Data pipeline for a labeling job.

    resolve options (validate; inspect the output once; mode and resume checks) -> input exists
    -> [finished run, nothing to do: return] -> load checkpoint on the driver, build label
    embeddings -> start/join Ray -> plan inputs -> prepare output (fingerprint, resume set;
    ``runstate``) -> [drop committed inputs] -> [decode tasks] -> [labeler actors] -> [commit one
    Parquet file per block] -> counts -> run manifest (commit marker; ``report``)

Everything that can fail for the whole job fails before the first image is read, and what
needs neither Ray nor the model fails before either starts (``options.resolve``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from . import runstate
from .calibration import load_for_run, manifest_entry as calibration_manifest_entry
from .config import JobConfig
from .errors import ConfigError, RayStartError
from .hierarchy import Hierarchy, with_hierarchy_fields
from .options import check_input_exists, local_stamp, resolve
from .output import MANIFEST_NAME, output_schema
from .progress import Progress
from .quiet import quiet_ray_logs
from .summary import RunFacts, RunSummary, finish_run, model_id, summary_of_finished  # noqa: F401 - RunSummary re-exported

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


def init_ray(address: str | None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start an embedded local Ray when neither is set.

    Raises:
        RayStartError: Ray did not start or could not be joined (exit code 3 in the CLI).

    Also sets this driver's Ray Data failure policy (``DataContext``): a few labeler actors may
    die during start-up before the job fails, and no failed block is ever dropped.
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
    kwargs = {"log_to_driver": True}
    if address:
        kwargs["address"] = address
        _check_reachable(address)
    elif not os.environ.get("RAY_ADDRESS"):
        # Embedded: a fresh local instance, never a (possibly stale) `ray start` cluster that
        # plain ray.init() would try to join.
        kwargs["address"] = "local"
        # Its workers (decode tasks, labeler actors) are this command's own work: run them at
        # the command's priority. Ray's default, nice 15, gives them 1/40 of the CPU weight of
        # any other process, so on a shared machine the labeler ran far slower than the same
        # model in a plain process (benchmarks/README.md, "Actor vs plain process"). An
        # explicit RAY_worker_niceness is kept; clusters started by `ray start` keep theirs.
        os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    try:
        ray.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises bare Exception/ConnectionError/TimeoutError here
        try:  # a half-started local node (GCS, raylet) must not outlive this process
            ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the start error is what the user needs
            pass
        target = kwargs.get("address") or os.environ.get("RAY_ADDRESS")
        where = "start a local Ray instance" if target == "local" else f"join the Ray cluster at {target}"
        raise RayStartError(
            f"could not {where}: {type(exc).__name__}: {exc} (a busy machine can make Ray's node start "
            "time out: retry, or start Ray once with `ray start --head` and pass --address)") from exc


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a ``host:port`` GCS address nothing listens on (``ray.init`` retries for
    minutes). Other forms (``auto``, ``ray://``, ``http://``) are left to Ray.

    Raises:
        RayStartError: the TCP connection is refused or times out.
    """
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "/" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayStartError(f"cannot reach a Ray cluster at {address}: {exc}") from exc


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

    def actor_pool_size(self, config: JobConfig) -> tuple[int, int]:
        """``(min, max)`` labeler actors for this cluster; see ``plan_actor_pool``.

        Raises:
            ConfigError: as ``plan_actor_pool``.
        """
        return plan_actor_pool(config, self.nodes, self.node_types)

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


def initial_actors(config: JobConfig, pool: tuple[int, int], inputs: int | None,
                   nodes: list[dict[str, float]]) -> int:
    """Labeler actors to start with: for CPU actors sized by the cluster, as many as the live
    ``nodes`` (``ClusterResources.nodes``) hold, but no more than gives each two batches and ``MIN_IMAGES_PER_CPU_ACTOR`` images
    of ``inputs``; else ``pool[0]``.

    Ray Data grows an actor pool only while the running actors stay busy with work queued, one
    actor at a time: in benchmarks a 2-core run of 320 images never got its second CPU actor.
    ``inputs`` (None when unknown, e.g. tar shards) keeps a run of a few images from paying for
    a model load per core. GPU pools and ``--concurrency`` start at their minimum, as configured.
    """
    if config.concurrency or config.num_gpus_per_actor:
        return pool[0]
    live = plan_actor_pool(config, nodes)[1]
    per_actor = max(2 * config.batch_size, MIN_IMAGES_PER_CPU_ACTOR)
    wanted = live if inputs is None else math.ceil(inputs / per_actor)
    return max(pool[0], min(pool[1], live, wanted))


def actor_pool_strategy(config: JobConfig, pool: tuple[int, int], inputs: int | None,
                        nodes: list[dict[str, float]]):
    """Ray Data's ``ActorPoolStrategy`` for the labeler: ``pool`` sizes, ``initial_actors``, and
    for GPU actors two calls in flight per actor, so that Ray Data batches the next input and
    formats the last output (host work) while the model runs on the device; the model calls
    themselves stay one at a time (``enable_true_multi_threading`` off). Ray versions without
    ``max_concurrent_calls_per_actor`` get the plain strategy."""
    import inspect

    import ray.data

    kwargs = {"min_size": pool[0], "max_size": pool[1], "initial_size": initial_actors(config, pool, inputs, nodes)}
    params = inspect.signature(ray.data.ActorPoolStrategy.__init__).parameters
    if config.num_gpus_per_actor and "max_concurrent_calls_per_actor" in params:
        kwargs["max_concurrent_calls_per_actor"] = GPU_CALLS_PER_ACTOR
    return ray.data.ActorPoolStrategy(**kwargs)


def bound_in_flight(config: JobConfig, output_hw: tuple[int, int], pool: tuple[int, int]) -> int:
    """Cap the object store memory this job's dataset may use (Ray Data backpressure) at
    ``IN_FLIGHT_BATCHES_PER_ACTOR`` decoded batches per labeler actor, at least
    ``MIN_IN_FLIGHT_BYTES``; returns the cap in bytes.

    Ray Data's own cap is a fraction of the object store (half of it: ~660 MB on a 24 GB
    machine), which decode tasks fill when the model is slower than decoding, so the peak memory
    of a run grew with its input up to that cap (+20 % PSS from 2,000 to 20,000 images,
    benchmarks/README.md). A few batches per actor keep the actors fed.
    """
    import ray
    import ray.data

    h, w = output_hw
    cap = max(MIN_IN_FLIGHT_BYTES, IN_FLIGHT_BATCHES_PER_ACTOR * pool[1] * config.batch_size * h * w * 3)
    # Never above Ray Data's own default (half the cluster's object store), e.g. for a pool
    # sized by an autoscaler's node types that are not up yet.
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    if store:
        cap = int(min(cap, max(MIN_IN_FLIGHT_BYTES, store / 2)))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(object_store_memory=cap)
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


def plan_actor_pool(config: JobConfig, nodes: list[dict[str, float]],
                    node_types: list[tuple[dict[str, float], int]] = ()) -> tuple[int, int]:
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
    g, c, d = config.num_gpus_per_actor, config.num_cpus_per_actor, config.decode_cpus_per_task
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
    if config.concurrency:
        return config.concurrency

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


def run_label_job(config: JobConfig, progress: bool = True) -> RunSummary:
    """Label every image of ``config.input`` and write the output contract to ``config.output``.

    ``progress``: show images done / total, rate, errors and ETA on stderr (``zslabel.progress``).

    Returns:
        RunSummary with counts per error code and timings.

    Raises:
        ZslabelError subclasses before any image is read (config, model, input, output), and
        ErrorBudgetExceeded after writing when more than ``max_error_fraction`` rows failed.
    """
    t0 = time.perf_counter()
    timings: dict[str, Any] = {}
    resolved = resolve(config)
    check_input_exists(config.input, config.storage_options, io=config.io_policy())
    stamps = {"input": local_stamp(config.input), "model": local_stamp(config.model)}
    done = runstate.finished_unchanged(config, resolved.output, stamps)
    if done is not None:
        log.info("%s holds a finished run of this job with unchanged input and model: nothing to do",
                 config.output)
        return summary_of_finished(config.output, done, resolved.output.path(MANIFEST_NAME), t0)

    import ray
    import ray.data

    from . import sources
    from .labels import build_label_set
    from .model import ZeroShotModel, checkpoint_digest, resolve_checkpoint
    from .stages import Labeler, LabelerSettings, decode_block

    spec_overrides = {"max_pixels": config.max_pixels, "min_side": config.min_side, "fast": config.fast_decode,
                      "reference_pixels": config.reference_pixels}
    path = resolve_checkpoint(config.model, config.revision, config.storage_options)
    # The text tower runs on the driver's GPU when it has one (float32: the label embeddings
    # are the classifier's weights), batched; its result is cached on disk (labels.build_label_set).
    text_model = ZeroShotModel(path, device=text_device(), **spec_overrides)
    resolved.rule.check_score_kind(text_model.score_kind, config.model)  # before any image is read
    digest = checkpoint_digest(path)
    label_set = build_label_set(resolved.labels, resolved.templates, text_model, digest=digest)
    spec, score_kind, model_type = text_model.preprocess, text_model.score_kind, text_model.model_type
    embed_dim = label_set.embeddings.shape[1]
    del text_model
    calib = load_for_run(config.calibration, config.storage_options, checkpoint_digest=digest,
                         labels=list(label_set.names), templates=list(label_set.templates), score_kind=score_kind)
    hier = Hierarchy.from_labels(list(label_set.names)) if config.hierarchy else None
    timings["model_and_labels_s"] = time.perf_counter() - t0

    # After the model: in a `ray job submit` driver, joining the cluster can replace the job's
    # unpacked working_dir under the process (its cwd then no longer exists), which breaks
    # libraries that resolve relative paths at import time (transformers does).
    init_ray(config.address)
    cluster = ClusterResources.read()
    pool = cluster.actor_pool_size(config)
    # Every task stage in front of the labeler runs with decoding's resources, strategy and
    # retries, so that Ray Data fuses them into one task per block ("ReadPlannedBlocks->
    # MapBatches(drop_committed)->MapBatches(decode_block)"). Unfused, reading a block took
    # a CPU slot of its own: on 2 cores decoding then ran at half rate (benchmarks/README.md,
    # "Decode-bound overhead").
    decode_args = {
        "num_cpus": config.decode_cpus_per_task,
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
    plan = sources.plan_inputs(
        config.input, input_format=config.input_format, storage_options=config.storage_options,
        path_column=config.path_column, id_column=config.id_column, dedupe=config.dedupe,
        image_column=config.image_column, task_options=decode_args, cluster_cpus=cluster.cpus())
    timings["planning_s"] = plan.planning_seconds

    schema = output_schema(plan.carried_columns, embed_dim if config.store_embeddings else None,
                           config.embedding_dtype, abstained=config.min_score is not None)
    if hier is not None:
        schema = with_hierarchy_fields(schema)
    fields = runstate.fingerprint_fields(
        config, checkpoint_digest=digest, model_type=model_type, score_kind=score_kind,
        labels=list(label_set.names), templates=list(label_set.templates),
        preprocess=spec.fingerprint_dict(), schema=schema)
    run = runstate.begin_run(config, fields, resolved.output, planned_paths=plan.planned_paths,
                             planned_files=plan.planned_files)
    plan.planned_paths = None  # checked; the rows themselves are in the object store (~100 B a path)
    settings = LabelerSettings(
        model=config.model, revision=config.revision, storage_options=config.storage_options,
        schema=schema, top_k=config.top_k, dtype=config.dtype,
        num_threads=max(1, int(config.num_cpus_per_actor)), store_embeddings=config.store_embeddings,
        spec_overrides=spec_overrides, ranking=resolved.rule, calibration=calib, hierarchy=hier)
    # One copy of the (C, D) label embeddings in the object store, shared by every actor.
    label_ref = ray.put(label_set.embeddings)
    bound_in_flight(config, spec.output_hw, pool)

    ds = plan.dataset
    # Inputs committed by an earlier run (--resume) are dropped in the decode task before any
    # byte is fetched or decoded.
    ds = ds.map_batches(runstate.drop_committed, fn_kwargs={"done": run.done}, batch_size=None,
                        batch_format="pyarrow", **decode_args)
    ds = ds.map_batches(
        decode_block, fn_kwargs={"spec": spec, "storage_options": config.storage_options,
                                 "batch_size": config.batch_size, "io": config.io_policy(),
                                 "decode_timeout": config.decode_time_limit()},
        # The CPU:GPU split is not configured: every CPU the actors leave free can run a decode
        # task (decode_cpus_per_task each; 1 suits single-threaded Pillow, < 1 overlaps remote
        # reads), and Ray Data's backpressure (the actors' input queue budget) stops decoding
        # from running ahead of the model. The manifest's timings say which side was the limit.
        # Whole blocks (batch_size=None, see decode_block); the labeler takes batch_size rows.
        batch_size=None, batch_format="numpy", **decode_args)
    ds = ds.map_batches(
        Labeler, fn_constructor_kwargs={"settings": settings, "label_refs": [label_ref],
                                        "label_names": list(label_set.names)},
        batch_size=config.batch_size, batch_format="numpy",
        compute=actor_pool_strategy(config, pool, plan.listed, cluster.nodes),
        num_cpus=config.num_cpus_per_actor, num_gpus=config.num_gpus_per_actor or None,
        scheduling_strategy="DEFAULT",
        # An actor lost with its node is recreated wherever resources are (model reloaded
        # from the node cache), as often as that happens over a long spot-instance run;
        # the batch it held is resubmitted. A batch that kills its actor every time
        # (e.g. a driver crash on one input) fails the job after a few tries instead
        # of looping forever (Ray Data's default for both is -1).
        max_restarts=-1, max_task_retries=ACTOR_MAX_TASK_RETRIES)

    # One committed Parquet file per ``rows_per_file`` labeled rows (runstate: hidden temp file +
    # rename, fenced by the run record); the rows that come back only name the files. Larger
    # files read faster downstream; smaller ones lose less work to a crash.
    ds = ds.map_batches(runstate.write_block, fn_kwargs={"target": run.target},
                        batch_size=config.rows_per_file, batch_format="pyarrow",
                        # A write (a few thousand label rows to Parquet) takes milliseconds of
                        # CPU, so it asks for none. With any CPU and no cap, Ray Data's allocator
                        # handed the CPUs no operator had reserved to this last operator, never to
                        # decoding (1 decode task next to a 1-CPU actor on 4 CPUs, 5 of 7 free on
                        # 8); with a whole CPU it held writes back until decoding had finished.
                        # The cap stops Ray from starting a worker process per write in flight
                        # while decoding holds every CPU (~1.5 s of CPU each). benchmarks/README.md,
                        # "Decode-bound".
                        num_cpus=WRITE_CPUS_PER_TASK,
                        compute=ray.data.TaskPoolStrategy(size=write_tasks(cluster.cpus())))
    t_run, t_run_epoch = time.perf_counter(), time.time()
    written = _consume_with_progress(ds, Progress(planned_rows(plan, run), enabled=progress))
    plan.finalize()  # tars / Parquet inputs: listed and skipped counts are known only now
    plan.check_has_inputs(config.input)  # e.g. tars of sidecars only: exit 2, never an empty success
    timings["labeling_s"] = time.perf_counter() - t_run
    timings.update(stage_timings(ds, since_epoch_s=t_run_epoch, config=config))

    facts = RunFacts(
        kind="label", config=config.public_dict(),
        # A local checkpoint is recorded absolute, so relabel finds it from any folder.
        model={"id": model_id(config.model), "revision": config.revision, "local_path": str(path),
               "digest": digest, "model_type": model_type, "score_kind": score_kind, "stamp": stamps["model"]},
        labels=list(label_set.names), templates=list(label_set.templates), preprocess=spec.fingerprint_dict(),
        input_counts={"skipped": plan.skipped, "listed": plan.listed, "duplicates_removed": plan.duplicates_removed},
        extra={"actor_pool": list(pool), "input_stamp": stamps["input"],
               **({runstate.INPUT_FILES: plan.planned_files} if plan.planned_files is not None else {}),
               "calibration": calibration_manifest_entry(calib, config.calibration)})
    return finish_run(run, facts, started=t0, timings=timings, files_this_run=len(written),
                      max_error_fraction=config.max_error_fraction)


def planned_rows(plan, run) -> int | None:
    """Images this run will write: planned inputs minus those committed earlier (``--resume``);
    None when the inputs are counted only while they are read (tars, Parquet with image bytes)."""
    if plan.listed is None or plan.kind in ("webdataset", "parquet"):
        return None
    return max(0, plan.listed - plan.skipped - plan.duplicates_removed - len(run.done))


def _consume_with_progress(ds, progress: Progress) -> list[dict]:
    """Run ``ds`` (the pipeline ending in ``write_block``) to the end, feeding ``progress`` as
    each committed file's row comes back; returns those rows (``runstate.WRITE_RESULT_SCHEMA``)."""
    written = []
    with progress:
        for row in ds.iter_rows():
            written.append(row)
            progress.update(row["rows"], row["errors"])
    return written


def text_device() -> str:
    """``"cuda"`` when this process sees a CUDA device (the text tower then runs there), else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def stage_timings(ds, since_epoch_s: float, config: JobConfig) -> dict[str, float | str]:
    """Where the labeling time went, and whether the run was decode-bound or model-bound.

    Measured: each stage's busy time, the sum of its task times (Ray Data's per-operator stats
    of the executed ``ds``), and this run's labeler actors with their lifetimes, counted from
    when each had loaded the model (the GCS actor table). Returns (seconds unless named):

    - ``decode_busy_s``, ``model_busy_s``, and per image ``decode_ms_per_image``,
      ``model_ms_per_image`` (per decode task or per actor).
    - ``model_actors``: labeler actors that came up; ``decode_slots``: decode tasks the CPUs
      they left free could run at once, (cluster CPUs - actors x ``num_cpus_per_actor``) /
      ``decode_cpus_per_task``, at least 1.
    - ``decode_need_s`` = decode_busy_s / decode_slots and ``model_need_s`` = model_busy_s /
      model_actors: the wall time each stage needs with all its slots busy.
    - ``bound``: the stage with the larger need, ``"decode"`` (reading + decoding; more decode
      CPUs or nodes would speed the run up) or ``"model"`` (more or faster actors would). A
      capacity comparison, so it holds for short runs too, where actors start after decoding
      has already run ahead.
    - ``model_actor_s``, ``model_utilisation`` = model_busy_s / model_actor_s in [0, 1]: the
      observed busy share of the actors' lifetime (low: they waited for images).

    Empty when the stats are unavailable (nothing labeled); never raises.
    """
    try:
        import ray
        import ray._private.state

        ops = []
        todo = [ds.get_stats_summary()]
        while todo:
            summary = todo.pop()
            ops += summary.operators_stats
            todo += summary.parents
        busy = {"decode": 0.0, "model": 0.0}
        images = 0
        for op in ops:
            stage = "decode" if "decode_block" in op.operator_name else "model" if "Labeler" in op.operator_name else None
            if stage and op.wall_time is not None:
                busy[stage] += op.wall_time.sum
                if stage == "model" and op.output_num_rows is not None:
                    images += op.output_num_rows.sum
        if not images:
            return {}
        now_ms = time.time() * 1000
        # Private but dependency-free (the public ray.util.state needs the dashboard): the GCS
        # actor table, with each actor's ALIVE time (after its constructor) and death time.
        job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        lifetimes_ms = [(a["EndTime"] or now_ms) - a["StartTime"]
                        for a in ray._private.state.actors(job_id=job_id).values()
                        if "Labeler" in a.get("ActorClassName", "") and a.get("StartTime")
                        and a["StartTime"] >= since_epoch_s * 1000]
        cpus = ray.cluster_resources().get("CPU", 0.0)
    except Exception as exc:  # noqa: BLE001 - reporting only; a Ray upgrade must not fail the job
        log.debug("no stage timings: %s", exc)
        return {}
    actors = max(1, len(lifetimes_ms))
    actor_s = sum(lifetimes_ms) / 1000
    slots = max(1.0, (cpus - actors * config.num_cpus_per_actor) / config.decode_cpus_per_task)
    decode_need, model_need = busy["decode"] / slots, busy["model"] / actors
    return {"decode_busy_s": round(busy["decode"], 3), "model_busy_s": round(busy["model"], 3),
            "decode_ms_per_image": round(1000 * busy["decode"] / images, 3),
            "model_ms_per_image": round(1000 * busy["model"] / images, 3),
            "model_actors": actors, "decode_slots": round(slots, 2),
            "decode_need_s": round(decode_need, 3), "model_need_s": round(model_need, 3),
            "model_actor_s": round(actor_s, 3),
            "model_utilisation": round(min(1.0, busy["model"] / actor_s) if actor_s > 0 else 0.0, 3),
            "bound": "model" if model_need >= decode_need else "decode"}
