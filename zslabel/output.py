"""Output contract: the column names, the names of an output's own files, the Parquet schema and
the row tables. (Which files of an output are data, atomic writes and the run manifest:
``store.fsio``.)

This module is the only place that spells the output's column and file names; every other
module uses the constants below (the input listing too: an input folder skips an output's own
files, ``sources.folder``).

Every Parquet file of a run has exactly ``output_schema(...)``; error rows carry nulls in
``labels``/``scores`` but the column types never change (a file of only failed rows still has
``list<string>`` labels). The run manifest ``_run_manifest.json`` sits beside the data (its
leading underscore makes Parquet readers skip it) and is written last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# The commit marker of a finished run, beside the data; its leading underscore makes Parquet
# readers skip it. Written last.
MANIFEST_NAME = "_run_manifest.json"
# An output's own state (the unfinished run's record, its claim, staged files): a folder holding
# one is a zslabel output even before its first manifest.
STATE_DIR = "_zslabel"
RUN_RECORD = f"{STATE_DIR}/run.json"
SWAP_RECORD = f"{STATE_DIR}/swap.json"
CLAIM_RECORD = f"{STATE_DIR}/claim.json"

# Column names of the output contract.
PATH = "path"                  # string: the input's URI (tar members: "<shard>#<member>")
INPUT_INDEX = "input_index"    # int64: the input's stable position in the plan (resume key)
LABELS = "labels"              # list<string>: best first; null on error rows
SCORES = "scores"              # list<float32>: matching scores in [0, 1]
ERROR = "error"                # string "<code>: <detail>" or null (see errors.CODES)
WIDTH = "width"                # int32 pixels of the decoded image (after EXIF orientation)
HEIGHT = "height"              # int32 pixels
ABSTAINED = "abstained"        # bool, only with --min-score
EMBEDDING = "embedding"        # fixed_size_list<float16|float32>[D], only with --store-embeddings
# Only with --hierarchy (``hierarchy.Hierarchy``): the deepest label path whose rolled-up score
# reaches --min-score, that score, and the path's components; nulls when none does.
HIER_LABEL = "hier_label"      # string
HIER_SCORE = "hier_score"      # float32
HIER_PATH = "hier_path"        # list<string>
# Columns the writer owns, the hierarchy's included; any other (string) column is carried from
# the input (a carried ``hier_label`` collided with the roll-up column of that name).
OWNED_COLUMNS = (PATH, INPUT_INDEX, LABELS, SCORES, ERROR, WIDTH, HEIGHT, ABSTAINED, EMBEDDING,
                 HIER_LABEL, HIER_SCORE, HIER_PATH)

BASE_FIELDS = [
    pa.field(PATH, pa.string(), nullable=False),
    pa.field(INPUT_INDEX, pa.int64(), nullable=False),
    pa.field(LABELS, pa.list_(pa.string())),
    pa.field(SCORES, pa.list_(pa.float32())),
    pa.field(ERROR, pa.string()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
]
# Present only when the run was given --min-score, so runs without it keep the base schema.
ABSTAINED_FIELD = pa.field(ABSTAINED, pa.bool_())
# Present only with --hierarchy, appended last.
HIERARCHY_FIELDS = [
    pa.field(HIER_LABEL, pa.string()),
    pa.field(HIER_SCORE, pa.float32()),
    pa.field(HIER_PATH, pa.list_(pa.string())),
]


def output_schema(carried_columns: Sequence[str] = (), embedding_dim: int | None = None,
                  embedding_dtype: str = "float16", abstained: bool = False, hierarchy: bool = False) -> pa.Schema:
    """The fixed output schema: base columns, optional ``abstained`` (bool: best score below
    ``--min-score``; null on error rows), carried string columns, optional ``embedding``
    (fixed-size list of ``embedding_dim`` float16/float32, L2-normalised), and with
    ``hierarchy`` the roll-up columns (``HIERARCHY_FIELDS``)."""
    fields = list(BASE_FIELDS)
    if abstained:
        fields.append(ABSTAINED_FIELD)
    fields += [pa.field(c, pa.string()) for c in carried_columns]
    if embedding_dim:
        value = pa.float16() if embedding_dtype == "float16" else pa.float32()
        fields.append(pa.field(EMBEDDING, pa.list_(value, embedding_dim)))
    schema = pa.schema(fields)
    return with_hierarchy_fields(schema) if hierarchy else schema


def with_hierarchy_fields(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the ``HIERARCHY_FIELDS`` appended (idempotent)."""
    for f in HIERARCHY_FIELDS:
        if f.name not in schema.names:
            schema = schema.append(f)
    return schema


def result_table(schema: pa.Schema, columns: dict[str, Any], label_names: np.ndarray,
                 top_indices: np.ndarray | None, top_scores: np.ndarray | None,
                 ok: np.ndarray, embeddings: np.ndarray | None = None, *,
                 counts: np.ndarray | None = None, abstained: np.ndarray | None = None) -> pa.Table:
    """Assemble one batch of output rows.

    Args:
        schema: from ``output_schema``.
        columns: ``path``, ``input_index``, ``error``, ``width``, ``height`` and carried columns,
            each a length-N array (None/NaN where missing).
        label_names: (C,) object array of label names.
        top_indices: (M, k) int64 label indices for the M rows where ``ok`` is True.
        top_scores: (M, k) float32 matching scores.
        ok: (N,) bool, rows that were labeled.
        embeddings: (M, D) float32 image embeddings of the ok rows, or None.
        counts: (M,) int64 entries per ok row when rows differ in length (multi-label, see
            ``ranking.rank``); ``top_indices``/``top_scores`` are then flat (E,) arrays.
        abstained: (M,) bool per ok row; written when ``schema`` has ``abstained``.

    Returns:
        A ``pa.Table`` with exactly ``schema``; rows where ``ok`` is False have null labels/scores.
    """
    n = len(ok)
    ok_rows = np.flatnonzero(ok)
    per_row = np.zeros(n, np.int64)
    if counts is not None:
        per_row[ok_rows] = counts
    elif top_indices is not None:
        per_row[ok_rows] = top_indices.shape[1]
    valid = pa.array(ok, pa.bool_())
    offsets = np.zeros(n + 1, np.int32)
    offsets[1:] = np.cumsum(per_row)
    offsets_arr = pa.array(offsets, pa.int32())
    if top_indices is not None and top_scores is not None and top_indices.size > 0:
        flat_labels, flat_scores = label_names[top_indices.ravel()], top_scores.ravel()
    else:
        flat_labels, flat_scores = np.array([], object), np.array([], np.float32)
    null_mask = pa.compute.invert(valid)
    labels = pa.ListArray.from_arrays(offsets_arr, pa.array(flat_labels, pa.string()), mask=null_mask)
    scores = pa.ListArray.from_arrays(offsets_arr, pa.array(flat_scores, pa.float32()), mask=null_mask)
    arrays = {LABELS: labels, SCORES: scores}
    if ABSTAINED in schema.names:
        flags = np.zeros(n, bool)
        if abstained is not None and len(ok_rows):
            flags[ok_rows] = abstained
        arrays[ABSTAINED] = pa.array(flags, pa.bool_(), mask=~ok)
    if EMBEDDING in schema.names:
        field = schema.field(EMBEDDING).type
        dim = field.list_size
        full = np.zeros((n, dim), np.float32)
        if embeddings is not None and len(ok_rows):
            full[ok_rows] = embeddings
        values = pa.array(full.astype(field.value_type.to_pandas_dtype()).ravel(), field.value_type)
        arrays[EMBEDDING] = pa.FixedSizeListArray.from_arrays(values, dim, mask=null_mask)
    for name in schema.names:
        if name not in arrays:
            arrays[name] = pa.array(_clean(columns[name]), schema.field(name).type, from_pandas=True)
    return pa.Table.from_arrays([arrays[n] for n in schema.names], schema=schema)


def _clean(values: Any) -> list:
    """Convert a numpy column (object/str/float-with-NaN) to a list with None for missing."""
    out: list[Any] = []
    for v in list(values):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
        elif isinstance(v, bytes):
            out.append(v.decode("utf-8", "replace"))
        elif isinstance(v, np.generic):
            out.append(v.item())
        else:
            out.append(v)
    return out
