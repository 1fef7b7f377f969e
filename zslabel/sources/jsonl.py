"""Input kind ``jsonl``: a JSON-lines manifest (``.jsonl``/``.ndjson``/``.json``, optionally
compressed), or a JSON array of entries (a file whose first character but blanks is ``[``).

One JSON object per line (per array element; an element may also be a string: its path);
the image is under the first of ``JSONL_PATH_KEYS`` (``path``, ``url``, ``uri``,
``file_name``; any case) that the line holds with a non-empty value, so lines
of one file may name their image by different keys (or only under ``path_column`` when one is
given). ``file_name`` is the key of Hugging Face ``imagefolder``'s ``metadata.jsonl``. Every
other key is carried to the output as a string column (non-string values as JSON text; keys
the output owns, such as ``labels``, are left out with a warning); a key that named the image
of some line is not carried. Blank lines are not entries. Everything else (relative entries,
empty paths, dedupe, counts) is the manifest rule.

This module is the worked example of adding a kind: one module and one line in the registry.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa

from .. import storage
from ..errors import InputError
from ..textfiles import decode_text
from .common import PATH_COLUMN_CANDIDATES, RESERVED_COLUMNS, InputKind, InputOptions, InputPlan, strip_compression
from .manifest import id_columns, pick_column, plan_path_table, read_table

# The keys that may name a line's image, in order of preference (README "Input kinds").
JSONL_PATH_KEYS = PATH_COLUMN_CANDIDATES

logger = logging.getLogger(__name__)

# ``.json``: what Hugging Face datasets' JSON builder reads under that name, JSON lines (BigQuery
# and Spark exports) or one JSON array (scrapers, web APIs).
SUFFIXES = (".jsonl", ".ndjson", ".json")


def _read(fs, fs_path: str, uri: str) -> tuple[pa.Table, dict[str, list[str]]]:
    """``(table of strings, {"malformed_row": text of the lines that are no JSON object})``: a
    bad line is a counted skip, as a CSV row with the wrong number of fields is. A file that is
    one JSON array is read by :func:`_read_array`.

    Raises:
        InputError: no line is a JSON object and the file is one JSON object over several lines
            (:func:`_refuse_one_object`) or starts as a JSON array but is not one.
    """
    with storage.open_input(fs, fs_path, "rb", compression=storage.compression_of(fs_path)) as f:
        text = decode_text(f.read(), uri)
    start = text.lstrip("\ufeff \t\r\n")[:1]
    array_error = None
    if start == "[":  # one JSON array, else JSON lines whose first line is a (malformed) array
        try:
            return _read_array(text, uri)
        except json.JSONDecodeError as exc:
            array_error = exc
    records: list[dict] = []
    malformed: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.lstrip("\ufeff")  # files concatenated with cat keep each one's BOM
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
            if problem is None:  # carried values as text now: dumps can hit the depth limit too
                record = {k: _text(v) for k, v in record.items()}
        except json.JSONDecodeError as exc:
            problem = f"not JSON ({exc.msg} at column {exc.colno})"
        except RecursionError:  # valid JSON nested deeper than Python's decoder goes (simplejson#334)
            problem = "JSON nested too deeply to read"
        if problem is not None:
            if not malformed:
                logger.warning("%s line %d: %s; such lines are skipped and counted (malformed_row)", uri, number,
                               problem)
            malformed.append(f"line {number}: {line[:200]}")
            continue
        records.append(record)
    if not records and array_error is not None:
        raise InputError(f"cannot read manifest {uri}: it starts as a JSON array but is not one "
                         f"({array_error.msg} at line {array_error.lineno} column {array_error.colno}), "
                         "nor JSON lines")
    if not records and start == "{":
        _refuse_one_object(text, uri)
    return _table(records), {"malformed_row": malformed}


def _refuse_one_object(text: str, uri: str) -> None:
    """Raise when ``text`` is one JSON object over several lines (COCO's annotation file, a
    pretty-printed record): which of its keys hold lists, and how to write them as lines.

    Raises:
        InputError: when it is such an object; nothing when it is not JSON at all.
    """
    try:
        whole = json.loads(text.lstrip("\ufeff"))
    except (json.JSONDecodeError, RecursionError):
        return
    if isinstance(whole, dict):
        lists = [k for k, v in whole.items() if isinstance(v, list)]
        key = lists[0] if lists else "KEY"
        raise InputError(f"manifest {uri} is one JSON object, not JSON lines or an array of entries"
                         + (f"; its keys holding lists: {', '.join(lists[:10])}" if lists else "")
                         + f"; write the entries one per line: jq -c '.{key}[]' F.json > F.jsonl")


def _read_array(text: str, uri: str) -> tuple[pa.Table, dict[str, list[str]]]:
    """A JSON array as :func:`_read` reads lines: each object an entry, each string a path
    (``{"path": s}``); any other element (number, null, nested array) a counted
    ``malformed_row`` named by its index.

    Raises:
        json.JSONDecodeError: the text is not one JSON array (the caller reads it as lines).
        InputError: an array nested too deeply to read.
    """
    try:
        elements = json.loads(text.lstrip("\ufeff"))
    except RecursionError as exc:
        raise InputError(f"cannot read manifest {uri}: JSON nested too deeply to read") from exc
    records: list[dict] = []
    malformed: list[str] = []
    for index, element in enumerate(elements):
        if isinstance(element, str):
            element = {"path": element}
        if not isinstance(element, dict):
            if not malformed:
                logger.warning("%s element %d: expected a JSON object or a path string, got %s; such elements are "
                               "skipped and counted (malformed_row)", uri, index, type(element).__name__)
            malformed.append(f"element {index}: {json.dumps(element)[:200]}")
            continue
        try:
            records.append({k: _text(v) for k, v in element.items()})
        except RecursionError:
            malformed.append(f"element {index}: JSON nested too deeply to read")
    return _table(records), {"malformed_row": malformed}


def _table(records: list[dict]) -> pa.Table:
    """One string column per key any record has (in first-seen order), null where a record lacks it."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return pa.table({k: pa.array([r.get(k) for r in records], pa.string()) for k in keys})


def _text(value) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def plan_jsonl(uri: str, options: InputOptions) -> InputPlan:
    """Plan a JSON-lines manifest; see the module docstring.

    Raises:
        InputError: unreadable file, no JSON object at all, no path key, no entries.
        TextDecodeError: the file is not UTF-8 (names the byte offset).
    """
    fs, fs_path, (table, dropped) = read_table(uri, options, _read)
    if table.num_columns == 0:
        bad = len(dropped["malformed_row"])
        raise InputError(f"no images found in manifest {uri} (no JSON objects"
                         + (f"; {bad} lines are not: the first, {dropped['malformed_row'][0]})" if bad else ")"))
    if options.path_column is not None:
        path_col = pick_column(table.column_names, options.path_column, (), uri, "path")
        paths, used = table.column(path_col).combine_chunks(), {path_col}
    else:
        paths, used = _first_key(table, uri)
    # Every key is carried, the id's too; one --id-column names must exist (as in a CSV), not be
    # silently missing from the output.
    id_columns(table, options, uri)
    reserved = [c for c in table.column_names if c not in used and c in RESERVED_COLUMNS]
    if reserved:
        logger.warning("%s: keys %s are output columns and are not carried", uri, ", ".join(reserved))
    carried = [c for c in table.column_names if c not in used and c not in RESERVED_COLUMNS]
    return plan_path_table(uri, fs, fs_path, table, paths, carried, options, kind="jsonl", dropped=dropped)


def _first_key(table: pa.Table, uri: str) -> tuple[pa.Array, set[str]]:
    """Per line, the value of the first ``JSONL_PATH_KEYS`` key (any case) that is set and not
    blank: ((N,) strings, null where none; the keys that named some line's image).

    Raises:
        InputError: no line has any of the keys.
    """
    by_lower: dict[str, list[str]] = {}
    for c in table.column_names:
        by_lower.setdefault(c.lower(), []).append(c)
    keys = [c for k in JSONL_PATH_KEYS for c in by_lower.get(k, [])]
    if not keys:
        raise InputError(f"no path column in {uri} (no line has a key of {', '.join(JSONL_PATH_KEYS)}); keys: "
                         f"{', '.join(table.column_names)}; name one with --path-column")
    values = [table.column(k).to_pylist() for k in keys]
    paths: list[str | None] = []
    used: set[str] = set()
    for row in zip(*values):
        for key, value in zip(keys, row):
            if value is not None and value.strip(" \t\r\n"):
                paths.append(value)
                used.add(key)
                break
        else:
            paths.append(None)
    return pa.array(paths, pa.string()), used


KIND = InputKind(
    name="jsonl",
    summary="a JSON-lines file (or a JSON array): one object per line with a path/url/uri/file_name key; "
            "other keys are carried",
    detect=lambda uri, pattern: not pattern and strip_compression(uri.rstrip("/").lower()).endswith(SUFFIXES),
    plan=plan_jsonl)
