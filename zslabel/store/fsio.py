"""An output's files on any fsspec filesystem: where it is (``output_filesystem``), which of its
files are data (``is_visible``, ``visible_parquet_files``, ``output_parquet_files``), atomic
writes (``open_atomic``), the run manifest (``MANIFEST_NAME``, ``read_manifest``) and reading a
file's rows whole (``footer_checked_batches``).

Every command that reads or writes an output goes through these (the store itself, relabel,
evaluate, calibrate, fit, export, report), so "which files are the run's" has one definition.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator

import fsspec
import pyarrow as pa

from ..errors import InputError, OutputError
from ..output import MANIFEST_NAME, STATE_DIR
from ..storage import url_to_fs


def output_filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fsspec filesystem, path without protocol)`` for an output URI or local path."""
    return url_to_fs(uri, storage_options, error=OutputError)


def is_visible(rel: str) -> bool:
    """Whether a Parquet reader of an output folder reads ``rel`` (a path relative to it): no part
    of the path starts with ``_`` or ``.`` (state, staging, manifest and temporary files)."""
    return not any(part.startswith(("_", ".")) for part in rel.split("/"))


def visible_parquet_files(rel_paths: list[str]) -> list[str]:
    """The data files of an output: the visible ``.parquet`` paths among ``rel_paths``, sorted.

    The one definition of "which Parquet files of an output are read" (store, relabel,
    evaluate and show all use it)."""
    return sorted(r for r in rel_paths if r.endswith(".parquet") and is_visible(r))


def nested_outputs(rel_paths: list[str]) -> list[str]:
    """The folders below an output's root that are zslabel outputs themselves (they hold a run
    manifest or a ``STATE_DIR``), outermost only, relative and sorted. ``rel_paths``: every file
    under the root, relative to it. The root's own state folder is not one.

    Their data files are visible to a reader of the root (``is_visible`` looks at names, not
    depth), so reading or writing the root would mix their rows with its own.
    """
    found = set()
    for rel in rel_paths:
        parts = rel.split("/")
        if parts[0] == STATE_DIR:
            continue
        if STATE_DIR in parts[1:]:
            found.add("/".join(parts[:parts.index(STATE_DIR, 1)]))
        elif len(parts) > 1 and parts[-1] == MANIFEST_NAME:
            found.add("/".join(parts[:-1]))
    return sorted(f for f in found if not any(f.startswith(other + "/") for other in found))


def describe_nested(uri: str, nested: list[str]) -> str:
    """One line naming the outputs ``nested_outputs`` found below ``uri`` (the first three)."""
    shown = ", ".join(posixpath.join(uri.rstrip("/"), n) for n in nested[:3])
    more = f" and {len(nested) - 3} more" if len(nested) > 3 else ""
    what = "zslabel outputs in folders" if len(nested) > 1 else "a zslabel output in a folder"
    return f"{uri} holds {what} below it ({shown}{more})"


def output_parquet_files(uri: str, storage_options: dict | None = None
                         ) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    """The data files of an output folder (or the one Parquet file ``uri`` names), in name order,
    and the folder holding its run manifest.

    Returns:
        ``(fsspec filesystem, [file paths without protocol], folder path)``.

    Raises:
        InputError: ``uri`` does not exist, cannot be listed, or holds no visible Parquet file.
    """
    fs, root = output_filesystem(uri, storage_options)
    try:
        if fs.isfile(root):
            return fs, [root], posixpath.dirname(root)
        if not fs.exists(root):
            raise InputError(f"{uri} does not exist")
        root = root.rstrip("/") or root
        found = [posixpath.relpath(f, root) for f in fs.find(root)]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        raise InputError(f"cannot list {uri}: {type(exc).__name__}: {exc}") from exc
    nested = nested_outputs(found)
    if nested:
        raise InputError(f"{describe_nested(uri, nested)}: their rows would be read as {uri}'s. Pass "
                         + ("that output's folder" if len(nested) == 1 else "one of those folders"))
    rel = visible_parquet_files(found)
    if not rel:
        raise InputError(f"no Parquet files under {uri}; pass the output folder of a zslabel run")
    _check_files_against_manifest(fs, root, uri, len(rel))
    return fs, [posixpath.join(root, r) for r in rel], root


def _check_files_against_manifest(fs: fsspec.AbstractFileSystem, root: str, uri: str, found: int) -> None:
    """A finished run's readers (show, report, export, eval, calibrate, fit, relabel) read every
    visible Parquet file of the folder: a part file deleted since, or a Parquet file another
    tool (or a copy) put there, would silently lose or add rows. The run manifest records how
    many data files the run committed (``counts.files``); a folder holding another number is
    refused. Folders without a manifest (an unfinished run) are read as they are; ``show``
    warns about those.

    Raises:
        InputError: naming both numbers and the way to repair.
    """
    path = posixpath.join(root, MANIFEST_NAME)
    try:
        with fs.open(path, "r") as fh:
            recorded = (json.load(fh).get("counts") or {}).get("files")
    except FileNotFoundError:
        return
    except Exception:  # noqa: BLE001 - an unreadable manifest is the store's to report, not a reader's
        return
    if isinstance(recorded, int) and recorded != found:
        raise InputError(
            f"{uri} holds {found} Parquet files but its run manifest records {recorded}: files were "
            f"{'added' if found > recorded else 'deleted'} since the run finished, and reading it would "
            f"{'add' if found > recorded else 'lose'} rows. Remove files zslabel did not write, or rerun the "
            "label command with --resume to label what is missing")


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str):
    """A binary file handle whose content appears at ``path`` whole when the block exits without
    an exception, and not at all otherwise: readers see the old file or the whole new one.

    Local (and network-mounted) filesystems: a hidden ``.<name>.<uuid>.tmp`` beside ``path``
    (Parquet readers skip dot files), fsync, then ``os.replace`` (atomic on POSIX); the data
    streams to disk. Other fsspec filesystems (s3, gs, az, memory): buffered in memory, then one
    upload; an object becomes visible only when its upload completes (an fsspec file closed by
    an exception would still publish what was written, hence the buffer). A crash can leave a
    hidden ``.tmp`` file, never a torn ``path``.
    """
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        parent, name = posixpath.split(fs._strip_protocol(path))
        os.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, posixpath.join(parent, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        buffer = io.BytesIO()
        yield buffer
        with fs.open(path, "wb") as fh:
            fh.write(buffer.getvalue())


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`open_atomic`)."""
    with open_atomic(fs, path) as fh:
        fh.write(data)


def read_manifest(uri: str, storage_options: dict | None = None) -> dict | None:
    """The run manifest under ``uri``, or None when there is none."""
    fs, root = output_filesystem(uri, storage_options)
    path = posixpath.join(root, MANIFEST_NAME)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def footer_checked_batches(reader, uri: str, **kwargs) -> Iterator[pa.RecordBatch]:
    """``reader.iter_batches(**kwargs)`` (a ``pyarrow.parquet.ParquetFile``), held to the rows
    its footer gives for the row groups read.

    pyarrow can end a damaged row group's batches early without raising (a data page header
    whose value count was overwritten): without this check a reader of such a file would go on
    with rows silently missing.

    Raises:
        pyarrow.ArrowInvalid: the batches gave another number of rows than the footer (the
            file named), as pyarrow raises for other damage; callers say what the file was for.
    """
    groups = kwargs.get("row_groups")
    meta = reader.metadata
    expected = sum(meta.row_group(g).num_rows for g in (range(meta.num_row_groups) if groups is None else groups))
    got = 0
    for batch in reader.iter_batches(**kwargs):
        got += batch.num_rows
        yield batch
    if got != expected:
        raise pa.ArrowInvalid(f"{uri} gave {got} rows where its footer gives {expected} (damaged pages)")
