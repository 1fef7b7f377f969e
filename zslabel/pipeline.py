"""The one place that composes the Ray Data pipeline for a labeling job.

    validate config -> check output -> load checkpoint on the driver, build label embeddings
    -> plan inputs -> [decode tasks] -> [labeler actors] -> Parquet -> counts -> run manifest

Everything that can fail for the whole job fails before the first image is read.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from .config import JobConfig
from .errors import ConfigError, ErrorBudgetExceeded, OutputError, error_code
from .output import existing_output_files, output_filesystem, output_schema, write_manifest

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a finished run did. Times in seconds; ``images_per_second`` counts output rows."""

    output: str
    rows: int
    labeled: int
    errors_by_code: dict[str, int]
    skipped: int
    listed: int | None
    wall_seconds: float
    images_per_second: float
    manifest_path: str
    timings: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """One human line for the end of a run."""
        errs = ", ".join(f"{c}={n}" for c, n in sorted(self.errors_by_code.items())) or "none"
        return (f"labeled {self.labeled} of {self.rows} images; errors: {errs}; skipped {self.skipped} "
                f"non-image files; {self.wall_seconds:.1f} s, {self.images_per_second:.1f} images/s; "
                f"output: {self.output}")


def init_ray(address: str | None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start an embedded local Ray when neither is set."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"log_to_driver": True}
    if address:
        kwargs["address"] = address
    ray.init(**kwargs)


def actor_pool_size(config: JobConfig) -> tuple[int, int]:
    """``(min, max)`` labeler actors: the configured bounds, else what the cluster can hold.

    Decided from the cluster's resources (``ray.nodes()``), never from the driver's hardware.
    CPU actors leave ``decode_cpus_per_task`` CPUs for decoding so a small machine cannot
    deadlock with every CPU held by actors.

    Raises:
        ConfigError: no node has the GPUs or CPUs one actor asks for (fails now, instead of
            waiting forever for resources that never come).
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_gpus = [n["Resources"].get("GPU", 0.0) for n in nodes]
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in nodes]
    g, c = config.num_gpus_per_actor, config.num_cpus_per_actor
    if g > 0 and max(node_gpus, default=0) < g:
        raise ConfigError(f"--num-gpus-per-actor {g} but no node of this Ray cluster has that many GPUs "
                          f"(GPUs per node: {node_gpus or [0]}); use a GPU cluster or --num-gpus-per-actor 0")
    if max(node_cpus, default=0) < c:
        raise ConfigError(f"--num-cpus-per-actor {c} but the largest node has {max(node_cpus, default=0):g} CPUs")
    if config.concurrency:
        return config.concurrency
    if g > 0:
        most = sum(math.floor(x / g) for x in node_gpus)
    else:
        most = math.floor((sum(node_cpus) - config.decode_cpus_per_task) / c) if c else 1
    return 1, max(1, most)


def run_label_job(config: JobConfig) -> RunSummary:
    """Label every image of ``config.input`` and write the output contract to ``config.output``.

    Returns:
        RunSummary with counts per error code and timings.

    Raises:
        ZslabelError subclasses before any image is read (config, model, input, output), and
        ErrorBudgetExceeded after writing when more than ``max_error_fraction`` rows failed.
    """
    import ray
    import ray.data

    from . import sources
    from .labels import build_label_set
    from .model import ZeroShotModel, checkpoint_digest, resolve_checkpoint
    from .stages import Labeler, LabelerSettings, decode_batch

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    config.validate()
    if existing_output_files(config.output, config.storage_options) and config.mode == "error":
        raise OutputError(f"output {config.output} already holds data; choose an empty location, "
                          "or pass --resume to continue it or --overwrite to replace it")

    spec_overrides = {"max_pixels": config.max_pixels, "min_side": config.min_side, "fast": config.fast_decode}
    path = resolve_checkpoint(config.model, config.revision, config.storage_options)
    text_model = ZeroShotModel(path, **spec_overrides)
    config.ranking_rule().check_score_kind(text_model.score_kind, config.model)  # before any image is read
    label_set = build_label_set(config.labels, config.templates, text_model)
    spec, score_kind, model_type = text_model.preprocess, text_model.score_kind, text_model.model_type
    embed_dim = label_set.embeddings.shape[1]
    del text_model
    timings["model_and_labels_s"] = time.perf_counter() - t0

    init_ray(config.address)
    pool = actor_pool_size(config)
    plan = sources.plan_inputs(
        config.input, input_format=config.input_format, storage_options=config.storage_options,
        path_column=config.path_column, id_column=config.id_column, dedupe=config.dedupe,
        image_column=config.image_column)
    timings["planning_s"] = plan.planning_seconds

    schema = output_schema(plan.carried_columns, embed_dim if config.store_embeddings else None,
                           config.embedding_dtype, abstained=config.min_score is not None)
    settings = LabelerSettings(
        model=config.model, revision=config.revision, storage_options=config.storage_options,
        schema=schema, top_k=config.top_k, dtype=config.dtype,
        num_threads=max(1, int(config.num_cpus_per_actor)), store_embeddings=config.store_embeddings,
        spec_overrides=spec_overrides, ranking=config.ranking_rule())
    # One copy of the (C, D) label embeddings in the object store, shared by every actor.
    label_ref = ray.put(label_set.embeddings)

    ds = plan.dataset.map_batches(
        decode_batch, fn_kwargs={"spec": spec, "storage_options": config.storage_options},
        batch_size=config.batch_size, num_cpus=config.decode_cpus_per_task, batch_format="numpy",
        # Decode tasks spread over the cluster (near the data, off the GPU nodes' hot CPUs) and
        # actors pack; the differing strategies also keep Ray Data from fusing decoding into
        # the actors, where it would run serially in front of the model.
        scheduling_strategy="SPREAD")
    ds = ds.map_batches(
        Labeler, fn_constructor_kwargs={"settings": settings, "label_refs": [label_ref],
                                        "label_names": list(label_set.names)},
        batch_size=config.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
        num_cpus=config.num_cpus_per_actor, num_gpus=config.num_gpus_per_actor or None,
        scheduling_strategy="DEFAULT")

    fs, root = output_filesystem(config.output, config.storage_options)
    if config.mode == "overwrite" and fs.exists(root):
        fs.rm(root, recursive=True)
    t_run = time.perf_counter()
    ds.write_parquet(config.output, filesystem=_arrow_fs(fs))
    timings["labeling_s"] = time.perf_counter() - t_run

    counts = _count_rows(config.output, config.storage_options)
    rows = counts.pop("__rows__")
    labeled = counts.pop("__labeled__")
    wall = time.perf_counter() - t0
    timings["wall_s"] = wall
    manifest = {
        "zslabel_run": 1,
        "config": config.public_dict(),
        "model": {"id": config.model, "revision": config.revision, "local_path": str(path),
                  "digest": checkpoint_digest(path), "model_type": model_type, "score_kind": score_kind},
        "labels": list(label_set.names),
        "templates": list(label_set.templates),
        "preprocess": spec.fingerprint_dict(),
        "counts": {"rows": rows, "labeled": labeled, "errors_by_code": counts, "skipped": plan.skipped,
                   "listed": plan.listed, "duplicates_removed": plan.duplicates_removed},
        "actor_pool": list(pool),
        "timings": timings,
        "versions": package_versions(),
    }
    manifest_path = write_manifest(config.output, manifest, config.storage_options)
    summary = RunSummary(output=config.output, rows=rows, labeled=labeled, errors_by_code=counts,
                         skipped=plan.skipped, listed=plan.listed, wall_seconds=wall,
                         images_per_second=rows / wall if wall else 0.0, manifest_path=manifest_path,
                         timings=timings)
    failed = rows - labeled
    if config.max_error_fraction is not None and rows and failed / rows > config.max_error_fraction:
        raise ErrorBudgetExceeded(
            f"{failed} of {rows} images failed ({failed / rows:.1%}), more than --max-error-fraction "
            f"{config.max_error_fraction:.1%}; the {rows} rows are written to {config.output}")
    return summary


def _arrow_fs(fs):
    """An fsspec filesystem as a pyarrow filesystem (local stays native for speed)."""
    import pyarrow.fs as pafs
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _count_rows(uri: str, storage_options: dict) -> dict[str, int]:
    """Counts per error code over the written output, reading only the ``error`` column."""
    import pyarrow.dataset as pads

    fs, root = output_filesystem(uri, storage_options)
    table = pads.dataset(root, filesystem=_arrow_fs(fs), format="parquet").to_table(columns=["error"])
    errors = table.column("error").to_pylist()
    counts: dict[str, int] = {}
    for e in errors:
        if e is not None:
            code = error_code(e)
            counts[code] = counts.get(code, 0) + 1
    counts["__rows__"] = len(errors)
    counts["__labeled__"] = sum(e is None for e in errors)
    return counts


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results, for the run manifest."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("zslabel", "ray", "torch", "transformers", "pyarrow", "pillow", "numpy", "fsspec"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
