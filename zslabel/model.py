"""Load a CLIP-family checkpoint and run its towers: label (text) and image embeddings.

No Ray here. A checkpoint is a Hugging Face hub id, a local folder, or an fsspec URI of a folder
(``s3://bucket/models/clip``); remote folders are copied once per machine and content (a
changed listing is copied afresh) into a local cache under a file lock, and hub downloads go
through ``huggingface_hub``'s per-machine cache (which locks too), so N actors on one node
fetch a checkpoint once, not N times.

Model families. A checkpoint folder belongs to one library that loads it:

- ``transformers`` (``zslabel.model_transformers.TransformersModel``): ``config.json`` with a
  ``model_type`` (CLIP, SigLIP, SigLIP 2, any dual encoder with
  ``get_image_features``/``get_text_features``).
- ``open_clip`` (``zslabel.model_openclip.OpenClipModel``, the ``open-clip`` extra):
  ``open_clip_config.json`` (BiomedCLIP, the LAION/DFN/MetaCLIP zoo); also ``--model
  hf-hub:ORG/NAME`` and ``--model ARCH:pretrained_tag``.

Every family is a ``zslabel.model_base.ZeroShotModel`` subclass with the same attributes and
methods (see its docstring); ``load_model(path)`` picks the family from the folder's files
(``family_of``), so the pipeline, relabel and calibration never name a family. Layers: this
module (which family, which folder) above the families, the families above ``model_base``
(their interface). Adding a family is one module: a subclass, a ``claims``/``resolve`` pair for
``--model`` values that are not folders (if any), and one entry in ``FAMILIES``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import model_openclip
from .errors import ModelLoadError
from .model_base import (
    CHECKPOINT_PATTERNS,
    OPEN_CLIP,
    OPEN_CLIP_CONFIG,
    TRANSFORMERS,
    ZeroShotModel,
    cache_root,
    checkpoint_digest,
)

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_PATTERNS", "FAMILIES", "Family", "ZeroShotModel", "cache_root", "checkpoint_digest",
           "family_of", "labeler_checkpoint", "load_model", "resolve_checkpoint"]


class Family(NamedTuple):
    """How one model library plugs in (see the module docstring).

    Attributes:
        name: the library's name, recorded in run manifests (``ZeroShotModel.library``).
        owns_folder: whether a local checkpoint folder belongs to this family (by its files).
        claims: whether a ``--model`` value that is not an existing path names a checkpoint of
            this family by its form alone (``hf-hub:org/name``, ``ARCH:tag``); None if none.
        resolve: ``(model, revision, storage_options) -> Path`` for the values ``claims``;
            raises ``ModelLoadError``.
        model_class: ``() -> type``: the family's ``ZeroShotModel`` subclass, imported on first
            use (so a family's library is imported only when one of its checkpoints is loaded);
            instances are made as ``cls(path, device, dtype, **spec_overrides)``.
    """

    name: str
    owns_folder: Callable[[Path], bool]
    claims: Callable[[str], bool] | None
    resolve: Callable[..., Path] | None
    model_class: Callable[[], type]


def _is_transformers_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _is_open_clip_folder(path: Path) -> bool:
    """An ``open_clip_config.json`` and no transformers ``config.json`` beside it.

    Some hub repos carry both (laion/CLIP-ViT-*: a transformers CLIP config and open_clip
    weights): those stay with transformers, as before open_clip support. A ``config.json``
    without ``model_type`` (timm's, in timm/* repos) is not a transformers checkpoint.
    """
    if not (path / OPEN_CLIP_CONFIG).is_file():
        return False
    try:
        return "model_type" not in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return True


def _transformers_class() -> type:
    from .model_transformers import TransformersModel

    return TransformersModel


def _open_clip_resolve(model: str, revision: str | None, storage_options: dict | None) -> Path:
    return model_openclip.resolve(model, revision)  # hub ids and zoo tags: no storage options


def _open_clip_class() -> type:
    return model_openclip.OpenClipModel


# Checked in order: open_clip first, since its folders may hold a (timm) config.json too.
FAMILIES = (
    Family(OPEN_CLIP, _is_open_clip_folder, model_openclip.claims, _open_clip_resolve, _open_clip_class),
    Family(TRANSFORMERS, _is_transformers_folder, None, None, _transformers_class),
)


def family_of(path: str | Path) -> Family | None:
    """The family whose checkpoint folder ``path`` is, or None (no marker file)."""
    path = Path(path)
    return next((f for f in FAMILIES if f.owns_folder(path)), None)


def _marker_names() -> str:
    return " or ".join(("config.json", OPEN_CLIP_CONFIG))


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
               **spec_overrides) -> ZeroShotModel:
    """Load the checkpoint folder ``path`` (from ``resolve_checkpoint``) with its family's class.

    Args:
        device, dtype: where and in which dtype the towers run.
        spec_overrides: decode settings over the checkpoint's own (``PreprocessSpec``:
            ``max_pixels``, ``min_side``, ``fast``, ``reference_pixels``).

    Returns:
        the family's ``ZeroShotModel`` (``TransformersModel`` or ``OpenClipModel``).

    Raises:
        ModelLoadError: ``path`` is no checkpoint folder of a known family, or its family
            cannot load it (the message says why).
    """
    family = family_of(path)
    if family is None:
        raise ModelLoadError(f"{path} holds no {_marker_names()}: not a checkpoint zslabel can load")
    model: ZeroShotModel = family.model_class()(path, device, dtype, **spec_overrides)
    return model


def resolve_checkpoint(model: str, revision: str | None = None,
                       storage_options: dict | None = None) -> Path:
    """Return a local folder holding the checkpoint ``model``.

    Args:
        model: local folder, ``file://`` URI, fsspec URI of a folder, hub id, or a value a
            family claims by its form (open_clip: ``hf-hub:org/name``, ``ARCH:pretrained_tag``).
        revision: hub revision (branch, tag or commit); ignored for folders.
        storage_options: fsspec options for remote URIs (endpoint, credentials chain settings).

    Raises:
        ModelLoadError: the folder does not exist or holds no checkpoint, the URI cannot be
            read, the hub id cannot be downloaded (e.g. offline), or an open_clip value was
            given without the ``open-clip`` extra installed, or names an unknown architecture
            or tag; the message says which and how to fix it.
    """
    from .storage import local_path

    # None: a URI of another filesystem than this machine's. A file: URI is read per RFC 8089,
    # as inputs and outputs read it.
    as_local = local_path(model)
    if as_local is None:
        return _copy_remote_checkpoint(model, storage_options or {})
    model = as_local
    local = Path(model).expanduser()
    if local.is_dir():
        if family_of(local) is None:
            raise ModelLoadError(f"model folder {local} has no {_marker_names()}; is it a Hugging Face "
                                 "(transformers) or open_clip checkpoint?")
        return local
    if local.exists():
        raise ModelLoadError(f"model {model!r} is not a checkpoint folder (it is a file)")
    for family in FAMILIES:
        if family.claims is not None and family.claims(model):
            assert family.resolve is not None  # a family that claims values resolves them (Family)
            return family.resolve(model, revision, storage_options)
    if _looks_like_path(model):
        raise ModelLoadError(f"no such checkpoint folder: {local} (--model {model!r} looks like a local path, "
                             "so the Hugging Face hub was not asked; a hub id is 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "cannot load"
        raise ModelLoadError(
            f"cannot download model {model!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Pass a local checkpoint folder or an fsspec URI with --model, or check network/HF_HUB_OFFLINE."
        ) from exc


def labeler_checkpoint(model: str, resolved: str, digest: str, revision: str | None = None,
                       storage_options: dict | None = None) -> Path:
    """The checkpoint folder a labeler actor loads: the run's own, checked by its digest.

    Args:
        model: the ``--model`` value. resolved: the folder the driver resolved it to
            (``resolve_checkpoint``). digest: that folder's ``checkpoint_digest``, which the
            run's label embeddings, fingerprint and manifest record.

    ``resolved`` is used where this machine has it whole (the driver's node, a shared file
    system); elsewhere ``model`` is resolved here (each node copies a remote folder once).

    Raises:
        ModelLoadError: as ``resolve_checkpoint``; or the weights found here are not those the
            run started with (new weights pushed to the same URI or written into the same
            folder, a hub branch that moved, during the run): one run labels with one model,
            never a mix of two.
    """
    here = Path(resolved)
    whole = (here.is_dir() and family_of(here) is not None
             and (here.parent != cache_root() / "checkpoints" or (here / ".zslabel-complete").exists()))
    path = here if whole else resolve_checkpoint(model, revision, storage_options)
    found = checkpoint_digest(path)
    if found != digest:
        raise ModelLoadError(f"the checkpoint of --model {model} changed during the run: this labeler found "
                             f"weights {found} in {path}, the run started with {digest} (its label embeddings, "
                             "fingerprint and manifest are those of the first): one run labels with one model; "
                             "rerun once the checkpoint stays put, or pin it (a versioned URI, --revision)")
    return path


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


def _copy_remote_checkpoint(uri: str, storage_options: dict) -> Path:
    """Copy a remote checkpoint folder once per machine and per content; concurrent callers wait
    on a file lock.

    The folder is listed on every call, and the copy is keyed on the URI and a stamp of that
    listing (``_listing_stamp``: each file's name, size and ETag or modification time), so new
    weights pushed to the same URI (a retrained ``latest``) get a fresh copy instead of the one
    cached for the old ones (fsspec/filesystem_spec#971: cached files never revalidated).
    """
    from filelock import FileLock

    from .storage import url_to_fs

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
    if not any(f.rsplit("/", 1)[-1] in ("config.json", OPEN_CLIP_CONFIG) for f in files):
        raise ModelLoadError(f"model URI {uri} holds no {_marker_names()}")
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
