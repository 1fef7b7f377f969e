"""Load a CLIP-family checkpoint and run its towers: label (text) and image embeddings.

No Ray here. A checkpoint is a Hugging Face hub id, a local folder, an fsspec URI of a folder
(``s3://bucket/models/clip``), or a value a family claims by its form; ``checkpoints`` finds,
copies (once per machine and content) or downloads the folder, this module says which family
loads it.

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
module (which family) above the families and ``checkpoints`` (which folder), the families above ``model_base``
(their interface). Adding a family is one module: a subclass, a ``claims``/``resolve`` pair for
``--model`` values that are not folders (if any), and one entry in ``FAMILIES``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import model_openclip
from .checkpoints import checkpoint_folder
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


# A checkpoint folder of any family holds one of these (a family's ``owns_folder`` needs one).
MARKER_FILES = ("config.json", OPEN_CLIP_CONFIG)
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
    return " or ".join(MARKER_FILES)


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
            family claims by its form (open_clip: ``hf-hub:org/name``, ``ARCH:pretrained_tag``;
            an existing path of that name is the path).
        revision: hub revision (branch, tag or commit); ignored for folders.
        storage_options: fsspec options for remote URIs (endpoint, credentials chain settings).

    Raises:
        ModelLoadError: the folder does not exist or holds no checkpoint, the URI cannot be
            read, the hub id cannot be downloaded (e.g. offline), or an open_clip value was
            given without the ``open-clip`` extra installed, or names an unknown architecture
            or tag; the message says which and how to fix it (``checkpoints.checkpoint_folder``).
    """
    for family in FAMILIES:
        if family.claims is not None and family.claims(model) and not os.path.exists(os.path.expanduser(model)):
            assert family.resolve is not None  # a family that claims values resolves them (Family)
            return family.resolve(model, revision, storage_options)
    return checkpoint_folder(model, revision, storage_options, markers=MARKER_FILES)


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
