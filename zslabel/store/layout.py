"""What an output location holds: the names the store writes, and a read-only snapshot.

Layout of an output location ``OUT``::

    OUT/part-<run_id>-<hash>.parquet    committed data: what ``pyarrow.parquet.read_table(OUT)`` reads
    OUT/_run_manifest.json              commit marker of a finished run (written last)
    OUT/_zslabel/claim.json             the live run's claim (owner, heartbeat; ``claim.py``)
    OUT/_zslabel/run.json               the unfinished run: id, mode, fingerprint, where it writes
    OUT/_zslabel/staging/<run_id>/      an ``--overwrite`` run's data until the swap
    OUT/_zslabel/swap.json              a decided swap (staged run -> OUT), rolled forward if cut short

Parquet readers skip names starting with ``_`` or ``.``, so state, staging and temporary files
are never read as data. Every name above is one the store writes (:func:`is_store_file`);
anything else in an output is the user's, and the store never deletes it.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError
from ..output import CLAIM_RECORD, MANIFEST_NAME, RUN_RECORD, STATE_DIR, SWAP_RECORD
from ..storage import canonical_location
from .fsio import is_visible, output_filesystem, visible_parquet_files, write_bytes_atomic

FINGERPRINT_KEY = b"zslabel.fingerprint"
RUN_ID_KEY = b"zslabel.run_id"
STAGING_DIR = f"{STATE_DIR}/staging"
# Run record and manifest key: the files an input kind reads in tasks (``begin``).
INPUT_FILES = "input_files"
TMP_SUFFIX = ".tmp"
# Data files (``files.part_name``: ``part-<run id>-<16 hex>.parquet``, the run id as
# ``session.new_run_id`` makes it) and the hidden temporary files of their atomic writes
# (``fsio.open_atomic``: ``.<name>.<uuid>.tmp``). Exactly these names: ``part-0.parquet`` is what
# pyarrow's ``write_dataset`` names a user's file, and --overwrite must not take it for its own.
_PART = r"part-\d{8}T\d{6}-[0-9a-f]{8}-[0-9a-f]{16}\.parquet"
_DATA_FILE = re.compile(_PART)
_TMP_FILE = re.compile(rf"\.{_PART}\.[0-9a-f]+\.tmp")


def is_store_file(rel: str) -> bool:
    """True when ``rel`` (a path relative to the output root) is a name the store writes: a data
    file or its temporary file in the root, the manifest, or anything under ``_zslabel/``."""
    if rel == MANIFEST_NAME or rel == STATE_DIR or rel.startswith(f"{STATE_DIR}/"):
        return True
    return "/" not in rel and bool(_DATA_FILE.fullmatch(rel) or _TMP_FILE.fullmatch(rel))


@dataclass
class OutputState:
    """What an output location holds (read-only snapshot; nothing is changed by taking it).

    ``files`` are all file paths under ``root`` relative to it, except the claim (which says who
    writes, not what is there); ``run_record`` is None when the last run finished (a record
    whose run id equals the manifest's is a finished run's leftover); ``claim`` is the live or
    stale claim record, None when unclaimed; ``outer`` the zslabel output a folder above
    ``root`` holds (:func:`output_holding`), None when none does (found when first inspected);
    ``sizes`` each file's size in bytes as listed (None where the listing gives none).
    """

    uri: str
    fs: fsspec.AbstractFileSystem
    root: str
    files: list[str]
    manifest: dict | None
    run_record: dict | None
    swap_record: dict | None
    claim: dict | None = None
    outer: str | None = None
    sizes: dict[str, int | None] = field(default_factory=dict)

    def refreshed(self) -> "OutputState":
        """A new snapshot of the same output, through the same filesystem object."""
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache()  # another process may have written since (s3fs caches listings)
        state = snapshot(self.uri, self.fs, self.root)
        state.outer = self.outer
        return state

    @property
    def is_empty(self) -> bool:
        return not self.files

    @property
    def holds_run(self) -> bool:
        """A manifest, an unfinished run or a decided swap is recorded."""
        return bool(self.manifest or self.run_record or self.swap_record)

    def data_files(self, data_dir: str = "") -> list[str]:
        """Relative paths of the Parquet files a reader of ``root/data_dir`` sees, sorted."""
        prefix = f"{data_dir}/" if data_dir else ""
        inside = [rel[len(prefix):] for rel in self.files if rel.startswith(prefix)]
        return [prefix + rel for rel in visible_parquet_files(inside)]

    def data_file_sizes(self, data_dir: str = "") -> dict[str, int | None]:
        """``{name relative to root/data_dir: size in bytes}`` of :meth:`data_files`."""
        prefix = f"{data_dir}/" if data_dir else ""
        return {rel[len(prefix):]: self.sizes.get(rel) for rel in self.data_files(data_dir)}

    def visible_files(self) -> list[str]:
        """Relative paths of every file a Parquet reader of ``root`` would consider (any type)."""
        return sorted(r for r in self.files if is_visible(r))

    def foreign_files(self) -> list[str]:
        """Files the store did not write (``is_store_file`` is False), sorted: the user's."""
        return sorted(r for r in self.files if not is_store_file(r))

    def recorded(self) -> tuple[str | None, dict | None, str, str]:
        """The settings of the run this output holds: ``(fingerprint, fingerprint fields, what
        run (for messages), its data folder)``; the unfinished run's when there is one, else
        the decided swap's, else the finished run's (fingerprint None when none is recorded)."""
        r = self.recorded_run()
        if r is None:
            return None, None, "its Parquet files", ""
        if r is self.run_record:
            return (r.get("fingerprint"), r.get("fingerprint_fields"), f"the unfinished run {r.get('run_id')}",
                    r.get("data_dir", ""))
        return (r.get("fingerprint"), r.get("fingerprint_fields"),
                f"the finished run {r.get('run_id', '(unknown id)')}", "")

    def recorded_run(self) -> dict | None:
        """The unfinished run's record, else the decided swap's manifest, else the manifest."""
        return self.run_record or (self.swap_record or {}).get("manifest") or self.manifest

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root


def enclosing_output(uri: str, storage_options: dict | None = None) -> str | None:
    """The zslabel output folder that holds ``uri`` (``uri`` itself or a folder above it), or
    None. An output is a folder with a run manifest or a ``_zslabel`` state folder (an
    unfinished run). Local paths are compared by real path, so a symlink does not hide one.

    For the commands that write files of their own (report, calibrate, fit, export): a file
    written into a run's folder would be taken for part of the run, or refused as a foreign file
    by the next ``label --overwrite`` of it.
    """
    fs, path = output_filesystem(uri, storage_options)
    return output_holding(fs, path)


def output_holding(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """:func:`enclosing_output` for a path of ``fs`` (without protocol)."""
    path = canonical_location(fs, path)
    while True:
        for marker in (MANIFEST_NAME, STATE_DIR):
            if fs.exists(posixpath.join(path, marker)):
                return path
        parent = posixpath.dirname(path)
        if parent in ("", path):
            return None  # past the filesystem's root, or the bucket
        path = parent


def refuse_inside_output(uri: str, storage_options: dict | None = None, what: str = "this file", *,
                         one_file: bool = False) -> None:
    """Raise ``OutputError`` when ``uri`` lies in a zslabel output folder (:func:`enclosing_output`),
    or names a folder (ends in ``/``) where ``one_file`` is to be written (fsspec wrote a file
    named ``DIR`` for ``DIR/``)."""
    if one_file and uri.endswith("/"):
        raise OutputError(f"{uri} ends in '/', which names a folder; {what} is one file: name the file")
    found = enclosing_output(uri, storage_options)
    if found is not None:
        raise OutputError(f"{uri} is inside the zslabel output {found}: {what} written there would be taken for "
                          "part of the run (or block its next --overwrite); write it outside the run's folder")


def inspect_output(uri: str, storage_options: dict | None = None) -> OutputState:
    """Snapshot of ``uri``: its files, manifest, run, swap and claim records.

    Raises:
        OutputError: ``uri`` is a file, cannot be listed, or holds an unreadable record.
    """
    fs, root = output_filesystem(uri, storage_options)
    state = snapshot(uri, fs, root)
    # The folder above the output itself, whatever its spelling ("RUN/." names RUN, not a folder in it).
    canon = canonical_location(fs, root.rstrip("/") or root)
    parent = posixpath.dirname(canon)
    state.outer = output_holding(fs, parent) if parent and parent != canon else None  # none above "/"
    return state


def snapshot(uri: str, fs: fsspec.AbstractFileSystem, root: str) -> OutputState:
    """:func:`inspect_output` through a filesystem already made (``OutputState.refreshed``: one
    filesystem object per run, so credentials are resolved once).

    Raises:
        OutputError: as :func:`inspect_output`.
    """
    root = root.rstrip("/") or root
    try:
        if not fs.exists(root):
            return OutputState(uri, fs, root, [], None, None, None)
        if not fs.isdir(root):
            raise OutputError(f"output {uri} exists and is a file, not a folder")
        # detail=True: the sizes come with the same listing (no request per file).
        listed = {relative(root, f): info.get("size") for f, info in fs.find(root, detail=True).items()}
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        raise OutputError(f"cannot inspect output location {uri}: {type(exc).__name__}: {exc}") from exc
    files = [f for f in listed if f != CLAIM_RECORD]
    state = OutputState(uri, fs, root, files, None, None, None, sizes=listed)
    state.manifest = read_json(state, MANIFEST_NAME) if MANIFEST_NAME in files else None
    state.run_record = read_json(state, RUN_RECORD) if RUN_RECORD in files else None
    state.swap_record = read_json(state, SWAP_RECORD) if SWAP_RECORD in files else None
    state.claim = read_json_or_none(fs, state.path(CLAIM_RECORD)) if CLAIM_RECORD in listed else None
    if state.run_record and state.manifest and state.manifest.get("run_id") == state.run_record.get("run_id"):
        state.run_record = None  # the run committed; only its cleanup was cut short
    return state


# --------------------------------------------------------------------------------------------
# small I/O helpers shared by the store's modules


def remove(state: OutputState, rel: str, recursive: bool = False) -> None:
    """Delete ``rel`` under the output root if it exists (never raises for a missing file)."""
    path = state.path(rel)
    try:
        if state.fs.exists(path):
            state.fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def remove_debris(state: OutputState, data_dir: str) -> None:
    """Hidden temporary files of writes that never completed (never visible to readers)."""
    for rel in state.files:
        base = posixpath.basename(rel)
        if base.startswith(".") and base.endswith(TMP_SUFFIX) and posixpath.dirname(rel) in ("", data_dir):
            remove(state, rel)


def read_json(state: OutputState, rel: str) -> dict:
    try:
        with state.fs.open(state.path(rel), "r") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot read {state.path(rel)}: {type(exc).__name__}: {exc}") from exc


def read_json_or_none(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """The JSON object at ``path``; None when missing or not (yet) valid JSON."""
    try:
        with fs.open(path, "r") as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None


def write_json(state: OutputState, rel: str, obj: dict) -> str:
    path = state.path(rel)
    write_bytes_atomic(state.fs, path, json_bytes(obj))
    return path


def json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def relative(root: str, path: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path


def arrow_fs(fs):
    """An fsspec filesystem as a pyarrow filesystem (local stays native for speed)."""
    import pyarrow.fs as pafs
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
