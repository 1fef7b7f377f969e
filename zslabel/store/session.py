"""A run's write session on an output: begin (by mode), count, commit (or swap), release.

Modes (checked before any image is read, ``checks.check_mode``):

- ``error`` (default): refuse an output location that holds anything.
- ``resume``: continue the unfinished run (or extend a finished one) when its fingerprint equals
  this run's; inputs whose ``input_index`` is in a committed file are dropped before decoding
  (no model call); error rows are kept unless ``retry_errors``, which removes them from their
  files so exactly those inputs are recomputed.
- ``overwrite``: write the new run to ``_zslabel/staging/<run_id>/`` while the old output stays
  readable, then swap (see :meth:`WriteSession.commit`). Only files the store wrote are ever
  deleted; an output holding anything else is refused before anything changes.

Every session holds the output's claim (``claim.py``) from before its first change to after its
commit, so two runs can never write one output; the commit re-checks the claim, keeps only rows
of files carrying this run's fingerprint, and refuses to commit when the rows do not account for
every listed input (:class:`Accounting`).

Why not Ray Data's job-level checkpointing (``DataContext.checkpoint_config``, ray 2.60): it
filters by id right after a ``Read`` operator and commits ids per written file, but here the
``input_index`` column is made by map stages after the read (``ray.data.range`` + block cutting,
tar/Parquet readers), where that filter fails (KeyError) or, for ``from_items``/``from_arrow``
sources, is silently not applied (rows duplicated on rerun); it also records error rows as done,
has no fingerprint check or atomic overwrite, and adds an actor pool plus a loading pass.
"""

from __future__ import annotations

import datetime
import logging
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import AccountingError, OutputError
from ..output import MANIFEST_NAME
from .checks import check_same_files, check_same_inputs, refuse_resume
from .claim import Claim
from .files import WriteTarget
from .fingerprint import describe_changes, fingerprint_digest
from .layout import (
    INPUT_FILES,
    RUN_RECORD,
    STAGING_DIR,
    STATE_DIR,
    SWAP_RECORD,
    OutputState,
    is_store_file,
    remove,
    remove_debris,
    write_json,
)
from .scan import RunCounts, Scan, count_rows, drop_error_rows, resolve_duplicates, scan_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accounting:
    """What the input side counted, to check ``listed == rows + skipped + duplicates_removed``.

    Attributes:
        listed: entries listed (files, manifest lines, tar members, source rows); None when the
            input kind cannot count them (the check is then skipped and the manifest says so).
        skipped: listed entries that are not images (counted, with reasons, in the manifest).
        duplicates_removed: listed entries dropped as duplicates (``--dedupe``).
    """

    listed: int | None
    skipped: int = 0
    duplicates_removed: int = 0

    def check(self, uri: str, rows: int) -> None:
        """Raise AccountingError unless ``rows`` output rows account for every listed entry."""
        if self.listed is None:
            return
        expected = self.listed - self.skipped - self.duplicates_removed
        if rows != expected:
            what = f"{expected - rows} inputs have no row" if rows < expected else f"{rows - expected} rows too many"
            raise AccountingError(
                f"output {uri}: accounting check failed, run not committed: {self.listed} inputs listed = "
                f"{self.skipped} skipped + {self.duplicates_removed} duplicates + {expected} rows expected, but "
                f"the output holds {rows} rows ({what}). This is a zslabel bug; please report it with the "
                "input listing. The written rows are kept: --resume labels what is missing")


def new_run_id() -> str:
    """``YYYYmmddTHHMMSS-<8 hex>`` (UTC): sortable by start time, unique per run."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{uuid.uuid4().hex[:8]}"


@dataclass
class WriteSession:
    """One run writing one output (see the module docstring).

    Attributes:
        target: where writer tasks publish (picklable).
        fields: the fingerprint fields; ``target.fingerprint`` is their digest.
        done: (M,) int64, sorted, unique: ``input_index`` values already committed (resume);
            the pipeline drops these inputs before decoding.
        carried_rows: rows kept from earlier runs (``len(done)``).
        retried_rows: error rows removed for recomputation (``retry_errors``).
        staged: True when this run writes to a staging folder and swaps at commit.
        carried_files: data files of earlier runs this run keeps (relative paths).
    """

    state: OutputState
    target: WriteTarget
    fields: dict[str, Any]
    done: np.ndarray
    claim: Claim | None = None
    carried_rows: int = 0
    retried_rows: int = 0
    staged: bool = False
    carried_files: tuple[str, ...] = ()
    committed: bool = False

    @property
    def run_id(self) -> str:
        return self.target.run_id

    @property
    def fingerprint(self) -> str:
        return self.target.fingerprint

    def counts(self) -> RunCounts:
        """Counts over this run's committed data folder, after making each input appear once
        (``scan.resolve_duplicates``) and checking that every file is this run's or one it
        carried over with the same fingerprint.

        Raises:
            OutputError: files of earlier runs hold an input twice, or a file of another run
                appeared (nothing is committed).
        """
        t = self.target
        state = self.state.refreshed()
        files = state.data_files(t.data_dir)
        mine = f"part-{self.run_id}-"
        strangers = [f for f in files if f not in self.carried_files and not posixpath.basename(f).startswith(mine)]
        if strangers:
            raise OutputError(f"output {t.uri}: files of another run appeared while run {self.run_id} held the "
                              f"output ({', '.join(strangers[:3])}); not committed. Run again with --overwrite")
        scan = scan_files(state, files)
        other = scan.files_with_other_fingerprint(self.fingerprint)
        if other:
            raise OutputError(f"output {t.uri}: files {other[:3]} carry another fingerprint than run "
                              f"{self.run_id}'s; not committed. Run again with --overwrite")
        scan = resolve_duplicates(t.data_dir, self.run_id, state, scan)
        return count_rows(scan, self.run_id)

    def commit(self, manifest: dict) -> str:
        """Write the run manifest (the commit marker) and clean up; returns the manifest path.

        ``manifest`` gets ``run_id``, ``fingerprint`` and ``fingerprint_fields``. In place runs
        (fresh, resume): manifest, then the run record and state folder are removed. Staged runs
        (overwrite): a swap record is written (the decision), then the old output's data files
        and manifest are deleted, the staged files renamed into the root, the manifest written
        and the state removed. A crash inside the swap leaves the swap record; the next
        ``--resume`` or ``--overwrite`` finishes it, and until then readers may see part of the
        old and part of the new output. That window lasts as long as the deletes and renames
        (milliseconds locally; one request per file on object stores).

        Raises:
            OutputError: the claim or the run record no longer names this run.
        """
        if self.claim is not None:
            self.claim.check()
            self.claim.stop()  # the cleanup below removes the state folder, claim included
        state = self.state.refreshed()
        if (state.run_record or {}).get("run_id") != self.run_id:
            raise OutputError(f"output {self.target.uri} was taken over by run "
                              f"{(state.run_record or {}).get('run_id')} before run {self.run_id} committed")
        # The committed files' sizes: a --resume of the finished run compares them with the
        # listing (checks.finished_unchanged), so a part cut short since is noticed for free.
        sizes = state.data_file_sizes(self.target.data_dir)
        manifest = dict(manifest, run_id=self.run_id, fingerprint=self.fingerprint, fingerprint_fields=self.fields,
                        data_files=sizes)
        self.committed = True
        if not self.staged:
            path = write_json(state, MANIFEST_NAME, manifest)
            finish_state(state)
            return path
        files = [posixpath.basename(f) for f in state.data_files(self.target.data_dir)]
        swap = {"run_id": self.run_id, "data_dir": self.target.data_dir, "files": files, "manifest": manifest}
        write_json(state, SWAP_RECORD, swap)
        return roll_forward(state, swap)

    def abandon(self) -> bool:
        """After a failure before the commit (no images found, a refused input, Ctrl-C early):
        a run that carried nothing over and committed no data file removes its run record (and
        its empty staging folder), so the output is as the run found it: a fresh run leaves
        nothing, an overwrite leaves the old output, and the next plain run is not refused as
        "an unfinished run". Otherwise the record stays, for ``--resume``. Returns whether the
        record was removed. The claim is released separately (:meth:`release`).
        """
        if self.committed or self.carried_files:
            return False
        state = self.state.refreshed()
        if state.data_files(self.target.data_dir) or (state.run_record or {}).get("run_id") != self.run_id:
            return False
        remove(state, RUN_RECORD)
        if self.staged:  # begin removed earlier runs' staging: only this run's, empty, is left
            remove(state, STAGING_DIR, recursive=True)
        return True

    def release(self) -> None:
        """Give up the claim (after a commit or a failure); the run record stays for --resume."""
        if self.claim is not None:
            self.claim.release()


def begin(state: OutputState, mode: str, fields: dict[str, Any], *, claim: Claim | None, run_id: str,
          storage_options: dict, retry_errors: bool = False,
          planned_paths: pa.Array | pa.ChunkedArray | None = None,
          planned_files: list[str] | None = None) -> WriteSession:
    """Prepare the output for this run according to ``mode``; returns the session.

    ``state``: the output as inspected (and checked, ``checks.check_mode``) after ``claim`` was
    taken. ``planned_paths``: this run's planned ``path`` per ``input_index`` (driver-planned
    inputs); a resume first checks that committed rows still match it. ``planned_files``: the
    tars or Parquet files read in tasks, kept in the run record as ``input_files``; a resume
    first checks that the earlier run's files still come first, in the same order.

    All checks happen before anything is changed. Then: the run record is written (fencing out
    writers of an earlier run), debris of cut-short runs is removed (hidden temporary files,
    stale staging folders), and for ``resume`` the committed inputs are collected.

    Raises:
        OutputError: ``resume`` with a different fingerprint (the message names what changed)
            or with an input whose listing moved committed rows; committed files that disagree
            with the recorded fingerprint or hold an input twice; storage failures.
    """
    if state.swap_record:
        # A decided swap was cut short: finish it so the output is one complete run again.
        log.info("finishing the interrupted swap of run %s in %s", state.swap_record.get("run_id"), state.uri)
        roll_forward(state, state.swap_record)
        state = state.refreshed()
    target = WriteTarget(state.uri, dict(storage_options), "", run_id, fingerprint_digest(fields))
    record = {} if planned_files is None else {INPUT_FILES: list(planned_files)}
    try:
        if mode == "resume" and not state.is_empty:
            session = _begin_resume(state, fields, target, retry_errors, planned_paths, record)
        elif mode == "overwrite" and (state.visible_files() or state.manifest):
            session = _begin_overwrite(state, fields, target, record)
        else:
            session = _begin_fresh(state, fields, target, record)
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        raise OutputError(f"cannot prepare output {state.uri}: {type(exc).__name__}: {exc}") from exc
    session.claim = claim
    return session


def _begin_fresh(state: OutputState, fields: dict, target: WriteTarget, record: dict) -> WriteSession:
    state.fs.makedirs(state.root, exist_ok=True)
    _write_record(state, target, fields, mode="fresh", **record)
    # Only leftovers of a run that never committed a row (or an overwrite of nothing) remain.
    remove(state, STAGING_DIR, recursive=True)
    remove_debris(state, "")
    return WriteSession(state, target, fields, np.zeros(0, np.int64))


def _begin_overwrite(state: OutputState, fields: dict, target: WriteTarget, record: dict) -> WriteSession:
    target = WriteTarget(target.uri, target.storage_options, f"{STAGING_DIR}/{target.run_id}",
                         target.run_id, target.fingerprint)
    _write_record(state, target, fields, mode="overwrite", **record)
    for rel in state.files:  # staging of earlier, cut-short overwrites
        if rel.startswith(f"{STAGING_DIR}/") and not rel.startswith(f"{target.data_dir}/"):
            remove(state, rel)
    remove_debris(state, "")
    state.fs.makedirs(state.path(target.data_dir), exist_ok=True)
    return WriteSession(state, target, fields, np.zeros(0, np.int64), staged=True)


def _begin_resume(state: OutputState, fields: dict, target: WriteTarget, retry_errors: bool,
                  planned_paths: pa.Array | pa.ChunkedArray | None, record: dict) -> WriteSession:
    run_record, manifest = state.run_record, state.manifest
    previous, previous_fields, source, data_dir = state.recorded()
    committed = scan_files(state, state.data_files(data_dir))
    if previous is None:
        found = set(committed.fingerprints)
        if not found:  # no record, no manifest, no data: only debris of a run that wrote nothing
            return _begin_fresh(state, fields, target, record)
        if "" in found or len(found) > 1:
            raise OutputError(f"cannot resume {state.uri}: its files carry no single zslabel fingerprint "
                              "(written by another tool, an older version, or mixed runs); use --overwrite")
        previous = found.pop()
    if previous != target.fingerprint:
        refuse_resume(state.uri, source, describe_changes(previous_fields, fields) if previous_fields else [])
    stray = sorted(set(committed.fingerprints) - {target.fingerprint})
    if stray:
        raise OutputError(f"cannot resume {state.uri}: committed files carry other fingerprints {stray} "
                          f"(e.g. {committed.files_with_other_fingerprint(target.fingerprint)[:3]}); "
                          "use --overwrite")
    # The input must still hold the committed rows at their positions; checked before anything changes.
    check_same_files(state.uri, (state.recorded_run() or {}).get(INPUT_FILES), record.get(INPUT_FILES))
    if planned_paths is not None:
        check_same_inputs(state, committed.paths, planned_paths)
    staged = bool(data_dir)
    target = WriteTarget(target.uri, target.storage_options, data_dir, target.run_id, target.fingerprint)
    previous_run = run_record.get("run_id") if run_record else (manifest or {}).get("run_id")
    _write_record(state, target, fields, mode="overwrite" if staged else "resume", previous_run=previous_run,
                  **record)
    # Files published by tasks of the earlier run between the scan and the record (the fence).
    state = state.refreshed()
    late = sorted(set(state.data_files(data_dir)) - set(committed.paths))
    if late:
        committed = committed.merged(scan_files(state, late))
    if not staged:
        remove(state, MANIFEST_NAME)  # the output is changing; the old commit marker no longer holds
    remove_debris(state, data_dir)
    committed.check_unique(state.uri)
    session = WriteSession(state, target, fields, np.zeros(0, np.int64), staged=staged,
                           carried_files=tuple(committed.paths))
    if retry_errors:
        session.retried_rows = drop_error_rows(state, committed)
        state = state.refreshed()
        session.carried_files = tuple(f for f in committed.paths if f in set(state.data_files(data_dir)))
    done = committed.done_indices(keep_errors=not retry_errors)
    session.done, session.carried_rows = done, len(done)
    log.info("resuming %s: %d inputs already committed (by run %s; this run is %s), %d error rows to retry",
             state.uri, session.carried_rows, previous_run, target.run_id, session.retried_rows)
    return session


def roll_forward(state: OutputState, swap: dict) -> str:
    """Make the staged run of ``swap`` the output; idempotent, so a cut-short swap can rerun it.
    Deletes only files the store wrote (``layout.is_store_file``) that are not the new run's."""
    new = set(swap["files"])
    old_manifest = state.manifest
    if old_manifest is not None and old_manifest.get("run_id") != swap["run_id"]:
        remove(state, MANIFEST_NAME)
    for rel in state.visible_files():
        if rel not in new and is_store_file(rel):
            remove(state, rel)
    for name in swap["files"]:
        src = state.path(f"{swap['data_dir']}/{name}")
        if state.fs.exists(src):
            state.fs.mv(src, state.path(name))
    path = write_json(state, MANIFEST_NAME, swap["manifest"])
    finish_state(state)
    return path


def finish_state(state: OutputState) -> None:
    """Remove the run's state (record first: if the cleanup is cut short, what remains reads as
    a finished run)."""
    remove(state, RUN_RECORD)
    remove(state, SWAP_RECORD)
    remove(state, STATE_DIR, recursive=True)


def _write_record(state: OutputState, target: WriteTarget, fields: dict, mode: str, **extra) -> None:
    record = {"run_id": target.run_id, "mode": mode, "data_dir": target.data_dir,
              "fingerprint": target.fingerprint, "fingerprint_fields": fields,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(), **extra}
    write_json(state, RUN_RECORD, record)


__all__ = ["Accounting", "AccountingError", "RunCounts", "Scan", "WriteSession", "begin", "new_run_id",
           "roll_forward"]
