"""Output contract: the Parquet schema, row tables, the output location and the run manifest.

Every Parquet file of a run has exactly ``output_schema(...)``; error rows carry nulls in
``labels``/``scores`` but the column types never change (a file of only failed rows still has
``list<string>`` labels). The run manifest ``_run_manifest.json`` sits beside the data (its
leading underscore makes Parquet readers skip it) and is written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from .errors import OutputError
from .storage import url_to_fs

MANIFEST_NAME = "_run_manifest.json"
BASE_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    pa.field("input_index", pa.int64(), nullable=False),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
]
# Present only when the run was given --min-score, so runs without it keep the base schema.
ABSTAINED_FIELD = pa.field("abstained", pa.bool_())


def output_schema(carried_columns: list[str] = (), embedding_dim: int | None = None,
                  embedding_dtype: str = "float16", abstained: bool = False) -> pa.Schema:
    """The fixed output schema: base columns, optional ``abstained`` (bool: best score below
    ``--min-score``; null on error rows), carried string columns, optional ``embedding``
    (fixed-size list of ``embedding_dim`` float16/float32, L2-normalised)."""
    fields = list(BASE_FIELDS)
    if abstained:
        fields.append(ABSTAINED_FIELD)
    fields += [pa.field(c, pa.string()) for c in carried_columns]
    if embedding_dim:
        value = pa.float16() if embedding_dtype == "float16" else pa.float32()
        fields.append(pa.field("embedding", pa.list_(value, embedding_dim)))
    return pa.schema(fields)


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
    has_values = top_indices is not None and top_indices.size > 0
    flat_labels = label_names[top_indices.ravel()] if has_values else np.array([], object)
    flat_scores = top_scores.ravel() if has_values else np.array([], np.float32)
    null_mask = pa.compute.invert(valid)
    labels = pa.ListArray.from_arrays(offsets_arr, pa.array(flat_labels, pa.string()), mask=null_mask)
    scores = pa.ListArray.from_arrays(offsets_arr, pa.array(flat_scores, pa.float32()), mask=null_mask)
    arrays = {"labels": labels, "scores": scores}
    if "abstained" in schema.names:
        flags = np.zeros(n, bool)
        if abstained is not None and len(ok_rows):
            flags[ok_rows] = abstained
        arrays["abstained"] = pa.array(flags, pa.bool_(), mask=~ok)
    if "embedding" in schema.names:
        field = schema.field("embedding").type
        dim = field.list_size
        full = np.zeros((n, dim), np.float32)
        if embeddings is not None and len(ok_rows):
            full[ok_rows] = embeddings
        values = pa.array(full.astype(field.value_type.to_pandas_dtype()).ravel(), field.value_type)
        arrays["embedding"] = pa.FixedSizeListArray.from_arrays(values, dim, mask=null_mask)
    for name in schema.names:
        if name not in arrays:
            arrays[name] = pa.array(_clean(columns[name]), schema.field(name).type, from_pandas=True)
    return pa.Table.from_arrays([arrays[n] for n in schema.names], schema=schema)


def _clean(values: Any) -> list:
    """Convert a numpy column (object/str/float-with-NaN) to a list with None for missing."""
    out = []
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


def output_filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fsspec filesystem, path without protocol)`` for an output URI or local path."""
    return url_to_fs(uri, storage_options, error=OutputError)


def existing_output_files(uri: str, storage_options: dict | None = None) -> list[str]:
    """Files under the output location (empty when it does not exist)."""
    fs, root = output_filesystem(uri, storage_options)
    try:
        if not fs.exists(root):
            return []
        if not fs.isdir(root):
            raise OutputError(f"output {uri} exists and is a file, not a folder")
        return [f for f in fs.find(root)]
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        raise OutputError(f"cannot inspect output location {uri}: {type(exc).__name__}: {exc}") from exc


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never part.

    Local (and network-mounted) filesystems: a hidden ``.<name>.<uuid>.tmp`` beside ``path``
    (Parquet readers skip dot files), fsync, then ``os.replace`` (atomic on POSIX). Other
    fsspec filesystems (s3, gs, az, memory): one upload; an object becomes visible only when
    its upload completes. A crash can leave a hidden ``.tmp`` file, never a torn ``path``.
    """
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        parent, name = posixpath.split(fs._strip_protocol(path))
        os.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, posixpath.join(parent, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        with fs.open(path, "wb") as fh:
            fh.write(data)


def write_manifest(uri: str, manifest: dict, storage_options: dict | None = None) -> str:
    """Write the run manifest JSON beside the data, atomically; returns its path. Called last
    (commit marker)."""
    fs, root = output_filesystem(uri, storage_options)
    path = posixpath.join(root, MANIFEST_NAME)
    write_bytes_atomic(fs, path, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return path


def read_manifest(uri: str, storage_options: dict | None = None) -> dict | None:
    """The run manifest under ``uri``, or None when there is none."""
    fs, root = output_filesystem(uri, storage_options)
    path = posixpath.join(root, MANIFEST_NAME)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)
