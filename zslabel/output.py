"""Output contract: the column names and Parquet schema, row tables, which files of an output
are visible, the output location and the run manifest.

This module is the only place that spells the output's column names; every other module uses
the constants below.

Every Parquet file of a run has exactly ``output_schema(...)``; error rows carry nulls in
``labels``/``scores`` but the column types never change (a file of only failed rows still has
``list<string>`` labels). The run manifest ``_run_manifest.json`` sits beside the data (its
leading underscore makes Parquet readers skip it) and is written last.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from .errors import InputError, OutputError
from .storage import url_to_fs

MANIFEST_NAME = "_run_manifest.json"

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
# Columns the writer owns; any other (string) column is carried from the input.
OWNED_COLUMNS = (PATH, INPUT_INDEX, LABELS, SCORES, ERROR, WIDTH, HEIGHT, ABSTAINED, EMBEDDING)

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


def output_schema(carried_columns: Sequence[str] = (), embedding_dim: int | None = None,
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
        fields.append(pa.field(EMBEDDING, pa.list_(value, embedding_dim)))
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


def output_filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fsspec filesystem, path without protocol)`` for an output URI or local path."""
    return url_to_fs(uri, storage_options, error=OutputError)


def is_visible(rel: str) -> bool:
    """Whether a Parquet reader of an output folder reads ``rel`` (a path relative to it): no part
    of the path starts with ``_`` or ``.`` (state, staging, manifest and temporary files)."""
    return not any(part.startswith(("_", ".")) for part in rel.split("/"))


def visible_parquet_files(rel_paths: list[str]) -> list[str]:
    """The data files of an output: the visible ``.parquet`` paths among ``rel_paths``, sorted.

    The one definition of "which Parquet files of an output are read" (store, relabel,
    evaluate and show all use it)."""
    return sorted(r for r in rel_paths if r.endswith(".parquet") and is_visible(r))


def output_parquet_files(uri: str, storage_options: dict | None = None
                         ) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    """The data files of an output folder (or the one Parquet file ``uri`` names), in name order,
    and the folder holding its run manifest.

    Returns:
        ``(fsspec filesystem, [file paths without protocol], folder path)``.

    Raises:
        InputError: ``uri`` does not exist, cannot be listed, or holds no visible Parquet file.
    """
    fs, root = output_filesystem(uri, storage_options)
    try:
        if fs.isfile(root):
            return fs, [root], posixpath.dirname(root)
        if not fs.exists(root):
            raise InputError(f"{uri} does not exist")
        root = root.rstrip("/") or root
        rel = visible_parquet_files([posixpath.relpath(f, root) for f in fs.find(root)])
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        raise InputError(f"cannot list {uri}: {type(exc).__name__}: {exc}") from exc
    if not rel:
        raise InputError(f"no Parquet files under {uri}; pass the output folder of a zslabel run")
    return fs, [posixpath.join(root, r) for r in rel], root


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str):
    """A binary file handle whose content appears at ``path`` whole when the block exits without
    an exception, and not at all otherwise: readers see the old file or the whole new one.

    Local (and network-mounted) filesystems: a hidden ``.<name>.<uuid>.tmp`` beside ``path``
    (Parquet readers skip dot files), fsync, then ``os.replace`` (atomic on POSIX); the data
    streams to disk. Other fsspec filesystems (s3, gs, az, memory): buffered in memory, then one
    upload; an object becomes visible only when its upload completes (an fsspec file closed by
    an exception would still publish what was written, hence the buffer). A crash can leave a
    hidden ``.tmp`` file, never a torn ``path``.
    """
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        parent, name = posixpath.split(fs._strip_protocol(path))
        os.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, posixpath.join(parent, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        buffer = io.BytesIO()
        yield buffer
        with fs.open(path, "wb") as fh:
            fh.write(buffer.getvalue())


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`open_atomic`)."""
    with open_atomic(fs, path) as fh:
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
