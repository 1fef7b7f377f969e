"""Load a CLIP-family checkpoint and run its towers: label (text) and image embeddings.

No Ray here. A checkpoint is a Hugging Face hub id, a local folder, or an fsspec URI of a folder
(``s3://bucket/models/clip``); remote folders are copied once per machine into a local cache
under a file lock, and hub downloads go through ``huggingface_hub``'s per-machine cache (which
locks too), so N actors on one node fetch a checkpoint once, not N times.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

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


def cache_root() -> Path:
    """Local folder for checkpoints copied from fsspec URIs (``$ZSLABEL_CACHE`` or ~/.cache/zslabel)."""
    return Path(os.environ.get("ZSLABEL_CACHE", Path.home() / ".cache" / "zslabel"))


def _is_remote_uri(model: str) -> bool:
    return "://" in model and not model.startswith("file://")


def resolve_checkpoint(model: str, revision: str | None = None,
                       storage_options: dict | None = None) -> Path:
    """Return a local folder holding the checkpoint ``model``.

    Args:
        model: local folder, ``file://`` URI, fsspec URI of a folder, or hub id.
        revision: hub revision (branch, tag or commit); ignored for folders.
        storage_options: fsspec options for remote URIs (endpoint, credentials chain settings).

    Raises:
        ModelLoadError: the folder does not exist, the URI cannot be read, or the hub id
            cannot be downloaded (e.g. offline); the message says which and how to fix it.
    """
    if model.startswith("file://"):
        model = model[len("file://"):]
    if _is_remote_uri(model):
        return _copy_remote_checkpoint(model, storage_options or {})
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model folder {local} has no config.json; is it a Hugging Face checkpoint?")
        return local
    if local.exists():
        raise ModelLoadError(f"model {model!r} is not a checkpoint folder (it is a file)")
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
            if not any(f.rsplit("/", 1)[-1] == "config.json" for f in files):
                raise ModelLoadError(f"model URI {uri} holds no config.json")
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
        if f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model"):
            h.update(str(f.relative_to(path)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


class ZeroShotModel:
    """A CLIP-family checkpoint ready for zero-shot classification.

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
        self.score_kind = SIGMOID if "siglip" in self.model_type else SOFTMAX
        try:
            self.preprocess = PreprocessSpec.from_image_processor(processor, **spec_overrides)
        except ValueError as exc:
            raise ModelLoadError(f"unsupported image processor in {self.path}: {exc}") from exc
        # Rescale + normalise run on the device, so only uint8 pixels travel between stages.
        mean = np.asarray(processor.image_mean if processor.do_normalize else [0.0, 0.0, 0.0], np.float32)
        std = np.asarray(processor.image_std if processor.do_normalize else [1.0, 1.0, 1.0], np.float32)
        rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0
        self._scale = torch.tensor(rescale / std, device=self.device).view(1, 3, 1, 1)
        self._shift = torch.tensor(mean / std, device=self.device).view(1, 3, 1, 1)

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
            feats = self.model.get_text_features(**self._tokenize([prompts[j] for j in chunk]))
            feats = getattr(feats, "pooler_output", feats)  # transformers 5 returns a ModelOutput
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
        if getattr(self, "_copied", None) is not None:
            self._copied.synchronize()
        buf[:n].copy_(x)
        out = buf[:n].to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray) -> torch.Tensor:
        """Image embeddings of uint8 (N, H, W, 3) pixels: (N, D) float32, L2-normalised, on the device."""
        feats = self.model.get_image_features(pixel_values=self.pixel_values(pixels))
        feats = getattr(feats, "pooler_output", feats)
        return l2_normalise(feats.float())
