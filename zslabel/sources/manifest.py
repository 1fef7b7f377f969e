"""Input kind ``manifest``: a ``.txt`` (one URI per line), ``.csv``/``.tsv`` or Parquet file naming
the images, read once on the driver; never listed, no per-file metadata calls.

Formats, each read by its own rules (README "Input kinds" repeats them):

- ``.txt``: one entry per line (:func:`txt_entries`): lines end at LF, CRLF or CR (nothing
  else splits a line: ``str.splitlines`` would also split at form feeds, U+2028 and other
  characters a name may hold); spaces and tabs around an entry are not part of it; a U+FEFF
  (BOM) at the start of any line is dropped (concatenated files); blank lines, and comment
  lines beginning ``# `` (hash, space) or only ``#``, are not entries; a first entry that is
  only ``path``, ``url`` or ``uri`` is a header. Everything else on a line is the entry as
  written: ``#1.jpg``, ``a,b.jpg``, ``"q".jpg``, URLs with ``?query`` or ``#fragment``, and
  ``%XX`` escapes are kept. A line holding ``\x1f`` or quotes is no problem (no CSV parser).
- ``.csv``: RFC 4180 (pyarrow with ``newlines_in_values``): quoted fields may hold commas,
  doubled quotes and line breaks (LAION/CC3M captions); a row with the wrong number of fields
  is skipped and counted (``malformed_row``), never the whole manifest refused.
- ``.tsv``: IANA ``text/tab-separated-values``: one row per line, no quoting (a caption that
  starts with ``"`` is text, not the start of a quoted field that would swallow later rows).
- ``.csv``/``.tsv`` without a header (Conceptual Captions: ``caption<TAB>url``), told by the
  first row (:func:`is_headerless`): every row is an entry, columns ``column_1`` ...
  ``column_N``, path column the first whose first value looks like an entry
  (:func:`headerless_column`).
- Parquet: any file, or a folder of parts (``part-*.parquet`` + ``_SUCCESS``, as Spark writes).

All columns are strings (ids like ``00042`` keep their zeros); carried columns of nested types
(lists, structs) are JSON text (``common.to_text``). Text manifests follow ``zslabel.textfiles``
rules (UTF-8 with or without BOM, UTF-16 with BOM); one that is not UTF-8 is refused with the
byte offset. Relative entries are relative to the manifest's folder; an entry is absolute when
it starts with ``/``, holds ``://``, or is a ``file:`` URI (RFC 8089 allows ``file:/a.jpg``);
``file:`` URIs are percent-decoded when read (``storage.file_uri_path``); a ``%XX`` escape of a
byte >= 0x80 in a plain local entry finds a file whose name is not UTF-8
(``zslabel.storage.display_name``).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import logging
import posixpath
import re

import pyarrow as pa
import pyarrow.compute as pc

from .. import io_policy, storage
from ..errors import InputError, ZslabelError
from ..textfiles import LINE_END, decode_text, is_comment
from .blocks import core_table, planned_dataset
from .common import (
    IMAGE_EXTENSIONS,
    MAX_EXAMPLES,
    PATH_COLUMN_CANDIDATES,
    RESERVED_COLUMNS,
    InputKind,
    InputOptions,
    InputPlan,
    extension,
    strip_compression,
    to_text,
)

logger = logging.getLogger(__name__)

SUFFIXES = (".txt", ".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")  # the names Parquet files go by


def manifest_format(name: str) -> str:
    """The manifest format from its (lower-case) name: parquet (``.parquet``, ``.parq``,
    ``.pq``), csv, tsv, else txt."""
    name = strip_compression(name)
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    for fmt in ("csv", "tsv"):
        if name.endswith("." + fmt):
            return fmt
    return "txt"


def read_table(uri: str, options: InputOptions, reader):
    """``(fs, fs_path, reader(fs, fs_path, uri))``, any failure but ours as ``InputError``.

    ``reader`` returns ``(table, {skip reason: dropped rows' text}, ...)`` (:func:`_read_manifest`,
    which adds the first row of a CSV/TSV without a header; ``jsonl._read``)."""
    fs, fs_path = storage.url_to_fs(uri, options.storage_options)
    try:
        result = reader(fs, fs_path, uri)
    except ZslabelError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read manifest {uri}: {io_policy.describe_error(exc, options.io)}") from exc
    names = result[0].column_names
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a column picked by name would be ambiguous (pyarrow: KeyError)
        raise InputError(f"manifest {uri} has the column {', '.join(map(repr, twice))} more than once; "
                         "rename one (columns: " + ", ".join(names) + ")")
    return fs, fs_path, result


def plan_manifest(uri: str, options: InputOptions) -> InputPlan:
    """Plan a manifest file; see the module docstring.

    Raises:
        InputError: unreadable or empty manifest, missing column, no entries.
        TextDecodeError: a text manifest that is not UTF-8 (names the byte offset).
    """
    fs, fs_path, (table, dropped, first_row) = read_table(uri, options, _read_manifest)
    if manifest_format(storage.kind_name(fs_path).lower()) == "txt" and table.column_names == ["path"]:
        path_col = "path"  # a text list (not Parquet told by its magic bytes)
    elif first_row is not None:  # no header: columns column_1 ... column_N
        path_col = headerless_column(table.column_names, first_row, options.path_column, uri, "path")
        if options.id_column is not None:
            options = dataclasses.replace(options, id_column=headerless_column(
                table.column_names, first_row, options.id_column, uri, "id"))
    else:
        path_col = pick_column(table.column_names, options.path_column, PATH_COLUMN_CANDIDATES, uri, "path")
    return plan_path_table(uri, fs, fs_path, table, path_col, id_columns(table, options, uri), options,
                           dropped=dropped)


def looks_like_entry(value: str) -> bool:
    """Whether a CSV/TSV field of the first row is an entry rather than a column name: a URI
    (``scheme://...``, ``file:``, ``data:``) or a name with an image extension (``0.png``,
    ``imgs/a.JPG``; a URL's query and fragment aside)."""
    value = value.strip(ASCII_SPACE).lstrip("\ufeff")
    if _URI_START.match(value) or value[:5].lower() in ("file:", "data:"):
        return True
    return extension(value) in IMAGE_EXTENSIONS


_URI_START = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_headerless(first_row: list[str]) -> bool:
    """Whether a CSV/TSV whose first row is ``first_row`` has no header: no field is named like
    a path column (``path``/``url``/``uri``, any case) and some field looks like an entry
    (:func:`looks_like_entry`), as in the Conceptual Captions TSV (``caption<TAB>url``)."""
    names = {f.strip(ASCII_SPACE).lstrip("\ufeff").lower() for f in first_row}
    return not names & set(PATH_COLUMN_CANDIDATES) and any(map(looks_like_entry, first_row))


def headerless_column(columns: list[str], first_row: list[str], wanted: str | None, uri: str, what: str) -> str:
    """The column of a manifest without a header (``columns``: ``column_1`` ... ``column_N``)
    that ``wanted`` names: one of those names (any case); or, as a user who read the first row
    as a header would name it, a value of ``first_row`` (that column, with a warning: the row
    is an entry and is read, never dropped). ``wanted`` None (path only): the first column
    whose first value looks like an entry.

    Raises:
        InputError: ``wanted`` is neither, naming the columns and the first row.
    """
    if wanted is None:
        return columns[next(i for i, v in enumerate(first_row) if looks_like_entry(v))]
    lower = {c.lower(): c for c in columns}
    if wanted.lower() in lower:
        return lower[wanted.lower()]
    values = [v.strip(ASCII_SPACE).lstrip("\ufeff") for v in first_row]
    for same in (lambda v: v == wanted.strip(ASCII_SPACE), lambda v: v.lower() == wanted.strip(ASCII_SPACE).lower()):
        hits = [i for i, v in enumerate(values) if same(v)]
        if hits:
            logger.warning("--%s-column %r is a value of the first row of %s, which has no header: that row is "
                           "an entry and is read as one; the %s column is %s", what, wanted, uri, what,
                           columns[hits[0]])
            return columns[hits[0]]
    shown = ", ".join(repr(v[:60] + ("..." if len(v) > 60 else "")) for v in values)
    raise InputError(f"{what} column {wanted!r} not found in {uri}: it has no header row (its first row is an "
                     f"entry: {shown}), so its columns are {', '.join(columns)}; name one of those, "
                     f"or add a header line")


def id_columns(table: pa.Table, options: InputOptions, uri: str) -> list[str]:
    """``[the id column]`` when one is asked for, else ``[]``.

    Raises:
        InputError: the column is missing or shadows an output column.
    """
    if options.id_column is None:
        return []
    column = pick_column(table.column_names, options.id_column, (), uri, "id")
    if column in RESERVED_COLUMNS:
        raise InputError(f"id column {column!r} of {uri} clashes with an output column; "
                         f"rename it (reserved: {', '.join(sorted(RESERVED_COLUMNS))})")
    return [column]


def plan_manifest_files(files: list[str], options: InputOptions, kind: str = "manifest") -> InputPlan:
    """Plan several Parquet manifests as one (a Spark-style folder of ``part-*.parquet``), rows
    in file order; relative entries are relative to each part's folder (the first part's).

    Raises:
        InputError: an unreadable part, a missing column, no entries.
    """
    tables = []
    for f in files:
        fs, fs_path, (table, *_) = read_table(f, options, _read_manifest)  # Parquet parts: nothing dropped
        tables.append(table)
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"Parquet manifest parts {files[0]} ... do not share a schema: {exc}") from exc
    path_col = pick_column(table.column_names, options.path_column, PATH_COLUMN_CANDIDATES, files[0], "path")
    fs, fs_path = storage.url_to_fs(files[0], options.storage_options)
    return plan_path_table(files[0], fs, fs_path, table, path_col, id_columns(table, options, files[0]),
                           options, kind=kind)


def plan_path_table(uri: str, fs, fs_path: str, table: pa.Table, path_col: str | pa.Array, carried: list[str],
                    options: InputOptions, kind: str = "manifest",
                    dropped: dict[str, list[str]] | None = None) -> InputPlan:
    """Plan rows naming images: ``table[path_col]`` URIs (or ``path_col`` itself, an (N,) string
    array), ``carried`` columns copied as strings (nested types as JSON text).

    Every row is listed; a row with an empty path is skipped and counted (``empty_path``: it
    cannot become an output row); ``dropped`` (the text of rows the reader took out of
    ``table``, by skip reason: ``malformed_row``, ``repeated_header``) are listed and skipped;
    with ``options.dedupe`` later rows of a repeated URI are removed and counted.
    """
    options.check_columns_used(kind, uri)
    dropped = {reason: rows for reason, rows in (dropped or {}).items() if rows}
    n_dropped = sum(map(len, dropped.values()))
    listed = table.num_rows + n_dropped
    column = table.column(path_col) if isinstance(path_col, str) else path_col
    paths = pc.utf8_trim(to_text(column), ASCII_SPACE)
    cols = {c: to_text(table.column(c)) for c in carried}
    # Kleene logic: a null path must give False (dropped), not null (which pc.all ignores).
    keep = pc.and_kleene(pc.is_valid(paths), pc.not_equal(paths, ""))
    empty_rows: list[int] = []
    if not pc.all(keep).as_py():
        empty_rows = pc.indices_nonzero(pc.invert(keep)).to_pylist()
        paths = paths.filter(keep)
        cols = {k: v.filter(keep) for k, v in cols.items()}
    paths = resolve_relative(paths, uri, fs, fs_path)
    removed = 0
    if options.dedupe and len(paths):
        first = (pa.table({"p": same_file_keys(paths), "i": pa.array(range(len(paths)), pa.int64())})
                 .group_by("p", use_threads=False).aggregate([("i", "min")]))
        take = first.column("i_min").take(pc.sort_indices(first.column("i_min")))
        removed = len(paths) - len(take)
        paths = paths.take(take)
        cols = {k: v.take(take) for k, v in cols.items()}
    if not len(paths):
        raise InputError(f"no images found in manifest {uri} ({listed} entries, "
                         f"{len(empty_rows)} with an empty path, "
                         + ", ".join([f"{len(dropped.get('malformed_row', []))} malformed",
                                      *(f"{len(v)} {k.replace('_', ' ')}" for k, v in dropped.items()
                                        if k != "malformed_row")]) + ")")
    table = core_table(paths, cols)
    read = planned_dataset(table, options)
    reasons = {k: v for k, v in (("empty_path", len(empty_rows)), *((k, len(v)) for k, v in dropped.items())) if v}
    examples = [f"{uri} row {i}" for i in empty_rows[:MAX_EXAMPLES]]
    for reason, rows in dropped.items():
        examples += [f"{uri} {reason.replace('_', ' ')} {m!r}" for m in rows[: max(0, MAX_EXAMPLES - len(examples))]]
    return InputPlan(kind=kind, listed=listed,
                     skipped=len(empty_rows) + n_dropped, skipped_by_reason=reasons,
                     skipped_examples=examples,
                     duplicates_removed=removed, planning_seconds=0.0, carried_columns=list(cols),
                     planned_paths=table.column("path"), **read)


def same_file_keys(paths: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One key per path for ``--dedupe``, equal for two spellings of one local file
    (``storage.comparable_path``: a ``file:`` URI and the path it names, ``a/./b.jpg``,
    ``a/x/../b.jpg``, ``a//b.jpg``; a symlink is not resolved). Remote URIs are compared as
    written. (N,) string array in, (N,) string array out."""
    return pa.array([storage.comparable_path(p) for p in paths.to_pylist()], pa.string())


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], uri: str,
                what: str) -> str:
    """``wanted`` (exact, else case-insensitive), else the first of ``candidates`` present.

    Raises:
        InputError: naming the columns the file has.
    """
    lower = {c.lower(): c for c in columns}
    if wanted is not None:
        if wanted in columns:
            return wanted
        if wanted.lower() in lower:
            return lower[wanted.lower()]
        raise InputError(f"{what} column {wanted!r} not found in {uri}; columns: "
                         f"{', '.join(columns)}")
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    raise InputError(f"no {what} column in {uri} (looked for {', '.join(candidates)}); "
                     f"columns: {', '.join(columns)}; name one with --path-column")


def _is_relative(paths: pa.Array) -> pa.Array:
    """Per entry: neither an absolute path, nor a URI, nor a ``file:`` URI (:func:`_is_relative_name`)."""
    return pc.invert(pc.or_(pc.or_(pc.starts_with(paths, "/"), pc.match_substring(paths, "://")),
                            pc.starts_with(paths, "file:", ignore_case=True)))


def _is_relative_name(name: str) -> bool:
    """:func:`_is_relative` of one name."""
    return not (name.startswith("/") or "://" in name or name.lower().startswith("file:"))


def resolve_relative(paths: pa.Array, uri: str, fs, fs_path: str) -> pa.Array:
    """Relative manifest entries are relative to the manifest's folder (as a full URI); so is
    the outermost target of an fsspec chain (``zip://a.jpg::imgs.zip``: the ``imgs.zip`` beside
    the manifest, not one in the working folder of whichever process reads it)."""
    relative = _is_relative(paths)
    base = storage.uri_maker(uri, fs)(posixpath.dirname(fs_path)).rstrip("/") + "/"
    chained = pc.and_(pc.invert(relative), pc.match_substring(paths, "::"))
    if pc.any(chained).as_py():  # rare: in Python
        values = paths.to_pylist()
        for i in pc.indices_nonzero(chained).to_pylist():
            # Only a chain: a name holding "::" (a local /data/run::1/a.jpg, an S3 key) is whole.
            head, _, target = values[i].rpartition("::")
            if target and storage.is_chain(values[i]) and _is_relative_name(target):
                values[i] = f"{head}::{base}{posixpath.normpath(target)}"
        paths = pa.array(values, pa.string())
    if not pc.any(relative).as_py():
        return paths
    joined = pc.binary_join_element_wise(base, paths, "")
    out = pc.if_else(relative, joined, paths)
    # "./a.jpg" and "../b/c.jpg" are rare: normalise only those rows, in Python.
    dotted = pc.and_(relative, pc.match_substring_regex(paths, r"(^|/)\.\.?(/|$)"))
    if pc.any(dotted).as_py():
        values = out.to_pylist()
        for i in pc.indices_nonzero(dotted).to_pylist():
            proto, sep, rest = values[i].rpartition("://")
            values[i] = proto + sep + posixpath.normpath(rest)
        out = pa.array(values, pa.string())
    return out


def utf8_bytes(raw: bytes, uri: str) -> bytes:
    """A text file's bytes as UTF-8 for pyarrow: UTF-16 (BOM-marked) is re-encoded; else as is."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return decode_text(raw, uri).encode("utf-8")
    return raw


def parse_text(raw: bytes, uri: str, parse):
    """``parse(raw)``; when pyarrow finds invalid UTF-8, the ``TextDecodeError`` naming the offset."""
    try:
        return parse(raw)
    except pa.ArrowInvalid as exc:
        if "utf8" in str(exc).lower() or "utf-8" in str(exc).lower():
            decode_text(raw, uri)  # raises with the file and byte offset
        raise


# Spaces, tabs and line breaks around a path are not part of it (a CSV cell "a.jpg\r\n" from a
# spreadsheet); every other character is, NBSP and form feed included.
ASCII_SPACE = " \t\r\n"


def txt_entries(text: str) -> list[str]:
    """The entries of a ``.txt`` manifest's text, by the rules in the module docstring."""
    entries = []
    for line in LINE_END.split(text):
        entry = line.lstrip("\ufeff").strip(" \t")
        if not entry or is_comment(entry):
            continue
        entries.append(entry)
    if entries and entries[0] in PATH_COLUMN_CANDIDATES:
        entries = entries[1:]  # a header naming the column, as csv manifests have
    return entries


def _read_manifest(fs, fs_path: str, uri: str) -> tuple[pa.Table, dict[str, list[str]], list[str] | None]:
    """``(table of strings, {skip reason: dropped rows' text}, first row)`` of one manifest file:
    rows with the wrong number of fields (``malformed_row``), and CSV/TSV rows repeating the
    header (``repeated_header``: manifests concatenated with ``cat``). A CSV/TSV without a
    header (:func:`is_headerless`) has every row an entry, its columns named ``column_1`` ...
    ``column_N``, and its first row's fields returned as the third item (else None)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fmt = manifest_format(storage.kind_name(fs_path).lower())
    with storage.open_input(fs, fs_path, "rb", compression=storage.compression_of(fs_path)) as f:
        if fmt == "parquet":
            return pq.read_table(f), {}, None
        raw = f.read()
    if fmt == "txt" and raw[:4] == b"PAR1":  # Parquet by its magic: Athena writes files without an extension
        return pq.read_table(pa.BufferReader(raw)), {}, None
    if fmt == "txt":
        return pa.table({"path": pa.array(txt_entries(decode_text(raw, uri)), pa.string())}), {}, None
    raw = utf8_bytes(raw, uri)
    # All columns as strings: ids like "00042" must not become integers. The header is parsed
    # with the csv module (quoting, line breaks in quoted names) to name the columns first.
    head = io.TextIOWrapper(io.BytesIO(raw[:1 << 20]), encoding="utf-8-sig", errors="replace", newline="")
    header = next(csv.reader(head, delimiter="\t" if fmt == "tsv" else ","), None)
    if not header:
        raise InputError(f"manifest {uri} is empty")
    first_row = header if is_headerless(header) else None
    if first_row is not None:  # the Conceptual Captions TSV: the first line is an entry too
        header = [f"column_{i + 1}" for i in range(len(first_row))]
        logger.warning("%s has no header row (its first row holds the entry %r): every row is an entry; its "
                       "columns are %s", uri, next(v for v in first_row if looks_like_entry(v)), ", ".join(header))
    malformed: list[str] = []

    def invalid_row(row) -> str:  # wrong number of fields: counted, not fatal
        malformed.append(row.text[:200])
        return "skip"

    if fmt == "tsv":  # IANA TSV: no quoting, a row per line
        parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False,
                                   invalid_row_handler=invalid_row)
    else:  # RFC 4180
        parse = pacsv.ParseOptions(delimiter=",", newlines_in_values=True, invalid_row_handler=invalid_row)
    # Only an empty field is null (an empty path: a counted skip). pyarrow's default null
    # spellings (NA, N/A, null, nan, None, ...) are file names and captions here: "NA.jpg" is
    # not, but an entry "NA" or a caption "null" was read as missing (arrow#4184).
    convert = pacsv.ConvertOptions(column_types={h: pa.string() for h in header}, strings_can_be_null=True,
                                   null_values=[""])

    def read(b: bytes, block_size: int | None = None) -> pa.Table:
        read_options = pacsv.ReadOptions(column_names=header if first_row is not None else None,
                                         **({"block_size": block_size} if block_size else {}))
        return pacsv.read_csv(io.BytesIO(b), parse_options=parse, convert_options=convert,
                              read_options=read_options)

    try:
        table = parse_text(raw, uri, read)
    except pa.ArrowInvalid as exc:
        if "straddl" not in str(exc):
            raise
        # A value longer than pyarrow's block (1 MB: a data: URI, a long caption, or a stray
        # quote that runs on): the manifest is in memory already, so it is one block.
        malformed.clear()
        table = parse_text(raw, uri, lambda b: read(b, len(b) + 1))
    if fmt == "csv":
        _warn_multiline_values(table, uri, raw)
    table, repeated = _drop_repeated_header(table)
    return table, {"malformed_row": malformed, "repeated_header": repeated}, first_row


def _drop_repeated_header(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """``table`` without the rows whose every value is its column's name (the header again, as
    in manifests concatenated with ``cat``: never an image path), and those rows' text. Compared
    as headers are written: in any case, around spaces, and after the BOM each file may start with."""
    same = None
    for i, name in enumerate(table.column_names):  # by position: a name may be there twice (refused later)
        value = pc.utf8_lower(pc.utf8_trim_whitespace(pc.replace_substring_regex(table.column(i), "^\ufeff", "")))
        eq = pc.fill_null(pc.equal(value, name.strip().lower()), False)
        same = eq if same is None else pc.and_(same, eq)
        if not pc.any(same).as_py():
            return table, []  # most manifests: no row matches the first column's name
    if same is None:  # no columns
        return table, []
    count = pc.sum(same).as_py()
    return table.filter(pc.invert(same)), [",".join(table.column_names)] * count


def _warn_multiline_values(table: pa.Table, uri: str, raw: bytes) -> None:
    """Say how many rows hold a value spanning lines. RFC 4180 allows it (a caption with a line
    break), but a stray opening quote (``"Hello``) joins every following line into one value
    until the next quote: those entries vanish into a caption, uncounted. The warning names the
    first such row so that the user can look.

    Raises:
        InputError: the last value runs to the end of the file inside a quote never closed
            (the entries after it would all be one value).
    """
    spanning = None
    for column in table.columns:
        has_break = pc.fill_null(pc.match_substring_regex(column, "[\r\n]"), False)
        spanning = has_break if spanning is None else pc.or_(spanning, has_break)
    count = pc.sum(spanning).as_py() if spanning is not None else 0
    if count:
        assert spanning is not None  # count > 0
        first = pc.index(spanning, True).as_py()
        if spanning[table.num_rows - 1].as_py() and _quote_left_open(raw):
            # The last value runs to the end of the file: a quote opened and never closed,
            # which RFC 4180 does not allow, and every line after it would vanish into it.
            raise InputError(f"manifest {uri}: a quote (\") opened in data row {table.num_rows} is never closed, so "
                             f"the rest of the file would be one value of that row; close or remove that quote")
        logger.warning("%s: %d rows have a value spanning several lines (the first: data row %d). A quoted "
                       "value may hold line breaks, but an unbalanced quote (\") joins the lines after it into "
                       "one value: check those rows if the manifest lists fewer entries than it has lines",
                       uri, count, first + 1)


def _quote_left_open(raw: bytes) -> bool:
    """Whether the CSV text ends inside a quoted value (Python's csv module, strict)."""
    limit = csv.field_size_limit(max(len(raw) + 1, csv.field_size_limit()))  # a run-on value is long
    try:
        for _ in csv.reader(io.StringIO(raw.decode("utf-8-sig", errors="replace"), newline=""), strict=True):
            pass
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    finally:
        csv.field_size_limit(limit)
    return False


KIND = InputKind(
    name="manifest",
    summary="a .txt (one URI per line), .csv/.tsv (path/url/uri/file_name column) or Parquet file naming "
            "the images; relative entries are relative to the manifest",
    detect=lambda uri, pattern: not pattern and strip_compression(uri.rstrip("/").lower()).endswith(SUFFIXES),
    plan=plan_manifest)
