"""Input discovery and reading: any fsspec URI -> a lazy Ray Dataset of images to label.

One module per input kind, each exposing an :class:`~zslabel.sources.common.InputKind`; the
registry ``KINDS`` below is the only list of kinds (``--input-format`` choices, config
validation and the README table are read from it). Adding a kind is one module plus one line
in ``KINDS``. Shared pieces: ``common`` (plan, options, naming rules, columns), ``blocks``
(Ray blocks), ``zslabel.storage`` (URIs and filesystems).
"""

from __future__ import annotations

import logging
import time

from .. import io_policy, storage
from ..errors import READ_ERROR, InputError, ZslabelError, error_string
from ..storage import expand_braces
from . import fetch, folder, jsonl, location, manifest, parquet, webdataset
from .common import FILE_INDEX_STRIDE, IMAGE_EXTENSIONS, SKIP_REASONS, InputKind, InputOptions, InputPlan

logger = logging.getLogger(__name__)

# Auto-detection order: the first kind whose ``detect`` claims a URI reads it.
KINDS: tuple[InputKind, ...] = (
    webdataset.KIND,
    jsonl.KIND,
    manifest.KIND,
    parquet.KIND,
    folder.GLOB,
    folder.FOLDER,
)
_BY_NAME = {k.name: k for k in KINDS}
INPUT_FORMATS: tuple[str, ...] = ("auto", *_BY_NAME)

__all__ = ["FILE_INDEX_STRIDE", "IMAGE_EXTENSIONS", "INPUT_FORMATS", "KINDS", "SKIP_REASONS", "InputKind",
           "InputOptions", "InputPlan", "detect_kind", "expand_braces", "fetch_bytes", "plan_inputs"]


def detect_kind(uri: str, *, pattern: bool | None = None) -> str:
    """The input kind ``plan_inputs(input_format="auto")`` uses for ``uri``.

    Args:
        pattern: whether glob characters in ``uri`` are a pattern; default: whenever present
            (``plan_inputs`` passes False when the name exists as written).
    """
    pattern = storage.has_glob(uri) if pattern is None else pattern
    return next(k.name for k in KINDS if k.detect(storage.kind_name(uri), pattern))


def plan_files(files: list[str], options: InputOptions) -> InputPlan | None:
    """Plan container files found in a folder with the first kind reading all such files."""
    for kind in KINDS:
        if kind.plan_files is None:
            continue
        mine = [f for f in files if storage.kind_name(f).lower().endswith(kind.file_suffixes)]
        if mine:
            plan = kind.plan_files(mine, options)
            plan.container_files = mine
            return plan
    return None


def _locate(uri: str, input_format: str, storage_options: dict | None, io: io_policy.IOPolicy) -> tuple[str, str]:
    """The input's one spelling (``location.locate``) and the kind that reads it
    (``input_format``, or the first of ``KINDS`` that claims it, as :func:`detect_kind`)."""
    where = location.locate(uri, storage_options, io, probe=input_format == "auto")
    if input_format != "auto":
        return where.uri, input_format
    name = next(k.name for k in KINDS if k.detect(where.kind_name, where.pattern))
    if name not in ("folder", "glob") and where.local_folder:
        # A folder named like a file (photos.tar/, imgs.jsonl/, Spark's table.parquet/): its
        # files are the input (loose images, else its shards or parts), never one unreadable file.
        name = "folder"
    return where.uri, name


def plan_inputs(uri: str, *, input_format: str = "auto", storage_options: dict | None = None,
                io: io_policy.IOPolicy | None = None, path_column: str | None = None, id_column: str | None = None,
                dedupe: bool = False, image_column: str | None = None,
                task_options: dict | None = None, cluster_cpus: float | None = None,
                use_ray: bool = True, output: str | None = None) -> InputPlan:
    """Discover the inputs at ``uri`` (no Ray needed) and return them with their counts.

    Args:
        uri: a folder, glob pattern, manifest file, tar shard(s) (brace ranges allowed) or
            Parquet file/folder, as a local path or any fsspec URI (``s3://``, ``gs://``,
            ``az://``, ``http(s)://``, ``file://``, ...). A name that exists as written is
            never a glob pattern.
        input_format: one of ``INPUT_FORMATS``; ``"auto"`` decides from the URI (see
            :func:`detect_kind`).
        storage_options: passed to the fsspec filesystem (endpoint, anon, ...); credentials come
            from each filesystem's standard chain otherwise.
        io: connect/read timeout (seconds) and retries for every listing and every manifest,
            tar or Parquet file read for this input, in read tasks too (the job's
            ``--io-timeout``/``--io-retries``; default ``io_policy.IOPolicy()``: 30 s, 3 retries).
            Added to ``storage_options`` once, here (``storage.io_storage_options``); the
            user's own timeout settings there win.
        path_column: manifest column holding the URIs (default: first of path/url/uri/file_name).
        id_column: manifest column carried to the output as a string column.
        dedupe: manifests only: keep the first row of each repeated URI.
        image_column: Parquet column of image bytes, any case (default: each file's own,
            ``parquet.image_columns``: a binary column named jpg/png/image/webp/bytes/jpeg/img
            in any case, else the only binary one named like images).
        task_options: Ray remote arguments for the stage that reads planned rows (see
            ``InputOptions``); the next stage's, so that Ray Data fuses them. The default of
            ``InputPlan.to_dataset``, which may be given them instead (the job does: it plans
            before Ray starts).
        cluster_cpus: CPUs the cluster has or may scale to; sizes the blocks of planned rows
            (``blocks.rows_per_block``). None: by the row count alone. As ``task_options``.
        use_ray: True: the plan is read as a Ray Dataset (``InputPlan.to_dataset``, made when
            first asked for: planning itself needs no Ray). False: ``plan.read_locally()``
            gives the rows (tars and Parquet are read then, in this process).
        output: the job's output URI (``--output``). A folder or glob input that holds it lists
            nothing under it: it is one skipped entry (``output_folder``), so that a rerun does
            not read the run's own Parquet files, manifest and state as inputs.

    Returns:
        An :class:`InputPlan`. Folder/glob/manifest rows are in deterministic order (listing
        sorted by path; manifest in file order). Its counts obey ``listed == rows + skipped +
        duplicates_removed`` (``plan.expected_rows()``; for tars and Parquet after
        ``plan.finalize()``), with ``skipped_by_reason`` keyed by ``SKIP_REASONS``.

    Raises:
        InputError: unknown format, nothing found, unreadable manifest, missing column,
            a filesystem protocol whose package is not installed, a listing or file that did
            not answer within ``io.timeout`` (the message names ``--io-timeout``).
        TextDecodeError: a text manifest that is not UTF-8.
    """
    start = time.perf_counter()
    if input_format != "auto" and input_format not in _BY_NAME:
        raise InputError(f"unknown input format {input_format!r}; expected one of {', '.join(INPUT_FORMATS)}")
    auto = input_format == "auto"
    io = io or io_policy.IOPolicy()
    uri, name = _locate(uri, input_format, storage_options, io)
    # The one place sources get their storage options: with the job's timeouts built in, so no
    # kind can open a listing, manifest, tar or Parquet file (here or in a read task) with the
    # 30 s default while the user asked for --io-timeout 5. Every file a kind opens is on the
    # input's own filesystem (shards beside shards, parts beside parts), which these fit.
    options = InputOptions(storage_options=storage.io_storage_options(uri, storage_options, io), io=io,
                           path_column=path_column, id_column=id_column, dedupe=dedupe, image_column=image_column,
                           auto=auto, plan_files=plan_files,
                           container_suffixes={k.name: k.file_suffixes for k in KINDS if k.plan_files is not None},
                           task_options=dict(task_options or {}),
                           cluster_cpus=cluster_cpus, use_ray=use_ray, output=output)
    try:
        plan = _BY_NAME[name].plan(uri, options)
    except ZslabelError:
        raise
    except Exception as exc:
        # A listing that stalled (kinds turn their own read failures into InputError or rows):
        # one line naming the limit, not a traceback. Other errors keep their traceback.
        if io_policy.timeout_cause(exc) is None:
            raise
        raise InputError(f"cannot plan input {uri}: {io_policy.describe_error(exc, io)}") from exc
    plan.planning_seconds = time.perf_counter() - start
    logger.info("planned %s input %s: listed=%s skipped=%d duplicates_removed=%d in %.2fs",
                plan.kind, uri, plan.listed, plan.skipped, plan.duplicates_removed, plan.planning_seconds)
    return plan


def fetch_bytes(path: str, storage_options: dict | None = None,
                io: io_policy.IOPolicy | None = None) -> tuple[bytes | None, str | None]:
    """Read one whole file through fsspec; never raises.

    Args:
        path: a plain local path or any fsspec URI (as produced in the ``path`` column; a local
            name with ``%XX`` escapes of undecodable bytes finds the file, see ``zslabel.storage``).
        storage_options: the same options given to :func:`plan_inputs`.
        io: connect/read timeout (seconds) of the filesystem and the byte limit of one input
            (default ``io_policy.IOPolicy()``); no retries here (``fetch.fetch_many`` has them).

    Returns:
        ``(data, None)`` on success, else ``(None, "read_error: <ExceptionType>: <message>")``.
    """
    max_bytes = (io or io_policy.IOPolicy()).max_bytes
    try:
        path = storage.file_uri_path(path) or path  # file:///a%20b.jpg is /a b.jpg (RFC 8089)
        if "://" not in path:
            # A plain local path (what folder, glob and manifest plans hold for local inputs):
            # read as the decode tasks read it (%XX escapes, NFC/NFD on a miss).
            return fetch.read_local(path, storage_options, max_bytes)
        fs, fs_path = storage.url_to_fs(path, storage_options, io=io)
        try:
            return fetch.cat_capped(fs, fs_path, max_bytes), None
        except FileNotFoundError:
            other = storage.open_path(fs, fs_path)  # %XX escapes, NFC/NFD: only on a miss
            if other == fs_path:
                raise
            return fetch.cat_capped(fs, other, max_bytes), None
    except Exception as exc:  # noqa: BLE001 - every storage failure becomes a row error
        return None, error_string(READ_ERROR, io_policy.describe_error(exc, io))
