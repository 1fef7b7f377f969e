"""Input kind ``manifest``: a ``.txt`` (one URI per line), ``.csv``/``.tsv`` or Parquet file naming
the images, read once with pyarrow; never listed, no per-file metadata calls.

Text manifests follow ``zslabel.textfiles`` rules (UTF-8 with or without BOM, UTF-16 with BOM,
any line ends); one that is not UTF-8 is refused with the byte offset. pyarrow validates UTF-8
while parsing, so the check costs nothing unless it fails. Relative entries are relative to the
manifest's folder; a ``%XX`` escape of a byte >= 0x80 in a local entry finds a file whose name
is not UTF-8 (``zslabel.storage.display_name``).
"""

from __future__ import annotations

import codecs
import csv
import io
import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..errors import InputError, ZslabelError
from ..textfiles import decode_text
from .blocks import core_table, dataset_from_table
from .common import (MAX_EXAMPLES, PATH_COLUMN_CANDIDATES, RESERVED_COLUMNS, InputKind, InputOptions,
                     InputPlan, strip_compression)

SUFFIXES = (".txt", ".csv", ".tsv")


def manifest_format(name: str) -> str:
    """The manifest format from its (lower-case) name: parquet, csv, tsv, else txt."""
    for fmt in ("parquet", "csv", "tsv"):
        if strip_compression(name).endswith("." + fmt):
            return fmt
    return "txt"


def read_table(uri: str, options: InputOptions, reader) -> tuple[object, str, pa.Table]:
    """``(fs, fs_path, reader(fs, fs_path, uri))``, any failure but ours as ``InputError``."""
    fs, fs_path = storage.url_to_fs(uri, options.storage_options)
    try:
        return fs, fs_path, reader(fs, storage.open_path(fs, fs_path), uri)
    except ZslabelError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read manifest {uri}: {type(exc).__name__}: {exc}") from exc


def plan_manifest(uri: str, options: InputOptions) -> InputPlan:
    """Plan a manifest file; see the module docstring.

    Raises:
        InputError: unreadable or empty manifest, missing column, no entries.
        TextDecodeError: a text manifest that is not UTF-8 (names the byte offset).
    """
    fs, fs_path, table = read_table(uri, options, _read_manifest)
    if manifest_format(fs_path.lower()) == "txt":
        paths = pc.utf8_trim_whitespace(table.column(0).combine_chunks().cast(pa.string()))
        # A first line naming the column as csv manifests do (path, url, uri) is a header, not an entry.
        if len(paths) and paths[0].as_py() in PATH_COLUMN_CANDIDATES:
            table, paths = table.slice(1), paths.slice(1)
        # Comment and blank lines are not entries.
        table = table.filter(pc.and_(pc.invert(pc.starts_with(paths, "#")), pc.not_equal(paths, "")))
        path_col = table.column_names[0]
    else:
        path_col = pick_column(table.column_names, options.path_column, PATH_COLUMN_CANDIDATES, uri, "path")
    carried = []
    if options.id_column is not None:
        carried = [pick_column(table.column_names, options.id_column, (), uri, "id")]
        if carried[0] in RESERVED_COLUMNS:
            raise InputError(f"id column {carried[0]!r} of {uri} clashes with an output column; "
                             f"rename it (reserved: {', '.join(sorted(RESERVED_COLUMNS))})")
    return plan_path_table(uri, fs, fs_path, table, path_col, carried, options)


def plan_path_table(uri: str, fs, fs_path: str, table: pa.Table, path_col: str, carried: list[str],
                    options: InputOptions, kind: str = "manifest") -> InputPlan:
    """Plan rows naming images: ``table[path_col]`` URIs, ``carried`` columns copied as strings.

    Every row is listed; a row with an empty path is skipped and counted (it cannot become an
    output row); with ``options.dedupe`` later rows of a repeated URI are removed and counted.
    """
    listed = table.num_rows
    paths = pc.utf8_trim_whitespace(table.column(path_col).combine_chunks().cast(pa.string()))
    cols = {c: table.column(c).combine_chunks().cast(pa.string()) for c in carried}
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
        first = (pa.table({"p": paths, "i": pa.array(range(len(paths)), pa.int64())})
                 .group_by("p", use_threads=False).aggregate([("i", "min")]))
        take = first.column("i_min").take(pc.sort_indices(first.column("i_min")))
        removed = len(paths) - len(take)
        paths = paths.take(take)
        cols = {k: v.take(take) for k, v in cols.items()}
    if not len(paths):
        raise InputError(f"no images found in manifest {uri} ({listed} entries, "
                         f"{len(empty_rows)} with an empty path)")
    table = core_table(paths, cols)
    dataset = dataset_from_table(table, options.task_options, options.cluster_cpus)
    return InputPlan(dataset=dataset, kind=kind, listed=listed,
                     skipped=len(empty_rows),
                     skipped_examples=[f"{uri} row {i}" for i in empty_rows[:MAX_EXAMPLES]],
                     duplicates_removed=removed, planning_seconds=0.0, carried_columns=list(cols),
                     planned_paths=table.column("path"))


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
                     f"columns: {', '.join(columns)}; name one with path_column")


def resolve_relative(paths: pa.Array, uri: str, fs, fs_path: str) -> pa.Array:
    """Relative manifest entries are relative to the manifest's folder (as a full URI)."""
    relative = pc.invert(pc.or_(pc.starts_with(paths, "/"),
                                pc.match_substring(paths, "://")))
    if not pc.any(relative).as_py():
        return paths
    base = storage.uri_maker(uri, fs)(posixpath.dirname(fs_path)).rstrip("/") + "/"
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


def _read_manifest(fs, fs_path: str, uri: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fmt = manifest_format(fs_path.lower())
    with fs.open(fs_path, "rb", compression="infer") as f:
        if fmt == "parquet":
            return pq.read_table(f)
        raw = utf8_bytes(f.read(), uri)
    if fmt == "txt":
        # One value per line: no delimiter, no quoting; pyarrow keeps it columnar and fast.
        return parse_text(raw, uri, lambda b: pacsv.read_csv(
            io.BytesIO(b), read_options=pacsv.ReadOptions(column_names=["path"]),
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False,
                                             double_quote=False, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types={"path": pa.string()},
                                                 strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False)))
    delimiter = "\t" if fmt == "tsv" else ","
    # All columns as strings: ids like "00042" must not become integers. The header is parsed
    # with the csv module (handles quoting) to name the columns before pyarrow reads the rest.
    text_head = raw[:1 << 20].decode("utf-8-sig", errors="replace").splitlines()
    if not text_head:
        raise InputError(f"manifest {uri} is empty")
    header = next(csv.reader([text_head[0]], delimiter=delimiter))
    return parse_text(raw, uri, lambda b: pacsv.read_csv(
        io.BytesIO(b), parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(column_types={h: pa.string() for h in header},
                                             strings_can_be_null=True)))


KIND = InputKind(
    name="manifest",
    summary="a .txt (one URI per line), .csv/.tsv (path/url/uri column) or Parquet file naming "
            "the images; relative entries are relative to the manifest",
    detect=lambda uri, pattern: not pattern and strip_compression(uri.rstrip("/").lower()).endswith(SUFFIXES),
    plan=plan_manifest)
