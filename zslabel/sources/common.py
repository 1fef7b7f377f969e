"""What every input kind shares: the plan it returns, the options it reads, the kind interface,
and the naming rules (image extensions, hidden files, tar/Parquet row paths).

Core columns of every planned dataset, then the kind's carried string columns:

=============  ========  ==============================================================
``path``       string    full URI of the image (plain absolute path for local files; a tar
                         member is ``TAR_URI#MEMBER``; a Parquet row without ``url`` is
                         ``PARQUET_URI#ROW``); undecodable name bytes as ``%XX``
                         (``zslabel.storage.display_name``)
``input_index``int64     position in the input order; contiguous 0..N-1 for driver-planned
                         kinds; for tars/Parquet ``file_index * 10**9 + row_in_file``
                         (monotonic, readable, known without reading earlier files)
``data``       binary    the encoded bytes when the source holds them inline (tars, Parquet);
                         null means the decode task calls ``fetch_bytes`` on ``path``
``read_error`` string    null, or ``"<code>: ..."`` when the source could not give this row's
                         bytes (a corrupt tar, a null image cell, a reader bug:
                         ``internal_error``); the decode task passes it through as the error
=============  ========  ==============================================================
"""

from __future__ import annotations

import posixpath
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..errors import InputError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    # No decoder here, but they are images: they become ``unsupported_format`` rows, not skips.
    ".jfif", ".pjpeg", ".heic", ".heif", ".avif",
})

# Names the output writer owns; a carried column may not shadow them.
RESERVED_COLUMNS = frozenset({"path", "input_index", "data", "read_error", "labels", "scores", "abstained",
                              "error", "width", "height", "embedding"})

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
PATH_COLUMN_CANDIDATES = ("path", "url", "uri")
CORE_SCHEMA = pa.schema([("path", pa.string()), ("input_index", pa.int64()),
                         ("data", pa.binary()), ("read_error", pa.string())])

# Rows of one lazily read file share a 10**9-wide input_index range: index // 10**9 is the
# file's position, index % 10**9 the row inside it.
FILE_INDEX_STRIDE = 1_000_000_000
MAX_EXAMPLES = 10


@dataclass
class InputOptions:
    """The user's input settings, as every kind's ``plan`` receives them.

    ``auto`` is True when the kind was detected rather than named (``--input-format auto``); a
    kind may then hand over to another (a folder holding only tar shards is a webdataset).
    ``plan_files`` is set by the registry: it plans a list of file URIs with the first kind
    that reads such files (tars, Parquet), or returns None. ``task_options``: Ray remote
    arguments of the stage that reads the planned rows (``blocks.dataset_from_table``); the
    pipeline gives its decode stage's, so Ray Data fuses the two into one task per block.
    ``cluster_cpus``: the CPUs the cluster has or may scale to, which sizes those blocks
    (``blocks.rows_per_block``); None sizes them by the row count alone.
    """

    storage_options: dict = field(default_factory=dict)
    path_column: str | None = None
    id_column: str | None = None
    dedupe: bool = False
    image_column: str | None = None
    auto: bool = True
    plan_files: Callable[[list[str], InputOptions], InputPlan | None] | None = None
    task_options: dict = field(default_factory=dict)
    cluster_cpus: float | None = None


@dataclass
class InputPlan:
    """What planning found: the lazy dataset and the counts for the run summary.

    ``dataset`` rows: the core columns (module docstring), then ``carried_columns`` (strings).
    Counts obey ``listed == rows + skipped + duplicates_removed`` for every kind (README
    "Inputs" says what each kind lists).
    For kinds read lazily in tasks (webdataset, parquet) ``listed`` is None and ``skipped`` 0
    until :meth:`finalize` is called after the dataset has been consumed.
    """

    dataset: Any  # ray.data.Dataset
    kind: str
    listed: int | None
    skipped: int
    skipped_examples: list[str]
    duplicates_removed: int
    planning_seconds: float
    carried_columns: list[str]
    # Driver-planned kinds (folder, glob, manifest): the ``path`` of every planned row, (N,)
    # strings in ``input_index`` order, so that a resume can check that committed rows still
    # name the same inputs (``store.session.begin``). None for kinds read in tasks.
    planned_paths: Any = None
    # Kinds read in tasks (tars, Parquet): the files, in file-index order (``input_index //
    # FILE_INDEX_STRIDE``), recorded by a run so that a resume can check them. None otherwise.
    planned_files: list[str] | None = None
    # Streaming kinds: () -> {file_uri: (listed, skipped, skipped_examples)} from the read tasks.
    _tally: Callable[[], dict[str, tuple[int, int, list[str]]]] | None = field(default=None, repr=False)

    def finalize(self) -> InputPlan:
        """Fill ``listed``/``skipped``/``skipped_examples`` from the read tasks (tars, Parquet).

        Call once the dataset has been fully consumed. Counts are kept per file, so a file read
        twice (task retry, dataset re-executed) is counted once. No-op for driver-planned kinds.
        Returns self.
        """
        if self._tally is None:
            return self
        per_file = self._tally()
        self.listed = sum(v[0] for v in per_file.values())
        self.skipped = sum(v[1] for v in per_file.values())
        examples: list[str] = []
        for uri in sorted(per_file):
            examples.extend(per_file[uri][2][: MAX_EXAMPLES - len(examples)])
        self.skipped_examples = examples
        return self

    def check_has_inputs(self, uri: str) -> None:
        """After :meth:`finalize`: raise when the input held no image at all.

        Driver-planned kinds raise while planning; tars and Parquet files are known to be empty
        (e.g. a tar of sidecars only) only once read.

        Raises:
            InputError: ``listed`` equals ``skipped`` (no row came from the input).
        """
        if self.listed is not None and self.listed - self.skipped - self.duplicates_removed <= 0:
            raise InputError(f"no images found in {uri} ({self.kind}: {self.listed} members listed, "
                             f"{self.skipped} skipped" + (": " + ", ".join(self.skipped_examples[:5])
                                                          if self.skipped_examples else "") + ")")


@dataclass(frozen=True)
class InputKind:
    """One input kind: the registry (``zslabel.sources.KINDS``) holds one per module.

    Attributes:
        name: the ``--input-format`` value.
        summary: one line for ``--help`` and the README table.
        detect: ``detect(uri, pattern)`` -> True when auto mode should read ``uri`` as this
            kind; ``pattern`` says whether ``uri``'s glob characters are a pattern (they are
            not when the name exists as written). The first kind in the registry that claims a
            URI wins.
        plan: ``plan(uri, options) -> InputPlan``; raises ``InputError`` (nothing found,
            unreadable, missing column) or ``TextDecodeError`` (a manifest that is not UTF-8).
        plan_files: for kinds whose inputs are container files (tars, Parquet): ``(files,
            options) -> InputPlan`` and the lower-case suffixes of such files, so a folder
            holding only those files is read as this kind in auto mode.
    """

    name: str
    summary: str
    detect: Callable[[str, bool], bool]
    plan: Callable[[str, InputOptions], InputPlan]
    plan_files: Callable[[list[str], InputOptions], InputPlan] | None = None
    file_suffixes: tuple[str, ...] = ()


def strip_compression(name: str) -> str:
    """``name`` without a trailing ``.gz``/``.bz2``/``.xz``/``.zst``."""
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def extension(path: str) -> str:
    """Lower-case extension with the dot (``.jpg``), ``""`` when none."""
    return posixpath.splitext(path)[1].lower()


def is_hidden(rel: str) -> bool:
    """True when any component of a relative path starts with ``.`` (``.git/x``, ``._a.jpg``).

    ``.`` and ``..`` components (``./0000.png`` from ``tar -C dir -cf x.tar .``) are not hidden.
    """
    return any(part.startswith(".") and part not in (".", "..") for part in rel.split("/"))


def member_name(name: str) -> str:
    """A tar member's name as it appears in ``path``: no leading ``./`` or ``/``."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def error_row_detail(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"`` for a row's error detail."""
    return f"{type(exc).__name__}: {exc}"


def internal_error_detail(where: str, exc: BaseException, log) -> str:
    """Log the traceback of an unexpected exception while reading one input; return the detail.

    The row gets ``internal_error: <detail>`` (a bug in zslabel, not a bad input): the job goes
    on, and the log holds the traceback to report.
    """
    log.error("internal error while reading %s:\n%s", where,
              "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return f"while reading {where}: {error_row_detail(exc)}"
