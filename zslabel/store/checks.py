"""The store's checks before anything changes: is the output usable in this mode, do the
recorded settings allow a resume, is a finished run already complete, and does the input still
hold the committed rows where they were. Plain values in (mode, settings dict); Ray-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import OutputError
from ..output import INPUT_INDEX, PATH
from .claim import check_not_claimed
from .fingerprint import describe_changes, settings_view
from .fsio import describe_nested, nested_outputs
from .layout import OutputState, arrow_fs


def check_mode(state: OutputState, mode: str) -> None:
    """Checks before the model is loaded: refuse an output another live run holds, refuse an
    occupied output in the default mode, and never let --resume or --overwrite touch a folder
    that holds something other than a zslabel output (an input folder given as output by
    mistake must not be deleted), nor let --overwrite delete files the store did not write; and
    never write a run inside another (its files would be read as the outer run's).

    Args:
        mode: "error", "resume" or "overwrite".

    Raises:
        OutputInUse: another live run claims the output.
        OutputError: the output lies inside another zslabel output, or holds one below it; ``mode == "error"`` and
            ``state`` is not empty; another mode and ``state`` holds files but no zslabel run;
            ``overwrite`` and ``state`` holds files the store did not write (listed; nothing is
            touched).
    """
    check_not_claimed(state)
    if state.outer is not None:
        # Its data files would be read as the outer run's, and block that run's --overwrite.
        raise OutputError(f"output {state.uri} is inside the zslabel output {state.outer}; write to a folder "
                          "outside it")
    nested = nested_outputs(state.files)
    if nested:
        # The same the other way round: the inner run's files would be read as this one's.
        raise OutputError(f"output {describe_nested(state.uri, nested)}; write to another folder, or to that "
                          "output itself (--resume, --overwrite)")
    if state.is_empty:
        return
    examples = ", ".join(state.files[:3]) + (", ..." if len(state.files) > 3 else "")
    if mode != "error":
        if not state.holds_run:
            raise OutputError(f"output {state.uri} holds files that are not a zslabel output "
                              f"({examples}); refusing to --{mode} it. Choose an empty or a "
                              "zslabel output location")
        foreign = state.foreign_files()
        if mode == "overwrite" and foreign:
            shown = ", ".join(foreign[:10]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 10 else "")
            raise OutputError(f"output {state.uri} holds files zslabel did not write ({shown}); --overwrite "
                              "deletes only its own files and refuses to leave them mixed into a new run. Move "
                              "them elsewhere, or write to another --output")
        return
    if not (state.holds_run or state.data_files()):
        # Not a run at all (e.g. the input folder given as --output): --resume and --overwrite
        # would be refused too, so do not suggest them.
        raise OutputError(f"output {state.uri} holds files that are not a zslabel output ({examples}); "
                          "choose an empty or new location")
    unfinished = state.run_record or state.swap_record or (state.data_files() and not state.manifest)
    what = "an unfinished run" if unfinished else "a finished run"
    raise OutputError(f"output {state.uri} already holds data ({what}); choose an empty location, "
                      "or pass --resume to continue it or --overwrite to replace it")


def check_resumable(state: OutputState, mode: str, settings: dict[str, Any]) -> None:
    """For ``resume``: refuse, before the model is loaded, when the settings recorded in the
    output differ from ``settings`` (what is known before the model) in anything but what only
    the model knows (see ``fingerprint.settings_view``). No-op for other modes or an output
    without a recorded run.

    Raises:
        OutputError: naming what changed.
    """
    if mode != "resume" or state.is_empty:
        return
    _, recorded, source, _ = state.recorded()
    if recorded:
        changes = describe_changes(settings_view(recorded), settings)
        if changes:
            refuse_resume(state.uri, source, changes)


def refuse_resume(uri: str, source: str, changes: list[str]) -> None:
    """Raise the resume refusal naming what changed."""
    detail = "; ".join(changes) if changes else "the settings that shape results differ"
    raise OutputError(f"cannot resume {uri}: this run's settings differ from {source}: {detail}. "
                      "Resume with the same settings, or pass --overwrite to replace the output, "
                      "or write to another location")


def finished_unchanged(state: OutputState, mode: str, retry_errors: bool, stamps: dict[str, str | None]
                       ) -> dict | None:
    """The manifest of the finished run in ``state`` when a ``--resume`` of it has nothing to do,
    decided without Ray or the model; else None (the run goes ahead and decides with them).

    Nothing to do: ``state`` holds a finished run (manifest, no unfinished run, swap or live
    claim), its settings are this run's (:func:`check_resumable` passed), there are no error rows
    to retry, the output holds the data files that run committed (as many; and the sizes its
    manifest records in ``data_files``, where it does), and the input (or relabel source) and
    the model checkpoint are local and unchanged: the same ``storage.local_stamp`` (file names,
    sizes and mtimes) as recorded by that run in ``input_stamp`` and ``model.stamp``. A hub
    model id or a remote input or model is never assumed unchanged.

    Args:
        stamps: ``{"input": ..., "model": ...}`` stamps of this run (None when not local).
    """
    m = state.manifest
    if mode != "resume" or m is None or state.run_record or state.swap_record:
        return None
    if retry_errors and (m.get("counts") or {}).get("errors_by_code"):
        return None
    if not stamps.get("input") or not stamps.get("model"):
        return None
    if m.get("input_stamp") != stamps["input"] or (m.get("model") or {}).get("stamp") != stamps["model"]:
        return None
    if len(state.data_files()) != (m.get("counts") or {}).get("files"):
        return None  # a part file deleted or added since: the run goes ahead, rescans and repairs
    recorded = m.get("data_files")  # absent in manifests of versions before 2026-12-06
    if isinstance(recorded, dict) and state.data_file_sizes() != recorded:
        return None  # a part cut short or replaced since: the scan names it (scan.scan_files)
    return m


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
    dataset = pads.dataset([state.path(r) for r in rel_paths], filesystem=arrow_fs(state.fs), format="parquet")
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
