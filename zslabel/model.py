"""Load a CLIP-family checkpoint and run its towers: label (text) and image embeddings.

No Ray here. A checkpoint is a Hugging Face hub id, a local folder, or an fsspec URI of a folder
(``s3://bucket/models/clip``); remote folders are copied once per machine into a local cache
under a file lock, and hub downloads go through ``huggingface_hub``'s per-machine cache (which
locks too), so N actors on one node fetch a checkpoint once, not N times.

Model families. A checkpoint folder belongs to one library that loads it:

- ``transformers`` (``TransformersModel``, here): ``config.json`` with a ``model_type`` (CLIP,
  SigLIP, SigLIP 2, any dual encoder with ``get_image_features``/``get_text_features``).
- ``open_clip`` (``zslabel.model_openclip.OpenClipModel``, the ``open-clip`` extra):
  ``open_clip_config.json`` (BiomedCLIP, the LAION/DFN/MetaCLIP zoo); also ``--model
  hf-hub:ORG/NAME`` and ``--model ARCH:pretrained_tag``.

Every family is a ``ZeroShotModel`` subclass with the same attributes and methods (see its
docstring); ``ZeroShotModel(path)`` picks the family from the folder's files
(``family_of``), so the pipeline, relabel and calibration never name a family. Adding a family
is one module: a subclass, a ``claims``/``resolve`` pair for ``--model`` values that are not
folders (if any), and one entry in ``FAMILIES``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from .decode import PreprocessSpec
from .errors import ModelLoadError
from .ranking import SIGMOID, SOFTMAX, l2_normalise

log = logging.getLogger(__name__)

# Files a zero-shot checkpoint needs; skips TF/Flax/ONNX duplicates in hub repos.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.bin"]
# transformers' pipeline pads SigLIP prompts to this length (zero_shot_image_classification.py).
SIGLIP_TEXT_LENGTH = 64


TRANSFORMERS, OPEN_CLIP = "transformers", "open_clip"
# The file that marks a checkpoint folder of each family.
OPEN_CLIP_CONFIG = "open_clip_config.json"


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


def _open_clip_claims(model: str) -> bool:
    from . import model_openclip

    return model_openclip.claims(model)


def _open_clip_resolve(model: str, revision: str | None, storage_options: dict | None) -> Path:
    from . import model_openclip

    return model_openclip.resolve(model, revision)


def _transformers_class() -> type:
    return TransformersModel


def _open_clip_class() -> type:
    from .model_openclip import OpenClipModel

    return OpenClipModel


# Checked in order: open_clip first, since its folders may hold a (timm) config.json too.
FAMILIES = (
    Family(OPEN_CLIP, _is_open_clip_folder, _open_clip_claims, _open_clip_resolve, _open_clip_class),
    Family(TRANSFORMERS, _is_transformers_folder, None, None, _transformers_class),
)


def family_of(path: str | Path) -> Family | None:
    """The family whose checkpoint folder ``path`` is, or None (no marker file)."""
    path = Path(path)
    return next((f for f in FAMILIES if f.owns_folder(path)), None)


def _marker_names() -> str:
    return " or ".join(("config.json", OPEN_CLIP_CONFIG))


def cache_root() -> Path:
    """Local folder for checkpoints copied from fsspec URIs (``$ZSLABEL_CACHE`` or ~/.cache/zslabel)."""
    return Path(os.environ.get("ZSLABEL_CACHE", Path.home() / ".cache" / "zslabel"))


def _is_remote_uri(model: str) -> bool:
    from .storage import local_path

    return local_path(model) is None  # a URI of another filesystem than this machine's


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
    if _is_remote_uri(model):
        return _copy_remote_checkpoint(model, storage_options or {})
    from .storage import local_path

    model = local_path(model) or model  # a file: URI read per RFC 8089, as inputs and outputs read it
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
    """Copy a remote checkpoint folder once per machine; concurrent callers wait on a file lock."""
    from filelock import FileLock

    from .storage import url_to_fs

    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    dest = cache_root() / "checkpoints" / key
    done = dest / ".zslabel-complete"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if done.exists():
            return dest
        try:
            fs, root = url_to_fs(uri, storage_options, error=ModelLoadError)
            files = [f for f in fs.find(root) if not f.endswith("/")]
            if not any(f.rsplit("/", 1)[-1] in ("config.json", OPEN_CLIP_CONFIG) for f in files):
                raise ModelLoadError(f"model URI {uri} holds no {_marker_names()}")
            for f in files:
                target = dest / os.path.relpath(f, root.rstrip("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(target))
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any storage failure means the model is unreachable
            raise ModelLoadError(f"cannot copy model from {uri}: {type(exc).__name__}: {exc}") from exc
        done.write_text(uri)
    log.info("checkpoint %s cached at %s", uri, dest)
    return dest


def checkpoint_digest(path: Path) -> str:
    """sha256 over the checkpoint's config and weight files (names and bytes), first 16 hex digits.

    Identifies the weights for run fingerprints even when no hub revision is known.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model", ".pth"):
            h.update(str(f.relative_to(path)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


class ZeroShotModel:
    """A CLIP-family checkpoint ready for zero-shot classification: the interface of every family.

    ``ZeroShotModel(path, device="cpu", dtype=torch.float32, **spec_overrides)`` loads the
    folder ``path`` (from ``resolve_checkpoint``) with its family's class (``family_of``):
    ``TransformersModel`` or ``zslabel.model_openclip.OpenClipModel``.

    Attributes (every family):
        path: the checkpoint folder.
        device, dtype: where and in which dtype the towers run (float16 on CUDA by default).
        library: ``"transformers"`` or ``"open_clip"``, recorded in run manifests.
        architecture: a readable name of the architecture (``CLIPModel``, ``ViT-B-16``,
            ``CustomTextCLIP(vision=timm:vit_base_patch16_224, text=hf:...)``).
        model_type: the short identity used in run fingerprints and the label cache key
            (transformers' ``model_type``, e.g. ``"clip"``; ``"open_clip:<architecture>"``).
        score_kind: ``"sigmoid"`` for SigLIP-family checkpoints, ``"softmax"`` otherwise.
        preprocess: the ``PreprocessSpec`` the decode stage brings images to (model size, uint8).
        model: the family's torch module (with ``logit_scale`` and, for SigLIP, ``logit_bias``).
        logit_scale, logit_bias, max_text_length: see the properties.

    Methods: ``prompt_token_ids``, ``encode_texts`` ((T, D) float32 numpy, L2-normalised),
    ``encode_images`` ((N, D) float32 torch on the device, L2-normalised), ``pixel_values``.
    A family implements ``_text_features`` and ``_image_features`` and sets the attributes,
    plus ``_scale``/``_shift`` (per-channel ``rescale / std`` and ``mean / std``) for
    ``pixel_values``.

    Raises:
        ModelLoadError: ``path`` is no checkpoint folder of a known family, or its family
            cannot load it (the message says why).
    """

    path: Path
    device: torch.device
    dtype: torch.dtype
    library: str
    architecture: str
    model_type: str
    score_kind: str
    preprocess: PreprocessSpec
    # The family's torch module (transformers' CLIPModel/SiglipModel, open_clip's CLIP).
    model: Any  # typed loosely: each library adds its own methods (get_text_features, encode_image)
    # The pinned host buffer and its last copy's CUDA event (``_to_device_pinned``), set on first use.
    _pinned: torch.Tensor
    _copied: torch.cuda.Event | None

    def __new__(cls, path: str | Path | None = None, *args, **kwargs):
        # ZeroShotModel(path) picks the family's class, so callers never name a family.
        # (path defaults to None so that copy/pickle, which call cls.__new__(cls), still work.)
        if cls is ZeroShotModel:
            if path is None:
                raise TypeError("ZeroShotModel() needs the path of a checkpoint folder")
            family = family_of(path)
            if family is None:
                raise ModelLoadError(f"{path} holds no {_marker_names()}: not a checkpoint zslabel can load")
            cls = family.model_class()
        return super().__new__(cls)

    # Both libraries keep the learned scale as a log (``model.logit_scale``) and SigLIP-style
    # models a ``model.logit_bias`` parameter on the torch module every family holds as ``model``.
    @property
    def logit_scale(self) -> float:
        """``exp(model.logit_scale)``, the multiplier of cosine similarities (CLIP: <= 100)."""
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def logit_bias(self) -> float:
        """SigLIP's ``logit_bias``; 0.0 for checkpoints without one."""
        bias = getattr(self.model, "logit_bias", None)
        return 0.0 if bias is None else float(bias.detach().float())

    @property
    def max_text_length(self) -> int:
        """Longest prompt in tokens the text tower accepts."""
        raise NotImplementedError

    def prompt_token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt (special tokens included, no truncation, no padding)."""
        raise NotImplementedError

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        """Unnormalised (len(prompts), D) text embeddings on the device (any float dtype)."""
        raise NotImplementedError

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised (N, D) image embeddings of (N, 3, H, W) normalised pixels."""
        raise NotImplementedError

    def _set_normalisation(self, mean, std, rescale: float = 1.0 / 255.0) -> None:
        """Per-channel ``x * rescale / std - mean / std`` for ``pixel_values`` (on the device)."""
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self._scale = torch.tensor(rescale / std, device=self.device).view(1, 3, 1, 1)
        self._shift = torch.tensor(mean / std, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def encode_texts(self, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """Text-tower embeddings of ``prompts``: (T, D) float32, L2-normalised (numpy).

        Runs in batches of at most ``batch_size`` prompts (bounded memory at taxonomy scale,
        e.g. 21,843 labels x 80 templates), ordered by length so that each batch pads little;
        rows come back in the order of ``prompts``.
        """
        if not prompts:
            return np.zeros((0, 0), np.float32)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = np.empty((len(prompts),), object)
        for i in range(0, len(prompts), batch_size):
            chunk = order[i:i + batch_size]
            feats = self._text_features([prompts[j] for j in chunk])
            for j, row in zip(chunk, l2_normalise(feats.float()).cpu().numpy()):
                out[j] = row
        return np.stack(list(out)).astype(np.float32)

    def pixel_values(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) pixels -> (N, 3, H, W) model-dtype tensor on the device, rescaled
        and normalised with the checkpoint's ``image_mean``/``image_std``.

        Only uint8 crosses to a GPU (a quarter of float32's bytes), from a reused pinned host
        buffer with a non-blocking copy; the float conversion and normalisation run on the device.
        """
        x = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cuda":
            x = self._to_device_pinned(x)
        x = x.permute(0, 3, 1, 2).float()
        return (x * self._scale - self._shift).to(self.dtype)

    def _to_device_pinned(self, x: torch.Tensor) -> torch.Tensor:
        """Copy a uint8 host tensor to the GPU through a pinned buffer kept between calls.

        Pinning a fresh buffer per batch (``Tensor.pin_memory``) costs a page-locked allocation
        each time; the kept buffer is only overwritten after the previous copy from it finished
        (a CUDA event), so the copy can run asynchronously with the host's next work.
        """
        n = x.shape[0]
        buf = getattr(self, "_pinned", None)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != x.shape[1:]:
            buf = self._pinned = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
            self._copied = None
        copied = getattr(self, "_copied", None)
        if copied is not None:
            copied.synchronize()
        buf[:n].copy_(x)
        out = buf[:n].to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray) -> torch.Tensor:
        """Image embeddings of uint8 (N, H, W, 3) pixels: (N, D) float32, L2-normalised, on the device."""
        return l2_normalise(self._image_features(self.pixel_values(pixels)).float())


class TransformersModel(ZeroShotModel):
    """A Hugging Face ``transformers`` checkpoint (``config.json``) ready for zero-shot classification.

    Holds the model (both towers), tokenizer and the preprocessing facts of its image
    processor. ``score_kind`` is ``"sigmoid"`` for SigLIP-family checkpoints (model_type contains
    "siglip") and ``"softmax"`` otherwise, as in transformers' zero-shot pipeline.

    Raises:
        ModelLoadError: the folder cannot be loaded by transformers' Auto classes, or the model
            has no ``get_image_features``/``get_text_features`` (not a dual encoder).
    """

    def __init__(self, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 **spec_overrides):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from .quiet import no_transformers_progress

        self.path = Path(path)
        try:
            with no_transformers_progress():  # a local folder: nothing to watch, one bar per actor
                self.model = AutoModel.from_pretrained(self.path, dtype=dtype).to(device).eval()
                self.tokenizer = AutoTokenizer.from_pretrained(self.path)
                processor = AutoImageProcessor.from_pretrained(self.path)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot load checkpoint at {self.path}: {type(exc).__name__}: {exc}") from exc
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ModelLoadError(f"{self.path} ({type(self.model).__name__}) is not a CLIP-family dual encoder")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_type: str = self.model.config.model_type
        self.library, self.architecture = TRANSFORMERS, type(self.model).__name__
        self.score_kind = SIGMOID if "siglip" in self.model_type else SOFTMAX
        try:
            self.preprocess = PreprocessSpec.from_image_processor(processor, **spec_overrides)
        except ValueError as exc:
            raise ModelLoadError(f"unsupported image processor in {self.path}: {exc}") from exc
        # Rescale + normalise run on the device, so only uint8 pixels travel between stages.
        mean = processor.image_mean if processor.do_normalize else [0.0, 0.0, 0.0]
        std = processor.image_std if processor.do_normalize else [1.0, 1.0, 1.0]
        self._set_normalisation(mean, std, float(processor.rescale_factor) if processor.do_rescale else 1.0)

    @property
    def max_text_length(self) -> int:
        """Longest prompt in tokens the text tower accepts (its position embeddings)."""
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        limit = int(getattr(text_cfg, "max_position_embeddings", 77))
        if self.score_kind == SIGMOID:
            limit = min(limit, SIGLIP_TEXT_LENGTH)
        return limit

    def prompt_token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt (special tokens included, no truncation, no padding)."""
        return [list(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]

    def _tokenize(self, prompts: list[str]):
        # Same tokenizer arguments as transformers' zero-shot pipeline, so embeddings match it.
        if self.score_kind == SIGMOID:
            kw = {"padding": "max_length", "max_length": SIGLIP_TEXT_LENGTH, "truncation": True}
        else:
            kw = {"padding": True}
        return self.tokenizer(prompts, return_tensors="pt", **kw).to(self.device)

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        feats = self.model.get_text_features(**self._tokenize(prompts))
        return getattr(feats, "pooler_output", feats)  # transformers 5 returns a ModelOutput

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.model.get_image_features(pixel_values=pixel_values)
        return getattr(feats, "pooler_output", feats)
