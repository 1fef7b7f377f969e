"""Input kind ``parquet``: Parquet files holding encoded images, read streaming in one Ray task
per file. Two layouts of the image column:

- img2dataset: a binary column (``jpg`` + ``url`` + ``key`` + ``caption``);
- Hugging Face ``datasets`` ``Image()``: ``struct<bytes: binary, path: string>`` (found by the
  ``huggingface`` schema metadata, or by that shape). A row whose ``bytes`` is null and whose
  ``path`` is set is read from that path (relative to the Parquet file's folder), as
  ``datasets`` itself does.

Each row is one input: ``path`` is its ``url`` when set, else the struct's ``path`` when the
bytes must be read from it, else ``FILE#ROW``; a row with no bytes and no path is that row's
``read_error``; an unreadable file is one ``read_error`` row. Every row is listed (``listed ==
rows``, nothing skipped). Carried columns (``key``, ``url``, ``caption``) of any type pass as
strings; nested ones (COCO's ``list<string>`` captions) as JSON text (``common.to_text``).

A single ``.parquet``, or a folder of parts (Spark's ``part-*.parquet`` + ``_SUCCESS``), named in
auto mode whose schema has no image column is a manifest (a list of paths), planned as one.
Files beside the parts that are not Parquet are counted as skipped (``not_a_shard``/``hidden``).
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Generator

import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..errors import INTERNAL_ERROR, READ_ERROR, InputError, error_string
from .blocks import EMIT_ROWS, STREAM_BLOCK_SIZE, error_table, schema_with, streaming_plan
from .common import (
    FILE_INDEX_STRIDE,
    InputKind,
    InputOptions,
    InputPlan,
    internal_error_detail,
    is_bytes_type,
    is_hidden,
    strip_compression,
    to_text,
)
from .manifest import plan_manifest, plan_manifest_files

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
    others: list[tuple[str, str]] = []  # files beside the parts: (uri, skip reason)
    if storage.is_pattern(uri, so):
        files = [storage.uri_maker(uri, fs)(p) for p in sorted(fs.glob(fs_path)) if p.lower().endswith(SUFFIXES)]
    elif strip_compression(uri.rstrip("/").lower()).endswith(SUFFIXES) and not fs.isdir(fs_path):
        files = [uri]
    else:  # a folder, also one named like a file (Spark writes "table.parquet/part-*.parquet")
        root = fs_path.rstrip("/")
        files = []
        for p in sorted(fs.find(root)):
            hidden = is_hidden(p[len(root):].lstrip("/"))
            if p.lower().endswith(SUFFIXES) and not hidden:
                files.append(storage.uri_maker(uri, fs)(p))
            elif not p.endswith("/"):
                others.append((storage.uri_maker(uri, fs)(p), "hidden" if hidden else "not_a_shard"))
    if not files:
        raise InputError(f"no Parquet files found at {uri}")
    plan = plan_files(files, options)
    for other, reason in others:
        plan.add_planned_skip(reason, other)
    return plan


def plan_files(files: list[str], options: InputOptions) -> InputPlan:
    """Plan the given Parquet file URIs (no listing); the first file's schema picks the image
    column (a file without the image column picked so finds its own, unless ``image_column``
    named it), every file's the carried columns.
    In auto mode, files without an image column are a manifest (one file, or Spark's parts).

    The first schema is the first readable file's: a damaged file (cut short, a bad footer) is
    that file's ``read_error`` row when the rows are read (``read_parquet``), not a failed job.

    Raises:
        InputError: no file's schema can be read, no image column (when not auto), manifest errors.
    """
    schemas = _schemas(files, options)
    first, schema = schemas[0]
    if options.auto and options.image_column is None and find_image_column(
            schema, None, first, required=False) is None:
        try:
            return plan_manifest(files[0], options) if len(files) == 1 else plan_manifest_files(files, options)
        except InputError as exc:
            lists = [f.name for f in schema if _is_image_list(f.type)]
            if not lists:
                raise
            kind = schema.field(lists[0]).type
            raise InputError(f"{first}: column {lists[0]!r} holds a list of images per row ({kind}, as Hugging "
                             "Face Sequence(Image()) stores them); zslabel labels one image per row: "
                             "flatten that column to one row per image first (pyarrow.compute.list_flatten, "
                             "datasets' map with batched=True)") from exc
    image_col = find_image_column(schema, options.image_column, first)
    # Every file's: a column some parts lack (img2dataset shards written with and without
    # captions) is null in their rows, not dropped from all of them.
    carried = [c for c in CARRIED if any(c in s.names for _, s in schemas)]
    return streaming_plan("parquet", files, read_parquet, options.storage_options, carried, use_ray=options.use_ray,
                          image_column=image_col, carried_columns=carried,
                          find_own_column=options.image_column is None)


# Footers read at once while planning (each is one small ranged read; on object stores the
# latency, not the bytes, is the cost).
SCHEMA_READERS = 16


def _schemas(files: list[str], options: InputOptions) -> list[tuple[str, pa.Schema]]:
    """``(uri, schema)`` of every file whose schema can be read, in file order (at least one).
    A file that cannot be read is left out here (a warning names the first few) and becomes its
    ``read_error`` row when the rows are read.

    Raises:
        InputError: none can be read (the first file's error, and how many failed).
    """
    from concurrent.futures import ThreadPoolExecutor

    def read(uri: str) -> pa.Schema | InputError:
        try:
            return _schema(uri, options)
        except InputError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(SCHEMA_READERS, len(files))) as pool:
        got = list(pool.map(read, files))
    failures = [g for g in got if isinstance(g, InputError)]
    readable = [(uri, g) for uri, g in zip(files, got) if not isinstance(g, InputError)]
    if readable:  # the job goes on: say which files will be error rows (else the error says it)
        for exc in failures[:3]:
            logger.warning("%s", exc)
        if len(failures) > 3:
            logger.warning("... and %d more Parquet files whose schema cannot be read", len(failures) - 3)
        return readable
    if len(files) == 1:
        raise failures[0]
    raise InputError(f"none of the {len(files)} Parquet files can be read; the first: {failures[0]}") from failures[0]


def _schema(uri: str, options: InputOptions) -> pa.Schema:
    import pyarrow.parquet as pq

    fs, fs_path = storage.url_to_fs(uri, options.storage_options)
    try:
        with storage.open_input(fs, fs_path, "rb") as f:
            return pq.read_schema(f)
    except Exception as exc:
        raise InputError(f"cannot read Parquet file {uri}: {storage.describe_error(exc, options.io)}") from exc


def _is_image_list(kind: pa.DataType) -> bool:
    """A list of images in one cell (``list<struct<bytes, path>>`` or ``list<binary>``)."""
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_list_view(kind)):
        return False
    return is_image_struct(kind.value_type) or is_bytes_type(kind.value_type)


def is_image_struct(kind: pa.DataType) -> bool:
    """True for Hugging Face ``datasets``' ``Image()`` storage: a struct with a binary ``bytes``
    field (and, usually, a string ``path``)."""
    if not pa.types.is_struct(kind) or kind.get_field_index("bytes") < 0:
        return False
    inner = kind.field(kind.get_field_index("bytes")).type
    return is_bytes_type(inner)


def _hf_image_columns(schema: pa.Schema) -> list[str]:
    """Columns the ``huggingface`` schema metadata (written by ``datasets``) declares ``Image``."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
    except (KeyError, ValueError, TypeError):
        return []
    return [name for name, f in features.items()
            if isinstance(f, dict) and f.get("_type") == "Image" and name in schema.names]


def find_image_column(schema: pa.Schema, wanted: str | None, uri: str, *, required: bool = True
                      ) -> str | None:
    """The image column: ``wanted``; else a column Hugging Face metadata declares ``Image``;
    else the first column named as in ``IMAGE_COLUMN_CANDIDATES`` that is binary or an image
    struct (:func:`is_image_struct`); else the only image struct. None when there is none and
    not ``required``.

    Raises:
        InputError: ``wanted`` is missing or neither binary nor an image struct, or none found
            and ``required``.
    """
    def usable(name: str) -> bool:
        kind = schema.field(name).type
        return is_bytes_type(kind) or is_image_struct(kind)

    if wanted is not None:
        if wanted not in schema.names:
            raise InputError(f"image column {wanted!r} not found in {uri}; columns: "
                             f"{', '.join(schema.names)}")
        if not usable(wanted):
            raise InputError(f"image column {wanted!r} of {uri} is {schema.field(wanted).type}, not binary "
                             "or struct<bytes: binary, path: string>")
        return wanted
    for name in _hf_image_columns(schema):
        if usable(name):
            return name
    for cand in IMAGE_COLUMN_CANDIDATES:
        if cand in schema.names and usable(cand):
            return cand
    structs = [f.name for f in schema if is_image_struct(f.type)]
    if len(structs) == 1:
        return structs[0]
    if required:
        raise InputError(f"no image column in {uri} (looked for binary columns or Hugging Face Image "
                         f"structs named {', '.join(IMAGE_COLUMN_CANDIDATES)}); columns: "
                         f"{', '.join(schema.names)}; name one with --image-column")
    return None


def _rows(rb: pa.RecordBatch, uri: str, first: int, index: pa.Array, image_column: str,
          carried: list[str]) -> pa.Table:
    """One record batch as rows (``schema_with(carried)``); ``first`` = its first row number."""
    n = rb.num_rows
    own = pc.binary_join_element_wise(uri + "#", pa.array([str(i) for i in range(first, first + n)]), "")
    if "url" in rb.schema.names:
        url = to_text(rb.column("url"))
        path = pc.if_else(pc.and_kleene(pc.is_valid(url), pc.not_equal(url, "")), url, own)
    else:
        path = own
    image = rb.column(image_column)
    if pa.types.is_struct(image.type):
        # Hugging Face Image(): bytes inline, or (bytes null) a path to read them from.
        data = _as_binary(pc.struct_field(image, "bytes"))
        if image.type.get_field_index("path") >= 0:
            where = _resolve_paths(to_text(pc.struct_field(image, "path")), uri)
            fetch = pc.and_kleene(pc.is_null(data), pc.and_kleene(pc.is_valid(where), pc.not_equal(where, "")))
            path = pc.if_else(fetch, where, path)
        else:
            fetch = pa.array([False] * n)
        missing = pc.and_kleene(pc.is_null(data), pc.invert(fetch))
    else:
        data = _as_binary(image)
        missing = pc.is_null(data)
    read_error = pc.if_else(missing, pa.scalar(error_string(
        READ_ERROR, f"no bytes in column {image_column!r} of {uri}")), pa.nulls(n, pa.string()))
    cols = [path, index, data, read_error]
    cols += [to_text(rb.column(c)) if c in rb.schema.names else pa.nulls(n, pa.string()) for c in carried]
    return pa.Table.from_arrays(cols, schema=schema_with(carried))


# The most bytes one Arrow binary array holds (32-bit offsets).
BINARY_ARRAY_BYTES = 2**31 - 1


def _as_binary(values: pa.Array) -> pa.Array | pa.ChunkedArray:
    """Image bytes in any binary layout as ``binary``; a batch holding more than
    ``BINARY_ARRAY_BYTES`` in all (``large_binary`` or ``binary_view``: 64 images of 36 MB) as
    chunks that each fit, where one cast failed for every row of the batch ("input array too
    large")."""
    limit = BINARY_ARRAY_BYTES
    if pa.types.is_binary(values.type):
        return values
    values = values.cast(pa.large_binary())  # 64-bit offsets hold any batch; lengths work on it
    sizes = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
    if int(sizes.sum()) <= limit:
        return values.cast(pa.binary())
    def part(lo: int, hi: int) -> pa.Array:
        # take, not slice: a slice keeps the whole batch's offsets, and the cast checks those
        return values.take(pa.array(range(lo, hi), pa.int64())).cast(pa.binary())

    chunks, start, size = [], 0, 0
    for i, n in enumerate(sizes.tolist()):
        if size + n > limit and i > start:
            chunks.append(part(start, i))
            start, size = i, 0
        size += n
    chunks.append(part(start, len(values)))
    return pa.chunked_array(chunks, pa.binary())


def _resolve_paths(paths: pa.Array, uri: str) -> pa.Array:
    """Image-struct paths as readable URIs: absolute paths and URIs as they are, relative ones
    relative to the Parquet file's folder (``datasets`` writes both)."""
    base = posixpath.dirname(uri)  # the file's own URI: a "#" in it is part of a name
    out = []
    for p in paths.to_pylist():
        if p is None or p == "" or p.startswith("/") or "://" in p or p.lower().startswith("file:"):
            out.append(p)
        else:
            out.append(posixpath.join(base, p))
    return pa.array(out, pa.string())


def read_parquet(uri: str, file_index: int, storage_options: dict, counts: dict, *,
                 image_column: str, carried_columns: list[str],
                 find_own_column: bool = False) -> Generator[pa.Table, None, None]:
    """Stream one Parquet file by record batches of ``EMIT_ROWS``; fills ``counts["listed"]``.

    ``image_column``: the column of encoded images; a file without it finds its own
    (``find_image_column``) when ``find_own_column`` (the column was picked from another file's
    schema, not named by the user: a folder mixing img2dataset's ``jpg`` and a Hugging Face
    ``image`` struct), else it is that file's ``read_error`` row.

    Never raises. Read one row group at a time: a row group that cannot be read (a damaged
    page, a checksum or decompression error) makes each of its rows, whose number the footer
    gives, a ``read_error`` row (``URI#ROW``), and the next row group is read; only a file whose
    footer cannot be read (or without an image column) is one ``read_error`` row for the file
    URI, as its rows are unknown. A bug while handling one record batch makes each of its rows
    an ``internal_error``. Each group is held to its footer's row count: rows a group does not
    give (pyarrow can end a damaged group early without raising) are ``read_error`` rows, rows
    beyond the count are dropped with a warning.
    """
    import pyarrow.parquet as pq

    carried = carried_columns
    row = 0
    base = file_index * FILE_INDEX_STRIDE

    def failed_rows(first: int, n: int, error: str) -> pa.Table:
        return error_table([f"{uri}#{i}" for i in range(first, first + n)], list(range(base + first, base + first + n)),
                           error, carried)

    try:
        fs, fs_path = storage.url_to_fs(uri, storage_options)
        with storage.open_input(fs, fs_path, "rb", block_size=STREAM_BLOCK_SIZE) as f:
            pf = pq.ParquetFile(f)
            if image_column not in pf.schema_arrow.names:
                own = find_image_column(pf.schema_arrow, None, uri, required=False) if find_own_column else None
                if own is None:
                    raise InputError(f"no image column {image_column!r} (columns: {', '.join(pf.schema_arrow.names)})")
                image_column = own
            else:  # this file's column of that name must hold bytes too (a list<binary> one did not)
                find_image_column(pf.schema_arrow, image_column, uri)
            # url too when not carried: a row's path is its url wherever this file has one.
            columns = [image_column, *[c for c in carried if c in pf.schema_arrow.names]]
            if "url" in pf.schema_arrow.names and "url" not in columns:
                columns.append("url")
            for group in range(pf.num_row_groups):
                group_rows = pf.metadata.row_group(group).num_rows
                group_end = row + group_rows
                try:
                    for rb in pf.iter_batches(batch_size=EMIT_ROWS, row_groups=[group], columns=columns):
                        if row + rb.num_rows > group_end:
                            # More rows than the footer gives: the extra ones have no URI#ROW
                            # of their own (the next group's rows would be named twice).
                            logger.warning("row group %d of Parquet %s gives more rows than its footer (%d): "
                                           "the extra rows are dropped", group, uri, group_rows)
                            rb = rb.slice(0, group_end - row)
                        n = rb.num_rows
                        if n == 0:
                            continue
                        index = pa.array(range(base + row, base + row + n), pa.int64())
                        try:
                            table = _rows(rb, uri, row, index, image_column, carried)
                        except Exception as exc:  # noqa: BLE001 - a bug costs these rows, not the file
                            detail = internal_error_detail(f"{uri} rows {row}..{row + n - 1}", exc, logger)
                            table = failed_rows(row, n, error_string(INTERNAL_ERROR, detail))
                        row += n
                        counts["listed"] = row
                        yield table
                except Exception as exc:  # noqa: BLE001 - a damaged row group costs its own rows
                    logger.warning("cannot read row group %d of Parquet %s: %s", group, uri,
                                   storage.describe_error(exc))
                    if group_end > row:
                        yield failed_rows(row, group_end - row, error_string(
                            READ_ERROR, f"parquet row group {group}: {storage.describe_error(exc)}"))
                else:
                    if group_end > row:
                        # pyarrow can end a damaged group's batches early without an error
                        # (a page header whose value count was overwritten): the footer's
                        # count, not the reader, says how many rows the group has.
                        got = group_rows - (group_end - row)
                        logger.warning("row group %d of Parquet %s gave %d of its %d rows", group, uri, got,
                                       group_rows)
                        yield failed_rows(row, group_end - row, error_string(
                            READ_ERROR, f"parquet row group {group}: gave {got} of its {group_rows} rows "
                                        "(damaged pages)"))
                row = group_end
                counts["listed"] = row
    except Exception as exc:  # noqa: BLE001 - a bad file is one error row, not a failed job
        logger.warning("cannot read Parquet %s: %s", uri, storage.describe_error(exc))
        counts["listed"] = row + 1
        yield error_table([uri], [base + row], error_string(READ_ERROR, f"parquet {storage.describe_error(exc)}"),
                          carried)


KIND = InputKind(
    name="parquet",
    summary="Parquet files of encoded image bytes (img2dataset: jpg + url/key/caption), a glob "
            "or folder of them; one Ray task streams each file",
    detect=lambda uri, pattern: strip_compression(uri.rstrip("/").lower()).endswith(SUFFIXES),
    plan=plan_parquet, plan_files=plan_files, file_suffixes=SUFFIXES)
