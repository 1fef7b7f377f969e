"""Input kind ``parquet``: Parquet files holding encoded images, read streaming in one Ray task
per file. Two layouts of the image column:

- img2dataset: a binary column (``jpg`` + ``url`` + ``key`` + ``caption``), found by name in any
  case, binary in any layout or ``list<uint8>`` (:func:`image_columns`); with one column per
  format (``jpg``, ``png``, ...) a row's image is the first of them not null;
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
auto mode none of whose files has an image column is a manifest (a list of paths), planned as one
(decided on every file, not the first: a shard whose ``jpg`` is all null, typed null, holds images
too); binary columns that may be the images are refused instead, naming ``--image-column``.
Files beside the parts that are not Parquet are counted as skipped (``not_a_shard``/``hidden``), and
so are files below ``_`` folders or names (``dataset_metadata``: Spark's ``_temporary/``, Delta's
``_delta_log/``, as ``pyarrow.dataset`` ignores them).
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Generator

import pyarrow as pa
import pyarrow.compute as pc

from .. import io_policy, storage
from ..errors import INTERNAL_ERROR, READ_ERROR, InputError, error_string
from .blocks import EMIT_ROWS, STREAM_BLOCK_SIZE, error_table, schema_with, streaming_plan
from .common import (
    FILE_INDEX_STRIDE,
    IMAGE_EXTENSIONS,
    PATH_COLUMN_CANDIDATES,
    InputKind,
    InputOptions,
    InputPlan,
    internal_error_detail,
    is_bytes_type,
    shard_skip_reason,
    strip_compression,
    to_text,
)
from .manifest import PARQUET_SUFFIXES, plan_manifest, plan_manifest_files

logger = logging.getLogger(__name__)

# Column names (any case) taken for an image column, in this order, when binary or an image struct.
IMAGE_COLUMN_CANDIDATES = ("jpg", "png", "image", "webp", "bytes", "jpeg", "img")
# Names of one column per image format (WebDataset converted to Parquet: ``jpg``, ``png``, ...):
# a row's image is in the first of them that is not null.
EXTENSION_COLUMNS = tuple(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
# A bytes column whose name (any case) holds one of these is taken when it is the only such one
# (``img_bytes``, ``image_bytes``, ``jpeg_data``).
IMAGE_NAME_HINTS = ("image", "img", "jpg", "jpeg", "png", "webp", "bytes")
CARRIED = ("key", "url", "caption")
# Arrow IPC files, read as Parquet files are: Hugging Face ``datasets``' ``save_to_disk`` folders
# (``data-00000-of-00001.arrow`` in the IPC stream format, beside ``dataset_info.json`` and
# ``state.json``; one sub-folder per split) and its cache files; the IPC file format too.
ARROW_SUFFIXES = (".arrow",)
SUFFIXES = PARQUET_SUFFIXES + ARROW_SUFFIXES


def is_arrow(uri: str) -> bool:
    """Whether ``uri`` names an Arrow IPC file (``ARROW_SUFFIXES``), not a Parquet one."""
    return strip_compression(storage.kind_name(uri).lower()).endswith(ARROW_SUFFIXES)


def _open_ipc(f) -> pa.ipc.RecordBatchFileReader | pa.ipc.RecordBatchStreamReader:
    """A reader of the Arrow IPC file ``f`` (binary, seekable): the file format (which starts with
    ``ARROW1``) or the stream format (what ``datasets`` writes)."""
    magic = f.read(6)
    f.seek(0)
    return pa.ipc.open_file(f) if magic == b"ARROW1" else pa.ipc.open_stream(f)


def _ipc_batches(reader: pa.ipc.RecordBatchFileReader | pa.ipc.RecordBatchStreamReader
                 ) -> Generator[pa.RecordBatch, None, None]:
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


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
    elif (strip_compression(storage.kind_name(uri).rstrip("/").lower()).endswith(SUFFIXES)
          or not options.auto) and not fs.isdir(fs_path):
        files = [uri]  # a file named as Parquet, or any file --input-format parquet names
    else:  # a folder, also one named like a file (Spark writes "table.parquet/part-*.parquet")
        root = fs_path.rstrip("/")
        files = []
        for p in sorted(fs.find(root)):
            skip = shard_skip_reason(p[len(root):].lstrip("/"))
            if p.lower().endswith(SUFFIXES) and skip is None:
                files.append(storage.uri_maker(uri, fs)(p))
            elif not p.endswith("/"):
                others.append((storage.uri_maker(uri, fs)(p), skip or "not_a_shard"))
    if not files and not options.auto and others:
        # --input-format parquet on a folder of files without a Parquet name (Athena's output):
        # its files are the parts.
        files = [o for o, reason in others if reason == "not_a_shard"]
        others = [(o, reason) for o, reason in others if reason != "not_a_shard"]
    if not files:
        raise InputError(f"no Parquet files found at {uri}")
    plan = plan_files(files, options)
    for other, reason in others:
        plan.add_planned_skip(reason, other)
    return plan


def plan_files(files: list[str], options: InputOptions) -> InputPlan:
    """Plan the given Parquet file URIs (no listing). Each file is read from its own image
    columns (:func:`image_columns`; only ``image_column`` when the user named it); every file's
    carried columns are carried.

    Whether the files hold images is decided on all of them, never on the first alone: they do
    when any readable file has an image column, or one named so but typed null (pandas writes
    an all-None column so: a shard where every download failed). A file that has none is read
    by :func:`read_parquet`'s rules (rows without bytes are ``read_error`` rows). In auto mode,
    files none of which hold images are a manifest (one file, or Spark's parts), unless one has
    binary columns that may be images (refused, naming ``--image-column``; ``--path-column``
    reads them as a manifest).

    The schemas are those of the readable files: a damaged file (cut short, a bad footer) is
    that file's ``read_error`` row when the rows are read, not a failed job.

    Raises:
        InputError: no file's schema can be read; no file has the named ``image_column``; no
            image column (when not auto); unclear image columns (as :func:`image_columns`);
            manifest errors (no path column: naming ``--image-column`` and ``--path-column``).
    """
    schemas, rows = _schemas(files, options)
    first, schema = schemas[0]
    wanted = options.image_column
    image_col: str | None = None
    unclear: list[InputError] = []
    errors: list[InputError] = []
    for uri, s in schemas:
        try:
            image_col = find_image_column(s, wanted, uri, required=False)
        except InputError as exc:
            (errors if wanted is not None else unclear).append(exc)
            continue
        if image_col is not None:
            break
    if image_col is None and wanted is None:
        image_col = next((c for _, s in schemas if (c := empty_image_column(s, text=False)) is not None), None)
    if image_col is None:
        if wanted is not None:
            raise errors[0]
        if unclear and options.path_column is None:
            raise unclear[0]
        if not options.auto:
            find_image_column(schema, None, first)  # raises: no image column
        return _plan_as_manifest(files, schemas, options)
    # Every file's: a column some parts lack (img2dataset shards written with and without
    # captions) is null in their rows, not dropped from all of them.
    carried = [c for c in CARRIED if any(c in s.names for _, s in schemas)]
    options.check_columns_used("parquet", first)
    plan = streaming_plan("parquet", files, read_parquet, options.storage_options, carried, use_ray=options.use_ray,
                          image_column=image_col, carried_columns=carried, find_own_column=wanted is None)
    plan.rows_at_most = rows
    return plan


def _plan_as_manifest(files: list[str], schemas: list[tuple[str, pa.Schema]], options: InputOptions) -> InputPlan:
    """Parquet files without images, planned as a manifest; its refusals say what else to do."""
    first, schema = schemas[0]
    if any(is_arrow(f) for f in files):
        raise InputError(f"no image column in {first} (binary, list<uint8> or struct<bytes, path>, named "
                         f"{', '.join(IMAGE_COLUMN_CANDIDATES)} in any case); columns: {', '.join(schema.names)}; "
                         "name one with --image-column (an Arrow file is read for its image bytes; for a list "
                         "of image paths, write it as Parquet or CSV)")
    try:
        return plan_manifest(files[0], options) if len(files) == 1 else plan_manifest_files(files, options)
    except InputError as exc:
        lists = [f.name for f in schema if _is_image_list(f.type)]
        if lists:
            kind = schema.field(lists[0]).type
            raise InputError(f"{first}: column {lists[0]!r} holds a list of images per row ({kind}, as Hugging "
                             "Face Sequence(Image()) stores them); zslabel labels one image per row: "
                             "flatten that column to one row per image first (pyarrow.compute.list_flatten, "
                             "datasets' map with batched=True)") from exc
        if options.path_column is None and not any(
                _named(s, c) for _, s in schemas for c in PATH_COLUMN_CANDIDATES):
            raise InputError(f"no image column and no path column in {first}; columns: {', '.join(schema.names)}; "
                             "name the column of image bytes with --image-column (binary, list<uint8> or "
                             "struct<bytes, path>), or the column of image URIs with --path-column") from exc
        raise


# Footers read at once while planning (each is one small ranged read; on object stores the
# latency, not the bytes, is the cost).
SCHEMA_READERS = 16


def _schemas(files: list[str], options: InputOptions) -> tuple[list[tuple[str, pa.Schema]], int | None]:
    """``(uri, schema)`` of every file whose schema can be read, in file order (at least one),
    and the most rows the files can give (their footers' counts, one ``read_error`` row per
    unreadable file; None when an Arrow IPC file's is unknown). A file that cannot be read is left out of
    the schemas (a warning names the first few) and becomes its ``read_error`` row when the rows are read.

    Raises:
        InputError: none can be read (the first file's error, and how many failed).
    """
    from concurrent.futures import ThreadPoolExecutor

    def read(uri: str) -> tuple[pa.Schema, int | None] | InputError:
        try:
            return file_footer(uri, options.storage_options, options.io)
        except InputError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(SCHEMA_READERS, len(files))) as pool:
        got = list(pool.map(read, files))
    failures = [g for g in got if isinstance(g, InputError)]
    readable = [(uri, g[0]) for uri, g in zip(files, got) if not isinstance(g, InputError)]
    counts = [g[1] for g in got if not isinstance(g, InputError)]
    rows = None if None in counts else sum(c for c in counts if c is not None) + len(failures)
    if readable:  # the job goes on: say which files will be error rows (else the error says it)
        for exc in failures[:3]:
            logger.warning("%s", exc)
        if len(failures) > 3:
            logger.warning("... and %d more Parquet files whose schema cannot be read", len(failures) - 3)
        return readable, rows
    if len(files) == 1:
        raise failures[0]
    raise InputError(f"none of the {len(files)} Parquet files can be read; the first: {failures[0]}") from failures[0]


def file_schema(uri: str, storage_options: dict, io: io_policy.IOPolicy | None = None) -> pa.Schema:
    """The Arrow schema of the Parquet or Arrow IPC file ``uri`` (its footer, or its stream's head).

    Raises:
        InputError: the file cannot be opened or holds no readable schema.
    """
    return file_footer(uri, storage_options, io)[0]


def file_footer(uri: str, storage_options: dict, io: io_policy.IOPolicy | None = None
                ) -> tuple[pa.Schema, int | None]:
    """``(Arrow schema, rows)`` of the Parquet or Arrow IPC file ``uri``: from its footer
    (one read); rows None for an Arrow IPC stream (its head does not say).

    Raises:
        InputError: the file cannot be opened or holds no readable schema.
    """
    import pyarrow.parquet as pq

    fs, fs_path = storage.url_to_fs(uri, storage_options)
    arrow = is_arrow(uri)
    try:
        with storage.open_input(fs, fs_path, "rb") as f:
            if arrow:
                return _open_ipc(f).schema, None
            footer = pq.ParquetFile(f)  # what pq.read_schema reads, and the row count beside it
            return footer.schema_arrow, footer.metadata.num_rows
    except Exception as exc:
        raise InputError(f"cannot read {'Arrow' if arrow else 'Parquet'} file {uri}: "
                         f"{io_policy.describe_error(exc, io)}") from exc


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


def is_byte_list(kind: pa.DataType) -> bool:
    """True for bytes stored as a list of ``uint8`` (``list``, ``large_list`` or ``fixed_size_list``:
    Hugging Face ``Sequence(Value('uint8'))``), read as the bytes they hold."""
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        return False
    return pa.types.is_uint8(kind.value_type)


def _holds_bytes(kind: pa.DataType) -> bool:
    return is_bytes_type(kind) or is_byte_list(kind)


def _usable(kind: pa.DataType) -> bool:
    return _holds_bytes(kind) or is_image_struct(kind)


def _named(schema: pa.Schema, name: str) -> str | None:
    """The column called ``name``: exactly, else in another case (the first such); None if none."""
    if name in schema.names:
        return name
    return next((n for n in schema.names if n.lower() == name.lower()), None)


def image_columns(schema: pa.Schema, wanted: str | None, uri: str) -> list[str]:
    """The columns one file's images are read from, the main one first; ``[]`` when none.

    ``wanted`` (exact name, else any case): that column alone. Else: a column Hugging Face
    metadata declares ``Image``; else the first column named (any case) as in
    ``IMAGE_COLUMN_CANDIDATES`` or ``EXTENSION_COLUMNS`` that holds bytes (binary in any layout,
    or ``list<uint8>``, :func:`is_byte_list`) or is an image struct (:func:`is_image_struct`),
    followed, when it holds bytes, by the file's other ``EXTENSION_COLUMNS`` holding bytes (a
    row's image is the first of them not null); else the only image struct; else the only
    bytes column whose name holds one of ``IMAGE_NAME_HINTS``.

    Raises:
        InputError: ``wanted`` is missing or holds no bytes; or, ``wanted`` None, the file has
            bytes columns but none of them is clearly its images (several named like images,
            or only others: a ``url`` column beside them does not make the file a manifest):
            the message lists them and names ``--image-column``.
    """
    if wanted is not None:
        name = _named(schema, wanted)
        if name is None:
            raise InputError(f"image column {wanted!r} not found in {uri}; columns: "
                             f"{', '.join(schema.names)}")
        if not _usable(schema.field(name).type):
            raise InputError(f"image column {name!r} of {uri} is {schema.field(name).type}, not binary, "
                             "list<uint8> or struct<bytes: binary, path: string>")
        return [name]
    for name in _hf_image_columns(schema):
        if _usable(schema.field(name).type):
            return [name]
    for cand in (*IMAGE_COLUMN_CANDIDATES, *EXTENSION_COLUMNS):
        name = _named(schema, cand)
        if name is None or not _usable(schema.field(name).type):
            continue
        if is_image_struct(schema.field(name).type):
            return [name]
        others = [f.name for f in schema if f.name != name and f.name.lower() in EXTENSION_COLUMNS
                  and _holds_bytes(f.type)]
        return [name, *others]
    structs = [f.name for f in schema if is_image_struct(f.type)]
    if len(structs) == 1:
        return structs
    binary = [f.name for f in schema if _holds_bytes(f.type)]
    hinted = [n for n in binary if any(h in n.lower() for h in IMAGE_NAME_HINTS)]
    if len(hinted) == 1:
        return hinted
    if binary:
        raise InputError(f"{uri}: cannot tell which column holds the images: binary column(s) "
                         f"{', '.join(map(repr, hinted or binary))}; name the image column with --image-column "
                         "(or, to read the file as a list of image URIs, the URI column with --path-column)")
    return []


def find_image_column(schema: pa.Schema, wanted: str | None, uri: str, *, required: bool = True
                      ) -> str | None:
    """The main image column of a file (the first of :func:`image_columns`); None when there is
    none and not ``required``.

    Raises:
        InputError: as :func:`image_columns` (whatever ``required``), or none found and ``required``.
    """
    found = image_columns(schema, wanted, uri)
    if found:
        return found[0]
    if required:
        raise InputError(f"no image column in {uri} (looked for binary columns or Hugging Face Image "
                         f"structs named {', '.join(IMAGE_COLUMN_CANDIDATES)} in any case); columns: "
                         f"{', '.join(schema.names)}; name one with --image-column")
    return None


def empty_image_column(schema: pa.Schema, *, text: bool = True) -> str | None:
    """A column named as an image column (``IMAGE_COLUMN_CANDIDATES``, ``EXTENSION_COLUMNS``, any
    case) that holds no bytes by its type: ``null`` (pandas writes an all-None column so: a shard
    where every download failed) or, when ``text``, a string (failed downloads kept as ``""``).
    Its rows are read as rows without bytes. None when there is none."""
    for cand in (*IMAGE_COLUMN_CANDIDATES, *EXTENSION_COLUMNS):
        name = _named(schema, cand)
        if name is None:
            continue
        kind = schema.field(name).type
        if pa.types.is_null(kind) or (text and (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                                                or pa.types.is_string_view(kind))):
            return name
    return None


def _rows(rb: pa.RecordBatch, uri: str, first: int, index: pa.Array, image_columns: list[str],
          carried: list[str]) -> pa.Table:
    """One record batch as rows (``schema_with(carried)``); ``first`` = its first row number.
    A row's bytes are the first of ``image_columns`` not null (one column per image format); a
    column typed null or string holds none (a non-empty string is that row's ``read_error``)."""
    n = rb.num_rows
    own = pc.binary_join_element_wise(uri + "#", pa.array([str(i) for i in range(first, first + n)]), "")
    if "url" in rb.schema.names:
        url = to_text(rb.column("url"))
        path = pc.if_else(pc.and_kleene(pc.is_valid(url), pc.not_equal(url, "")), url, own)
    else:
        path = own
    image_column = image_columns[0]
    image = rb.column(image_column)
    text = None
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
    elif not _holds_bytes(image.type):  # typed null or string: no bytes in this file's column
        data = pa.nulls(n, pa.binary())
        if not pa.types.is_null(image.type):
            text = pc.fill_null(pc.greater(pc.utf8_length(image.cast(pa.string())), 0), False)
        missing = pa.array([True] * n)
    elif len(image_columns) == 1:
        data = _as_binary(_as_bytes(image))
        missing = pc.is_null(data)
    else:
        # large_binary while coalescing: any batch fits; _as_binary then cuts it to fit binary
        data = _as_binary(pc.coalesce(*[_as_bytes(rb.column(c)).cast(pa.large_binary()) for c in image_columns]))
        missing = pc.is_null(data)
    where_not = "" if len(image_columns) == 1 else f" (nor in {', '.join(map(repr, image_columns[1:]))})"
    read_error = pc.if_else(missing, pa.scalar(error_string(
        READ_ERROR, f"no bytes in column {image_column!r}{where_not} of {uri}")), pa.nulls(n, pa.string()))
    if text is not None:
        read_error = pc.if_else(text, pa.scalar(error_string(
            READ_ERROR, f"column {image_column!r} of {uri} holds text ({image.type}), not image bytes")), read_error)
    cols = [path, index, data, read_error]
    cols += [to_text(rb.column(c)) if c in rb.schema.names else pa.nulls(n, pa.string()) for c in carried]
    return pa.Table.from_arrays(cols, schema=schema_with(carried))


def _as_bytes(values: pa.Array) -> pa.Array:
    """A bytes column as it is, a ``list<uint8>`` one (:func:`is_byte_list`) as ``large_binary``:
    each list's bytes, null where the list is null (a null element inside a list reads as 0)."""
    if not is_byte_list(values.type):
        return values
    if pa.types.is_fixed_size_list(values.type):
        values = values.cast(pa.large_list(pa.uint8()))
    import numpy as np

    offsets = values.offsets.to_numpy().astype(np.int64)
    flat = pc.fill_null(values.values, 0).to_numpy(zero_copy_only=False).astype(np.uint8, copy=False)
    body = flat[offsets[0]:offsets[-1]]
    out = pa.Array.from_buffers(pa.large_binary(), len(values),
                                [None, pa.py_buffer(offsets - offsets[0]), pa.py_buffer(body.tobytes())])
    return pc.if_else(pc.is_valid(values), out, pa.nulls(len(values), pa.large_binary()))


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

    ``image_column``: the column of encoded images, named by the user; with ``find_own_column``
    (the user named none) each file is read from its own :func:`image_columns` instead (a
    folder mixing img2dataset's ``jpg`` and a Hugging Face ``image`` struct; one column per
    format), ``image_column`` (the first file's) only naming what a file without any lacks.
    A file whose image column holds no bytes by its type (null, string:
    :func:`empty_image_column`, or the named column so typed) gives one ``read_error`` row
    per row; a file without an image column (or with unclear ones) is one ``read_error`` row.

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
            if is_arrow(uri):
                yield from _read_ipc(f, uri, base, counts, image_column, carried, find_own_column)
                return
            pf = pq.ParquetFile(f)
            own = _own_columns(pf.schema_arrow, uri, image_column, find_own_column)
            # url too when not carried: a row's path is its url wherever this file has one.
            columns = [*own, *[c for c in carried if c in pf.schema_arrow.names]]
            if "url" in pf.schema_arrow.names and "url" not in columns:
                columns.append("url")
            for group in range(pf.num_row_groups):
                group_rows = pf.metadata.row_group(group).num_rows
                group_end = row + group_rows
                try:
                    for rb in pf.iter_batches(batch_size=EMIT_ROWS, row_groups=[group], columns=columns):
                        # pyarrow does not check the UTF-8 of string pages: a damaged caption page
                        # gave strings no reader of the output could decode. Raises ArrowInvalid.
                        rb.validate(full=True)
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
                            table = _rows(rb, uri, row, index, own, carried)
                        except Exception as exc:  # noqa: BLE001 - a bug costs these rows, not the file
                            detail = internal_error_detail(f"{uri} rows {row}..{row + n - 1}", exc, logger)
                            table = failed_rows(row, n, error_string(INTERNAL_ERROR, detail))
                        row += n
                        counts["listed"] = row
                        yield table
                except Exception as exc:  # noqa: BLE001 - a damaged row group costs its own rows
                    logger.warning("cannot read row group %d of Parquet %s: %s", group, uri,
                                   io_policy.describe_error(exc))
                    if group_end > row:
                        yield failed_rows(row, group_end - row, error_string(
                            READ_ERROR, f"parquet row group {group}: {io_policy.describe_error(exc)}"))
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
        what = "arrow" if is_arrow(uri) else "parquet"
        logger.warning("cannot read %s %s: %s", what.capitalize(), uri, io_policy.describe_error(exc))
        row = max(row, counts.get("listed") or 0)  # an Arrow file's rows read before the failure
        counts["listed"] = row + 1
        yield error_table([uri], [base + row], error_string(READ_ERROR, f"{what} {io_policy.describe_error(exc)}"),
                          carried)


def _read_ipc(f, uri: str, base: int, counts: dict, image_column: str, carried: list[str],
              find_own_column: bool) -> Generator[pa.Table, None, None]:
    """Stream one Arrow IPC file (open binary file ``f``) as :func:`read_parquet` streams a
    Parquet file, by record batches cut to ``EMIT_ROWS``; fills ``counts["listed"]``.

    An IPC stream has no footer giving its row count, so a batch that cannot be read raises
    here and the rest of the file is one ``read_error`` row (:func:`read_parquet`'s rule for a
    file whose rows are unknown); the rows read before it are kept."""
    reader = _open_ipc(f)
    own = _own_columns(reader.schema, uri, image_column, find_own_column)
    columns = [*own, *[c for c in carried if c in reader.schema.names]]
    if "url" in reader.schema.names and "url" not in columns:
        columns.append("url")
    row = 0
    for batch in _ipc_batches(reader):
        batch = batch.select(columns)
        batch.validate(full=True)  # as a Parquet row group's (UTF-8 of strings); the rest of the file then fails
        for start in range(0, batch.num_rows, EMIT_ROWS):
            rb = batch.slice(start, EMIT_ROWS)
            n = rb.num_rows
            index = pa.array(range(base + row, base + row + n), pa.int64())
            try:
                table = _rows(rb, uri, row, index, own, carried)
            except Exception as exc:  # noqa: BLE001 - a bug costs these rows, not the file
                detail = internal_error_detail(f"{uri} rows {row}..{row + n - 1}", exc, logger)
                table = error_table([f"{uri}#{i}" for i in range(row, row + n)], list(index.to_pylist()),
                                    error_string(INTERNAL_ERROR, detail), carried)
            row += n
            counts["listed"] = row
            yield table
    counts["listed"] = row


def _holds_no_bytes(kind: pa.DataType) -> bool:
    """Typed so that it can hold no image bytes, though named as an image column: null, string."""
    return (pa.types.is_null(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind))


def _own_columns(schema: pa.Schema, uri: str, image_column: str, find_own: bool) -> list[str]:
    """The image columns ``read_parquet`` reads one file's rows from (see there).

    Raises:
        InputError: the file has no image column, or unclear ones (its ``read_error`` row).
    """
    if find_own:
        own = image_columns(schema, None, uri)
        if own:
            return own
        empty = empty_image_column(schema)
        if empty is not None:
            return [empty]
    name = _named(schema, image_column)
    if name is None:
        raise InputError(f"no image column {image_column!r} (columns: {', '.join(schema.names)})")
    if _holds_no_bytes(schema.field(name).type):
        return [name]
    # this file's column of that name must hold bytes (a list<binary> one does not): raises if not
    return image_columns(schema, name, uri)


KIND = InputKind(
    name="parquet",
    summary="Parquet files of encoded image bytes (img2dataset: jpg + url/key/caption), a glob "
            "or folder of them, or Arrow IPC files (Hugging Face save_to_disk folders); one Ray task "
            "streams each file",
    detect=lambda uri, pattern: strip_compression(uri.rstrip("/").lower()).endswith(SUFFIXES),
    plan=plan_parquet, plan_files=plan_files, file_suffixes=SUFFIXES)
