"""Output modes, the run fingerprint, and the commit protocol that makes runs resumable and
exactly-once, for every command that writes an output (``label`` in Ray writer tasks through
:func:`write_block`, ``relabel`` in one process through :func:`open_part`).

Layout of an output location ``OUT``::

    OUT/part-<run_id>-<hash>.parquet    committed data: what ``pyarrow.parquet.read_table(OUT)`` reads
    OUT/_run_manifest.json              commit marker of a finished run (written last)
    OUT/_zslabel/run.json               the unfinished run: id, mode, fingerprint, where it writes
    OUT/_zslabel/staging/<run_id>/      an ``--overwrite`` run's data until the swap
    OUT/_zslabel/swap.json              a decided swap (staged run -> OUT), rolled forward if cut short

Parquet readers skip names starting with ``_`` or ``.``, so state, staging and temporary files
are never read as data.

Commit protocol (per data file): a file is committed once it is visible under its final name.
On local/shared filesystems it is written to a hidden temporary name beside its final name,
fsynced and renamed into place (``os.replace`` is atomic); on object stores it is one upload,
and an object appears only when its upload completes. A visible file is therefore always whole,
and a run cut short leaves only whole, committed files plus hidden debris. File names are
``part-<run_id>-<sha1 of the rows' input_index>``, so a writer task that Ray retries rewrites
the same file instead of adding a copy.

Modes (checked before any image is read):

- ``error`` (default): refuse an output location that holds anything.
- ``resume``: continue the unfinished run (or extend a finished one) when its fingerprint equals
  this run's; inputs whose ``input_index`` is in a committed file are dropped before decoding
  (no model call); error rows are kept unless ``retry_errors``, which removes them from their
  files so exactly those inputs are recomputed.
- ``overwrite``: write the new run to ``_zslabel/staging/<run_id>/`` while the old output stays
  readable, then swap (see :func:`commit_run`).

Why not Ray Data's job-level checkpointing (``DataContext.checkpoint_config``, ray 2.60): it
filters by id right after a ``Read`` operator and commits ids per written file, but here the
``input_index`` column is made by map stages after the read (``ray.data.range`` + block cutting,
tar/Parquet readers), where that filter fails (KeyError) or, for ``from_items``/``from_arrow``
sources, is silently not applied (rows duplicated on rerun); it also records error rows as done,
has no fingerprint check or atomic overwrite, and adds an actor pool plus a loading pass.

The run record ``_zslabel/run.json`` doubles as a fence: a writer task publishes a file only
while the record names its run, so tasks of a killed driver that outlive it cannot add rows
after a resumed run has taken over.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import posixpath
import typing
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .calibration import load_calibration
from .errors import NON_FINITE_SCORES, OutputError, error_code
from .output import (ERROR, INPUT_INDEX, MANIFEST_NAME, PATH, is_visible, open_atomic, output_filesystem,
                     visible_parquet_files, write_bytes_atomic)

if typing.TYPE_CHECKING:
    from .options import LabelingOptions

log = logging.getLogger(__name__)

FINGERPRINT_KEY = b"zslabel.fingerprint"
RUN_ID_KEY = b"zslabel.run_id"
STATE_DIR = "_zslabel"
RUN_RECORD = f"{STATE_DIR}/run.json"
SWAP_RECORD = f"{STATE_DIR}/swap.json"
# Run record and manifest key: the files an input kind reads in tasks (``begin_run``).
INPUT_FILES = "input_files"
STAGING_DIR = f"{STATE_DIR}/staging"
TMP_SUFFIX = ".tmp"

# Option fields (JobConfig, RelabelConfig) that change no output row (execution, storage, mode),
# or that enter the fingerprint in resolved form below (model, labels, templates, decode limits
# via the preprocessing spec). Every other field is fingerprinted as is, so a new
# result-changing option is covered without editing this module.
NON_RESULT_FIELDS = frozenset({
    "output", "address", "batch_size", "concurrency", "num_gpus_per_actor", "num_cpus_per_actor",
    "decode_cpus_per_task", "storage_options", "mode", "retry_errors", "max_error_fraction", "rows_per_file",
    "labels_file", "labels", "templates", "model", "revision", "max_pixels", "min_side", "fast_decode",
    # time limits decide nothing about a labeled row
    "io_timeout", "io_retries", "decode_timeout",
})


# --------------------------------------------------------------------------------------------
# fingerprint


def settings_fields(config: "LabelingOptions", labels: list[str], templates: list[str]) -> dict[str, Any]:
    """The fingerprint fields known before the model is loaded: the result-changing options as
    they are, ``model`` (``id``, ``revision``), ``labels`` and ``templates`` (as embedded)."""
    fields = {k: v for k, v in config.public_dict().items() if k not in NON_RESULT_FIELDS}
    fields.update(model={"id": config.model, "revision": config.revision},
                  labels=list(labels), templates=list(templates))
    # The calibration by content (its id), not by file path; both keys only when used, so outputs
    # of earlier versions still resume.
    fields.pop("calibration", None)
    fields.pop("hierarchy", None)
    if config.calibration:
        fields["calibration"] = load_calibration(config.calibration, config.storage_options).id
    if config.hierarchy:
        fields["hierarchy"] = True
    return json.loads(json.dumps(fields, default=str))  # tuples -> lists, as after a JSON round trip


def fingerprint_fields(config: "LabelingOptions", *, checkpoint_digest: str, model_type: str, score_kind: str,
                       labels: list[str], templates: list[str], preprocess: dict | None,
                       schema: pa.Schema) -> dict[str, Any]:
    """Everything that changes output rows, as a JSON-able dict (see :func:`fingerprint_digest`):
    :func:`settings_fields` plus what the loaded model adds.

    Args:
        config: the job's options; its result-changing ones (``top_k``, ``dtype``,
            ``store_embeddings``, ``embedding_dtype``, the input or relabel source and how it is
            read, ...) are taken as they are.
        checkpoint_digest: ``model.checkpoint_digest`` of the resolved checkpoint (weights hash).
        model_type, score_kind: from the loaded model ("softmax" or "sigmoid").
        labels, templates: the label set as embedded (names as written to the output).
        preprocess: ``PreprocessSpec.fingerprint_dict()`` (geometry, pixel limit, decoder
            versions); for a relabel, the source run's.
        schema: the output schema (columns and types), so files of one output can be read together.
    """
    fields = settings_fields(config, labels, templates)
    fields["model"].update(digest=checkpoint_digest, model_type=model_type, score_kind=score_kind)
    fields.update(preprocess=json.loads(json.dumps(preprocess, default=str)),
                  output_schema=[f"{f.name}: {f.type}" for f in schema])
    return fields


# Fingerprint fields only the loaded model (or a relabel's source manifest) gives; without them
# a record is compared early.
MODEL_FIELDS = ("preprocess", "output_schema", "source_fingerprint")
MODEL_KEYS = ("digest", "model_type", "score_kind")


def settings_view(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without what only the loaded model (or a relabel source) knows (``MODEL_FIELDS``, ``model.MODEL_KEYS``):
    comparable with :func:`settings_fields`."""
    view = {k: v for k, v in fields.items() if k not in MODEL_FIELDS}
    if isinstance(view.get("model"), dict):
        view["model"] = {k: v for k, v in view["model"].items() if k not in MODEL_KEYS}
    return view


def fingerprint_digest(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``fields`` (sorted keys), first 16 hex digits."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_MISSING = object()


def _some(items: list, shown: int = 5) -> str:
    """``'a', 'b', 'c', ... (1,000 in all)``: a 21,843-label change stays one readable line."""
    text = ", ".join(map(repr, items[:shown]))
    return text + (f", ... ({len(items):,} in all)" if len(items) > shown else "")


def describe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human lines naming what differs between two fingerprint dicts, e.g.
    ``"labels differ: added 'fox', removed 'bird'"`` or ``"top_k: 5 -> 3"``; nested dicts give
    dotted names (``"model.digest: 'ab..' -> 'cd..'"``). Empty when equal."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines += describe_changes(a, b, f"{name}.")
        elif isinstance(a, list) and isinstance(b, list):
            added = [x for x in b if x not in a]
            removed = [x for x in a if x not in b]
            parts = ([f"added {_some(added)}"] if added else []) + ([f"removed {_some(removed)}"] if removed else [])
            lines.append(f"{name} differ: " + (", ".join(parts) or
                                               f"same entries, other order: {_some(a)} -> {_some(b)}"))
        else:
            show = lambda v: "(not set)" if v is _MISSING else repr(v)  # noqa: E731
            lines.append(f"{name}: {show(a)} -> {show(b)}")
    return lines


# --------------------------------------------------------------------------------------------
# inspecting an output location


@dataclass
class OutputState:
    """What an output location holds (read-only snapshot; nothing is changed by taking it).

    ``files`` are all file paths under ``root`` relative to it; ``run_record`` is None when the
    last run finished (a record whose run id equals the manifest's is a finished run's leftover).
    """

    uri: str
    fs: Any
    root: str
    files: list[str]
    manifest: dict | None
    run_record: dict | None
    swap_record: dict | None

    @property
    def is_empty(self) -> bool:
        return not self.files

    def data_files(self, data_dir: str = "") -> list[str]:
        """Relative paths of the Parquet files a reader of ``root/data_dir`` sees, sorted."""
        prefix = f"{data_dir}/" if data_dir else ""
        inside = [rel[len(prefix):] for rel in self.files if rel.startswith(prefix)]
        return [prefix + rel for rel in visible_parquet_files(inside)]

    def visible_files(self) -> list[str]:
        """Relative paths of every file a Parquet reader of ``root`` would consider (any type)."""
        return sorted(r for r in self.files if is_visible(r))

    def recorded(self) -> tuple[str | None, dict | None, str, str]:
        """The settings of the run this output holds: ``(fingerprint, fingerprint fields, what
        run (for messages), its data folder)``; the unfinished run's when there is one, else
        the decided swap's, else the finished run's (fingerprint None when none is recorded)."""
        r = self._recorded_run()
        if r is None:
            return None, None, "its Parquet files", ""
        if r is self.run_record:
            return (r.get("fingerprint"), r.get("fingerprint_fields"), f"the unfinished run {r.get('run_id')}",
                    r.get("data_dir", ""))
        return (r.get("fingerprint"), r.get("fingerprint_fields"),
                f"the finished run {r.get('run_id', '(unknown id)')}", "")

    def recorded_input_files(self) -> list[str] | None:
        """``input_files`` (tars or Parquet files read in tasks) of the run :meth:`recorded`
        describes; None when not recorded."""
        return (self._recorded_run() or {}).get(INPUT_FILES)

    def _recorded_run(self) -> dict | None:
        """The unfinished run's record, else the decided swap's manifest, else the manifest."""
        return self.run_record or (self.swap_record or {}).get("manifest") or self.manifest

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root


def inspect_output(uri: str, storage_options: dict | None = None) -> OutputState:
    """Snapshot of ``uri``: its files, manifest, run and swap records.

    Raises:
        OutputError: ``uri`` is a file, cannot be listed, or holds an unreadable record.
    """
    fs, root = output_filesystem(uri, storage_options)
    root = root.rstrip("/") or root
    try:
        if not fs.exists(root):
            return OutputState(uri, fs, root, [], None, None, None)
        if not fs.isdir(root):
            raise OutputError(f"output {uri} exists and is a file, not a folder")
        files = [_relative(root, f) for f in fs.find(root)]
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        raise OutputError(f"cannot inspect output location {uri}: {type(exc).__name__}: {exc}") from exc
    state = OutputState(uri, fs, root, files, None, None, None)
    state.manifest = _read_json(state, MANIFEST_NAME) if MANIFEST_NAME in files else None
    state.run_record = _read_json(state, RUN_RECORD) if RUN_RECORD in files else None
    state.swap_record = _read_json(state, SWAP_RECORD) if SWAP_RECORD in files else None
    if state.run_record and state.manifest and state.manifest.get("run_id") == state.run_record.get("run_id"):
        state.run_record = None  # the run committed; only its cleanup was cut short
    return state


def check_mode(config: "LabelingOptions", state: OutputState) -> None:
    """Checks before the model is loaded: refuse an occupied output, and never let --resume or
    --overwrite touch a folder that holds something other than a zslabel output (an input
    folder given as output by mistake must not be deleted).

    Raises:
        OutputError: ``config.mode == "error"`` and ``state`` is not empty, or another mode and
            ``state`` holds files but no zslabel run (nothing is touched).
    """
    if state.is_empty:
        return
    examples = ", ".join(state.files[:3]) + (", ..." if len(state.files) > 3 else "")
    if config.mode != "error":
        if not (state.manifest or state.run_record or state.swap_record):
            raise OutputError(f"output {config.output} holds files that are not a zslabel output "
                              f"({examples}); refusing to --{config.mode} it. Choose an empty or a "
                              "zslabel output location")
        return
    if not (state.manifest or state.run_record or state.swap_record or state.data_files()):
        # Not a run at all (e.g. the input folder given as --output): --resume and --overwrite
        # would be refused too, so do not suggest them.
        raise OutputError(f"output {config.output} holds files that are not a zslabel output ({examples}); "
                          "choose an empty or new location")
    unfinished = state.run_record or state.swap_record or (state.data_files() and not state.manifest)
    what = "an unfinished run" if unfinished else "a finished run"
    raise OutputError(f"output {config.output} already holds data ({what}); choose an empty location, "
                      "or pass --resume to continue it or --overwrite to replace it")


def check_resumable(config: "LabelingOptions", state: OutputState, labels: list[str],
                    templates: list[str]) -> None:
    """For ``--resume``: refuse, before the model is loaded, when the settings recorded in the
    output differ from this run's in anything but what only the model knows (see
    :func:`settings_view`). No-op for other modes or an output without a recorded run.

    Raises:
        OutputError: naming what changed (as :func:`begin_run` would after loading the model).
    """
    if config.mode != "resume" or state.is_empty:
        return
    _, recorded, source, _ = state.recorded()
    if recorded:
        changes = describe_changes(settings_view(recorded), settings_fields(config, labels, templates))
        if changes:
            _refuse_resume(config, source, changes)


def _refuse_resume(config: "LabelingOptions", source: str, changes: list[str]) -> None:
    detail = "; ".join(changes) if changes else "the settings that shape results differ"
    raise OutputError(f"cannot resume {config.output}: this run's settings differ from {source}: {detail}. "
                      "Resume with the same settings, or pass --overwrite to replace the output, "
                      "or write to another location")


def finished_unchanged(config: "LabelingOptions", state: OutputState, stamps: dict[str, str | None]
                       ) -> dict | None:
    """The manifest of the finished run in ``state`` when a ``--resume`` of it has nothing to do,
    decided without Ray or the model; else None (the run goes ahead and decides with them).

    Nothing to do: ``state`` holds a finished run (manifest, no unfinished run or swap), its
    settings are this run's (:func:`check_resumable` passed), there are no error rows to retry,
    and the input (or relabel source) and the model checkpoint are local and unchanged: the same
    ``options.local_stamp`` (file names, sizes and mtimes) as recorded by that run in
    ``input_stamp`` and ``model.stamp``. A hub model id or a remote input or model is never
    assumed unchanged.

    Args:
        stamps: ``{"input": ..., "model": ...}`` stamps of this run (None when not local).
    """
    m = state.manifest
    if config.mode != "resume" or m is None or state.run_record or state.swap_record:
        return None
    if config.retry_errors and (m.get("counts") or {}).get("errors_by_code"):
        return None
    if not stamps.get("input") or not stamps.get("model"):
        return None
    if m.get("input_stamp") != stamps["input"] or (m.get("model") or {}).get("stamp") != stamps["model"]:
        return None
    return m


# --------------------------------------------------------------------------------------------
# starting a run


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


@dataclass
class RunPlan:
    """What :func:`begin_run` decided for this run.

    Attributes:
        done: (M,) int64, sorted, unique: ``input_index`` values already committed; the pipeline
            drops these inputs before decoding.
        carried_rows: rows kept from earlier runs (``len(done)``).
        retried_rows: error rows removed for recomputation (``retry_errors``).
        staged: True when this run writes to a staging folder and swaps at commit.
    """

    state: OutputState
    target: WriteTarget
    fields: dict[str, Any]
    done: np.ndarray
    carried_rows: int = 0
    retried_rows: int = 0
    staged: bool = False

    @property
    def run_id(self) -> str:
        return self.target.run_id

    @property
    def fingerprint(self) -> str:
        return self.target.fingerprint


def new_run_id() -> str:
    """``YYYYmmddTHHMMSS-<8 hex>`` (UTC): sortable by start time, unique per run."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{uuid.uuid4().hex[:8]}"


def begin_run(config: "LabelingOptions", fields: dict[str, Any], state: OutputState | None = None,
              planned_paths: pa.Array | pa.ChunkedArray | None = None,
              planned_files: list[str] | None = None) -> RunPlan:
    """Prepare ``config.output`` for this run according to ``config.mode``; returns the plan.

    ``state``: the output as inspected and checked (``check_mode``) when the run was resolved;
    inspected here when None. ``planned_paths``: this run's planned ``path`` per ``input_index``
    (driver-planned inputs, ``InputPlan.planned_paths``); a resume first checks that committed
    rows still match it (``check_same_inputs``). ``planned_files``: the tars or Parquet
    files read in tasks (``InputPlan.planned_files``), kept in the run record as
    ``input_files``; a resume first checks that the earlier run's files still come first, in
    the same order (``check_same_files``).

    All checks happen before anything is changed. Then: the run record is written (fencing out
    writers of an earlier run), debris of cut-short runs is removed (hidden temporary files,
    stale staging folders), and for ``resume`` the committed inputs are collected.

    Raises:
        OutputError: occupied output in the default mode; ``resume`` with a different
            fingerprint (the message names what changed) or with an input whose listing moved
            committed rows; committed files that disagree with the recorded fingerprint or
            hold an input twice; storage failures.
    """
    if state is None:
        state = inspect_output(config.output, config.storage_options)
        check_mode(config, state)
    if state.swap_record:
        # A decided swap was cut short: finish it so the output is one complete run again.
        log.info("finishing the interrupted swap of run %s in %s", state.swap_record.get("run_id"), config.output)
        _roll_forward(state, state.swap_record)
        state = inspect_output(config.output, config.storage_options)
    digest = fingerprint_digest(fields)
    target = WriteTarget(config.output, dict(config.storage_options), "", new_run_id(), digest)
    record = {} if planned_files is None else {INPUT_FILES: list(planned_files)}
    try:
        if config.mode == "resume" and not state.is_empty:
            return _begin_resume(config, state, fields, target, planned_paths, record)
        if config.mode == "overwrite" and (state.visible_files() or state.manifest):
            return _begin_overwrite(state, fields, target, record)
        return _begin_fresh(state, fields, target, record)
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        raise OutputError(f"cannot prepare output {config.output}: {type(exc).__name__}: {exc}") from exc


def check_same_files(uri: str, earlier: list[str] | None, files: list[str] | None) -> None:
    """Raise unless the files an earlier run read in tasks (``earlier``, from its run record or
    manifest) are the first of this run's ``files``, in the same order: their rows are matched
    by file position (``input_index // FILE_INDEX_STRIDE``). New files sorting after them are
    fine. No check when either list is unknown (outputs of older versions, other input kinds).

    Raises:
        OutputError: naming the first file whose position changed.
    """
    if earlier is None or files is None:
        return
    for i, old in enumerate(earlier):
        new = files[i] if i < len(files) else None
        if new != old:
            now = "no longer listed" if new is None else f"now {new!r}"
            raise OutputError(
                f"cannot resume {uri}: the input changed since the earlier run: its file #{i} was {old!r}, "
                f"{now} ({len(earlier)} files then, {len(files)} now). Rows are matched by file position, "
                "so resuming would skip or repeat images. Use --overwrite to label the current input "
                "afresh, or a new --output. (Files that sort after all earlier ones resume fine.)")


def _begin_fresh(state: OutputState, fields: dict, target: WriteTarget, record: dict | None = None) -> RunPlan:
    state.fs.makedirs(state.root, exist_ok=True)
    _write_record(state, target, fields, mode="fresh", **(record or {}))
    # Only leftovers of a run that never committed a row (or an overwrite of nothing) remain.
    _remove(state, STAGING_DIR, recursive=True)
    _remove_debris(state, "")
    return RunPlan(state, target, fields, np.zeros(0, np.int64))


def _begin_overwrite(state: OutputState, fields: dict, target: WriteTarget, record: dict | None = None) -> RunPlan:
    target = WriteTarget(target.uri, target.storage_options, f"{STAGING_DIR}/{target.run_id}",
                         target.run_id, target.fingerprint)
    _write_record(state, target, fields, mode="overwrite", **(record or {}))
    for rel in state.files:  # staging of earlier, cut-short overwrites
        if rel.startswith(f"{STAGING_DIR}/") and not rel.startswith(f"{target.data_dir}/"):
            _remove(state, rel)
    _remove_debris(state, "")
    state.fs.makedirs(state.path(target.data_dir), exist_ok=True)
    return RunPlan(state, target, fields, np.zeros(0, np.int64), staged=True)


def _begin_resume(config: "LabelingOptions", state: OutputState, fields: dict, target: WriteTarget,
                  planned_paths: pa.Array | pa.ChunkedArray | None = None, record: dict | None = None) -> RunPlan:
    run_record, manifest = state.run_record, state.manifest
    previous, previous_fields, source, data_dir = state.recorded()
    committed = _scan(state, state.data_files(data_dir))
    if previous is None:
        found = set(committed.fingerprints)
        if not found:  # no record, no manifest, no data: only debris of a run that wrote nothing
            return _begin_fresh(state, fields, target, record)
        if "" in found or len(found) > 1:
            raise OutputError(f"cannot resume {config.output}: its files carry no single zslabel fingerprint "
                              "(written by another tool, an older version, or mixed runs); use --overwrite")
        previous = found.pop()
    if previous != target.fingerprint:
        _refuse_resume(config, source, describe_changes(previous_fields, fields) if previous_fields else [])
    stray = sorted(set(committed.fingerprints) - {target.fingerprint})
    if stray:
        raise OutputError(f"cannot resume {config.output}: committed files carry other fingerprints {stray} "
                          f"(e.g. {committed.files_with_other_fingerprint(target.fingerprint)[:3]}); "
                          "use --overwrite")
    # The input must still hold the committed rows at their positions; checked before anything changes.
    check_same_files(config.output, state.recorded_input_files(), (record or {}).get(INPUT_FILES))
    if planned_paths is not None:
        check_same_inputs(state, committed.paths, planned_paths)
    staged = bool(data_dir)
    target = WriteTarget(target.uri, target.storage_options, data_dir, target.run_id, target.fingerprint)
    _write_record(state, target, fields, mode="overwrite" if staged else "resume",
                  previous_run=run_record.get("run_id") if run_record else (manifest or {}).get("run_id"),
                  **(record or {}))
    # Files published by tasks of the earlier run between the scan and the record (the fence).
    state = inspect_output(config.output, config.storage_options)
    late = sorted(set(state.data_files(data_dir)) - set(committed.paths))
    if late:
        committed = committed.merged(_scan(state, late))
    if not staged:
        _remove(state, MANIFEST_NAME)  # the output is changing; the old commit marker no longer holds
    _remove_debris(state, data_dir)
    committed.check_unique(config.output)
    plan = RunPlan(state, target, fields, np.zeros(0, np.int64), staged=staged)
    if config.retry_errors:
        plan.retried_rows = _drop_error_rows(state, committed)
    done = committed.done_indices(keep_errors=not config.retry_errors)
    plan.done, plan.carried_rows = done, len(done)
    log.info("resuming %s: %d inputs already committed (run %s), %d error rows to retry",
             config.output, plan.carried_rows, target.run_id, plan.retried_rows)
    return plan


# --------------------------------------------------------------------------------------------
# the stage functions the pipeline runs in Ray tasks (Ray-free themselves)


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
WRITE_RESULT_SCHEMA = pa.schema([pa.field("file", pa.string()), pa.field("rows", pa.int64()),
                                 pa.field("errors", pa.int64())])


def write_block(table: pa.Table, target: WriteTarget) -> pa.Table:
    """Commit one block of output rows as one Parquet file under ``target``.

    Args:
        table: output rows (``output.output_schema``), N >= 0.
        target: from :class:`RunPlan`.

    Returns:
        One row ``(file, rows, errors)`` naming the committed file (none for an empty block).

    Raises:
        OutputError: the run record no longer names this run (a newer run took over the output);
            nothing is published then.
    """
    if table.num_rows == 0:
        return WRITE_RESULT_SCHEMA.empty_table()
    idx = table.column(INPUT_INDEX).to_numpy(zero_copy_only=False)
    with open_part(target, idx) as (fh, name):
        fh.write(_parquet_bytes(table.replace_schema_metadata(stamped_metadata(table.schema, target))))
    errors = table.num_rows - table.column(ERROR).null_count
    return pa.Table.from_pylist([{"file": name, "rows": table.num_rows, "errors": errors}],
                                schema=WRITE_RESULT_SCHEMA)


def stamped_metadata(schema: pa.Schema, target: WriteTarget) -> dict:
    """``schema``'s metadata plus this run's fingerprint and id (read back by resume checks)."""
    metadata = dict(schema.metadata or {})
    metadata.update({FINGERPRINT_KEY: target.fingerprint.encode(), RUN_ID_KEY: target.run_id.encode()})
    return metadata


@contextmanager
def open_part(target: WriteTarget, input_index: np.ndarray):
    """Commit one data file of this run: yields ``(binary file handle, file name)``; the file is
    published under its final name when the block exits without an exception (atomically, see
    ``output.open_atomic``) and never otherwise.

    The name is ``part-<run_id>-<sha1 of input_index>``: a retried writer rewrites the same file.

    Args:
        input_index: (N,) int64 ``input_index`` values of the rows the file will hold.

    Raises:
        OutputError: the run record no longer names this run (a newer run took over the output);
            nothing is published then.
    """
    fs, root = output_filesystem(target.uri, target.storage_options)
    root = root.rstrip("/") or root
    idx = np.ascontiguousarray(input_index, np.int64)
    name = f"part-{target.run_id}-{hashlib.sha1(idx.tobytes()).hexdigest()[:16]}.parquet"
    record = _read_record(fs, posixpath.join(root, RUN_RECORD))
    if (record or {}).get("run_id") != target.run_id:
        raise OutputError(f"output {target.uri} is now owned by run {(record or {}).get('run_id')}, not "
                          f"{target.run_id}; this run's file {name} is not published")
    with open_atomic(fs, posixpath.join(root, target.data_dir, name) if target.data_dir
                     else posixpath.join(root, name)) as fh:
        yield fh, name


# --------------------------------------------------------------------------------------------
# finishing a run


@dataclass
class RunCounts:
    """Counts over the committed output of a run (all rows, not only this run's).

    ``model_images``: rows this run passed to the model (written by this run and decoded:
    labeled or ``non_finite_scores``); ``written``: rows this run wrote; ``carried_over``: rows
    kept from earlier runs.
    """

    rows: int
    labeled: int
    errors_by_code: dict[str, int]
    written: int
    model_images: int
    carried_over: int
    files: int


def collect_counts(plan: RunPlan) -> RunCounts:
    """Read ``input_index`` and ``error`` of every committed file of this run's data folder,
    after making each input appear once (see :func:`_resolve_duplicates`).

    Raises:
        OutputError: files of earlier runs hold an input twice (not repairable by this run).
    """
    state = inspect_output(plan.target.uri, plan.target.storage_options)
    scan = _resolve_duplicates(plan, state, _scan(state, state.data_files(plan.target.data_dir)))
    errors = scan.table.column(ERROR).to_pylist()
    mine = _of_run(scan, plan.run_id)
    by_code: dict[str, int] = {}
    model_images = 0
    for err, own in zip(errors, mine):
        code = error_code(err)
        if code is not None:
            by_code[code] = by_code.get(code, 0) + 1
        if own and (code is None or code == NON_FINITE_SCORES):
            model_images += 1
    return RunCounts(rows=len(errors), labeled=sum(e is None for e in errors), errors_by_code=by_code,
                     written=int(mine.sum()), model_images=model_images,
                     carried_over=len(errors) - int(mine.sum()), files=len(scan.paths))


def _of_run(scan: "_Scan", run_id: str) -> np.ndarray:
    """(N,) bool: rows of ``scan`` in files written by run ``run_id``."""
    return np.array([posixpath.basename(f).startswith(f"part-{run_id}-")
                     for f in scan.table.column("file").to_pylist()], bool)


def _resolve_duplicates(plan: RunPlan, state: OutputState, scan: "_Scan") -> "_Scan":
    """Keep each ``input_index`` once before the commit: rows of earlier runs win, then this
    run's files in name order; this run's files losing rows are rewritten under the same name
    (or deleted when emptied). Returns the scan of the result.

    Duplicates are not expected; they can come from a writer task that Ray re-executes after a
    lost node with rows batched differently (so under another file name), or from a writer of
    a killed run that published just before this run's record fenced it out.

    Raises:
        OutputError: files of earlier runs hold an input twice.
    """
    idx = scan.table.column(INPUT_INDEX).to_numpy()
    uniq, counts = np.unique(idx, return_counts=True)
    if len(uniq) == len(idx):
        return scan
    mine = _of_run(scan, plan.run_id)
    carried = _Scan(scan.table.filter(pa.array(~mine)), [], {})
    carried.check_unique(plan.target.uri)
    files = np.array(scan.table.column("file").to_pylist(), dtype=object)
    dup = np.flatnonzero(np.isin(idx, uniq[counts > 1]))
    seen = set(idx[dup][~mine[dup]].tolist())
    drop: dict[str, set[int]] = {}
    for row in sorted(dup[mine[dup]], key=lambda r: files[r]):
        if int(idx[row]) in seen:
            drop.setdefault(files[row], set()).add(int(idx[row]))
        else:
            seen.add(int(idx[row]))
    for path, indices in sorted(drop.items()):
        with state.fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
        keep = table.filter(pc.invert(pc.is_in(table.column(INPUT_INDEX),
                                                pa.array(sorted(indices), pa.int64()))))
        if keep.num_rows:
            write_bytes_atomic(state.fs, path, _parquet_bytes(keep))
        else:
            state.fs.rm(path)
    log.warning("run %s: %d duplicate rows removed from %d of its files before the commit",
                plan.run_id, sum(map(len, drop.values())), len(drop))
    state = inspect_output(plan.target.uri, plan.target.storage_options)
    return _scan(state, state.data_files(plan.target.data_dir))


def commit_run(plan: RunPlan, manifest: dict) -> str:
    """Write the run manifest (the commit marker) and clean up; returns the manifest path.

    ``manifest`` gets ``run_id``, ``fingerprint`` and ``fingerprint_fields``. In place runs
    (fresh, resume): manifest, then the run record and state folder are removed. Staged runs
    (overwrite): a swap record is written (the decision), then the old data files and manifest
    are deleted, the staged files renamed into the root, the manifest written and the state
    removed. A crash inside the swap leaves the swap record; the next ``--resume`` or
    ``--overwrite`` finishes it (see :func:`begin_run`), and until then readers may see part of
    the old and part of the new output. That window lasts as long as the deletes and renames
    (milliseconds locally; one request per file on object stores).

    Raises:
        OutputError: the run record no longer names this run.
    """
    state = inspect_output(plan.target.uri, plan.target.storage_options)
    if (state.run_record or {}).get("run_id") != plan.run_id:
        raise OutputError(f"output {plan.target.uri} was taken over by run "
                          f"{(state.run_record or {}).get('run_id')} before run {plan.run_id} committed")
    manifest = dict(manifest, run_id=plan.run_id, fingerprint=plan.fingerprint, fingerprint_fields=plan.fields)
    if not plan.staged:
        path = _write_manifest_state(state, manifest)
        _finish_state(state)
        return path
    files = [posixpath.basename(f) for f in state.data_files(plan.target.data_dir)]
    swap = {"run_id": plan.run_id, "data_dir": plan.target.data_dir, "files": files, "manifest": manifest}
    write_bytes_atomic(state.fs, state.path(SWAP_RECORD), _json_bytes(swap))
    return _roll_forward(state, swap)


def _roll_forward(state: OutputState, swap: dict) -> str:
    """Make the staged run of ``swap`` the output; idempotent, so a cut-short swap can rerun it."""
    new = set(swap["files"])
    old_manifest = state.manifest
    if old_manifest is not None and old_manifest.get("run_id") != swap["run_id"]:
        _remove(state, MANIFEST_NAME)
    for rel in state.visible_files():
        if rel not in new:
            _remove(state, rel)
    for name in swap["files"]:
        src = state.path(f"{swap['data_dir']}/{name}")
        if state.fs.exists(src):
            state.fs.mv(src, state.path(name))
    path = _write_manifest_state(state, swap["manifest"])
    _finish_state(state)
    return path


# --------------------------------------------------------------------------------------------
# helpers


@dataclass
class _Scan:
    """``input_index``, ``error`` and ``file`` of committed rows, plus each file's fingerprint."""

    table: pa.Table                     # "file": full path (without protocol)
    paths: list[str]                    # the files read, relative to the output root
    fingerprints: dict[str, list[str]]  # fingerprint -> files carrying it ("" when none)

    def merged(self, other: "_Scan") -> "_Scan":
        fps = {k: list(v) for k, v in self.fingerprints.items()}
        for k, v in other.fingerprints.items():
            fps.setdefault(k, []).extend(v)
        return _Scan(pa.concat_tables([self.table, other.table]), self.paths + other.paths, fps)

    def files_with_other_fingerprint(self, fingerprint: str) -> list[str]:
        return [f for k, v in self.fingerprints.items() if k != fingerprint for f in v]

    def check_unique(self, uri: str) -> None:
        idx = self.table.column(INPUT_INDEX).to_numpy()
        uniq, counts = np.unique(idx, return_counts=True)
        if len(uniq) != len(idx):
            twice = uniq[counts > 1]
            raise OutputError(f"output {uri} holds {len(twice)} inputs more than once (input_index "
                              f"{twice[:5].tolist()}...): another run wrote into it at the same time? "
                              "Use --overwrite to start over")

    def done_indices(self, keep_errors: bool) -> np.ndarray:
        table = self.table if keep_errors else self.table.filter(pc.is_null(self.table.column(ERROR)))
        return np.unique(table.column(INPUT_INDEX).to_numpy()).astype(np.int64)


def _scan(state: OutputState, rel_paths: list[str]) -> _Scan:
    """Read the small columns of committed files (one footer + two columns per file)."""
    import pyarrow.dataset as pads

    schema = pa.schema([(INPUT_INDEX, pa.int64()), (ERROR, pa.string()), ("file", pa.string())])
    if not rel_paths:
        return _Scan(schema.empty_table(), [], {})
    paths = [state.path(r) for r in rel_paths]
    dataset = pads.dataset(paths, filesystem=_arrow_fs(state.fs), format="parquet")
    fingerprints: dict[str, list[str]] = {}
    for frag in dataset.get_fragments():
        md = frag.physical_schema.metadata or {}
        fingerprints.setdefault(md.get(FINGERPRINT_KEY, b"").decode(), []).append(frag.path)
    table = dataset.to_table(columns=[INPUT_INDEX, ERROR, "__filename"])
    table = pa.table([table.column(0).cast(pa.int64()), table.column(1), table.column(2)], schema=schema)
    return _Scan(table, list(rel_paths), fingerprints)


def check_same_inputs(state: OutputState, rel_paths: list[str], planned_paths: pa.Array | pa.ChunkedArray) -> None:
    """Raise unless every row of the committed files ``rel_paths`` names the input that
    ``planned_paths`` (this run's planned ``path`` per ``input_index``) holds at its
    ``input_index``. Reads ``input_index`` and ``path`` a record batch at a time, so a resume
    of millions of rows does not hold a second copy of every path.

    A resume skips inputs by ``input_index``, their position in the listing: a file added,
    removed or renamed in front of others moves every later one, so resuming would skip new
    images, label others twice and keep rows of deleted ones.

    Raises:
        OutputError: naming how many committed rows no longer match and the first of them.
    """
    import pyarrow.dataset as pads

    if not rel_paths:
        return
    if isinstance(planned_paths, pa.ChunkedArray):
        planned_paths = planned_paths.combine_chunks()
    dataset = pads.dataset([state.path(r) for r in rel_paths], filesystem=_arrow_fs(state.fs), format="parquet")
    if PATH not in dataset.schema.names:  # every zslabel output has it; hand-made test files may not
        return
    rows = moved = 0
    first: tuple[int, str, str | None] | None = None
    for batch in dataset.to_batches(columns=[INPUT_INDEX, PATH]):
        idx = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
        old = batch.column(1).to_numpy(zero_copy_only=False)
        listed = idx < len(planned_paths)
        new = np.full(len(idx), None, object)  # None: the position is past the new listing's end
        if listed.any():
            new[listed] = planned_paths.take(pa.array(idx[listed])).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero((new != old) & (old != None))  # noqa: E711 - elementwise on objects
        rows, moved = rows + len(idx), moved + len(bad)
        if len(bad):
            i = bad[np.argmin(idx[bad])]
            if first is None or idx[i] < first[0]:
                first = (int(idx[i]), old[i], new[i])
    if first is None:
        return
    at, was, now = first
    now = "no longer listed" if now is None else f"now {now!r}"
    raise OutputError(
        f"cannot resume {state.uri}: the input changed since the earlier run. {moved} of its {rows} "
        f"committed rows no longer match the input at their position (input_index {at} was {was!r}, "
        f"{now}): inputs were added in front of, removed from or renamed in the listing, and "
        "resuming by position would skip or repeat images or keep rows of removed ones. Use "
        "--overwrite to label the current input afresh, or a new --output. (Inputs added after all "
        "earlier ones, e.g. new manifest lines at the end, resume fine.)")


def _drop_error_rows(state: OutputState, scan: _Scan) -> int:
    """Rewrite each committed file holding error rows without them (same name, atomic replace);
    delete files with only error rows. Returns the number of rows removed."""
    has_error = pc.is_valid(scan.table.column(ERROR))
    files = sorted(set(scan.table.filter(has_error).column("file").to_pylist()))
    removed = 0
    for path in files:
        with state.fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
        keep = table.filter(pc.is_null(table.column(ERROR)))
        removed += table.num_rows - keep.num_rows
        if keep.num_rows:
            write_bytes_atomic(state.fs, path, _parquet_bytes(keep))
        else:
            state.fs.rm(path)
    return removed


def _write_record(state: OutputState, target: WriteTarget, fields: dict, mode: str, **extra) -> None:
    record = {"run_id": target.run_id, "mode": mode, "data_dir": target.data_dir,
              "fingerprint": target.fingerprint, "fingerprint_fields": fields,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(), **extra}
    write_bytes_atomic(state.fs, state.path(RUN_RECORD), _json_bytes(record))


def _write_manifest_state(state: OutputState, manifest: dict) -> str:
    path = state.path(MANIFEST_NAME)
    write_bytes_atomic(state.fs, path, _json_bytes(manifest))
    return path


def _finish_state(state: OutputState) -> None:
    # Record first: if the cleanup is cut short, what remains reads as a finished run.
    _remove(state, RUN_RECORD)
    _remove(state, SWAP_RECORD)
    _remove(state, STATE_DIR, recursive=True)


def _remove_debris(state: OutputState, data_dir: str) -> None:
    """Hidden temporary files of writes that never completed (never visible to readers)."""
    for rel in state.files:
        base = posixpath.basename(rel)
        if base.startswith(".") and base.endswith(TMP_SUFFIX) and posixpath.dirname(rel) in ("", data_dir):
            _remove(state, rel)


def _remove(state: OutputState, rel: str, recursive: bool = False) -> None:
    path = state.path(rel)
    try:
        if state.fs.exists(path):
            state.fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def _read_json(state: OutputState, rel: str) -> dict:
    try:
        with state.fs.open(state.path(rel), "r") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot read {state.path(rel)}: {type(exc).__name__}: {exc}") from exc


def _read_record(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "r") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _relative(root: str, path: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path


def _arrow_fs(fs):
    """An fsspec filesystem as a pyarrow filesystem (local stays native for speed)."""
    import pyarrow.fs as pafs
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
