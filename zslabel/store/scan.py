"""Reading back what an output holds: the small columns of committed files, the rows a run
wrote, duplicates resolved before a commit, error rows dropped for ``--retry-errors``, counts.
Ray-free.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import NON_FINITE_SCORES, OutputError, error_code
from ..output import ERROR, INPUT_INDEX
from ..summary import RunCounts
from .fsio import write_bytes_atomic
from .layout import FINGERPRINT_KEY, OutputState, arrow_fs, parquet_bytes

log = logging.getLogger(__name__)


@dataclass
class Scan:
    """``input_index``, ``error`` and ``file`` of committed rows, plus each file's fingerprint."""

    table: pa.Table                     # "file": full path (without protocol)
    paths: list[str]                    # the files read, relative to the output root
    fingerprints: dict[str, list[str]]  # fingerprint -> files carrying it ("" when none)

    def merged(self, other: "Scan") -> "Scan":
        fps = {k: list(v) for k, v in self.fingerprints.items()}
        for k, v in other.fingerprints.items():
            fps.setdefault(k, []).extend(v)
        return Scan(pa.concat_tables([self.table, other.table]), self.paths + other.paths, fps)

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


def scan_files(state: OutputState, rel_paths: list[str]) -> Scan:
    """Read the small columns of committed files (one footer + two columns per file).

    Raises:
        OutputError: a file is no readable Parquet file (cut short or overwritten since it was
            committed); the message names it and what to do.
    """
    import pyarrow.dataset as pads

    schema = pa.schema([(INPUT_INDEX, pa.int64()), (ERROR, pa.string()), ("file", pa.string())])
    if not rel_paths:
        return Scan(schema.empty_table(), [], {})
    paths = [state.path(r) for r in rel_paths]
    fingerprints: dict[str, list[str]] = {}
    try:
        dataset = pads.dataset(paths, filesystem=arrow_fs(state.fs), format="parquet")
        for frag in dataset.get_fragments():
            md = frag.physical_schema.metadata or {}
            fingerprints.setdefault(md.get(FINGERPRINT_KEY, b"").decode(), []).append(frag.path)
        table = dataset.to_table(columns=[INPUT_INDEX, ERROR, "__filename"])
    except (pa.ArrowInvalid, OSError) as exc:
        raise OutputError(_damaged_files_message(state, rel_paths, exc)) from exc
    table = pa.table([table.column(0).cast(pa.int64()), table.column(1), table.column(2)], schema=schema)
    return Scan(table, list(rel_paths), fingerprints)


def _damaged_files_message(state: OutputState, rel_paths: list[str], exc: BaseException) -> str:
    """Which of ``rel_paths`` Arrow cannot read (each footer read again: only on this error
    path), and what to do; a file the store committed was whole when it was committed."""
    damaged: dict[str, str] = {}
    for rel in rel_paths:
        try:
            with state.fs.open(state.path(rel), "rb") as fh:
                pq.read_metadata(fh)
        except Exception as err:  # noqa: BLE001 - any reason to be unreadable is the same answer
            damaged[rel] = f"{type(err).__name__}: {str(err).strip()[:160]}"
    if not damaged:  # the files are whole: a storage error, not damage
        return f"cannot read the committed files of output {state.uri}: {type(exc).__name__}: {exc}"
    first, why = next(iter(damaged.items()))
    more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
    return (f"output {state.uri}: committed file {first}{more} cannot be read as Parquet ({why}): cut short or "
            "overwritten after the run wrote it, so its rows are lost. Delete the damaged file(s) and run --resume "
            "again to label those images anew (the other rows are kept), or use --overwrite to start over")


def of_run(scan: "Scan", run_id: str) -> np.ndarray:
    """(N,) bool: rows of ``scan`` in files written by run ``run_id``."""
    return np.array([posixpath.basename(f).startswith(f"part-{run_id}-")
                     for f in scan.table.column("file").to_pylist()], bool)


def resolve_duplicates(data_dir: str, run_id: str, state: OutputState, scan: "Scan") -> "Scan":
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
    mine = of_run(scan, run_id)
    carried = Scan(scan.table.filter(pa.array(~mine)), [], {})
    carried.check_unique(state.uri)
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
            write_bytes_atomic(state.fs, path, parquet_bytes(keep))
        else:
            state.fs.rm(path)
    log.warning("run %s: %d duplicate rows removed from %d of its files before the commit",
                run_id, sum(map(len, drop.values())), len(drop))
    state = state.refreshed()
    return scan_files(state, state.data_files(data_dir))


def drop_error_rows(state: OutputState, scan: Scan) -> int:
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
            write_bytes_atomic(state.fs, path, parquet_bytes(keep))
        else:
            state.fs.rm(path)
    return removed


def count_rows(scan: Scan, run_id: str) -> RunCounts:
    """Counts over the rows of ``scan`` (each input once); ``run_id``'s files are this run's."""
    errors = scan.table.column(ERROR).to_pylist()
    mine = of_run(scan, run_id)
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
