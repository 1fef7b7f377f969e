"""Relabel stored image embeddings with new labels/templates: the text tower only, no image read.

An earlier ``zslabel label --store-embeddings`` run wrote each image's L2-normalised embedding
beside its labels. The zero-shot scores depend on the image only through that embedding
(``ranking.zero_shot_logits``), so new labels cost one text-tower pass plus an (N, D) x (D, C)
product, instead of fetching and decoding every image again:

    source Parquet files --(stream per file, per batch)--> embeddings (B, D) float32, renormalised
      -> logits = exp(logit_scale) * emb @ labels.T (+ logit_bias) -> softmax / sigmoid -> rank
      -> same output schema and run manifest as ``zslabel label`` with the same options

One process, no Ray: it is matrix products over Parquet batches, so memory is bounded by the
batch size whatever the number of rows. The output is written through the store's commit
protocol, as ``zslabel label`` writes: one committed file per source file, staged and swapped
for ``--overwrite``, resumable with ``--resume``. The embeddings must come from the same checkpoint as the
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

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import job
from .errors import ConfigError, InputError
from .labels import DEFAULT_TEMPLATE
from .options import DEFAULT_TOP_K, LabelingOptions
from .output import (
    ABSTAINED,
    EMBEDDING,
    ERROR,
    INPUT_INDEX,
    LABELS,
    OWNED_COLUMNS,
    PATH,
    SCORES,
    output_schema,
    result_table,
)
from .progress import Progress
from .scoring import ZeroShotClassifier, score_rows
from .storage import canonical_location, protocols
from .store import (
    MANIFEST_NAME,
    Accounting,
    drop_committed,
    footer_checked_batches,
    not_done,
    open_part,
    output_filesystem,
    output_parquet_files,
    read_manifest,
    stamped_metadata,
)
from .summary import summary_of_finished

log = logging.getLogger(__name__)


@dataclass
class RelabelConfig(LabelingOptions):
    """Configuration of one relabel job: the shared ``LabelingOptions`` (labels, templates,
    model, ranking, storage, output and mode, as for ``zslabel label``) plus:

    Attributes:
        source: an earlier run's output folder (or one of its Parquet files, or any Parquet
            dataset with ``path`` and a fixed-size-list ``embedding`` column), local or fsspec URI.
        templates, top_k: default None: the source run's (its run manifest), else the label
            defaults ("This is a photo of {}.", 5); a relabel never silently resets them.
        model, revision: default None: the model recorded in the source's run manifest. Refused
            when its digest differs from the source's.
        batch_size: source rows per batch (bounds memory: about batch_size x (D + C) floats).
        store_embeddings: copy the source ``embedding`` column (same dtype) into the output, so
            the output can itself be relabeled.
    """

    source: str = ""
    model: str | None = None
    # None: the source run's (``RelabelSource.recorded_settings``), so that relabeling with new
    # labels keeps the prompt templates and top-k the source was labeled with.
    templates: list[str] | None = None  # type: ignore[assignment]
    top_k: int | None = None  # type: ignore[assignment]
    batch_size: int = 8192
    store_embeddings: bool = True

    def validate(self):
        """Check everything that needs neither the model nor storage.

        Returns:
            The validated ``ranking.RankingRule``.

        Raises:
            ConfigError: naming the first bad setting.
        """
        if not self.source:
            raise ConfigError("no source given: pass an earlier run's output (made with --store-embeddings)")
        rule = super().validate()
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {self.batch_size})")
        out, src = (_location(u, self.storage_options) for u in (self.output, self.source))
        if out == src or out.startswith(src.rstrip("/") + "/"):
            raise ConfigError(f"--output {self.output} is the source (or inside it); choose another location")
        return rule


def _location(uri: str, storage_options: dict) -> str:
    """``protocol://path`` of ``uri``, to compare two locations (``storage.canonical_location``).
    Compared as written, ``/r//run`` was not the source ``/r/run``, and ``relabel --overwrite``
    replaced the source run it was reading."""
    fs, path = output_filesystem(uri, storage_options)
    return f"{protocols(fs)[0]}://{canonical_location(fs, path)}"


@dataclass
class RelabelSource:
    """The source of a relabel: its Parquet files, their rows and the run manifest beside them.

    Attributes:
        files: file paths (without protocol) in name order; ``rows``: (F,) int64 rows per file
            (from the footers); ``starts``: (F,) int64 ``input_index`` of each file's first row:
            rows are numbered in file order, so a resumed relabel numbers them the same way.
        schema: the first file's Arrow schema; ``dim``: its embedding size (None for plain lists).
        manifest: the run manifest beside the files, or None.
    """

    uri: str
    fs: Any
    files: list[str]
    root: str
    rows: np.ndarray
    starts: np.ndarray
    schema: pa.Schema
    dim: int | None
    manifest: dict | None

    @classmethod
    def open(cls, uri: str, storage_options: dict) -> "RelabelSource":
        """List and check the source (footers only).

        Raises:
            InputError: no source, no Parquet file, a footer that cannot be read, no ``path`` or
                ``embedding`` column.
        """
        fs, files, root = output_parquet_files(uri, storage_options)
        rows = np.zeros(len(files), np.int64)
        schema = None
        for i, f in enumerate(files):
            try:
                with fs.open(f, "rb") as fh:
                    meta = pq.read_metadata(fh)
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"cannot read relabel source file {f}: {type(exc).__name__}: {exc}") from exc
            rows[i] = meta.num_rows
            # Every file's columns, here, before anything is written: a foreign Parquet file
            # (another tool's stats.parquet) was met only while relabeling, after part files
            # had been committed to the new output.
            file_schema = meta.schema.to_arrow_schema()
            if schema is None:
                schema = file_schema
            elif _embedding_dim(file_schema, f) != _embedding_dim(schema, uri):
                raise InputError(f"relabel source file {f} holds embeddings of another size than {files[0]}")
        starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        manifest = read_manifest(root, storage_options)
        if manifest is None:
            log.warning("no %s beside %s: the model that made the embeddings cannot be checked", MANIFEST_NAME, uri)
        return cls(uri, fs, files, root, rows, starts, schema, _embedding_dim(schema, uri), manifest)

    def recorded_model(self, model: str | None, revision: str | None) -> tuple[str, str | None]:
        """``(model, revision)``: the ones given, else those the source's run manifest records.

        Raises:
            ConfigError: none given and none recorded.
        """
        if model:
            return model, revision
        recorded = (self.manifest or {}).get("model") or {}
        if not recorded.get("id"):
            raise ConfigError(f"no run manifest beside {self.uri} records its model; pass --model "
                              "(the checkpoint that made the embeddings)")
        return recorded["id"], recorded.get("revision")

    def recorded_settings(self, templates: list[str] | None, top_k: int | None) -> tuple[list[str], int]:
        """``(templates, top_k)``: the ones given, else the source run's, else the defaults."""
        config = (self.manifest or {}).get("config") or {}
        if templates is None:
            templates = list((self.manifest or {}).get("templates") or [DEFAULT_TEMPLATE])
            log.info("templates from the source run: %s", templates)
        if top_k is None:
            top_k = int(config.get("top_k") or DEFAULT_TOP_K)
            log.info("top-k from the source run: %d", top_k)
        return templates, top_k

    def recorded_labels(self) -> list[str]:
        """The source run's labels (its run manifest), for ``relabel --head`` without ``--labels``:
        a head is fitted on a run's labels, so they are the ones it scores.

        Raises:
            ConfigError: no run manifest beside the source records labels.
        """
        labels = (self.manifest or {}).get("labels")
        if not labels:
            raise ConfigError(f"no run manifest beside {self.uri} records its labels: pass --labels or --labels-file")
        log.info("labels from the source run: %d labels", len(labels))
        return list(labels)

    def input_index(self, i: int) -> np.ndarray:
        """(rows[i],) int64 ``input_index`` of file ``i``'s rows: the source's own column when it
        has one (a zslabel output), else the file's rows numbered from ``starts[i]``."""
        if INPUT_INDEX not in self.schema.names:
            return np.arange(self.starts[i], self.starts[i] + self.rows[i], dtype=np.int64)
        batches = list(self.batches(i, [INPUT_INDEX], max(1, int(self.rows[i]))))
        return np.concatenate([b.column(0).to_numpy(zero_copy_only=False) for b in batches] or
                              [np.zeros(0)]).astype(np.int64)

    def batches(self, i: int, columns: list[str], batch_size: int):
        """Record batches of file ``i``; a file that cannot be read raises InputError naming it.

        Raises:
            InputError: unreadable file, or another embedding size than ``dim``.
        """
        f = self.files[i]
        try:
            with self.fs.open(f, "rb") as fh:
                reader = pq.ParquetFile(fh)
                file_dim = _embedding_dim(reader.schema_arrow, f)
                if file_dim is not None and self.dim is not None and file_dim != self.dim:
                    raise InputError(f"{f} holds {file_dim}-dimensional embeddings, other files {self.dim}")
                names = reader.schema_arrow.names
                yield from footer_checked_batches(reader, f, batch_size=batch_size,
                                                  columns=[c for c in columns if c in names])
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read relabel source file {f}: {type(exc).__name__}: {exc}; the files "
                             "committed so far are kept (with --overwrite, the previous output is unchanged): "
                             "fix the file and rerun with --resume") from exc


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
    if EMBEDDING not in schema.names:
        raise InputError(f"{source} has no 'embedding' column; label the images once with "
                         "`zslabel label ... --store-embeddings`, then relabel that output")
    if PATH not in schema.names:
        raise InputError(f"{source} has no 'path' column")
    t = schema.field(EMBEDDING).type
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


def run_relabel_job(config: RelabelConfig, progress: bool = True):
    """Relabel the embeddings of ``config.source`` with new labels into ``config.output``, through
    the same commit protocol as ``zslabel label`` (``store``): one committed file per source
    file; ``--overwrite`` stages the new output and swaps it in only when every file is written;
    ``--resume`` finishes a relabel that stopped part way, of the same source run (a source
    labeled again since is refused: its rows are numbered afresh).
    ``progress``: show rows done / total, rate, errors and ETA on stderr (``zslabel.progress``).

    Returns:
        ``summary.RunSummary`` (rows, labeled, errors by code, timings, manifest path).

    Raises:
        ConfigError: invalid labels/templates/flags, a model other than the source's, an
            embedding dimension that differs from the model's, --multi-label on a softmax model.
        InputError: no source, no Parquet files, no ``embedding`` column, an unreadable source
            file, a labeled row without an embedding.
        ModelLoadError: the checkpoint cannot be loaded.
        OutputError: the output holds data (without --overwrite/--resume), or a --resume whose
            settings differ, or the output cannot be written.
        All before the model loads, except model checks, and the source checks made while
        reading (an unreadable file, a labeled row without an embedding): those stop the job
        with the files committed so far kept (staged for --overwrite: the old output stays
        whole) and no run manifest; ``--resume`` then finishes it.
    """
    so = config.storage_options
    if not config.source:
        config.validate()  # names the missing source
    source = RelabelSource.open(config.source, so)
    config.model, config.revision = source.recorded_model(config.model, config.revision)
    config.templates, config.top_k = source.recorded_settings(config.templates, config.top_k)
    if config.head and not config.labels and not config.labels_file:
        config.labels = source.recorded_labels()
    prepared = job.prepare(config, config.source,
                           check_model=lambda digest: check_same_model(source.manifest, config.model,
                                                                      config.revision, digest))
    if isinstance(prepared, job.FinishedRun):
        return summary_of_finished(*prepared)  # nothing left to do
    with prepared.claimed():
        dim = prepared.label_set.embeddings.shape[1]
        if source.dim is not None and source.dim != dim:
            raise ConfigError(f"the source embeddings have {source.dim} dimensions but {config.model} embeds labels "
                              f"in {dim}; they come from another model")
        schema, emb_dtype = relabel_output_schema(config, prepared, source, dim)
        # Made before the output changes: a classifier that cannot be built (torch, the device)
        # leaves no write session behind.
        scorer = _Scorer(prepared.classifier(), schema)
        src_manifest = source.manifest or {}
        # The source run itself, not only its settings: a source labeled again (--overwrite)
        # renumbers its rows, and a --resume by input_index kept stale rows or counted too many.
        # Only when known: a source without a manifest (any Parquet with embeddings) has none.
        source_run = {"source_run": src_manifest["run_id"]} if src_manifest.get("run_id") else {}
        session = job.begin(prepared, schema, preprocess=src_manifest.get("preprocess"),
                            extra_fields={"source_fingerprint": src_manifest.get("fingerprint"), **source_run})
        t_run = time.perf_counter()
        written = _relabel_files(config, source, session, scorer, progress)
        prepared.timings["labeling_s"] = time.perf_counter() - t_run
        facts = relabel_facts(config, prepared, source, emb_dtype)
        return job.finish(prepared, session, "relabel", **facts, files_this_run=written,
                          accounting=Accounting(int(sum(source.rows))))


def relabel_output_schema(config: RelabelConfig, prepared: job.PreparedJob, source: RelabelSource,
                          dim: int) -> tuple[pa.Schema, str]:
    """The output schema (the source's string columns carried) and the embedding dtype."""
    carried = [f.name for f in source.schema if f.name not in OWNED_COLUMNS
               and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]
    dropped = [n for n in source.schema.names if n not in OWNED_COLUMNS and n not in carried]
    if dropped:
        log.warning("source columns %s are not strings and are not carried into the relabeled output", dropped)
    emb_type = source.schema.field(EMBEDDING).type
    emb_dtype = "float32" if pa.types.is_float32(emb_type.value_type) else "float16"
    schema = output_schema(carried, dim if config.store_embeddings else None, emb_dtype,
                           abstained=config.min_score is not None, hierarchy=prepared.hierarchy is not None)
    return schema, emb_dtype


def _relabel_files(config: RelabelConfig, source: RelabelSource, session, scorer: "_Scorer", progress: bool) -> int:
    """Score every source file not yet committed into one committed output file each (rows of
    ``scorer.schema``); returns the number of files written."""
    schema = scorer.schema
    # Only what the output needs: the source's labels/scores are never read.
    columns = [n for n in source.schema.names if n in schema.names or n in (ERROR, EMBEDDING)]
    stamped = schema.with_metadata(stamped_metadata(schema, session.target))
    written = 0
    total = max(0, int(sum(source.rows)) - len(session.done))
    with Progress(total, enabled=progress, unit="rows", desc="relabeling") as shown:
        for i, (start, n) in enumerate(zip(source.starts, source.rows)):
            # One committed file per source file; its rows keep their source order and numbering.
            todo = not_done(source.input_index(i), session.done)
            if not len(todo):
                continue
            with open_part(session.target, todo) as (fh, _), pq.ParquetWriter(fh, stamped) as writer:
                first = int(start)
                for batch in source.batches(i, columns, config.batch_size):
                    table = drop_committed(scorer(batch, first), session.done)
                    first += batch.num_rows
                    writer.write_table(table)
                    shown.update(table.num_rows, table.num_rows - table.column(ERROR).null_count)
            written += 1
    return written


def relabel_facts(config: RelabelConfig, prepared: job.PreparedJob, source: RelabelSource,
                  emb_dtype: str) -> dict[str, Any]:
    """What the run manifest records of this relabel besides the counts, as ``job.finish`` takes
    them (``config``, ``preprocess``, ``input_counts``, ``extra``): the source run's settings
    with this relabel's own, and where the embeddings came from."""
    src_manifest = source.manifest or {}
    run_config = {**(src_manifest.get("config") or {}),
                  **dict(output=config.output, labels=prepared.labels, labels_file=None,
                         templates=prepared.templates, model=config.model, revision=config.revision,
                         top_k=config.top_k, min_score=config.min_score, multi_label=bool(config.multi_label),
                         threshold=config.threshold, mode=config.mode, store_embeddings=config.store_embeddings,
                         embedding_dtype=emb_dtype, calibration=config.calibration, hierarchy=config.hierarchy,
                         head=config.head)}
    recorded = src_manifest.get("model") or {}
    return dict(
        config=run_config, preprocess=src_manifest.get("preprocess"),
        input_counts=src_manifest.get("counts") or {},
        extra={"relabel": {"source": config.source, "source_model_digest": recorded.get("digest"),
                           "model_checked": source.manifest is not None, "settings": config.public_dict()}})


class _Scorer:
    """Scores one source batch with the new label embeddings and builds its output rows."""

    def __init__(self, classifier: ZeroShotClassifier, schema: pa.Schema):
        self.classifier, self.schema = classifier, schema
        self.ranked_schema = pa.schema([schema.field(n) for n in (LABELS, SCORES, ABSTAINED)
                                        if n in schema.names])

    def __call__(self, batch: pa.RecordBatch, first_index: int) -> pa.Table:
        """One source batch -> output rows with ``self.schema``; ``input_index`` is the source's,
        or ``first_index``, ``first_index + 1``, ... when the source has none."""
        import torch

        n = batch.num_rows
        names = batch.schema.names
        col = {name: batch.column(i) for i, name in enumerate(names)}
        given = col[ERROR].to_pylist() if ERROR in col else [None] * n
        emb_col = col[EMBEDDING]
        emb, present = embedding_matrix(emb_col, self.classifier.label_embeddings.shape[1])
        missing = np.array([e is None for e in given], bool) & ~present
        if missing.any():
            p = col[PATH][int(np.flatnonzero(missing)[0])].as_py()
            raise InputError(f"row {p!r} was labeled but has no stored embedding; the source is incomplete")
        scored = score_rows(self.classifier, np.array(given, dtype=object),
                            lambda rows: torch.from_numpy(emb[rows]))
        errors, ok, ranked, hier_cols = list(scored.errors), scored.ok, scored.ranked, scored.hierarchy_columns
        new_errors = errors != given
        part = result_table(self.ranked_schema, {}, self.classifier.label_names,
                            None if ranked is None else ranked.indices,
                            None if ranked is None else ranked.scores, ok,
                            counts=None if ranked is None else ranked.counts,
                            abstained=None if ranked is None else ranked.abstained)
        arrays = []
        for f in self.schema:
            if f.name in part.schema.names:
                arrays.append(part.column(f.name).combine_chunks())
            elif f.name in hier_cols:
                arrays.append(pa.array(hier_cols[f.name], f.type))
            elif f.name == ERROR:
                arrays.append(pa.array(errors, pa.string()))
            elif f.name == EMBEDDING:
                arr = emb_col.cast(f.type)
                if new_errors:  # a full run nulls the embedding of a non_finite_scores row
                    arr = pa.FixedSizeListArray.from_arrays(arr.values.slice(arr.offset * f.type.list_size,
                                                                             n * f.type.list_size),
                                                            f.type.list_size, mask=pa.array(~ok))
                arrays.append(arr)
            elif f.name in col:
                arrays.append(col[f.name].cast(f.type))
            elif f.name == INPUT_INDEX:
                arrays.append(pa.array(np.arange(first_index, first_index + n, dtype=np.int64)))
            else:
                arrays.append(pa.nulls(n, f.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)
