"""Input kinds ``folder`` (every image file below a prefix) and ``glob`` (files matching a pattern).

A folder is found with ONE recursive listing (``fs.find``; on S3 one paginated ListObjectsV2,
no per-file HEAD; locally an ``os.scandir`` walk). Every listed file is either a row (an image
extension, not hidden) or skipped and counted; object keys ending in ``/`` are folder markers,
not files, and are not listed.
"""

from __future__ import annotations

import logging
import os
import posixpath

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from .. import storage
from ..errors import InputError
from .blocks import core_table, dataset_from_table
from .common import IMAGE_EXTENSIONS, MAX_EXAMPLES, InputKind, InputOptions, InputPlan, extension, is_hidden

logger = logging.getLogger(__name__)


def local_find(root: str) -> tuple[list[str], list[str]]:
    """All files below a local folder: (files, unreadable_dirs).

    ``os.scandir`` walk: file types come from the directory entries, so no per-file ``stat``
    (fsspec's local ``find`` stats every entry: 5.9 s vs 0.3 s for 200,000 files). Symlinked
    folders are followed once (cycles cut by real path), as fsspec does.
    """
    if os.path.isfile(root):
        return [root], []
    files: list[str] = []
    bad: list[str] = []
    seen: set[str] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        files.append(entry.path)
                    elif not entry.is_symlink():
                        stack.append(entry.path)
                    else:
                        real = os.path.realpath(entry.path)
                        if real not in seen:
                            seen.add(real)
                            stack.append(entry.path)
        except OSError as exc:
            if folder == root:
                if isinstance(exc, FileNotFoundError):
                    return [], []
                raise InputError(f"cannot list {root}: {exc}") from exc
            logger.warning("cannot list %s: %s", folder, exc)
            bad.append(folder)
    return files, bad


def _list(uri: str, pattern: bool, storage_options: dict) -> tuple[object, str, str, list[str], list[str]]:
    """(fs, fs_path, root, files sorted, unreadable folders) for a folder or a glob pattern."""
    fs, fs_path = storage.url_to_fs(uri, storage_options)
    unreadable: list[str] = []
    if pattern:
        root = fs_path[: storage.glob_start(fs_path) or len(fs_path)].rsplit("/", 1)[0]
        try:
            found = fs.glob(fs_path, detail=True)
        except ValueError as exc:  # fsspec rejects malformed patterns ("a**b")
            raise InputError(f"invalid glob pattern {uri}: {exc}") from exc
        files = [p for p, info in found.items() if info.get("type") != "directory"]
    else:
        root = fs_path.rstrip("/") or fs_path
        if storage.is_local(fs) and type(fs).find is LocalFileSystem.find:
            files, unreadable = local_find(root)
        else:
            files = fs.find(root, detail=False)
    # Zero-byte "folder/" objects (S3 consoles make them) are folder markers, not files.
    return fs, fs_path, root, sorted(p for p in files if not p.endswith("/")), unreadable


def plan_listing(uri: str, options: InputOptions, *, pattern: bool) -> InputPlan:
    """Plan a folder (``pattern=False``) or a glob pattern; see the module docstring.

    Raises:
        InputError: nothing exists at ``uri``, no images among the files, a malformed pattern.
    """
    fs, fs_path, root, files, unreadable = _list(uri, pattern, options.storage_options)
    to_uri = storage.uri_maker(uri, fs)
    images: list[str] = []
    skipped: list[str] = []
    for p in files:
        rel = p[len(root):].lstrip("/") if p.startswith(root) else posixpath.basename(p)
        is_image = extension(storage.name_part(p, fs)) in IMAGE_EXTENSIONS
        (images if is_image and not is_hidden(rel) else skipped).append(p)
    skipped.extend(unreadable)  # a sub-folder that cannot be listed is counted, never dropped
    if not images and options.auto and options.plan_files is not None:
        # img2dataset / WebDataset output folders hold shards, not loose images.
        shards = [to_uri(p) for p in skipped if not is_hidden(p[len(root):].lstrip("/"))]
        handed = options.plan_files(shards, options)
        if handed is not None:
            return handed
    if not images:
        if not files and not fs.exists((root or fs_path) if pattern else fs_path):
            raise InputError(f"no images found: {uri} does not exist")
        raise InputError(f"no images found under {uri} ({len(skipped)} files skipped"
                         + (": " + ", ".join(to_uri(p) for p in skipped[:5]) if skipped else "")
                         + ")")
    table = core_table(pa.array([to_uri(p) for p in images], pa.string()))
    dataset = dataset_from_table(table, options.task_options, options.cluster_cpus)
    return InputPlan(dataset=dataset, kind="glob" if pattern else "folder",
                     listed=len(files) + len(unreadable), skipped=len(skipped),
                     skipped_examples=[to_uri(p) for p in skipped[:MAX_EXAMPLES]],
                     duplicates_removed=0, planning_seconds=0.0, carried_columns=[],
                     planned_paths=table.column("path"))


FOLDER = InputKind(
    name="folder",
    summary="every image file below a folder or prefix (one recursive listing); an existing "
            "single image file is a folder of one",
    detect=lambda uri, pattern: True,
    plan=lambda uri, options: plan_listing(uri, options, pattern=False))

GLOB = InputKind(
    name="glob",
    summary="the files matching a pattern (*, ?, [..]) when no file or folder has that exact name",
    detect=lambda uri, pattern: pattern,
    plan=lambda uri, options: plan_listing(uri, options, pattern=True))
