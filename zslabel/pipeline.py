"""The one place that composes the Ray Data pipeline for a labeling job, and its driver.

    job.check (options, output checks, --resume short-cut, claim) -> plan inputs (``sources``)
    -> job.load (model + label embeddings) -> start/join Ray and size every stage
    (``cluster``) -> job.begin (write session) -> [drop committed inputs] -> [decode tasks] -> [labeler
    actors] -> [commit one Parquet file per block], run to the end -> job.finish (counts,
    accounting check, run manifest, error budget)

Everything that can fail for the whole job fails before the first image is read, and what
needs neither Ray nor the model (the options, the output, the input's listing) fails before
either starts. What the stages
share is derived from the config once, in ``run_label_job``, before the output changes: the
cluster's sizing (actor pool and its strategy, decode task options, decoded bytes in flight,
write tasks) and the I/O policy the inputs are planned and fetched with; ``compose`` only wires
the stages with those values.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from . import job, sources
from .cluster import (
    ACTOR_MAX_TASK_RETRIES,
    WRITE_CPUS_PER_TASK,
    ClusterResources,
    actor_pool_strategy,
    bound_in_flight,
    decode_task_options,
    init_ray,
    write_tasks,
)
from .config import JobConfig
from .errors import ModelLoadError, OutputError
from .io_policy import IOPolicy
from .output import output_schema
from .progress import Progress
from .stage_timings import stage_timings
from .store import INPUT_FILES, Accounting, drop_committed, write_block
from .summary import RunSummary, summary_of_finished

log = logging.getLogger(__name__)


def run_label_job(config: JobConfig, progress: bool = True) -> RunSummary:
    """Label every image of ``config.input`` and write the output contract to ``config.output``.

    ``progress``: show images done / total, rate, errors and ETA on stderr (``zslabel.progress``).

    Returns:
        RunSummary with counts per error code and timings.

    Raises:
        ZslabelError subclasses before any image is read (config, model, input, output; an
        output another run holds), AccountingError when the rows do not account for every
        listed input (nothing committed), and ErrorBudgetExceeded after writing when more than
        ``max_error_fraction`` rows failed.
    """
    spec_overrides = {"max_pixels": config.max_pixels, "min_side": config.min_side, "fast": config.fast_decode,
                      "reference_pixels": config.reference_pixels}
    # Every read of the job (the input check, planning, fetching) within one I/O policy.
    io = config.io_policy()
    checked = job.check(config, config.input, check_input=config.check_input)
    if isinstance(checked, job.CheckedJob):
        with checked.claimed():
            # The inputs, listed before the model loads and Ray starts (planning needs neither), so an
            # unreadable manifest or an input without images fails in seconds.
            plan = sources.plan_inputs(
                config.input, input_format=config.input_format, storage_options=config.storage_options, io=io,
                path_column=config.path_column, id_column=config.id_column, dedupe=config.dedupe,
                image_column=config.image_column, output=config.output)
            prepared = job.load(checked, device="auto", spec_overrides=spec_overrides)
            prepared.timings["planning_s"] = plan.planning_seconds
            # Ray, and each stage's resources sized from the cluster's (``cluster``), once.
            # After the model: in a `ray job submit` driver, joining the cluster can replace the
            # job's unpacked working_dir under the process (its cwd then no longer exists), which
            # breaks libraries that resolve relative paths at import time (transformers does).
            init_ray(config.address)
            cluster = ClusterResources.read()
            # Before the output changes: a pool no node can hold fails here, leaving nothing behind.
            pool = cluster.actor_pool_size(config)
            task_options = decode_task_options(config)
            # The planned rows as a Ray Dataset read in the decode tasks (with their task options,
            # so that Ray Data fuses the two into one task per block), in blocks sized for the cluster.
            dataset = plan.to_dataset(task_options, cluster.cpus())
            inputs = plan.listed if plan.listed is not None else plan.rows_at_most
            labelers = actor_pool_strategy(config, pool, inputs, cluster.nodes)
            bound_in_flight(config, prepared.preprocess.output_hw, pool, dataset)
            # The write session: the output schema is part of the run's fingerprint.
            schema = output_schema(plan.carried_columns, prepared.embedding_dim if config.store_embeddings else None,
                                   config.embedding_dtype, abstained=config.min_score is not None,
                                   hierarchy=prepared.hierarchy is not None)
            session = job.begin(prepared, schema, preprocess=prepared.preprocess.fingerprint_dict(),
                                planned_paths=plan.planned_paths, planned_files=plan.planned_files)
            plan.planned_paths = None  # checked; the rows themselves are in the object store (~100 B a path)
            ds = compose(config, prepared, plan, session, schema, spec_overrides, io=io, task_options=task_options,
                         labelers=labelers, writers=write_tasks(cluster.cpus()))
            written = consume(ds, config, plan, session, prepared.timings, progress)
            return job.finish(
                prepared, session, "label", config=config.public_dict(),
                preprocess=prepared.preprocess.fingerprint_dict(),
                input_counts={"skipped": plan.skipped, "listed": plan.listed,
                              "duplicates_removed": plan.duplicates_removed,
                              "skipped_by_reason": plan.skipped_by_reason},
                extra={"actor_pool": list(pool),
                       **({INPUT_FILES: plan.planned_files} if plan.planned_files is not None else {})},
                files_this_run=len(written), accounting=Accounting(plan.listed, plan.skipped, plan.duplicates_removed))
    # A --resume of a finished run with unchanged settings, input and model: nothing left to do.
    return summary_of_finished(*checked)


def compose(config: JobConfig, prepared: job.PreparedJob, plan, session, schema, spec_overrides: dict[str, Any], *,
            io: IOPolicy, task_options: dict, labelers, writers: int):
    """The Ray Data chain: planned inputs -> drop committed -> decode tasks -> labeler actors ->
    one committed Parquet file per ``rows_per_file`` rows. Returns the (lazy) dataset whose
    rows name the committed files (``store.WRITE_RESULT_SCHEMA``).

    The stages' resources come decided (``run_label_job``, from ``cluster``): ``task_options``
    of the decode tasks (``decode_task_options``), ``labelers`` the actor pool's strategy
    (``actor_pool_strategy``), ``writers`` the most write tasks at once (``write_tasks``); ``io``
    is the I/O policy the inputs were planned with, which every fetch keeps."""
    import ray
    import ray.data

    from .stages import Labeler, LabelerSettings, decode_block

    spec = prepared.preprocess
    settings = LabelerSettings(
        model=prepared.options.model or "", revision=config.revision, storage_options=config.storage_options,
        schema=schema, top_k=config.top_k, checkpoint=prepared.checkpoint, digest=prepared.digest, dtype=config.dtype,
        num_threads=max(1, int(config.num_cpus_per_actor)), store_embeddings=config.store_embeddings,
        spec_overrides=spec_overrides, ranking=prepared.rule, calibration=prepared.calibration,
        hierarchy=prepared.hierarchy, head=prepared.head)
    # One copy of the (C, D) label embeddings in the object store, shared by every actor.
    label_ref = ray.put(prepared.label_set.embeddings)

    ds = plan.dataset
    # Inputs committed by an earlier run (--resume) are dropped in the decode task before any
    # byte is fetched or decoded.
    ds = ds.map_batches(drop_committed, fn_kwargs={"done": session.done}, batch_size=None,
                        batch_format="pyarrow", **task_options)
    ds = ds.map_batches(
        decode_block, fn_kwargs={"spec": spec, "storage_options": config.storage_options,
                                 "batch_size": config.batch_size, "io": io,
                                 "decode_timeout": config.decode_time_limit()},
        # The CPU:GPU split is not configured: every CPU the actors leave free can run a decode
        # task (decode_cpus_per_task each; 1 suits single-threaded Pillow, < 1 overlaps remote
        # reads), and Ray Data's backpressure (the actors' input queue budget) stops decoding
        # from running ahead of the model. The manifest's timings say which side was the limit.
        # Whole blocks (batch_size=None, see decode_block); the labeler takes batch_size rows.
        batch_size=None, batch_format="numpy", **task_options)
    ds = ds.map_batches(
        Labeler, fn_constructor_kwargs={"settings": settings, "label_refs": [label_ref],
                                        "label_names": prepared.labels},
        batch_size=config.batch_size, batch_format="numpy", compute=labelers,
        num_cpus=config.num_cpus_per_actor, num_gpus=config.num_gpus_per_actor or None,
        scheduling_strategy="DEFAULT",
        # An actor lost with its node is recreated wherever resources are (model reloaded
        # from the node cache), as often as that happens over a long spot-instance run;
        # the batch it held is resubmitted. A batch that kills its actor every time
        # (e.g. a driver crash on one input) fails the job after a few tries instead
        # of looping forever (Ray Data's default for both is -1).
        max_restarts=-1, max_task_retries=ACTOR_MAX_TASK_RETRIES)
    # One committed Parquet file per ``rows_per_file`` labeled rows (store.files: hidden temp
    # file + rename, fenced by the run record); the rows that come back only name the files.
    # Larger files read faster downstream; smaller ones lose less work to a crash.
    return ds.map_batches(write_block, fn_kwargs={"target": session.target},
                          batch_size=config.rows_per_file, batch_format="pyarrow",
                          # A write (a few thousand label rows to Parquet) takes milliseconds of
                          # CPU, so it asks for none. With any CPU and no cap, Ray Data's allocator
                          # handed the CPUs no operator had reserved to this last operator, never to
                          # decoding (1 decode task next to a 1-CPU actor on 4 CPUs, 5 of 7 free on
                          # 8); with a whole CPU it held writes back until decoding had finished.
                          # The cap stops Ray from starting a worker process per write in flight
                          # while decoding holds every CPU (~1.5 s of CPU each). benchmarks/README.md,
                          # "Decode-bound".
                          num_cpus=WRITE_CPUS_PER_TASK, compute=ray.data.TaskPoolStrategy(size=writers))


def _labeler_start_error(exc: BaseException) -> ModelLoadError | None:
    """The ``ModelLoadError`` a labeler actor raised while starting, from the error Ray Data hands
    the driver for it (an ``ActorDiedError`` that keeps only the actor's traceback as text), or
    None for any other error."""
    import ray.exceptions

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ray.exceptions.RayActorError) and seen.actor_init_failed:
            found = re.search(r"zslabel\.errors\.ModelLoadError: ([^\n\x1b]+)", seen.error_msg)
            if found:
                return ModelLoadError(found.group(1).strip())
        seen = seen.__cause__ or seen.__context__
    return None


def consume(ds, config: JobConfig, plan, session, timings: dict[str, Any], progress: bool) -> list[dict]:
    """Run ``ds`` (the pipeline ending in ``write_block``) to the end, showing images done out of
    those this run will write (planned inputs minus those committed earlier; unknown for tars
    and Parquet with image bytes, counted only while read); returns the rows naming the
    committed files (``store.WRITE_RESULT_SCHEMA``). Then the plan's counts are final, and
    ``timings`` gains ``labeling_s`` and the stages' (``stage_timings``).

    Raises:
        InputError: the inputs held no image at all (e.g. tars of sidecars only).
        OutputError: a write task could not write the output (a full disk, a quota, a read-only
            folder: the ``failure`` of its row, ``store.files.write_block``); the files committed
            so far are kept for ``--resume``.
        ModelLoadError: a labeler actor could not load the run's model (its checkpoint changed
            during the run, a GPU torch cannot use, a folder missing on its node).
    """
    t_run, t_run_epoch = time.perf_counter(), time.time()
    total = None
    if plan.listed is not None and plan.kind not in ("webdataset", "parquet"):
        total = max(0, plan.listed - plan.skipped - plan.duplicates_removed - len(session.done))
    written = []
    try:
        with Progress(total, enabled=progress) as shown:
            try:
                for row in ds.iter_rows():
                    if row["failure"] is not None:
                        raise OutputError(row["failure"])  # the CLI's one line and exit 2, not Ray's traceback
                    written.append(row)
                    shown.update(row["rows"], row["errors"])
            except Exception as exc:
                refused = _labeler_start_error(exc)
                if refused is None:
                    raise
                raise refused from exc
    finally:
        plan.release()  # tars / Parquet inputs: the read tasks' tally actor, its counts kept
    plan.finalize()  # tars / Parquet inputs: listed and skipped counts are known only now
    plan.check_has_inputs(config.input)  # e.g. tars of sidecars only: exit 2, never an empty success
    timings["labeling_s"] = time.perf_counter() - t_run
    timings.update(stage_timings(ds, since_epoch_s=t_run_epoch, num_cpus_per_actor=config.num_cpus_per_actor,
                                 decode_cpus_per_task=config.decode_cpus_per_task))
    return written
