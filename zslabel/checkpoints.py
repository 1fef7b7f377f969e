"""Where a checkpoint's files are: the local folder of a ``--model`` value that is a path, an
fsspec URI of a folder or a Hugging Face hub id. Which library loads the folder is ``model``'s
question (its families); this module only finds, copies and downloads folders.

Remote folders are copied once per machine and content (a changed listing is copied afresh)
into a local cache under a file lock, and hub downloads go through ``huggingface_hub``'s
per-machine cache (which locks too), so N actors on one node fetch a checkpoint once, not N
times. No Ray, no torch here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from .errors import ModelLoadError
from .model_base import CHECKPOINT_PATTERNS, cache_root
from .storage import local_path, url_to_fs

log = logging.getLogger(__name__)


def checkpoint_folder(model: str, revision: str | None, storage_options: dict | None, *,
                      markers: tuple[str, ...]) -> Path:
    """The local folder holding the checkpoint ``model`` names (``model.resolve_checkpoint``
    asks its families first, for the values one claims by their form).

    Args:
        model: local folder, ``file://`` URI (RFC 8089), fsspec URI of a folder, or hub id.
        revision: hub revision (branch, tag or commit); ignored for folders.
        storage_options: fsspec options for remote URIs (endpoint, credentials chain settings).
        markers: file names of which a checkpoint folder holds at least one (``model.MARKER_FILES``).

    Raises:
        ModelLoadError: the folder does not exist or holds none of ``markers``, the URI cannot
            be read, the hub id cannot be downloaded (e.g. offline); the message says which and
            how to fix it.
    """
    copied = _copy_remote_checkpoint(model, storage_options or {}, markers)
    if copied is not None:
        return copied
    as_local = local_path(model)
    assert as_local is not None  # a URI of another filesystem was copied above
    local = Path(as_local).expanduser()
    names = " or ".join(markers)
    if local.is_dir():
        if not any((local / m).is_file() for m in markers):
            raise ModelLoadError(f"model folder {local} has no {names}; is it a Hugging Face "
                                 "(transformers) or open_clip checkpoint?")
        return local
    if local.exists():
        raise ModelLoadError(f"model {as_local!r} is not a checkpoint folder (it is a file)")
    if _looks_like_path(as_local):
        raise ModelLoadError(f"no such checkpoint folder: {local} (--model {as_local!r} looks like a local path, "
                             "so the Hugging Face hub was not asked; a hub id is 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(as_local, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "cannot load"
        raise ModelLoadError(
            f"cannot download model {as_local!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Pass a local checkpoint folder or an fsspec URI with --model, or check network/HF_HUB_OFFLINE."
        ) from exc


def _looks_like_path(model: str) -> bool:
    """Whether a ``--model`` value that does not exist was meant as a local folder, not a hub id.

    Hub ids are ``name`` or ``org/name`` (letters, digits, ``-_.``). A local path: starts with
    ``./ ../ / ~`` or ``.``, has a Windows drive (``C:``) or a backslash, has more than one
    ``/``, or its parent folder exists here (``models/nonexistent`` next to ``models/``).
    """
    if model.startswith((".", "/", "~")) or "\\" in model or re.match(r"^[A-Za-z]:", model):
        return True
    if model.count("/") > 1:
        return True
    parent = Path(model).expanduser().parent
    return model.count("/") == 1 and parent.is_dir()


def _copy_remote_checkpoint(uri: str, storage_options: dict, markers: tuple[str, ...]) -> Path | None:
    """Copy a remote checkpoint folder once per machine and per content; concurrent callers wait
    on a file lock. None for a local path, a ``file:`` URI or a hub id (``storage.local_path``
    is not None for them: ``checkpoint_folder`` takes those).

    The folder is listed on every call, and the copy is keyed on the URI and a stamp of that
    listing (``_listing_stamp``: each file's name, size and ETag or modification time), so new
    weights pushed to the same URI (a retrained ``latest``) get a fresh copy instead of the one
    cached for the old ones (fsspec/filesystem_spec#971: cached files never revalidated).
    """
    from filelock import FileLock

    if local_path(uri) is not None:
        return None
    try:
        fs, root = url_to_fs(uri, storage_options, error=ModelLoadError)
        listing = fs.find(root, detail=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any storage failure means the model is unreachable
        raise ModelLoadError(f"cannot copy model from {uri}: {type(exc).__name__}: {exc}") from exc
    base = root.rstrip("/")
    files = {name: info for name, info in listing.items()
             if not name.endswith("/") and info.get("type", "file") != "directory"}
    if not any(f.rsplit("/", 1)[-1] in markers for f in files):
        raise ModelLoadError(f"model URI {uri} holds no {' or '.join(markers)}")
    stamp = _listing_stamp(files, base)
    key = hashlib.sha256(f"{uri.rstrip('/')}\n{stamp}".encode()).hexdigest()[:16]
    dest = cache_root() / "checkpoints" / key
    done = dest / ".zslabel-complete"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if done.exists():
            return dest
        try:
            for f in files:
                target = dest / os.path.relpath(f, base)
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(target))
        except Exception as exc:  # noqa: BLE001 - any storage failure means the model is unreachable
            raise ModelLoadError(f"cannot copy model from {uri}: {type(exc).__name__}: {exc}") from exc
        done.write_text(f"{uri}\n{stamp}")
    log.info("checkpoint %s cached at %s", uri, dest)
    return dest


# Listing fields that change when an object's content does: an ETag (S3, Azure, HTTP) or a
# generation/hash (GCS) when the backend gives one, else a modification time.
_VERSION_FIELDS = ("ETag", "etag", "md5Hash", "generation", "version_id", "VersionId")
_TIME_FIELDS = ("LastModified", "last_modified", "mtime", "updated", "modified", "created")


def _listing_stamp(files: dict[str, dict], base: str) -> str:
    """One line per file of a remote checkpoint: relative name, size, and its ETag (or the like)
    or else its modification time, when the listing gives one; sorted by name."""
    lines = []
    for name in sorted(files):
        info = files[name]
        version = next((info[k] for k in _VERSION_FIELDS if info.get(k) not in (None, "")), None)
        if version is None:
            version = next((info[k] for k in _TIME_FIELDS if info.get(k) not in (None, "")), "")
        lines.append(f"{os.path.relpath(name, base)}\t{info.get('size')}\t{version}")
    return "\n".join(lines)
