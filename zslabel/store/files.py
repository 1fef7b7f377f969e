"""The task side of the store: what Ray writer tasks (``label``) and relabel's loop call to
drop committed inputs and publish data files. Ray-free; picklable arguments only.

Commit protocol (per data file): a file is committed once it is visible under its final name.
On local/shared filesystems it is written to a hidden temporary name beside its final name,
fsynced and renamed into place (``os.replace`` is atomic); on object stores it is one upload,
and an object appears only when its upload completes. A visible file is therefore always whole,
and a run cut short leaves only whole, committed files plus hidden debris. File names are
``part-<run_id>-<sha1 of the rows' input_index>``, so a writer task that Ray retries rewrites
the same file instead of adding a copy.

The run record ``_zslabel/run.json`` doubles as a fence: a writer task publishes a file only
while the record names its run, so tasks of a killed driver that outlive it cannot add rows
after a resumed run has taken over.
"""

from __future__ import annotations

import errno
import hashlib
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import OutputError
from ..output import ERROR, INPUT_INDEX
from .fsio import open_atomic, output_filesystem
from .layout import FINGERPRINT_KEY, RUN_ID_KEY, RUN_RECORD, parquet_bytes, read_json_or_none


@dataclass(frozen=True)
class WriteTarget:
    """Where the writer tasks of one run publish files (picklable; sent to Ray tasks).

    ``data_dir`` is relative to the output root ("" or a staging folder).
    """

    uri: str
    storage_options: dict
    data_dir: str
    run_id: str
    fingerprint: str


def part_name(run_id: str, input_index: np.ndarray) -> str:
    """``part-<run_id>-<sha1 of input_index>.parquet``: the same rows give the same name."""
    idx = np.ascontiguousarray(input_index, np.int64)
    return f"part-{run_id}-{hashlib.sha1(idx.tobytes()).hexdigest()[:16]}.parquet"


def not_done(input_index: np.ndarray, done: np.ndarray) -> np.ndarray:
    """The values of ``input_index`` ((N,) int64) not in ``done`` ((M,) int64, sorted)."""
    return input_index[~np.isin(input_index, done)] if len(done) else input_index


def drop_committed(batch: pa.Table, done: np.ndarray) -> pa.Table:
    """Rows of ``batch`` whose ``input_index`` is not in ``done`` ((M,) int64, sorted)."""
    if not len(done) or batch.num_rows == 0:
        return batch
    idx = batch.column(INPUT_INDEX).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    pos = np.minimum(np.searchsorted(done, idx), len(done) - 1)
    return batch.filter(pa.array(done[pos] != idx))


# One row per committed file; ``errors``: its rows with an error code (for the progress display).
# ``failure``: set (``file`` null, ``rows`` 0) when the block could not be written (``write_failure``).
WRITE_RESULT_SCHEMA = pa.schema([pa.field("file", pa.string()), pa.field("rows", pa.int64()),
                                 pa.field("errors", pa.int64()), pa.field("failure", pa.string())])


def write_block(table: pa.Table, target: WriteTarget) -> pa.Table:
    """Commit one block of output rows as one Parquet file under ``target``.

    Args:
        table: output rows (``output.output_schema``), N >= 0.
        target: from :class:`RunPlan`.

    Returns:
        One row ``(file, rows, errors, failure=None)`` naming the committed file (none for an
        empty block); or, when the output cannot be written and a retry cannot mend it (an
        ``OSError``: a full disk, a quota, a read-only or unwritable folder, a file in the way),
        one row whose ``failure`` says so
        (``write_failure``), nothing published. Returned, not raised: Ray hands the driver a
        task's exception as a ``UserCodeException`` that has lost it (its cause is dropped on
        the way) after printing a traceback; ``pipeline.consume`` raises it as an OutputError.

    Raises:
        OutputError: the run record no longer names this run (a newer run took over the output);
            nothing is published then.
    """
    if table.num_rows == 0:
        return WRITE_RESULT_SCHEMA.empty_table()
    idx = table.column(INPUT_INDEX).to_numpy(zero_copy_only=False)
    try:
        with open_part(target, idx) as (fh, name):
            fh.write(parquet_bytes(table.replace_schema_metadata(stamped_metadata(table.schema, target))))
    except OSError as exc:
        if exc.errno not in _NO_SPACE + _NOT_WRITABLE + _IN_THE_WAY:
            raise  # a reset connection, a timeout: Ray retries the task, as before
        return pa.Table.from_pylist([{"file": None, "rows": 0, "errors": 0, "failure": write_failure(target.uri, exc)}],
                                    schema=WRITE_RESULT_SCHEMA)
    errors = table.num_rows - table.column(ERROR).null_count
    return pa.Table.from_pylist([{"file": name, "rows": table.num_rows, "errors": errors, "failure": None}],
                                schema=WRITE_RESULT_SCHEMA)


# The failures no retry of the task can mend (the others, such as a connection reset by an
# object store, are raised for Ray's task retries).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_IN_THE_WAY = (errno.EEXIST, errno.ENOTDIR, errno.EISDIR)  # a file where the output needs a folder


def write_failure(uri: str, exc: OSError) -> str:
    """The message for a data file of the output ``uri`` that could not be written (``exc``:
    ENOSPC, EDQUOT, EROFS, EACCES, ...): what failed, that the committed files are kept, and
    what to do before ``--resume``."""
    if exc.errno in _NO_SPACE:
        fix = "free space"
    elif exc.errno in _NOT_WRITABLE:
        fix = "make the output writable"
    else:
        fix = "fix the output's storage"
    return (f"cannot write the output {uri}: {type(exc).__name__}: {exc}; the files committed so far are kept: "
            f"{fix} and rerun with --resume")


def stamped_metadata(schema: pa.Schema, target: WriteTarget) -> dict:
    """``schema``'s metadata plus this run's fingerprint and id (read back by resume checks)."""
    metadata = dict(schema.metadata or {})
    metadata.update({FINGERPRINT_KEY: target.fingerprint.encode(), RUN_ID_KEY: target.run_id.encode()})
    return metadata


@contextmanager
def open_part(target: WriteTarget, input_index: np.ndarray):
    """Commit one data file of this run: yields ``(binary file handle, file name)``; the file is
    published under its final name when the block exits without an exception (atomically, see
    ``fsio.open_atomic``) and never otherwise.

    The name is ``part-<run_id>-<sha1 of input_index>``: a retried writer rewrites the same file.

    Args:
        input_index: (N,) int64 ``input_index`` values of the rows the file will hold.

    Raises:
        OutputError: the run record no longer names this run (a newer run took over the output);
            nothing is published then.
    """
    fs, root = output_filesystem(target.uri, target.storage_options)
    root = root.rstrip("/") or root
    name = part_name(target.run_id, input_index)
    record = read_json_or_none(fs, posixpath.join(root, RUN_RECORD))
    if (record or {}).get("run_id") != target.run_id:
        raise OutputError(f"output {target.uri} is now owned by run {(record or {}).get('run_id')}, not "
                          f"{target.run_id}; this run's file {name} is not published")
    with open_atomic(fs, posixpath.join(root, target.data_dir, name) if target.data_dir
                     else posixpath.join(root, name)) as fh:
        yield fh, name
