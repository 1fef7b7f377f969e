"""Input kind ``jsonl``: a JSON-lines manifest (``.jsonl``/``.ndjson``, optionally compressed).

One JSON object per line; the image is under the first of ``JSONL_PATH_KEYS`` (``path``,
``url``, ``uri``, ``file_name``; any case) that the line holds with a non-empty value, so lines
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
from .manifest import pick_column, plan_path_table, read_table

# The keys that may name a line's image, in order of preference (README "Input kinds").
JSONL_PATH_KEYS = PATH_COLUMN_CANDIDATES

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".ndjson")


def _read(fs, fs_path: str, uri: str) -> tuple[pa.Table, dict[str, list[str]]]:
    """``(table of strings, {"malformed_row": text of the lines that are no JSON object})``: a
    bad line is a counted skip, as a CSV row with the wrong number of fields is."""
    with storage.open_input(fs, fs_path, "rb", compression=storage.compression_of(fs_path)) as f:
        text = decode_text(f.read(), uri)
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
    keys = list(dict.fromkeys(k for r in records for k in r))
    table = pa.table({k: pa.array([r.get(k) for r in records], pa.string()) for k in keys})
    return table, {"malformed_row": malformed}


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
    summary="a JSON-lines file: one object per line with a path/url/uri/file_name key; other keys are carried",
    detect=lambda uri, pattern: not pattern and strip_compression(uri.rstrip("/").lower()).endswith(SUFFIXES),
    plan=plan_jsonl)
