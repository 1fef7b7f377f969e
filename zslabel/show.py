"""``zslabel show OUT``: the first rows of an output as plain text, one line per row, best
labels first (or the error code), in input order; what was left out is said on stderr so that
piped stdout stays one line per row. No Ray.
"""

from __future__ import annotations

import sys

from .errors import ZslabelError


def show_output(uri: str, rows: int, storage_options: dict) -> str:
    """A plain-text table of the first ``rows`` rows of an output, in input order; when rows are
    left out, says so on stderr ("showing R of N rows"), and when the folder holds no run
    manifest (a run that stopped or failed before its commit) warns there that the rows are
    an unfinished run's.

    Raises:
        ZslabelError: ``uri`` holds no readable zslabel output.
    """
    import pyarrow.dataset as pads

    from .output import ERROR, INPUT_INDEX, LABELS, PATH, SCORES
    from .store import MANIFEST_NAME, output_parquet_files

    fs, files, folder = output_parquet_files(uri, storage_options)
    columns = [PATH, INPUT_INDEX, LABELS, SCORES, ERROR]
    try:
        dataset = pads.dataset(files, filesystem=fs, format="parquet")
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise ZslabelError(f"{uri} is not a zslabel output: its Parquet files have no column "
                               f"{', '.join(missing)} (they hold {', '.join(dataset.schema.names[:8]) or 'none'})")
        if not fs.exists(f"{folder.rstrip('/')}/{MANIFEST_NAME}"):
            print(f"warning: {uri} holds no finished run (no {MANIFEST_NAME}): these rows are an unfinished or "
                  "failed run's; rerun the label command with --resume to finish it", file=sys.stderr)
        table = dataset.to_table(columns=columns)
    except ZslabelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means "not an output"
        # pyarrow's messages can go on for lines (a schema dump): the first says what failed.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ZslabelError(f"cannot read output {uri}: {type(exc).__name__}: {first}") from exc
    total = table.num_rows
    table = table.sort_by(INPUT_INDEX).slice(0, rows)
    if total > table.num_rows:
        # On stderr, so that piped stdout stays one line per row.
        print(f"(showing {table.num_rows} of {total} rows; --rows N for more)", file=sys.stderr)
    shown = table.to_pylist()
    names = display_names([r[PATH] for r in shown])
    width = min(60, max((len(n) for n in names), default=0))
    lines = []
    for r, name in zip(shown, names):
        result = r[ERROR] or "  ".join(f"{lab} {sc:.3f}" for lab, sc in zip(r[LABELS], r[SCORES]))
        lines.append(f"{name:<{width}}  {result}")
    return "\n".join(lines)


def display_names(paths: list[str]) -> list[str]:
    """``paths`` relative to their common folder (two ``a.jpg`` in different folders stay apart),
    with characters a reader could not tell apart escaped: control characters, and every
    non-ASCII character of a name that is not in NFC form (an NFD ``é`` shows as ``e\\u0301``,
    so it does not look like the NFC file beside it)."""
    import posixpath
    import unicodedata

    cut = posixpath.commonprefix(paths).rfind("/") + 1  # one path: its folder
    out = []
    for p in paths:
        name = p[cut:] or p
        nfc = unicodedata.is_normalized("NFC", name)
        out.append("".join(c if c.isprintable() and (nfc or c.isascii()) else c.encode("unicode_escape").decode()
                           for c in name))
    return out
