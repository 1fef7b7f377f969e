"""Input kind ``parquet``: Parquet files holding encoded image bytes (img2dataset layout: ``jpg`` +
``url`` + ``key`` + ``caption``), read streaming in one Ray task per file.

Each row is one input: ``path`` is its ``url`` when set, else ``FILE#ROW``; a null image cell
is that row's ``read_error``; an unreadable file is one ``read_error`` row. Every row is listed
(``listed == rows``, nothing skipped). A single ``.parquet`` named in auto mode whose schema has
no image-bytes column is a manifest (a list of paths), and is planned as one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..errors import INTERNAL_ERROR, READ_ERROR, InputError, error_string
from .blocks import EMIT_ROWS, STREAM_BLOCK_SIZE, error_table, schema_with, streaming_plan
from .common import (FILE_INDEX_STRIDE, InputKind, InputOptions, InputPlan, error_row_detail,
                     internal_error_detail, is_hidden, strip_compression)
from .manifest import plan_manifest

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("jpg", "png", "image", "webp", "bytes")
CARRIED = ("key", "url", "caption")
SUFFIXES = (".parquet",)


def plan_parquet(uri: str, options: InputOptions) -> InputPlan:
    """Plan a Parquet file, a glob of them or a folder of them; see the module docstring.

    Raises:
        InputError: no Parquet files, an unreadable first file, no image-bytes column.
    """
    so = options.storage_options
    fs, fs_path = storage.url_to_fs(uri, so)
    if storage.is_pattern(uri, so):
        files = [storage.uri_maker(uri, fs)(p) for p in sorted(fs.glob(fs_path)) if p.lower().endswith(SUFFIXES)]
    elif strip_compression(uri.rstrip("/").lower()).endswith(SUFFIXES) and not fs.isdir(fs_path):
        files = [uri]
    else:  # a folder, also one named like a file (Spark writes "table.parquet/part-*.parquet")
        root = fs_path.rstrip("/")
        files = [storage.uri_maker(uri, fs)(p) for p in sorted(fs.find(root))
                 if p.lower().endswith(SUFFIXES) and not is_hidden(p[len(root):].lstrip("/"))]
    if not files:
        raise InputError(f"no Parquet files found at {uri}")
    if options.auto and options.image_column is None and len(files) == 1:
        if find_image_column(_schema(files[0], so), None, files[0], required=False) is None:
            return plan_manifest(files[0], options)
    return plan_files(files, options)


def plan_files(files: list[str], options: InputOptions) -> InputPlan:
    """Plan the given Parquet file URIs (no listing); the first file's schema picks the columns."""
    schema = _schema(files[0], options.storage_options)
    image_col = find_image_column(schema, options.image_column, files[0])
    carried = [c for c in CARRIED if c in schema.names]
    return streaming_plan("parquet", files, read_parquet, options.storage_options, carried,
                          image_column=image_col, carried_columns=carried)


def _schema(uri: str, storage_options: dict) -> pa.Schema:
    import pyarrow.parquet as pq

    fs, fs_path = storage.url_to_fs(uri, storage_options)
    try:
        with fs.open(storage.open_path(fs, fs_path), "rb") as f:
            return pq.read_schema(f)
    except Exception as exc:
        raise InputError(f"cannot read Parquet file {uri}: {error_row_detail(exc)}") from exc


def find_image_column(schema: pa.Schema, wanted: str | None, uri: str, *, required: bool = True
                      ) -> str | None:
    """The image-bytes column: ``wanted``, else the first binary column named as in
    ``IMAGE_COLUMN_CANDIDATES``; None when there is none and not ``required``.

    Raises:
        InputError: ``wanted`` is missing, or none found and ``required``.
    """
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    if wanted is not None:
        if wanted not in schema.names:
            raise InputError(f"image column {wanted!r} not found in {uri}; columns: "
                             f"{', '.join(schema.names)}")
        return wanted
    for cand in IMAGE_COLUMN_CANDIDATES:
        if cand in binary:
            return cand
    if required:
        raise InputError(f"no image-bytes column in {uri} (looked for binary columns named "
                         f"{', '.join(IMAGE_COLUMN_CANDIDATES)}); columns: "
                         f"{', '.join(schema.names)}; name one with image_column")
    return None


def _rows(rb: pa.RecordBatch, uri: str, first: int, index: pa.Array, image_column: str,
          carried: list[str]) -> pa.Table:
    """One record batch as rows (``schema_with(carried)``); ``first`` = its first row number."""
    n = rb.num_rows
    own = pc.binary_join_element_wise(uri + "#", pa.array([str(i) for i in range(first, first + n)]), "")
    if "url" in rb.schema.names:
        url = rb.column("url").cast(pa.string())
        path = pc.if_else(pc.and_kleene(pc.is_valid(url), pc.not_equal(url, "")), url, own)
    else:
        path = own
    data = rb.column(image_column).cast(pa.binary())
    read_error = pc.if_else(pc.is_null(data), pa.scalar(error_string(
        READ_ERROR, f"no bytes in column {image_column!r} of {uri}")), pa.nulls(n, pa.string()))
    cols = [path, index, data, read_error]
    cols += [rb.column(c).cast(pa.string()) if c in rb.schema.names else pa.nulls(n, pa.string())
             for c in carried]
    return pa.Table.from_arrays(cols, schema=schema_with(carried))


def read_parquet(uri: str, file_index: int, storage_options: dict, counts: dict, *,
                 image_column: str, carried_columns: list[str]) -> Iterator[pa.Table]:
    """Stream one Parquet file by record batches of ``EMIT_ROWS``; fills ``counts["listed"]``.

    Never raises: an unreadable file ends with one ``read_error`` row for the file URI; a bug
    while handling one record batch makes each of its rows an ``internal_error``.
    """
    import pyarrow.parquet as pq

    carried = carried_columns
    row = 0
    base = file_index * FILE_INDEX_STRIDE
    try:
        fs, fs_path = storage.url_to_fs(uri, storage_options)
        with fs.open(storage.open_path(fs, fs_path), "rb", block_size=STREAM_BLOCK_SIZE) as f:
            pf = pq.ParquetFile(f)
            columns = [image_column, *[c for c in carried if c in pf.schema_arrow.names]]
            for rb in pf.iter_batches(batch_size=EMIT_ROWS, columns=columns):
                n = rb.num_rows
                index = pa.array(range(base + row, base + row + n), pa.int64())
                try:
                    table = _rows(rb, uri, row, index, image_column, carried)
                except Exception as exc:  # noqa: BLE001 - a bug costs these rows, not the file
                    detail = internal_error_detail(f"{uri} rows {row}..{row + n - 1}", exc, logger)
                    table = error_table([f"{uri}#{i}" for i in range(row, row + n)], index.to_pylist(),
                                        error_string(INTERNAL_ERROR, detail), carried)
                row += n
                counts["listed"] = row
                yield table
    except Exception as exc:  # noqa: BLE001 - a bad file is one error row, not a failed job
        logger.warning("cannot read Parquet %s: %s", uri, error_row_detail(exc))
        counts["listed"] = row + 1
        yield error_table([uri], [base + row], error_string(READ_ERROR, f"parquet {error_row_detail(exc)}"),
                          carried)


KIND = InputKind(
    name="parquet",
    summary="Parquet files of encoded image bytes (img2dataset: jpg + url/key/caption), a glob "
            "or folder of them; one Ray task streams each file",
    detect=lambda uri, pattern: strip_compression(uri.rstrip("/").lower()).endswith(SUFFIXES),
    plan=plan_parquet, plan_files=plan_files, file_suffixes=SUFFIXES)
