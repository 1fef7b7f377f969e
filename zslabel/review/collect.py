"""One streaming pass over a zslabel output: counts, per-label score statistics and the small
sets of rows the report shows; then a second pass that reads only those rows' details.

Nothing here holds the output in memory. Pass 1 reads the columns ``labels``, ``scores``,
``error`` (and ``abstained`` when present; ``path`` only with ground truth) one record batch at
a time and keeps, per label, a fixed number of row references chosen by a key:

- most confident: the largest top-1 score;
- least confident: the smallest margin between the top-1 and the runner-up score (a row with a
  single label has margin = its score);
- random: the smallest of a seeded uniform draw per row, i.e. a uniform sample without
  replacement (reservoir sampling by random keys), reproducible for a given output and seed
  because files and batches are always read in the same order.

Errors keep a random sample per error code, abstained rows a random sample. A row reference is
``file_number << 32 | row_in_file`` (int64). Pass 2 (``read_rows``) reads path, labels, scores,
error, size and ``input_index`` of the referenced rows only, file by file.

Ground truth (optional) never costs a join of the whole output either: pass 1 keeps only rows
whose normalised path or file name occurs in the ground truth (the two ways
``zslabel.evaluate`` matches), and ``truth.py`` evaluates that subset with ``zslabel.evaluate``.

Ray-free; numpy and pyarrow only.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InputError
from ..output import ABSTAINED, ERROR, HEIGHT, INPUT_INDEX, LABELS, PATH, SCORES, WIDTH
from ..store import MANIFEST_NAME, footer_checked_batches, output_parquet_files

# Rows per record batch: large enough that the per-batch numpy work dominates Python overhead,
# small enough that a batch of paths and label lists stays a few tens of MB.
BATCH_ROWS = 65_536
# Histogram bins of the top-1 score per label, on [0, 1].
SCORE_BINS = 40
# A top-1 whose margin to the runner-up is below this counts as "close call" in the label table.
CLOSE_MARGIN = 0.1
ROW_SHIFT = 32


def row_ref(file_number: int, rows: np.ndarray) -> np.ndarray:
    """Row references (int64) of ``rows`` (row numbers within file ``file_number``)."""
    return (np.int64(file_number) << ROW_SHIFT) | rows.astype(np.int64)


def split_ref(ref: int) -> tuple[int, int]:
    """``(file_number, row_in_file)`` of a row reference."""
    return int(ref) >> ROW_SHIFT, int(ref) & ((1 << ROW_SHIFT) - 1)


class SmallestPerGroup:
    """Per group (an int id), the ``n`` entries with the smallest key, ties by the smaller ref.

    Memory is at most ``n`` entries per group seen; each ``add`` costs a sort of the new entries
    plus those kept. Deterministic: the result depends only on the set of entries added.
    """

    def __init__(self, n: int):
        self.n = n
        self.groups = np.empty(0, np.int64)
        self.keys = np.empty(0, np.float64)
        self.refs = np.empty(0, np.int64)

    def add(self, groups: np.ndarray, keys: np.ndarray, refs: np.ndarray) -> None:
        """Offer entries: ``groups`` (N,) int, ``keys`` (N,) float, ``refs`` (N,) int64."""
        if self.n <= 0 or len(groups) == 0:
            return
        g = np.concatenate([self.groups, groups.astype(np.int64)])
        k = np.concatenate([self.keys, keys.astype(np.float64)])
        r = np.concatenate([self.refs, refs.astype(np.int64)])
        order = np.lexsort((r, k, g))
        gs = g[order]
        # rank of each entry within its group, in sorted order
        start = np.r_[True, gs[1:] != gs[:-1]]
        first = np.maximum.accumulate(np.where(start, np.arange(len(gs)), 0))
        keep = order[(np.arange(len(gs)) - first) < self.n]
        self.groups, self.keys, self.refs = g[keep], k[keep], r[keep]

    def of(self, group: int) -> list[int]:
        """Refs kept for ``group``, smallest key first."""
        sel = self.groups == group
        order = np.lexsort((self.refs[sel], self.keys[sel]))
        return [int(x) for x in self.refs[sel][order]]

    def all_refs(self) -> set[int]:
        return {int(x) for x in self.refs}


class Interner:
    """Strings -> dense ids in order of first appearance (label names, error codes)."""

    def __init__(self, names: Iterable[str] = ()):
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        for name in names:
            self.id(name)

    def id(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = len(self.names)
            self.names.append(name)
        return self.ids[name]

    def encode(self, values: pa.Array) -> np.ndarray:
        """(N,) int64 ids of a string array without nulls (dictionary-encoded: one dict lookup
        per distinct value, not per row)."""
        enc = pc.dictionary_encode(values)
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        lut = np.array([self.id(s) for s in enc.dictionary.to_pylist()] or [0], np.int64)
        return lut[enc.indices.to_numpy(zero_copy_only=False)]


@dataclass
class Scan:
    """What pass 1 found.

    Attributes:
        files: the output's Parquet file paths (filesystem paths, read order); ``fs`` reads them.
        manifest: the run manifest dict, or None when the output has none (unfinished run).
        rows, labeled, errored, no_label: row counts (``no_label``: labeled rows whose label list
            is empty, multi-label runs with nothing above the threshold).
        has_abstained: the output has an ``abstained`` column; ``abstained``: rows marked so.
        labels: label names by id (the manifest's labels first, then any other top-1 seen).
        top1_count, abstained_count, close_count: (C,) int64 per label id.
        score_sum, margin_sum: (C,) float64 sums of top-1 scores and margins.
        hist: (C, SCORE_BINS) int64 histogram of top-1 scores per label.
        errors_by_code: {code: count}; error_codes: code names by id.
        close_pairs: {(top-1 id, runner-up id): rows} over close calls (margin < CLOSE_MARGIN).
        confident, unsure, sample: per label id, ``SmallestPerGroup`` of row refs.
        error_sample: per error-code id; abstained_sample: group 0.
        truth_rows: with ground truth: the rows whose path could match it, as
            ``{"ref", "path", "labels", "scores", "error", "abstained"}`` lists (``truth.py``).
    """

    fs: Any
    files: list[str]
    manifest: dict | None
    rows: int = 0
    labeled: int = 0
    errored: int = 0
    no_label: int = 0
    has_abstained: bool = False
    abstained: int = 0
    labels: list[str] = field(default_factory=list)
    # The per-label arrays and the samples are filled in by ``scan_outputs``; their defaults are
    # those of an empty scan (no label, nothing kept), so they are never None.
    top1_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    abstained_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    close_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    score_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    margin_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    hist: np.ndarray = field(default_factory=lambda: np.zeros((0, SCORE_BINS), np.int64))
    errors_by_code: dict[str, int] = field(default_factory=dict)
    error_codes: list[str] = field(default_factory=list)
    confident: SmallestPerGroup = field(default_factory=lambda: SmallestPerGroup(0))
    unsure: SmallestPerGroup = field(default_factory=lambda: SmallestPerGroup(0))
    sample: SmallestPerGroup = field(default_factory=lambda: SmallestPerGroup(0))
    error_sample: SmallestPerGroup = field(default_factory=lambda: SmallestPerGroup(0))
    abstained_sample: SmallestPerGroup = field(default_factory=lambda: SmallestPerGroup(0))
    truth_rows: dict[str, list] | None = None
    max_labels_per_row: int = 0
    close_pairs: dict[tuple[int, int], int] = field(default_factory=dict)

    def runner_ups(self) -> dict[int, tuple[str, int]]:
        """Per top-1 label id: the label its close calls most often had second, and how often
        (ties: the label that comes first)."""
        best: dict[int, tuple[int, int]] = {}
        for (a, b), n in self.close_pairs.items():
            if a not in best or (n, -b) > (best[a][0], -best[a][1]):
                best[a] = (n, b)
        return {a: (self.labels[b], n) for a, (n, b) in best.items()}


class _PerLabel:
    """Growable (C,) / (C, B) accumulators; C grows when a top-1 label outside the manifest appears."""

    def __init__(self, n: int):
        self.size = max(n, 1)
        self.top1 = np.zeros(self.size, np.int64)
        self.abst = np.zeros(self.size, np.int64)
        self.close = np.zeros(self.size, np.int64)
        self.score = np.zeros(self.size, np.float64)
        self.margin = np.zeros(self.size, np.float64)
        self.hist = np.zeros((self.size, SCORE_BINS), np.int64)

    def grow(self, n: int) -> None:
        if n <= self.size:
            return
        extra = n - self.size
        for name in ("top1", "abst", "close", "score", "margin"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros(extra, a.dtype)]))
        self.hist = np.concatenate([self.hist, np.zeros((extra, SCORE_BINS), np.int64)])
        self.size = n


def open_output(uri: str, storage_options: dict | None = None) -> tuple[Any, list[str], dict | None]:
    """``(fs, data files, run manifest or None)`` of an output folder.

    Raises:
        InputError: no such output, or no visible Parquet files.
    """
    fs, files, root = output_parquet_files(uri, storage_options)
    try:
        # Read through ``fs``: ``root`` has no protocol, and ``uri`` may name one Parquet file.
        with fs.open(posixpath.join(root, MANIFEST_NAME), "rb") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        manifest = None
    except Exception:  # noqa: BLE001 - a damaged manifest leaves the report without run facts
        manifest = None
    return fs, files, manifest


def scan_output(uri: str, *, storage_options: dict | None = None, seed: int = 0, per_label: int = 6,
                error_examples: int = 8, abstained_examples: int = 12,
                truth_filter: Callable[[list[str]], np.ndarray] | None = None,
                on_rows: Callable[[int, int], None] | None = None,
                opened: tuple[Any, list[str], dict | None] | None = None) -> Scan:
    """Pass 1 over the output at ``uri`` (see the module docstring).

    Args:
        seed: seed of the random sample (``numpy.random.default_rng``).
        per_label: rows kept per label for each of confident / unsure / random.
        truth_filter: with ground truth: ``paths -> (N,) bool`` of the rows worth keeping for it.
        on_rows: called with the rows and error rows of each record batch (progress).
        opened: ``open_output(uri, storage_options)`` when the caller has it already.

    Raises:
        InputError: not a zslabel output (no ``labels``/``scores``/``error`` column) or unreadable.
    """
    fs, files, manifest = opened or open_output(uri, storage_options)
    labels = Interner([str(x) for x in (manifest or {}).get("labels") or []])
    codes = Interner()
    acc = _PerLabel(len(labels.names))
    scan = Scan(fs=fs, files=files, manifest=manifest)
    scan.confident, scan.unsure, scan.sample = (SmallestPerGroup(per_label) for _ in range(3))
    scan.error_sample, scan.abstained_sample = SmallestPerGroup(error_examples), SmallestPerGroup(abstained_examples)
    if truth_filter is not None:
        scan.truth_rows = {k: [] for k in ("ref", "path", "labels", "scores", "error", "abstained")}
    rng = np.random.default_rng(seed)
    # Record batches are gathered up to BATCH_ROWS rows before they are scanned: an output has
    # many small files (1024 rows each by default), and the per-batch cost is mostly fixed.
    pending: list[tuple[pa.RecordBatch, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        batch = pending[0][0] if len(pending) == 1 else pa.concat_batches([b for b, _ in pending])
        refs = np.concatenate([r for _, r in pending])
        pending.clear()
        u = rng.random(batch.num_rows)  # drawn for every row, so the sample does not depend on errors
        has_abst = ABSTAINED in batch.schema.names
        _scan_batch(scan, batch, refs, u, labels, codes, acc, has_abst)
        if truth_filter is not None:
            _keep_truth_rows(scan, batch, refs, truth_filter, has_abst)
        scan.rows += batch.num_rows
        if on_rows:
            on_rows(batch.num_rows, is_err_count(batch))

    for file_number, f in enumerate(files):
        try:
            fh = fs.open(f, "rb")
            pf = pq.ParquetFile(fh)
        except Exception as exc:  # noqa: BLE001 - storage and format errors differ per backend
            raise InputError(f"cannot read output file {f}: {type(exc).__name__}: {exc}") from exc
        with fh:
            names = pf.schema_arrow.names
            missing = [c for c in (LABELS, SCORES, ERROR) if c not in names]
            if missing:
                raise InputError(f"{f} is not a zslabel output: no {', '.join(missing)} column")
            has_abst = ABSTAINED in names
            scan.has_abstained |= has_abst
            cols = [LABELS, SCORES, ERROR] + ([ABSTAINED] if has_abst else [])
            if truth_filter is not None:
                cols.append(PATH)
            first_row = 0
            for batch in footer_checked_batches(pf, f, batch_size=BATCH_ROWS, columns=cols):
                n = batch.num_rows
                if pending and (pending[0][0].schema != batch.schema):
                    flush()
                pending.append((batch, row_ref(file_number, np.arange(first_row, first_row + n))))
                first_row += n
                if sum(b.num_rows for b, _ in pending) >= BATCH_ROWS:
                    flush()
    flush()
    scan.labels, scan.error_codes = labels.names, codes.names
    acc.grow(len(labels.names))
    scan.top1_count, scan.abstained_count, scan.close_count = acc.top1, acc.abst, acc.close
    scan.score_sum, scan.margin_sum, scan.hist = acc.score, acc.margin, acc.hist
    return scan


def is_err_count(batch: pa.RecordBatch) -> int:
    """Error rows of a record batch."""
    return batch.num_rows - batch.column(ERROR).null_count


def _scan_batch(scan: Scan, batch: pa.RecordBatch, refs: np.ndarray, u: np.ndarray, labels: Interner,
                codes: Interner, acc: _PerLabel, has_abst: bool) -> None:
    err = batch.column(ERROR)
    is_err = err.is_valid().to_numpy(zero_copy_only=False)
    if is_err.any():
        # The code is the part before the first colon (errors.error_code), taken vectorised.
        errs = err.filter(pa.array(is_err))
        code_ids = codes.encode(pc.list_element(pc.split_pattern(errs, pattern=":", max_splits=1), 0))
        counts = np.bincount(code_ids)
        for cid in np.nonzero(counts)[0]:
            name = codes.names[cid]
            scan.errors_by_code[name] = scan.errors_by_code.get(name, 0) + int(counts[cid])
        scan.errored += int(is_err.sum())
        scan.error_sample.add(code_ids, u[is_err], refs[is_err])
    lab = batch.column(LABELS)
    length = pc.fill_null(pc.list_value_length(lab), 0).to_numpy(zero_copy_only=False)
    ok = ~is_err & lab.is_valid().to_numpy(zero_copy_only=False)
    scan.labeled += int(ok.sum())
    if length.size:
        scan.max_labels_per_row = max(scan.max_labels_per_row, int(length[ok].max(initial=0)))
    scan.no_label += int((ok & (length == 0)).sum())
    if has_abst:
        abst = pc.fill_null(batch.column(ABSTAINED), False).to_numpy(zero_copy_only=False)
        scan.abstained += int(abst.sum())
        scan.abstained_sample.add(np.zeros(int(abst.sum()), np.int64), u[abst], refs[abst])
    else:
        abst = np.zeros(batch.num_rows, bool)
    has = ok & (length >= 1)
    if not has.any():
        return
    mask = pa.array(has)
    lab1 = pc.list_element(lab.filter(mask), 0)
    sc = batch.column(SCORES).filter(mask)
    s0 = pc.list_element(sc, 0).to_numpy(zero_copy_only=False).astype(np.float64)
    two = length[has] >= 2
    s1 = np.zeros(len(s0))
    if two.any():
        s1[two] = pc.list_element(sc.filter(pa.array(two)), 1).to_numpy(zero_copy_only=False)
    margin = s0 - s1
    ids = labels.encode(lab1)
    close = two & (margin < CLOSE_MARGIN)
    if close.any():
        # Which label a close call nearly went to: (top-1, runner-up) pair counts.
        lab2 = labels.encode(pc.list_element(lab.filter(mask).filter(pa.array(close)), 1))
        pairs, counts = np.unique(ids[close] * (1 << 31) + lab2, return_counts=True)
        for pair, n in zip(pairs.tolist(), counts.tolist()):
            key = (pair >> 31, pair & ((1 << 31) - 1))
            scan.close_pairs[key] = scan.close_pairs.get(key, 0) + n
    acc.grow(len(labels.names))
    c = acc.size
    acc.top1 += np.bincount(ids, minlength=c)
    acc.abst += np.bincount(ids, weights=abst[has], minlength=c).astype(np.int64)
    acc.close += np.bincount(ids, weights=margin < CLOSE_MARGIN, minlength=c).astype(np.int64)
    acc.score += np.bincount(ids, weights=s0, minlength=c)
    acc.margin += np.bincount(ids, weights=margin, minlength=c)
    b = np.clip((s0 * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
    acc.hist += np.bincount(ids * SCORE_BINS + b, minlength=c * SCORE_BINS).reshape(c, SCORE_BINS)
    r = refs[has]
    scan.confident.add(ids, -s0, r)
    scan.unsure.add(ids, margin, r)
    scan.sample.add(ids, u[has], r)


def _keep_truth_rows(scan: Scan, batch: pa.RecordBatch, refs: np.ndarray, truth_filter, has_abst: bool) -> None:
    paths = batch.column(PATH).to_pylist()
    keep = truth_filter(paths)
    if not keep.any():
        return
    idx = np.nonzero(keep)[0]
    sub = batch.take(pa.array(idx))
    d = sub.to_pydict()
    t = scan.truth_rows
    assert t is not None  # rows are kept for ground truth only, and scan_outputs then made truth_rows
    t["ref"] += [int(x) for x in refs[idx]]
    t["path"] += d[PATH]
    t["labels"] += d[LABELS]
    t["scores"] += d[SCORES]
    t["error"] += d[ERROR]
    t["abstained"] += d[ABSTAINED] if has_abst else [None] * len(idx)


def basename_of(path: str) -> str:
    """A row's file name, as ``zslabel.evaluate`` matches by it (a tar member by its member's name)."""
    return posixpath.basename(path.rsplit("#", 1)[-1])


@dataclass
class Row:
    """One output row as the report shows it. ``scores`` are floats; ``labels`` may be empty."""

    ref: int
    path: str
    input_index: int | None
    labels: list[str]
    scores: list[float]
    error: str | None
    width: int | None
    height: int | None
    abstained: bool | None


def read_rows(scan: Scan, refs: set[int], on_rows: Callable[[int], None] | None = None) -> dict[int, Row]:
    """Pass 2: the details of the rows ``refs`` name, reading only the files holding them and,
    in each, only the record batches holding them."""
    by_file: dict[int, list[int]] = {}
    for ref in refs:
        fno, row = split_ref(ref)
        by_file.setdefault(fno, []).append(row)
    out: dict[int, Row] = {}
    for fno in sorted(by_file):
        wanted = np.array(sorted(by_file[fno]), np.int64)
        with scan.fs.open(scan.files[fno], "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            cols = [c for c in (PATH, INPUT_INDEX, LABELS, SCORES, ERROR, WIDTH, HEIGHT, ABSTAINED) if c in names]
            # Only the row groups holding wanted rows are decoded.
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            groups = sorted({int(g) for g in np.searchsorted(starts, wanted, side="right") - 1})
            for g in groups:
                table = pf.read_row_group(g, columns=cols)
                lo, hi = starts[g], starts[g + 1]
                local = wanted[(wanted >= lo) & (wanted < hi)]
                d = table.take(pa.array(local - lo)).to_pydict()
                for i, row in enumerate(local):
                    ref = int(row_ref(fno, np.array([row]))[0])
                    out[ref] = Row(ref=ref, path=d[PATH][i], input_index=(d.get(INPUT_INDEX) or [None] * len(local))[i],
                                   labels=list(d[LABELS][i] or []), scores=[float(s) for s in (d[SCORES][i] or [])],
                                   error=d[ERROR][i], width=(d.get(WIDTH) or [None] * len(local))[i],
                                   height=(d.get(HEIGHT) or [None] * len(local))[i],
                                   abstained=(d.get(ABSTAINED) or [None] * len(local))[i])
                if on_rows:
                    on_rows(len(local))
    return out
