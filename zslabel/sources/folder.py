"""Input kinds ``folder`` (every image file below a prefix) and ``glob`` (files matching a pattern).

A folder is found with ONE recursive listing (``fs.find``; on S3 one paginated ListObjectsV2,
no per-file HEAD; locally an ``os.scandir`` walk). Every listed file is either a row (an image
extension, not hidden) or skipped and counted with its reason (``hidden``, ``not_an_image``);
a sub-folder that cannot be read (``unreadable_folder``) and a symlink to a folder that is not
followed because it loops back or points into the input (``folder_link``, see
:func:`local_find`) are listed and skipped too. Object keys ending in ``/`` are folder
markers, not files, and are not listed. A folder holding only tar or Parquet shards is handed
to that kind (auto mode); its other files are then skipped as ``not_a_shard``. The job's own
output folder, when it lies inside the input, is not listed: it is one skipped entry
(``output_folder``), so that its part files, manifest and state never become inputs.

A glob pattern names the files it matches, except that one ending in ``/`` (``photos/*/``)
names folders, as in POSIX glob(7) and bash: each matched folder (a local link to a folder
too) is listed as a folder input is, and the files the pattern matches beside them are not
read. ``photos/**/`` matches ``photos`` itself too; a folder inside another match, or (locally)
a link to a matched tree, is walked once.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tarfile
import zipfile
from collections import Counter

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from .. import storage
from ..errors import InputError
from ..output import CLAIM_RECORD, MANIFEST_NAME, RUN_RECORD, SWAP_RECORD
from .blocks import core_table, planned_dataset
from .common import (
    IMAGE_EXTENSIONS,
    MAX_EXAMPLES,
    InputKind,
    InputOptions,
    InputPlan,
    extension,
    is_hidden,
    shard_skip_reason,
    strip_compression,
)

logger = logging.getLogger(__name__)


def local_find(root: str | list[str], skip: str | None = None) -> tuple[list[str], list[str], list[str], list[str]]:
    """All files below a local folder, or below several (``root`` a list: the folders a pattern
    ending in ``/`` matched, walked as one tree): (files, unreadable_dirs,
    skipped_folder_links, skipped_folders).

    ``os.scandir`` walk: file types come from the directory entries, so no per-file ``stat``
    (fsspec's local ``find`` stats every entry: 5.9 s vs 0.3 s for 200,000 files).

    A symlink to a folder is followed only when its real path lies outside every tree already
    being walked (the input's, and those of links already followed) and is no ancestor of one:
    a link back to an ancestor (a loop) or into the input itself would list the same images
    twice. Such links are returned in ``skipped_folder_links`` (counted as skips, reason
    ``folder_link``), never silently dropped. Links to folders elsewhere are walked once each.

    ``skip``: the real path (``os.path.realpath``) of a folder not to walk (the job's output);
    each folder or folder link found with that real path is returned in ``skipped_folders``.
    """
    if isinstance(root, str) and os.path.isfile(root):
        return [root], [], [], []
    roots = [root] if isinstance(root, str) else root
    files: list[str] = []
    bad: list[str] = []
    links: list[str] = []
    skipped: list[str] = []
    trees: list[str] = []  # real paths of the trees walked: the roots, followed links

    def overlaps(real: str) -> bool:
        return any(real == t or real.startswith(t.rstrip("/") + "/") or t.startswith(real.rstrip("/") + "/")
                   for t in trees)

    # Each folder with its real path, known without a realpath call per folder: a sub-folder
    # that is no link is its parent's real path plus its name.
    stack: list[tuple[str, str]] = []
    for one in roots:
        real_root = os.path.realpath(one)
        if real_root == skip and one != root:  # a matched folder that is the output
            skipped.append(one)
            continue
        if overlaps(real_root):  # a matched folder that is (a link to) another's tree: once
            links.append(one)
            continue
        trees.append(real_root)
        stack.append((one, real_root))
    stack.reverse()  # popped first to last
    while stack:
        folder, real_folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        files.append(entry.path)
                        continue
                    link = entry.is_symlink()
                    real = os.path.realpath(entry.path) if link else real_folder.rstrip("/") + "/" + entry.name
                    if real == skip:
                        skipped.append(entry.path)
                    elif not link:
                        stack.append((entry.path, real))
                    elif overlaps(real):
                        links.append(entry.path)
                    else:
                        trees.append(real)
                        stack.append((entry.path, real))
        except OSError as exc:
            if folder == root:  # the input folder itself (not one of several a pattern matched)
                if isinstance(exc, FileNotFoundError):
                    return [], [], [], []
                raise InputError(f"cannot list {root}: {exc}") from exc
            logger.warning("cannot list %s: %s", folder, exc)
            bad.append(folder)
    return files, bad, links, skipped


def output_path(fs: fsspec.AbstractFileSystem, output: str | None, storage_options: dict) -> str | None:
    """The job's ``output`` as a normalised path of ``fs`` (local: ``os.path.realpath``, so
    links and ``..`` do not hide it; else the filesystem's own path without a trailing ``/``),
    or None when there is no output or it is on another filesystem.

    Never raises: an output URI that cannot be opened here is on no input's filesystem.
    """
    if not output:
        return None
    try:
        out_fs, path = storage.url_to_fs(output, storage_options)
    except Exception:  # noqa: BLE001 - the output's own checks report a bad output URI
        return None
    if set(storage.protocols(out_fs)) != set(storage.protocols(fs)):
        return None
    return storage.canonical_location(fs, path)


def output_inside(fs: fsspec.AbstractFileSystem, root: str, output: str | None, storage_options: dict) -> str | None:
    """The job's ``output`` as the listing of an input's ``root`` (a path of ``fs``) names it,
    when it lies strictly below ``root`` (compared normalised, :func:`output_path`); else None."""
    real_out = output_path(fs, output, storage_options)
    if real_out is None:
        return None
    real_root = (os.path.realpath(root) if storage.is_local(fs) else root).rstrip("/")
    if not real_out.startswith(real_root + "/"):
        return None
    return root.rstrip("/") + real_out[len(real_root):]


def names_folders(uri: str) -> bool:
    """Whether a glob pattern names folders: it ends in ``/`` (POSIX glob(7), bash); in a ``::``
    chain, the link holding the pattern does (``zip://*/::/d/imgs.zip``)."""
    return (storage.chain_parts(uri)[0] if storage.is_chain(uri) else uri).endswith("/")


def is_folder(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> bool:
    """Whether a glob match (``fs.glob(..., detail=True)``'s ``info``) is a folder; a local
    symlink to a folder is one (fsspec calls its type ``other``)."""
    if info.get("type") == "directory":
        return True
    return bool(info.get("islink")) and storage.is_local(fs) and os.path.isdir(path)


def outermost(folders: list[str]) -> list[str]:
    """``folders`` sorted, without those inside another of them (``photos/**/`` matches
    ``photos/a`` and ``photos/a/b``: listing both would list ``b`` twice)."""
    kept: list[str] = []
    # By components: "a", "a/b", "a b" (a plain sort puts "a b" between "a" and "a/b").
    for folder in sorted(folders, key=lambda f: f.rstrip("/").split("/")):
        if not kept or not (folder.rstrip("/") + "/").startswith(kept[-1].rstrip("/") + "/"):
            kept.append(folder)
    return kept


# Files only a zslabel output holds at its top: a finished run's manifest, a run's state records.
_OUTPUT_MARKERS = (MANIFEST_NAME, RUN_RECORD, CLAIM_RECORD, SWAP_RECORD)


def zslabel_outputs(files: list[str]) -> list[str]:
    """The outermost folders among ``files``' that are zslabel outputs (they hold one of
    ``_OUTPUT_MARKERS`` at their top)."""
    names = {posixpath.basename(m) for m in _OUTPUT_MARKERS}  # a million files: one set lookup each
    found = {p[: -len(marker) - 1] for p in files if posixpath.basename(p) in names
             for marker in _OUTPUT_MARKERS if p.endswith("/" + marker)}
    return outermost(sorted(found))


def _find(fs: fsspec.AbstractFileSystem, root: str | list[str], options: InputOptions
          ) -> tuple[list[str], list[str], list[str], list[str]]:
    """(files, unreadable folders, skipped folder links, output folders skipped) below a
    folder ``root`` of ``fs``, or below each of several (a list, none inside another):
    locally :func:`local_find`, else one ``fs.find`` per folder."""
    if storage.is_local(fs) and type(fs).find is LocalFileSystem.find:
        # By real path: also an output reached through a folder link the walk follows.
        return local_find(root, skip=output_path(fs, options.output, options.storage_options))
    return [p for one in ([root] if isinstance(root, str) else root) for p in fs.find(one, detail=False)], [], [], []


def _list(uri: str, pattern: bool, options: InputOptions
          ) -> tuple[fsspec.AbstractFileSystem, str, str, list[str], list[str], list[str], list[str]]:
    """(fs, fs_path, root, files sorted, unreadable folders, skipped folder links, output
    folders skipped) for a folder or a glob pattern."""
    fs, fs_path = storage.url_to_fs(uri, options.storage_options)  # fsspec drops a trailing "/"
    unreadable: list[str] = []
    links: list[str] = []
    outputs: list[str] = []
    if pattern:
        root = fs_path[: storage.glob_start(fs_path) or len(fs_path)].rsplit("/", 1)[0]
        try:
            # auto: a folder that exists under its bracketed name is itself, as a whole input
            # is; --input-format glob keeps every bracket a character class.
            found = fs.glob(storage.literal_brackets(fs, fs_path) if options.auto else fs_path, detail=True)
        except ValueError as exc:  # fsspec rejects malformed patterns ("a**b")
            raise InputError(f"invalid glob pattern {uri}: {exc}") from exc
        if names_folders(uri):
            # "photos/*/" names the matched folders (bash: `ls photos/*/`), never the files
            # beside them: each is listed as a folder input is.
            folders = outermost([p for p, info in found.items() if is_folder(fs, p, info)])
            if not folders:
                raise InputError(f"no folder matches {uri}: a pattern ending in '/' names folders (every "
                                 "image under each is read); drop the '/' to match files")
            files, unreadable, links, outputs = _find(fs, folders, options)
        else:
            files = [p for p, info in found.items() if info.get("type") != "directory"]
    else:
        root = fs_path.rstrip("/") or fs_path
        # An HTTP folder is its index page, which many servers serve only under the name with
        # its "/" (a 404 without it: an empty listing).
        files, unreadable, links, outputs = _find(fs, fs_path if storage.is_http_url(fs_path) else root, options)
    if not outputs:
        inside = output_inside(fs, root, options.output, options.storage_options)
        if inside is not None:
            kept = [p for p in files if not p.startswith(inside + "/")]
            if len(kept) < len(files):
                files, outputs = kept, [inside]
    if not pattern or names_folders(uri):
        # An earlier run's output (another --output) inside a listed folder: its Parquet files
        # were read as input shards (a read_error row each, "no image column").
        earlier = [d for d in zslabel_outputs(files) if d != root and d not in outputs]
        if earlier:
            files = [p for p in files if not any(p.startswith(d + "/") for d in earlier)]
            outputs = sorted(outputs + earlier)
    # Zero-byte "folder/" objects (S3 consoles make them) are folder markers, not files.
    return (fs, fs_path, root, sorted(p for p in files if not p.endswith("/")), unreadable, sorted(links),
            outputs)


def repeated_archive_names(fs: fsspec.AbstractFileSystem, files: list[str]) -> list[str]:
    """Each of ``files`` (paths of ``fs``) once for every earlier entry of the same name in the
    zip or tar archive ``fs`` reads (a ``::`` chain's ``ZipFileSystem``/``TarFileSystem``); []
    for any other filesystem. Python's zipfile and tarfile, and fsspec over them, index an
    archive by name, the last entry winning: a listing sees one file where the archive holds
    two, and the other would be neither a row nor a skip (img2dataset-style zips appended to,
    ``zip -g``, ``tar -r``)."""
    archive = getattr(fs, "zip", None) or getattr(fs, "tar", None)
    if isinstance(archive, zipfile.ZipFile):
        names = Counter(info.filename.rstrip("/") for info in archive.infolist())
    elif isinstance(archive, tarfile.TarFile):
        names = Counter(member.name.rstrip("/") for member in archive.getmembers())
    else:
        return []
    return [p for p in files for _ in range(names.get(p.lstrip("/"), 1) - 1)]


def plan_listing(uri: str, options: InputOptions, *, pattern: bool) -> InputPlan:
    """Plan a folder (``pattern=False``) or a glob pattern; see the module docstring.

    Raises:
        InputError: nothing exists at ``uri``, no images among the files, a malformed pattern.
    """
    fs, fs_path, root, files, unreadable, links, outputs = _list(uri, pattern, options)
    to_uri = storage.uri_maker(uri, fs)
    images: list[str] = []
    skipped: list[tuple[str, str]] = []  # (path, reason)
    def relative(p: str) -> str:
        return p[len(root):].lstrip("/") if p.startswith(root) else posixpath.basename(p)

    for p in files:
        rel = relative(p)
        if is_hidden(rel):
            skipped.append((p, "hidden"))
        elif extension(storage.name_part(p, fs)) in IMAGE_EXTENSIONS:
            images.append(p)
        else:
            skipped.append((p, "not_an_image"))
    # A sub-folder that cannot be listed, or a folder link not followed, is counted, never dropped;
    # so is an archive entry that a later one of the same name hides from every reader by name.
    skipped += [(p, "unreadable_folder") for p in unreadable] + [(p, "folder_link") for p in links]
    skipped += [(p, "archive_name_repeated") for p in repeated_archive_names(fs, files)]
    # The job's own output: one entry however many files it holds, so that the counts of a
    # rerun (its part files, manifest and state there now) equal the first run's; an earlier
    # run's likewise.
    for p in outputs:
        logger.info("skipping the zslabel output folder %s inside the input %s", to_uri(p), uri)
        skipped.append((p, "output_folder"))
    # No images, or only a shard folder's own metadata (a ``_preview.jpg`` beside Spark parts):
    # not a folder of images; its shards are the input, as pyarrow.dataset reads it.
    if all(shard_skip_reason(relative(p)) for p in images) and options.auto and options.plan_files is not None:
        # img2dataset / WebDataset / Spark output folders hold shards, not loose images; read as
        # a dataset (``shard_skip_reason``: no ``_temporary/`` or ``_delta_log/`` parts).
        # Each listed file as the shard folder counts it: the dataset's own metadata, or a
        # candidate shard (None), or its listing reason.
        as_shards = [(to_uri(p), shard_skip_reason(relative(p)) if reason == "not_an_image" else reason)
                     for p, reason in skipped] + [(to_uri(p), shard_skip_reason(relative(p))) for p in images]
        handed = options.plan_files([u for u, reason in as_shards if reason is None], options)
        if handed is not None:
            taken = set(handed.container_files or handed.planned_files or ())
            for u, reason in as_shards:
                if u not in taken:
                    handed.add_planned_skip(reason or "not_a_shard", u)
            # Not the dataset's own metadata (``_temporary/``, ``_delta_log/``): skipped on purpose.
            _warn_unread_containers(uri, [u for u, reason in as_shards if reason is None and u not in taken],
                                    options, f"it is read as {handed.kind} files")
            return handed
    if not images:
        if not files and not fs.exists((root or fs_path) if pattern else fs_path):
            raise InputError(f"no images found: {uri} does not exist")
        why = Counter(reason for _, reason in skipped)
        bookkeeping = any(reason == "not_an_image" and shard_skip_reason(relative(p)) == "dataset_metadata"
                          for p, reason in skipped)
        raise InputError(f"no images found under {uri} ({len(skipped)} files skipped"
                         + (f" ({', '.join(f'{r}: {n}' for r, n in why.most_common())}): "
                            + ", ".join(to_uri(p) for p, _ in skipped[:5]) if skipped else "")
                         + (")" if "not_an_image" not in why else
                            "; an image is a file named with one of the extensions listed in README 'Formats')")
                         + _unread_kind_hint([p for p, reason in skipped if reason == "not_an_image"])
                         + ("; files below a name starting with '_' (Spark's _temporary/, Delta's _delta_log/, "
                            "_SUCCESS) are a dataset's bookkeeping and are never read as its shards, as "
                            "pyarrow.dataset reads a folder" if bookkeeping else ""))
    _warn_unread_containers(uri, [to_uri(p) for p, reason in skipped if reason == "not_an_image"], options,
                            "it is read as loose images")
    options.check_columns_used("glob" if pattern else "folder", uri)
    table = core_table(pa.array([to_uri(p) for p in images], pa.string()))
    read = planned_dataset(table, options)
    reasons: dict[str, int] = {}
    for _, reason in skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    return InputPlan(kind="glob" if pattern else "folder",
                     listed=len(images) + len(skipped), skipped=len(skipped), skipped_by_reason=reasons,
                     skipped_examples=[to_uri(p) for p, _ in skipped[:MAX_EXAMPLES]],
                     duplicates_removed=0, planning_seconds=0.0, carried_columns=[],
                     planned_paths=table.column("path"), **read)


# Files that hold a list of images in a form no input kind reads, and how to convert them.
_CONVERT_HINTS = {
    ".json": "a .json file in a folder is not read as a manifest: name the file itself as the input",
}


def _unread_kind_hint(paths: list[str]) -> str:
    """``"; <how to convert>"`` for each kind of file in ``paths`` that lists images in a form
    no input kind reads (``_CONVERT_HINTS``), else ``""``."""
    found = {ext for p in paths for ext in _CONVERT_HINTS if strip_compression(p.lower()).endswith(ext)}
    return "".join(f"; {_CONVERT_HINTS[ext]}" for ext in sorted(found))


def _warn_unread_containers(uri: str, skipped: list[str], options: InputOptions, how: str) -> None:
    """Warn when a folder read one way skips files another kind reads (tars beside loose images,
    Parquet beside tars): counted as skips, but easy to miss in a summary line."""
    for kind, suffixes in options.container_suffixes.items():
        unread = [p for p in skipped if storage.kind_name(p).lower().endswith(suffixes)]  # not "x.jpg::a.tar"
        if unread:
            logger.warning("%s holds %d %s file(s) that this run does not read, as %s (the first: %s); "
                           "label them in a run of their own", uri, len(unread), kind, how, unread[0])


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
