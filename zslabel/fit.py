"""``zslabel fit``: fit a few-shot head (``zslabel.heads``) on a run's stored embeddings and ground truth.

    run output (--store-embeddings) + run manifest     ground truth (evaluate.load_ground_truth)
      -> pass 1: path and error columns, a record batch at a time -> rows matching the ground
         truth (evaluate.match_ground_truth: full path, then unique file name)
      -> pass 2: embedding column, a record batch at a time -> (M, D) float32 of the matched rows
         only (relabel.embedding_matrix: renormalised)
      -> the run's checkpoint embeds the run's labels and templates (labels.build_label_set; its
         digest checked against the run's as relabel does) -> the zero-shot classifier
      -> heads.fit_report (split, cross-validation, held-out before/after, learning curve, refit)
      -> head file (safetensors + metadata), report on stdout

Memory: the matched rows' embeddings (M x D float32), plus one record batch while reading (never
the whole output table); then ``heads.fit_report``'s: a copy of the fit rows' embeddings and
their zero-shot logits (0.7 M x C float32 with the default 30% held out), one chunk of rows at a
time for everything else. At 100,000 x 1,000 (D = 512) the process peaked at 1,470 MB
(``benchmarks/fit_scale.py``, 2026-12-05). Every refusal (no embeddings, ground truth
naming no label of the run, one label only, NaN embeddings, another checkpoint) happens before
anything is written. No Ray.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .errors import ConfigError, InputError

log = logging.getLogger(__name__)
BATCH_ROWS = 8192


def read_labeled_embeddings(run: str, ground_truth: str, storage_options: dict | None = None
                            ) -> tuple[np.ndarray, np.ndarray, dict, dict[str, Any]]:
    """The embeddings of the run's labeled rows that the ground truth names, and their labels.

    Returns:
        ``(x (M, D) float32 renormalised, y (M,) int64 label index in the run's labels, run
        manifest, counts)``; counts: ground-truth images, matched (by file name), errored rows,
        rows without an embedding, images whose label is not a label of the run (and those labels).

    Raises:
        InputError: no run manifest with model and labels, no Parquet file, no ``embedding``
            column (a run without ``--store-embeddings``), no row matching the ground truth, or no
            matched image whose label is one of the run's labels.
    """
    from .calibrate import label_index
    from .evaluate import _basename, as_candidates, load_ground_truth, match_ground_truth, normalise_path
    from .relabel import embedding_matrix
    from .store import footer_checked_batches, output_parquet_files, read_manifest

    fs, files, root = output_parquet_files(run, storage_options)
    manifest = read_manifest(root, storage_options)
    if manifest is None or not manifest.get("labels") or not (manifest.get("model") or {}).get("id"):
        raise InputError(f"{run} has no run manifest with model and labels (_run_manifest.json); fit needs the "
                         "output folder of a finished `zslabel label --store-embeddings` (or relabel) run")
    labels = list(manifest["labels"])
    gt = load_ground_truth(ground_truth, storage_options)
    wanted_paths, wanted_names = set(gt.paths), {_basename(p) for p in gt.paths}

    # Pass 1: which rows (file, row) are candidates; paths and errors only.
    where: dict[str, tuple[int, int]] = {}
    errored: dict[str, bool] = {}
    examples: list[str] = []
    dim = None
    for fi, f in enumerate(files):
        with fs.open(f, "rb") as fh:
            reader = pq.ParquetFile(fh)
            names = reader.schema_arrow.names
            if "embedding" not in names:
                raise InputError(f"{f} has no 'embedding' column: fit needs stored image embeddings; label the "
                                 "sample with `zslabel label ... --store-embeddings` and fit on that output")
            dim = dim or getattr(reader.schema_arrow.field("embedding").type, "list_size", None)
            cols = ["path"] + (["error"] if "error" in names else [])
            row = 0
            for batch in footer_checked_batches(reader, f, batch_size=BATCH_ROWS, columns=cols):
                paths = [normalise_path(p) for p in batch.column(0).to_pylist()]
                errs = batch.column(1).to_pylist() if len(cols) > 1 else [None] * len(paths)
                examples += paths[:2 - len(examples)]
                for i, p in enumerate(paths):
                    if (p in wanted_paths or _basename(p) in wanted_names) and p not in where:
                        where[p] = (fi, row + i)
                        errored[p] = errs[i] is not None
                row += len(paths)
    matches, unmatched, by_name = match_ground_truth(gt, where)
    if not matches:
        raise InputError(f"no row of {run} matches ground truth {ground_truth} (compared as normalised full paths, "
                         f"then unique file names; output paths e.g. {examples}, ground truth e.g. "
                         f"{list(gt.paths[:2])}); are they the same images?")
    index = label_index(labels)
    gt, mapped = as_candidates(gt, index)
    chosen: dict[tuple[int, int], int] = {}
    unknown: dict[str, int] = {}
    n_err = 0
    for gi, key in matches:
        truth = gt.labels[gi]
        if errored[key]:
            n_err += 1
        elif truth not in index:
            unknown[truth] = unknown.get(truth, 0) + 1
        else:
            chosen[where[key]] = index[truth]
    counts: dict[str, Any] = {"ground_truth_images": len(gt.paths), "matched": len(matches),
                              "matched_by_basename": by_name, "unmatched_ground_truth": len(unmatched),
                              "errored": n_err, "unknown_label_images": sum(unknown.values()),
                              "unknown_labels": sorted(unknown)}
    if mapped:
        counts["truth_labels_mapped"] = mapped
    if not chosen:
        raise InputError(f"{len(matches)} rows of {run} match {ground_truth} but none is usable: {n_err} errored; "
                         f"{sum(unknown.values())} images name {len(unknown)} labels that are not labels of the run "
                         f"(e.g. {sorted(unknown)[:5]}; the run's labels e.g. {labels[:5]})")
    if unknown:
        log.warning("%d ground-truth images name %d labels that are not labels of the run and are left out: %s",
                    sum(unknown.values()), len(unknown), sorted(unknown)[:10])

    # Pass 2: only the chosen rows' embeddings, into one preallocated matrix. ``keys`` are sorted by
    # (file, row), so a file's chosen rows fill consecutive slots from its first one.
    keys = sorted(chosen)
    x = None
    y = np.array([chosen[k] for k in keys], np.int64)
    key_files = np.array([k[0] for k in keys], np.int64)
    key_rows = np.array([k[1] for k in keys], np.int64)
    missing = 0
    for fi in np.unique(key_files):
        first = int(np.searchsorted(key_files, fi, side="left"))
        rows_here = key_rows[first:int(np.searchsorted(key_files, fi, side="right"))]
        with fs.open(files[fi], "rb") as fh:
            reader = pq.ParquetFile(fh)
            start = 0
            for batch in footer_checked_batches(reader, files[fi], batch_size=BATCH_ROWS, columns=["embedding"]):
                lo, hi = np.searchsorted(rows_here, [start, start + batch.num_rows])
                if hi > lo:
                    take = rows_here[lo:hi] - start
                    col = batch.column(0).take(take)
                    d = dim or max((len(v) for v in col.to_pylist() if v is not None), default=0)
                    emb, present = embedding_matrix(col, d)
                    if x is None:
                        x = np.zeros((len(keys), d), np.float32)
                    x[first + lo:first + hi] = emb
                    missing += int((~present).sum())
                    y[first + lo + np.flatnonzero(~present)] = -1
                start += batch.num_rows
    counts["without_embedding"] = missing
    keep = y >= 0
    if missing:
        log.warning("%d matched labeled rows have no stored embedding and are left out", missing)
    counts["used"] = int(keep.sum())
    assert x is not None
    return x[keep], y[keep], manifest, counts


def run_fit(run: str, ground_truth: str, *, head_path: str, holdout: float = 0.3, seed: int = 0,
            folds: int = 5, learning_curve: bool = True, storage_options: dict | None = None,
            progress=None):
    """Fit a head for the run in ``run`` and write it to ``head_path`` (the module docstring).

    Returns:
        The saved ``heads.Head`` (``fit`` holds the report's figures).

    Raises:
        InputError: see ``read_labeled_embeddings``; one label only; NaN embeddings.
        ConfigError: bad ``holdout``/``folds``; a checkpoint other than the run's; embeddings of
            another size than the model's.
        ModelLoadError: the run's checkpoint cannot be loaded.
    """
    from . import heads
    from .labels import build_label_set
    from .model import checkpoint_digest, load_model, resolve_checkpoint
    from .relabel import check_same_model
    from .store import refuse_inside_output

    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"--holdout must be in [0, 1) (got {holdout})")
    if folds < 2:
        raise ConfigError(f"--folds must be >= 2 (got {folds})")
    refuse_inside_output(head_path, storage_options, "a head file", one_file=True)
    t0 = time.perf_counter()
    x, y, manifest, counts = read_labeled_embeddings(run, ground_truth, storage_options)
    labels, templates = list(manifest["labels"]), list(manifest.get("templates") or [])
    heads.check_sample(x, y, len(labels), labels)  # NaN, single label: before the model loads
    read_s = time.perf_counter() - t0
    model = manifest["model"]
    path = resolve_checkpoint(model["id"], model.get("revision"), storage_options)
    digest = checkpoint_digest(path)
    check_same_model(manifest, model["id"], model.get("revision"), digest)
    zs_model = load_model(path)
    label_set = build_label_set(labels, templates, zs_model, digest=digest)
    if x.shape[1] != label_set.embeddings.shape[1]:
        raise ConfigError(f"the stored embeddings have {x.shape[1]} dimensions but {model['id']} embeds labels in "
                          f"{label_set.embeddings.shape[1]}; they come from another model")
    zs = heads.ZeroShot(np.asarray(label_set.embeddings, np.float32), zs_model.logit_scale, zs_model.logit_bias,
                        zs_model.score_kind)
    del zs_model
    result, facts = heads.fit_report(x, y, zs, labels, holdout=holdout, seed=seed, folds=folds,
                                     learning_curve_shots=heads.SHOTS if learning_curve else None, log=progress)
    facts.update(matching=counts, run=run, read_seconds=read_s, total_seconds=time.perf_counter() - t0)
    head = heads.head_from_fit(result, zs, labels=labels, templates=templates, checkpoint_digest=digest,
                               model=model.get("id"), fit=facts)
    head.save(head_path, storage_options)
    return head
