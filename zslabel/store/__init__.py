"""The output store: one object per output location, for every command that writes one.

Lifecycle (in the spirit of Ray Data's ``Datasink``: ``on_write_start`` / ``write`` /
``on_write_complete``)::

    store = OutputStore.open(uri, storage_options)      # inspect once; nothing changes
    store.check(mode, settings)                          # mode, foreign files, resume settings
    store.finished_unchanged(mode, retry_errors, stamps) # --resume with nothing to do?
    store.claim(mode)                                    # exclusive claim, re-inspect, re-check
    session = store.begin(mode, fields, ...)             # run record, resume set, staging
      ... writer tasks: files.write_block / files.open_part(session.target, ...)
    counts = session.counts()                            # duplicates resolved, ownership checked
    session.commit(manifest)                             # manifest (or swap), state removed
    session.release()                                    # always (finally)

Plain values in (mode, settings dicts), never the options object. Modules: ``layout`` (names,
snapshot), ``fingerprint``, ``claim`` (one run at a time), ``checks`` (before anything changes),
``session`` (begin/commit/swap), ``scan`` (reading committed rows back), ``files`` (task side),
``fsio`` (an output's files on any filesystem: data files, atomic writes, the manifest; also what
the read-only commands use).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from ..errors import OutputError
from .checks import check_mode, check_resumable, finished_unchanged
from .claim import Claim, OutputInUse, acquire, remove_if_empty
from .files import WRITE_RESULT_SCHEMA, WriteTarget, drop_committed, not_done, open_part, stamped_metadata, write_block
from .fingerprint import describe_changes, fingerprint_digest, fingerprint_fields, settings_view
from .fsio import (
    MANIFEST_NAME,
    footer_checked_batches,
    is_visible,
    open_atomic,
    output_filesystem,
    output_parquet_files,
    read_manifest,
    visible_parquet_files,
    write_bytes_atomic,
)
from .layout import (
    FINGERPRINT_KEY,
    INPUT_FILES,
    STATE_DIR,
    OutputState,
    enclosing_output,
    inspect_output,
    is_store_file,
    refuse_inside_output,
)
from .scan import RunCounts
from .session import Accounting, AccountingError, WriteSession, begin, new_run_id

log = logging.getLogger(__name__)


class OutputStore:
    """One output location (fsspec URI) as seen by one run.

    Attributes:
        uri: the output location. state: the latest snapshot (``layout.OutputState``).
    """

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.state = inspect_output(uri, self.storage_options)
        self._claim: Claim | None = None
        self._session: WriteSession | None = None
        self._created_root = False
        self.run_id = new_run_id()

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None) -> "OutputStore":
        """Inspect ``uri`` (nothing is changed).

        Raises:
            OutputError: ``uri`` is a file, cannot be listed, or holds an unreadable record.
        """
        return cls(uri, storage_options)

    def check(self, mode: str, settings: dict[str, Any] | None = None) -> None:
        """``checks.check_mode`` and, for ``resume`` with ``settings``, ``checks.check_resumable``.

        Raises:
            OutputInUse, OutputError: see those functions (nothing is changed).
        """
        check_mode(self.state, mode)
        if settings is not None:
            check_resumable(self.state, mode, settings)

    def finished_unchanged(self, mode: str, retry_errors: bool, stamps: dict[str, str | None]) -> dict | None:
        """See ``checks.finished_unchanged``."""
        if self.state.claim is not None:
            return None
        return finished_unchanged(self.state, mode, retry_errors, stamps)

    def claim(self, mode: str, settings: dict[str, Any] | None = None) -> None:
        """Claim the output for this run, then inspect it again and repeat :meth:`check` (another
        run may have finished or started since the first look). Creates the output folder.

        Raises:
            OutputInUse: a live run holds it. OutputError: as :meth:`check`; the claim is
                released again then.
        """
        if self.state.is_empty and not self.state.fs.exists(self.state.root):
            self._created_root = True
        try:
            self.state.fs.makedirs(self.state.root, exist_ok=True)
        except OSError as exc:  # a parent that is a file, or no such parent (/proc/zz), or read-only
            raise OutputError(f"cannot create the output folder {self.state.uri}: {type(exc).__name__}: "
                              f"{exc.strerror or exc}") from exc
        self._claim = acquire(self.state, self.run_id)
        try:
            self.state = self.state.refreshed()
            self.state.claim = None  # ours
            self.check(mode, settings)
        except BaseException:
            self.release()
            raise

    def begin(self, mode: str, fields: dict[str, Any], *, retry_errors: bool = False,
              planned_paths: pa.Array | pa.ChunkedArray | None = None,
              planned_files: list[str] | None = None) -> WriteSession:
        """Start this run's write session (``session.begin``); claims first if not yet claimed.

        Raises:
            OutputError: see ``session.begin``.
        """
        if self._claim is None:
            self.claim(mode)
        self._session = begin(self.state, mode, fields, claim=self._claim, run_id=self.run_id,
                              storage_options=self.storage_options, retry_errors=retry_errors,
                              planned_paths=planned_paths, planned_files=planned_files)
        return self._session

    def release(self) -> None:
        """Give up the claim, if held (idempotent); a session that failed before writing
        anything is abandoned first (``WriteSession.abandon``)."""
        if self._session is not None and not self._session.committed:
            try:
                self._session.abandon()
            except Exception as exc:  # noqa: BLE001 - never hide the failure that ended the run
                log.warning("could not remove the run record of %s: %s", self.uri, exc)
            self._session = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None
            if self._created_root:  # a run that failed before writing leaves nothing behind
                remove_if_empty(self.state, "")


__all__ = [
    "Accounting", "AccountingError", "FINGERPRINT_KEY", "INPUT_FILES", "OutputInUse", "OutputState", "OutputStore",
    "RunCounts", "STATE_DIR", "WRITE_RESULT_SCHEMA", "WriteSession", "WriteTarget", "describe_changes",
    "drop_committed", "enclosing_output", "fingerprint_digest", "fingerprint_fields", "inspect_output",
    "is_store_file", "not_done", "open_part", "refuse_inside_output", "settings_view", "stamped_metadata",
    "write_block",
    # fsio: an output's files (also for the read-only commands)
    "MANIFEST_NAME", "footer_checked_batches", "is_visible", "open_atomic", "output_filesystem",
    "output_parquet_files", "read_manifest", "visible_parquet_files", "write_bytes_atomic",
]
