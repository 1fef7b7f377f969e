"""The interface every model family implements (``ZeroShotModel``), and what the families share:
their names, the files a checkpoint folder holds and its digest, the local cache folder.

Below both families (``model_transformers``, ``model_openclip``) and the module that picks one
(``model``), so none of them imports another. No Ray here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .decode import PreprocessSpec
from .ranking import l2_normalise

TRANSFORMERS, OPEN_CLIP = "transformers", "open_clip"
# The file that marks a checkpoint folder of the open_clip family (transformers': config.json).
OPEN_CLIP_CONFIG = "open_clip_config.json"
# Files a zero-shot checkpoint needs; skips TF/Flax/ONNX duplicates in hub repos.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.bin"]


def cache_root() -> Path:
    """Local folder for checkpoints copied from fsspec URIs (``$ZSLABEL_CACHE`` or ~/.cache/zslabel)."""
    return Path(os.environ.get("ZSLABEL_CACHE", Path.home() / ".cache" / "zslabel"))


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

    Made by ``zslabel.model.load_model(path, device="cpu", dtype=torch.float32,
    **spec_overrides)``, which loads the folder ``path`` (from ``resolve_checkpoint``) with its
    family's class (``family_of``): ``zslabel.model_transformers.TransformersModel`` or
    ``zslabel.model_openclip.OpenClipModel``.

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
