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

import json
import posixpath
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..errors import InputError
from ..io_policy import IOPolicy, describe_error
from ..output import OWNED_COLUMNS

IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    # The other formats the decoder reads (``decode.DECODED_FORMATS``): a folder of JPEG 2000
    # scans or PPM frames was "no images found" though each listed file was labeled.
    ".jfif", ".pjpeg", ".jpe", ".mpo", ".apng", ".dib", ".ico", ".cur", ".tga", ".ppm", ".pgm", ".pbm",
    ".pnm", ".pfm", ".jp2", ".j2k", ".jpx", ".jpf", ".qoi", ".jxl",
    # Images that become ``unsupported_format`` rows, not skips, where no decoder is installed.
    ".heic", ".heif", ".avif",
})

# Names the output writer owns (the output contract's) and the rows' own: a carried column may
# not shadow them.
RESERVED_COLUMNS = frozenset(OWNED_COLUMNS) | {"data", "read_error"}

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
# ``file_name``: Hugging Face ``imagefolder``'s metadata.csv / metadata.jsonl / metadata.parquet.
PATH_COLUMN_CANDIDATES = ("path", "url", "uri", "file_name")
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

    ``storage_options`` already hold ``io``'s timeouts in the form the input's filesystem
    takes (``plan_inputs`` builds them with ``storage.io_storage_options``), so every listing
    and every manifest, tar or Parquet file a kind opens with them, in read tasks too, is
    bounded by the job's ``--io-timeout``/``--io-retries``. ``io`` itself is kept for messages.
    """

    storage_options: dict = field(default_factory=dict)
    io: IOPolicy = field(default_factory=IOPolicy)
    path_column: str | None = None
    id_column: str | None = None
    dedupe: bool = False
    image_column: str | None = None
    auto: bool = True
    plan_files: Callable[[list[str], InputOptions], InputPlan | None] | None = None
    # Set by the registry too: the file suffixes of each kind that reads container files
    # (``{"webdataset": (".tar", ...), "parquet": (".parquet",)}``), to name those a folder skips.
    container_suffixes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    task_options: dict = field(default_factory=dict)
    cluster_cpus: float | None = None
    # False: plan without Ray (no dataset; InputPlan.read_locally gives the rows), for tests
    # and tools that check planning and counting on their own.
    use_ray: bool = True
    # The job's output (``--output``): a folder or glob input that holds it skips what lies
    # under it (``output_folder``), so the run's own files are never its inputs.
    output: str | None = None

    def check_columns_used(self, kind: str, what: str) -> None:
        """Refuse a column flag that ``kind`` (the kind reading ``what``, as it decides so) has
        no use for: ``--path-column`` and ``--id-column`` name columns of a manifest (CSV, TSV,
        JSONL, Parquet of paths), ``--image-column`` one of Parquet or Arrow image bytes. Each
        was ignored without a word (a run without the id column the user asked for).

        Raises:
            InputError: naming the flag, the kind and what the kind carries instead.
        """
        for name, kinds in COLUMN_FLAG_KINDS.items():
            value = getattr(self, name)
            if value is not None and kind not in kinds:
                flag = "--" + name.replace("_", "-")
                carried = {"parquet": "; a Parquet file of images carries its url, key and caption columns",
                           "webdataset": "; a tar's sidecars (.json, .txt, .cls) are carried as columns"}.get(kind, "")
                raise InputError(f"{flag} {value!r} names a column, but {what} is read as {kind} input, which has "
                                 f"none: {flag} applies to {' and '.join(kinds)} inputs{carried}")


# The kinds each column flag applies to (``InputOptions.check_columns_used``).
COLUMN_FLAG_KINDS = {"path_column": ("manifest", "jsonl"), "id_column": ("manifest", "jsonl"),
                     "image_column": ("parquet",)}


# Why an entry was skipped (``InputPlan.skipped_by_reason`` keys; README "Counts").
SKIP_REASONS: dict[str, str] = {
    "hidden": "a hidden file or member (a path component starting with '.')",
    "not_an_image": "a file or member without an image extension that is no carried sidecar",
    "unreadable_folder": "a sub-folder that could not be listed",
    "folder_link": "a symlink to a folder already listed (a loop, or a folder inside the input)",
    "empty_path": "a manifest row or line whose path is empty or null",
    "malformed_row": "a CSV/TSV manifest row with the wrong number of fields, a JSONL line that is no JSON object",
    "repeated_header": "a CSV/TSV manifest row repeating the header (manifests concatenated)",
    "sidecar_without_image": "a tar sidecar (.json/.txt/.cls) whose key has no image member",
    "sidecar_not_adjacent": "a tar sidecar that comes after its image, with other keys between",
    "sidecar_repeated": "a second tar sidecar of one kind for one key (the first is carried)",
    "sidecar_too_large": "a tar sidecar above webdataset.MAX_SIDECAR_BYTES (16 MiB), not carried",
    "tar_directory": "a tar member that is a directory",
    "tar_special": "a tar member that is a device, FIFO or other special file",
    "tar_link_not_image": "a tar hard/symbolic link whose name is not an image",
    "not_a_shard": "a file beside tar/Parquet shards in their folder (stats .json, ...)",
    "dataset_metadata": "a file below a folder of tar/Parquet shards with a path component starting with '_' "
                        "(_SUCCESS, _temporary/, _delta_log/: Hadoop, Spark and Delta Lake bookkeeping, which "
                        "pyarrow.dataset ignores too)",
    "archive_name_repeated": "a zip or tar entry (read through a '::' chain) whose name a later entry of the "
                             "same archive repeats: readers by name (zipfile, tarfile, fsspec) open only the last",
    "output_folder": "a zslabel output folder (the job's own --output, or an earlier run's: it holds a run "
                     "manifest or the store's state) inside a folder input: one entry, not read",
}


def new_counts() -> dict:
    """The counts a streaming reader fills: ``listed``, ``skipped``, ``reasons`` ({reason: n})
    and ``examples`` (at most ``MAX_EXAMPLES`` skipped names)."""
    return {"listed": 0, "skipped": 0, "reasons": {}, "examples": []}


def count_skip(counts: dict, reason: str, example: str, *, listed: bool = True) -> None:
    """Count one skipped entry in ``counts`` (see :func:`new_counts`) under ``reason``
    (a ``SKIP_REASONS`` key); ``listed``: also count it as listed (every skip is an entry)."""
    counts["listed"] += int(listed)
    counts["skipped"] += 1
    counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
    if len(counts["examples"]) < MAX_EXAMPLES:
        counts["examples"].append(example)


@dataclass
class InputPlan:
    """What planning found: the planned rows and the counts for the run summary.

    Planning needs no Ray: the job plans its input before the model loads and Ray starts, so an
    unreadable manifest or an input without images fails in seconds. The Ray Dataset is made
    afterwards, once, by :meth:`to_dataset` (or the :attr:`dataset` property). Its rows: the
    core columns (module docstring), then ``carried_columns`` (strings).
    Counts obey ``listed == rows + skipped + duplicates_removed`` for every kind (README
    "Inputs" says what each kind lists); :meth:`expected_rows` is the right-hand side's row
    count. ``skipped_by_reason`` splits ``skipped`` by ``SKIP_REASONS`` key (its values sum to
    ``skipped``). For kinds read lazily in tasks (webdataset, parquet) ``listed`` is None and
    ``skipped`` holds only what planning skipped (files beside the shards) until
    :meth:`finalize` is called after the dataset has been consumed.
    """

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
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    # Kinds read in tasks: the most rows they can give, where planning can tell cheaply (Parquet:
    # the footers' row counts; a few plain tars: their sizes), else None. Sizes the labeler
    # pool (``cluster.initial_actors``), counts nothing.
    rows_at_most: int | None = None
    # Streaming kinds: () -> {file_uri: counts (``new_counts``)} from the read tasks.
    _tally: Callable[[], dict[str, dict]] | None = field(default=None, repr=False)
    # Streaming kinds: what planning itself listed and skipped (files beside the shards), kept
    # apart so that finalize() adds the read tasks' counts to it rather than replacing it.
    _planned_counts: dict | None = field(default=None, repr=False)
    # Container files (tars, Parquet, manifest parts) a plan handed over from a folder reads;
    # the folder counts its other files as skipped (``not_a_shard``).
    container_files: list[str] | None = field(default=None, repr=False)
    # Planned without Ray (InputOptions.use_ray False): () -> the planned tables, read here.
    _local: Callable[[], list[pa.Table]] | None = field(default=None, repr=False)
    # Planned for Ray: (task_options, cluster_cpus) -> (the lazy ray.data.Dataset, the streaming
    # kinds' tally or None); None arguments mean the planning options' own.
    _open: Callable[[dict | None, float | None], tuple[Any, Callable[[], dict[str, dict]] | None]] | None = \
        field(default=None, repr=False)
    _dataset: Any = field(default=None, repr=False)  # ray.data.Dataset, once made

    def to_dataset(self, task_options: dict | None = None, cluster_cpus: float | None = None) -> Any:
        """The lazy ``ray.data.Dataset`` of the planned rows, made on the first call (Ray must be
        running by then: ``ray.data`` would start a local instance); later calls return it.

        Args:
            task_options: Ray remote arguments of the stage that reads the rows (see
                ``InputOptions``); None: the planning options' own.
            cluster_cpus: the CPUs that size the blocks of driver-planned rows
                (``blocks.rows_per_block``); None: the planning options' own.

        Raises:
            ValueError: the plan was made without Ray (``read_locally`` gives its rows).
        """
        if self._dataset is None:
            if self._open is None:
                raise ValueError("this plan was made without Ray: read plan.read_locally()")
            self._dataset, tally = self._open(task_options, cluster_cpus)
            self._open = None  # it holds the planned table, which is in the object store now
            if tally is not None:
                self._tally = tally
        return self._dataset

    @property
    def dataset(self) -> Any:
        """:meth:`to_dataset` with the planning options' task options and CPUs."""
        return self.to_dataset()

    def read_locally(self) -> list[dict]:
        """The rows of a plan made without Ray (``plan_inputs(..., use_ray=False)``), as dicts
        in ``input_index`` order. For tars and Parquet the kind's reader runs here, in this
        process, and :meth:`finalize` then sees its counts.

        Raises:
            ValueError: the plan was made with Ray (read ``dataset`` instead).
        """
        if self._local is None:
            raise ValueError("this plan was made for Ray: read plan.to_dataset()")
        rows = [r for t in self._local() for r in t.to_pylist()]
        return sorted(rows, key=lambda r: r["input_index"])

    def __post_init__(self) -> None:
        if self._tally is not None and self._planned_counts is None:
            self._planned_counts = {"listed": self.listed or 0, "skipped": self.skipped,
                                    "reasons": dict(self.skipped_by_reason),
                                    "examples": list(self.skipped_examples)}

    def finalize(self) -> InputPlan:
        """Fill ``listed``/``skipped``/``skipped_by_reason``/``skipped_examples`` from the read
        tasks (tars, Parquet), added to what planning counted.

        Call once the dataset has been fully consumed. Counts are kept per file, so a file read
        twice (task retry, dataset re-executed) is counted once. No-op for driver-planned kinds.
        Returns self.
        """
        if self._tally is None:
            return self
        per_file = self._tally()
        base = self._planned_counts or new_counts()
        reasons = dict(base["reasons"])
        examples = list(base["examples"])
        self.listed = base["listed"] + sum(c["listed"] for c in per_file.values())
        self.skipped = base["skipped"] + sum(c["skipped"] for c in per_file.values())
        for uri in sorted(per_file):
            for reason, n in per_file[uri]["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
            examples.extend(per_file[uri]["examples"][: max(0, MAX_EXAMPLES - len(examples))])
        self.skipped_by_reason = reasons
        self.skipped_examples = examples
        return self

    def release(self) -> None:
        """Stop the Ray actor that collects the read tasks' counts (tars, Parquet), keeping its
        counts for :meth:`finalize`: once the dataset has been consumed or has failed. Reading
        the dataset again is not counted then. No-op for other kinds, plans without Ray, and
        after the first call."""
        close = getattr(self._tally, "close", None)
        if close is not None:
            close()

    def add_planned_skip(self, reason: str, example: str) -> None:
        """Count one entry that planning listed and skipped (``reason``: a ``SKIP_REASONS``
        key), e.g. ``_SUCCESS`` beside Parquet parts; for streaming kinds it is kept apart from
        the read tasks' counts, which :meth:`finalize` adds to it."""
        # Only streaming kinds keep planning's own counts apart (their tally may not exist yet).
        if self._planned_counts is not None:
            count_skip(self._planned_counts, reason, example)
        if self.listed is not None:
            self.listed += 1
        self.skipped += 1
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(example)

    def expected_rows(self) -> int | None:
        """The number of output rows the counts promise: ``listed - skipped -
        duplicates_removed``. A job checks ``rows == plan.expected_rows()`` (the invariant
        ``listed == rows + skipped + duplicates_removed``) before it commits. None for tars and
        Parquet until :meth:`finalize` has run."""
        if self.listed is None:
            return None
        return self.listed - self.skipped - self.duplicates_removed

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
    """Lower-case extension with the dot (``.jpg``), ``""`` when none. Trailing white space is
    not part of it: ``"a.png "`` (a name Linux and macOS allow) is a PNG to Pillow too."""
    return posixpath.splitext(path.rstrip())[1].lower()


def is_hidden(rel: str) -> bool:
    """True when any component of a relative path starts with ``.`` (``.git/x``, ``._a.jpg``).

    ``.`` and ``..`` components (``./0000.png`` from ``tar -C dir -cf x.tar .``) are not hidden.
    """
    return any(part.startswith(".") and part not in (".", "..") for part in rel.split("/"))


def shard_skip_reason(rel: str) -> str | None:
    """Why a file at ``rel`` below a folder of tar or Parquet shards is no shard of it, or None.

    ``hidden`` (a component starting with ``.``), or ``dataset_metadata`` (with ``_``): the
    folder is read as a dataset, with ``pyarrow.dataset``'s default ``ignore_prefixes``, so a
    Spark job's leftover ``_temporary/.../part-*.parquet`` (SPARK-3011) or a Delta table's
    ``_delta_log/*.checkpoint.parquet`` are no second copy of the rows. (A folder of images keeps
    ``_`` names: there they are images.)
    """
    if is_hidden(rel):
        return "hidden"
    if any(part.startswith("_") for part in rel.split("/")):
        return "dataset_metadata"
    return None


def member_name(name: str) -> str:
    """A tar member's name as it appears in ``path``: no leading ``./`` or ``/``."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def internal_error_detail(where: str, exc: BaseException, log) -> str:
    """Log the traceback of an unexpected exception while reading one input; return the detail.

    The row gets ``internal_error: <detail>`` (a bug in zslabel, not a bad input): the job goes
    on, and the log holds the traceback to report.
    """
    log.error("internal error while reading %s:\n%s", where,
              "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return f"while reading {where}: {describe_error(exc)}"


def is_bytes_type(kind: pa.DataType) -> bool:
    """Whether ``kind`` holds bytes in any of Arrow's layouts, each castable to ``binary``:
    ``binary``, ``large_binary``, ``binary_view`` (Polars, newer Arrow writers),
    ``fixed_size_binary``, or a dictionary of those (pandas' Categorical of bytes)."""
    if pa.types.is_dictionary(kind):
        return is_bytes_type(kind.value_type)
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
            or pa.types.is_fixed_size_binary(kind))


def to_text(column) -> pa.Array:
    """A carried column (``pa.Array``/``pa.ChunkedArray``, any type) as a (N,) string array.

    Strings stay as they are; numbers, booleans, dates and dictionaries of those are cast by
    Arrow; binary is decoded as UTF-8 (invalid bytes replaced); nested values (lists such as
    COCO's several captions, structs, maps) are JSON text, as the ``jsonl`` kind carries
    non-string values. Nulls stay null. Never raises for a type: anything Arrow cannot cast
    becomes JSON text (``str`` for values JSON has no form for).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.dictionary_decode(), kind.value_type
    if pa.types.is_string(kind):
        return column
    if is_bytes_type(kind):
        return pa.array([None if v is None else v.decode("utf-8", errors="replace")
                         for v in column.to_pylist()], pa.string())
    if not pa.types.is_nested(kind):
        try:
            return column.cast(pa.string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            pass
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                     for v in column.to_pylist()], pa.string())
