"""What every export format shares: reading a finished run's output as a stream of Arrow record
batches, the export's result line, and the "output already exists" check. No Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError, OutputError
from ..output import EMBEDDING, ERROR, LABELS, PATH, SCORES
from ..store import (
    MANIFEST_NAME,
    footer_checked_batches,
    output_filesystem,
    output_parquet_files,
    read_manifest,
    refuse_inside_output,
)

# Rows per record batch read from the run's Parquet files: the unit of memory of every export
# (8,192 rows of a 512-d float16 embedding are ~8 MB).
BATCH_ROWS = 8192


@dataclass
class RunOutput:
    """A finished ``zslabel label``/``relabel`` output opened for export.

    Attributes:
        uri: the output folder (or one Parquet file) as given.
        fs: its fsspec filesystem. files: its visible Parquet files, in name order.
        schema: the Arrow schema of its first file (every file of a run has the same one).
        manifest: ``_run_manifest.json`` as a dict.
    """

    uri: str
    fs: fsspec.AbstractFileSystem
    files: list[str]
    schema: pa.Schema
    manifest: dict[str, Any]

    @property
    def run_id(self) -> str:
        """The run's id from its manifest (``runstate`` writes it), else ``"unknown"``."""
        return str(self.manifest.get("run_id") or "unknown")

    @property
    def labels(self) -> list[str]:
        """The run's candidate labels, in the run's order (from its manifest)."""
        return list(self.manifest.get("labels") or [])

    @property
    def rows(self) -> int | None:
        """Rows the manifest counts (None when it does not say)."""
        return (self.manifest.get("counts") or {}).get("rows")

    def has(self, column: str) -> bool:
        return column in self.schema.names

    def batches(self, columns: list[str] | None = None, batch_size: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``batch_size`` rows over every file, in file order.

        Only one batch (plus one Parquet row group being decoded) is in memory at a time.

        Args:
            columns: columns to read (default: all of ``schema``), in that order.

        Raises:
            InputError: a file whose schema differs from the first file's (not one run's output)
                or that cannot be read.
        """
        names = list(columns or self.schema.names)
        for f in self.files:
            try:
                with self.fs.open(f, "rb") as fh:
                    reader = pq.ParquetFile(fh)
                    missing = [c for c in names if c not in reader.schema_arrow.names]
                    if missing:
                        raise InputError(f"{f} has no column(s) {', '.join(missing)}: the files of {self.uri} "
                                         "are not one run's output")
                    yield from footer_checked_batches(reader, f, batch_size=batch_size, columns=names)
            except (OSError, pa.ArrowInvalid) as exc:
                raise InputError(f"cannot read {f}: {type(exc).__name__}: {exc}") from exc


def open_run(uri: str, storage_options: dict | None = None,
             required: tuple[str, ...] = (PATH, LABELS, SCORES, ERROR)) -> RunOutput:
    """Open a finished run's output for export.

    Raises:
        InputError: no such output, no Parquet files, no ``_run_manifest.json`` (an unfinished
            run: finish it with ``--resume`` first), or a ``required`` column missing.
    """
    fs, files, root = output_parquet_files(uri, storage_options)
    manifest = read_manifest(root, storage_options)
    if manifest is None:
        raise InputError(f"{uri} has no {MANIFEST_NAME}: it is not a finished zslabel "
                         "run (finish it with `zslabel label ... --resume`, then export)")
    try:
        with fs.open(files[0], "rb") as fh:
            schema = pq.ParquetFile(fh).schema_arrow
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read {files[0]}: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise InputError(f"{uri} is not a zslabel output: no {', '.join(missing)} column")
    return RunOutput(uri, fs, files, schema, manifest)


def embedding_dim(schema: pa.Schema) -> int | None:
    """Length of the fixed-size ``embedding`` column, or None when the output has none."""
    if EMBEDDING not in schema.names:
        return None
    return getattr(schema.field(EMBEDDING).type, "list_size", None)


def check_free(uri: str, overwrite: bool, storage_options: dict | None = None, what: str = "export", *,
               replaceable: Callable[[Any, str], bool] | None = None) -> None:
    """Refuse to replace an existing file or folder at ``uri`` unless ``overwrite`` (the same
    rule as ``zslabel label``'s output: nothing is replaced by accident).

    Args:
        replaceable: ``(fs, path) -> bool`` for an existing ``uri``: whether ``--overwrite`` may
            replace it (a format that writes a folder says "an earlier export of mine, or an
            empty folder", so that a folder holding other files is never written into).

    Raises:
        OutputError: ``uri`` exists and ``overwrite`` is False, or ``replaceable`` says no; a
            file's ``uri`` (no ``replaceable``) ends in ``/``.
    """
    refuse_inside_output(uri, storage_options, f"a {what}", one_file=replaceable is None)
    fs, path = output_filesystem(uri, storage_options)
    if not fs.exists(path):
        return
    if not overwrite:
        raise OutputError(f"{what} {uri} already exists; pass --overwrite to replace it")
    if replaceable is not None and not replaceable(fs, path):
        raise OutputError(f"{what} {uri} exists and is not one: --overwrite replaces only an earlier {what} or "
                          "an empty folder, never other files; choose a new path")


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        format: the format's registry name. outputs: the files or tables written.
        rows: rows (tasks) written. source_rows: rows of the run that were read.
        left_out: rows not exported, by reason (``error`` rows, ...).
        notes: further facts for the message (index parameters, order, ...).
        seconds: wall time of the export.
    """

    format: str
    outputs: list[str]
    rows: int
    source_rows: int
    left_out: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        """One human line: what was written, what was left out and why."""
        left = ", ".join(f"{n} {why}" for why, n in self.left_out.items() if n) or "none"
        return (f"exported {self.rows} of {self.source_rows} rows as {self.format} to {', '.join(self.outputs)}; "
                f"left out: {left}; {self.seconds:.1f} s" + "".join(f"; {n}" for n in self.notes))
