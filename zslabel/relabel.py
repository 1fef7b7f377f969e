"""Relabel stored image embeddings with new labels/templates: the text tower only, no image read.

An earlier ``zslabel label --store-embeddings`` run wrote each image's L2-normalised embedding
beside its labels. The zero-shot scores depend on the image only through that embedding
(``ranking.zero_shot_logits``), so new labels cost one text-tower pass plus an (N, D) x (D, C)
product, instead of fetching and decoding every image again:

    source Parquet files --(stream per file, per batch)--> embeddings (B, D) float32, renormalised
      -> logits = exp(logit_scale) * emb @ labels.T (+ logit_bias) -> softmax / sigmoid -> rank
      -> same output schema and run manifest as ``zslabel label`` with the same options

One process, no Ray: it is matrix products over Parquet batches, so memory is bounded by the
batch size whatever the number of rows. The embeddings must come from the same checkpoint as the
new label embeddings; the source's run manifest records its checkpoint digest, and a different
model is refused.

Scores match a full run to float rounding: exactly the same formula and label embeddings, with
the image embedding rounded to the stored dtype. float32 storage: ~1e-7. float16 storage
(relative rounding 2^-11 per component) moves a logit by up to about logit_scale x 5e-5, so a
score by up to ~1e-3 at real logit scales (CLIP ~100, SigLIP ~117; a sigmoid moves by at most a
quarter of its logit's change); measured on the tiny test checkpoints (scale e^2): 1.6e-5 CLIP,
1.2e-4 SigLIP. Store float32 embeddings when relabeled scores must match more closely.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import NON_FINITE_SCORES, ConfigError, InputError, OutputError, error_code, error_string
from .calibration import load_for_run, manifest_entry as calibration_manifest_entry
from .evaluate import normalise_path
from .hierarchy import Hierarchy, with_hierarchy_fields
from .hierarchy import check_options as check_hierarchy_options
from .labels import DEFAULT_TEMPLATE, merge_labels_file, validate_prompts
from .output import (MANIFEST_NAME, existing_output_files, output_filesystem, output_schema, read_manifest,
                     result_table, write_manifest)

log = logging.getLogger(__name__)

# Columns the output writer owns; every other string column of the source is carried through.
OWNED_COLUMNS = ("path", "input_index", "labels", "scores", "error", "width", "height", "abstained", "embedding")
RELABEL_MODES = ("error", "overwrite")


@dataclass
class RelabelConfig:
    """Configuration of one relabel job (CLI flags share these names).

    Attributes:
        source: an earlier run's output folder (or one of its Parquet files, or any Parquet
            dataset with ``path`` and a fixed-size-list ``embedding`` column), local or fsspec URI.
        output: new output folder or URI.
        labels / labels_file / templates / top_k / min_score / multi_label / threshold: as for
            ``zslabel label`` (``JobConfig``).
        model, revision: the checkpoint whose text tower embeds the labels; default the model
            recorded in the source's run manifest. Refused when its digest differs from the
            source's.
        batch_size: source rows per batch (bounds memory: about batch_size x (D + C) floats).
        mode: "error" (refuse an occupied output) or "overwrite".
        store_embeddings: copy the source ``embedding`` column (same dtype) into the output, so
            the output can itself be relabeled.
        storage_options: fsspec options for source, output and a remote model folder.
        calibration: a ``zslabel calibrate`` file fitted for this model, labels and templates;
            scores are then calibrated (``calibration.py``).
        hierarchy: add the ``hier_*`` columns (``hierarchy.py``; needs ``min_score``).
    """

    source: str = ""
    output: str = ""
    labels: list[str] = field(default_factory=list)
    labels_file: str | None = None
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])
    model: str | None = None
    revision: str | None = None
    top_k: int = 5
    min_score: float | None = None
    multi_label: bool = False
    threshold: float | None = None
    batch_size: int = 8192
    mode: str = "error"
    store_embeddings: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    calibration: str | None = None
    hierarchy: bool = False

    def ranking_rule(self):
        """The ``ranking.RankingRule`` (top-k, abstention, multi-label) of this job."""
        from .ranking import RankingRule

        return RankingRule(top_k=self.top_k, min_score=self.min_score, multi_label=bool(self.multi_label),
                           threshold=self.threshold)

    def validate(self) -> None:
        """Check everything that needs neither the model nor storage; ConfigError on the first problem."""
        self.labels = merge_labels_file(self.labels, self.labels_file)
        self.labels_file = None
        if not self.source:
            raise ConfigError("no source given: pass an earlier run's output (made with --store-embeddings)")
        if not self.output:
            raise ConfigError("no output given: pass --output DIR_OR_URI")
        validate_prompts(self.labels, self.templates)
        self.ranking_rule().validate()
        check_hierarchy_options(self.hierarchy, self.min_score)
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.mode not in RELABEL_MODES:
            raise ConfigError(f"relabel mode must be one of {RELABEL_MODES} (got {self.mode!r})")
        if normalise_path(self.output) == normalise_path(self.source) or \
                normalise_path(self.output).startswith(normalise_path(self.source).rstrip("/") + "/"):
            raise ConfigError(f"--output {self.output} is the source (or inside it); choose another location")

    def public_dict(self) -> dict[str, Any]:
        """JSON-able config with storage option values redacted."""
        d = dataclasses.asdict(self)
        d["storage_options"] = {k: "<redacted>" for k in self.storage_options}
        return d


def source_files(source: str, storage_options: dict | None = None) -> tuple[Any, list[str], str]:
    """The source's Parquet files, in name order, and the folder holding its run manifest.

    Returns:
        ``(fsspec filesystem, [file paths], folder path)``. Files and folders whose name starts
        with ``_`` or ``.`` are skipped, as Parquet readers do.

    Raises:
        InputError: the source does not exist or holds no Parquet file.
    """
    fs, root = output_filesystem(source, storage_options)
    try:
        if fs.isfile(root):
            return fs, [root], posixpath.dirname(root)
        if not fs.exists(root):
            raise InputError(f"relabel source {source} does not exist")
        files = sorted(f for f in fs.find(root) if f.endswith(".parquet") and not any(
            part.startswith(("_", ".")) for part in posixpath.relpath(f, root).split("/")))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        raise InputError(f"cannot list relabel source {source}: {type(exc).__name__}: {exc}") from exc
    if not files:
        raise InputError(f"no Parquet files under {source}; pass the output folder of a "
                         "`zslabel label --store-embeddings` run")
    return fs, files, root


def embedding_matrix(column: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A (fixed-size) list column of embeddings -> ``((N, dim) float32, (N,) bool present)``.

    Rows whose embedding is null are zeros with ``present`` False. The rows are renormalised to
    unit L2 norm: stored float16 values are rounded, and renormalising brings them back to the
    sphere the full run scored them on.

    Raises:
        InputError: a list of another length than ``dim``.
    """
    n = len(column)
    present = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
    out = np.zeros((n, dim), np.float32)
    if isinstance(column.type, pa.FixedSizeListType):
        values = column.values.slice(column.offset * dim, n * dim)
        out[:] = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, dim)
    else:
        lengths = column.value_lengths().fill_null(dim).to_numpy(zero_copy_only=False)
        if (lengths != dim).any():
            raise InputError(f"embedding lists of length {sorted(set(lengths.tolist()) - {dim})}, expected {dim}")
        flat = column.flatten().fill_null(0).to_numpy(zero_copy_only=False).astype(np.float32)
        out[present] = flat.reshape(-1, dim)
    out[~present] = 0.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A zero vector becomes NaN here on purpose: its scores are non-finite and the row
        # becomes a non_finite_scores error, as in the full run.
        out[present] = out[present] / norms[present]
    return out, present


def _embedding_dim(schema: pa.Schema, source: str) -> int | None:
    if "embedding" not in schema.names:
        raise InputError(f"{source} has no 'embedding' column; label the images once with "
                         "`zslabel label ... --store-embeddings`, then relabel that output")
    if "path" not in schema.names:
        raise InputError(f"{source} has no 'path' column")
    t = schema.field("embedding").type
    if isinstance(t, pa.FixedSizeListType):
        return t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return None
    raise InputError(f"'embedding' column of {source} is {t}, not a list of floats")


def check_same_model(manifest: dict | None, model: str | None, revision: str | None, digest: str) -> None:
    """Refuse label embeddings from another checkpoint than the one that made the image embeddings.

    Compares the checkpoint digest (sha256 of config and weight files, ``model.checkpoint_digest``)
    with the source manifest's ``model.digest``; without a recorded digest, the model id and
    revision. Raises ConfigError naming both models.
    """
    if manifest is None:
        return
    recorded = manifest.get("model") or {}
    if recorded.get("digest"):
        same = recorded["digest"] == digest
    else:
        same = recorded.get("id") == model and recorded.get("revision") == revision
    if not same:
        raise ConfigError(
            f"the embeddings were made by model {recorded.get('id')!r} (revision {recorded.get('revision')}, "
            f"digest {recorded.get('digest')}), not by {model!r} (digest {digest}); label embeddings from "
            "another checkpoint live in a different space, so the scores would be meaningless. "
            "Omit --model to use the recorded model")


def run_relabel_job(config: RelabelConfig):
    """Relabel the embeddings of ``config.source`` with new labels into ``config.output``.

    Returns:
        ``pipeline.RunSummary`` (rows, labeled, errors by code, timings, manifest path).

    Raises:
        ConfigError: invalid labels/templates/flags, a model other than the source's, an
            embedding dimension that differs from the model's, --multi-label on a softmax model.
        InputError: no source, no Parquet files, no ``embedding`` column, a labeled row without
            an embedding.
        ModelLoadError: the checkpoint cannot be loaded.
        OutputError: the output holds data (without ``mode="overwrite"``) or cannot be written.
        All before the first output file is written, except the source checks made per file
        (another dimension, a labeled row without an embedding): those stop the job with the
        finished files in place and no run manifest.
    """
    from .labels import build_label_set
    from .model import ZeroShotModel, checkpoint_digest, resolve_checkpoint
    from .pipeline import RunSummary, package_versions

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    config.validate()
    so = config.storage_options
    existing = existing_output_files(config.output, so)
    if existing and config.mode != "overwrite":
        raise OutputError(f"output {config.output} already holds data; choose an empty location or pass --overwrite")
    if existing and read_manifest(config.output, so) is None:
        # --overwrite replaces an earlier output, never a folder of other files (e.g. images).
        raise OutputError(f"output {config.output} holds files that are not a zslabel output; "
                          "refusing to --overwrite it")
    fs, files, source_root = source_files(config.source, so)
    with fs.open(files[0], "rb") as fh:
        source_schema = pq.read_schema(fh)
    dim = _embedding_dim(source_schema, config.source)
    manifest = read_manifest(source_root, so)
    if manifest is None:
        log.warning("no %s beside %s: the model that made the embeddings cannot be checked", MANIFEST_NAME,
                    config.source)
    recorded = (manifest or {}).get("model") or {}
    model_id = config.model or recorded.get("id")
    revision = config.revision if config.model else recorded.get("revision")
    if not model_id:
        raise ConfigError(f"no run manifest beside {config.source} records its model; pass --model "
                          "(the checkpoint that made the embeddings)")

    path = resolve_checkpoint(model_id, revision, so)
    digest = checkpoint_digest(path)
    check_same_model(manifest, model_id, revision, digest)
    rule = config.ranking_rule()
    text_model = ZeroShotModel(path)
    rule.check_score_kind(text_model.score_kind, model_id)
    label_set = build_label_set(config.labels, config.templates, text_model)
    score_kind, model_type = text_model.score_kind, text_model.model_type
    scale, bias = text_model.logit_scale, text_model.logit_bias
    del text_model
    calib = load_for_run(config.calibration, so, checkpoint_digest=digest, labels=list(label_set.names),
                         templates=list(label_set.templates), score_kind=score_kind)
    hier = Hierarchy.from_labels(list(label_set.names)) if config.hierarchy else None
    if dim is not None and dim != label_set.embeddings.shape[1]:
        raise ConfigError(f"the source embeddings have {dim} dimensions but {model_id} embeds labels in "
                          f"{label_set.embeddings.shape[1]}; they come from another model")
    dim = label_set.embeddings.shape[1]
    timings["model_and_labels_s"] = time.perf_counter() - t0

    carried = [f.name for f in source_schema if f.name not in OWNED_COLUMNS
               and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]
    dropped = [n for n in source_schema.names if n not in OWNED_COLUMNS and n not in carried]
    if dropped:
        log.warning("source columns %s are not strings and are not carried into the relabeled output", dropped)
    emb_type = source_schema.field("embedding").type
    emb_dtype = "float32" if pa.types.is_float32(emb_type.value_type) else "float16"
    schema = output_schema(carried, dim if config.store_embeddings else None, emb_dtype,
                           abstained=config.min_score is not None)
    if hier is not None:
        schema = with_hierarchy_fields(schema)

    out_fs, out_root = output_filesystem(config.output, so)
    if config.mode == "overwrite" and out_fs.exists(out_root):
        out_fs.rm(out_root, recursive=True)
    out_fs.makedirs(out_root, exist_ok=True)
    scorer = _Scorer(label_set.embeddings, np.asarray(label_set.names, dtype=object), scale, bias,
                     score_kind, rule, schema, calibration=calib, hierarchy=hier)
    t_run = time.perf_counter()
    totals = {"rows": 0, "labeled": 0}
    errors_by_code: dict[str, int] = {}
    next_index = 0
    for f in files:
        # One output file per source file, same relative name: row order and layout carry over.
        target = posixpath.join(out_root, posixpath.relpath(f, source_root))
        # Streamed to a hidden name, then renamed: an interrupted relabel leaves no torn file
        # that Parquet readers would pick up (they skip names starting with ".").
        hidden = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.tmp")
        out_fs.makedirs(posixpath.dirname(target), exist_ok=True)
        try:
            with fs.open(f, "rb") as src, out_fs.open(hidden, "wb") as dst:
                reader = pq.ParquetFile(src)
                file_dim = _embedding_dim(reader.schema_arrow, f)
                if file_dim is not None and file_dim != dim:
                    raise InputError(f"{f} holds {file_dim}-dimensional embeddings, other files {dim}")
                with pq.ParquetWriter(dst, schema) as writer:
                    # Only what the output needs: the source's labels/scores are never read.
                    wanted = [n for n in reader.schema_arrow.names if n in schema.names or n in ("error", "embedding")]
                    for batch in reader.iter_batches(batch_size=config.batch_size, columns=wanted):
                        table, codes = scorer(batch, next_index)
                        next_index += batch.num_rows
                        writer.write_table(table)
                        totals["rows"] += batch.num_rows
                        for c in codes:
                            if c is None:
                                totals["labeled"] += 1
                            else:
                                errors_by_code[c] = errors_by_code.get(c, 0) + 1
            out_fs.mv(hidden, target)
        except BaseException:
            with contextlib.suppress(Exception):
                out_fs.rm(hidden)
            raise
    timings["labeling_s"] = time.perf_counter() - t_run
    wall = time.perf_counter() - t0
    timings["wall_s"] = wall

    source_counts = (manifest or {}).get("counts") or {}
    run_config = dict((manifest or {}).get("config") or {})
    run_config.update(output=config.output, labels=list(label_set.names), labels_file=None,
                      templates=list(label_set.templates), model=model_id, revision=revision,
                      top_k=config.top_k, min_score=config.min_score, multi_label=bool(config.multi_label),
                      threshold=config.threshold, mode=config.mode, store_embeddings=config.store_embeddings,
                      embedding_dtype=emb_dtype, calibration=config.calibration, hierarchy=config.hierarchy)
    new_manifest = {
        "zslabel_run": 1,
        "kind": "relabel",
        "config": run_config,
        "relabel": {"source": config.source, "source_model_digest": recorded.get("digest"),
                    "model_checked": manifest is not None, "settings": config.public_dict()},
        "model": {"id": model_id, "revision": revision, "local_path": str(path), "digest": digest,
                  "model_type": model_type, "score_kind": score_kind},
        "labels": list(label_set.names),
        "templates": list(label_set.templates),
        "calibration": calibration_manifest_entry(calib, config.calibration),
        "preprocess": (manifest or {}).get("preprocess"),
        "counts": {"rows": totals["rows"], "labeled": totals["labeled"], "errors_by_code": errors_by_code,
                   "skipped": source_counts.get("skipped", 0), "listed": source_counts.get("listed"),
                   "duplicates_removed": source_counts.get("duplicates_removed", 0)},
        "timings": timings,
        "versions": package_versions(),
    }
    manifest_path = write_manifest(config.output, new_manifest, so)
    rows = totals["rows"]
    return RunSummary(output=config.output, rows=rows, labeled=totals["labeled"], errors_by_code=errors_by_code,
                      skipped=source_counts.get("skipped", 0), listed=source_counts.get("listed"),
                      wall_seconds=wall, images_per_second=rows / wall if wall else 0.0,
                      manifest_path=manifest_path, timings=timings)


class _Scorer:
    """Scores one source batch with the new label embeddings and builds its output rows."""

    def __init__(self, label_embeddings: np.ndarray, label_names: np.ndarray, logit_scale: float,
                 logit_bias: float, score_kind: str, rule, schema: pa.Schema, *, calibration=None,
                 hierarchy=None):
        import torch

        self.labels = torch.from_numpy(label_embeddings)
        self.names, self.scale, self.bias, self.kind = label_names, logit_scale, logit_bias, score_kind
        self.rule, self.schema = rule, schema
        self.calibration, self.hierarchy = calibration, hierarchy
        self.ranked_schema = pa.schema([schema.field(n) for n in ("labels", "scores", "abstained")
                                        if n in schema.names])

    def __call__(self, batch: pa.RecordBatch, first_index: int) -> tuple[pa.Table, list[str | None]]:
        """One source batch -> (output table with ``self.schema``, error code per row or None)."""
        import torch

        from .ranking import rank, scores_from_logits, zero_shot_logits

        n = batch.num_rows
        names = batch.schema.names
        col = {name: batch.column(i) for i, name in enumerate(names)}
        errors = col["error"].to_pylist() if "error" in col else [None] * n
        emb_col = col["embedding"]
        emb, present = embedding_matrix(emb_col, self.labels.shape[1])
        ok = np.array([e is None for e in errors], bool)
        missing = ok & ~present
        if missing.any():
            p = col["path"][int(np.flatnonzero(missing)[0])].as_py()
            raise InputError(f"row {p!r} was labeled but has no stored embedding; the source is incomplete")
        rows = np.flatnonzero(ok)
        ranked = None
        new_errors = False
        if len(rows):
            logits = zero_shot_logits(torch.from_numpy(emb[rows]), self.labels, self.scale, self.bias)
            if self.calibration is not None:
                logits = self.calibration.adjust_logits(logits)
            scores = scores_from_logits(logits, self.kind).numpy()
            finite = np.isfinite(scores).all(axis=1)
            if not finite.all():
                for r in rows[~finite]:
                    errors[r] = error_string(NON_FINITE_SCORES, "model output has NaN or infinite scores")
                ok[rows[~finite]] = False
                scores = scores[finite]
                new_errors = True
            ranked = rank(scores, self.rule)
        hier_cols = {} if self.hierarchy is None else self.hierarchy.columns(
            scores if ranked is not None else np.zeros((0, len(self.names)), np.float32), ok, self.kind,
            self.rule.min_score)
        part = result_table(self.ranked_schema, {}, self.names, None if ranked is None else ranked.indices,
                            None if ranked is None else ranked.scores, ok,
                            counts=None if ranked is None else ranked.counts,
                            abstained=None if ranked is None else ranked.abstained)
        arrays = []
        for f in self.schema:
            if f.name in part.schema.names:
                arrays.append(part.column(f.name).combine_chunks())
            elif f.name in hier_cols:
                arrays.append(pa.array(hier_cols[f.name], f.type))
            elif f.name == "error":
                arrays.append(pa.array(errors, pa.string()))
            elif f.name == "embedding":
                arr = emb_col.cast(f.type)
                if new_errors:  # a full run nulls the embedding of a non_finite_scores row
                    arr = pa.FixedSizeListArray.from_arrays(arr.values.slice(arr.offset * f.type.list_size,
                                                                             n * f.type.list_size),
                                                            f.type.list_size, mask=pa.array(~ok))
                arrays.append(arr)
            elif f.name in col:
                arrays.append(col[f.name].cast(f.type))
            elif f.name == "input_index":
                arrays.append(pa.array(np.arange(first_index, first_index + n, dtype=np.int64)))
            else:
                arrays.append(pa.nulls(n, f.type))
        return pa.Table.from_arrays(arrays, schema=self.schema), [error_code(e) for e in errors]
