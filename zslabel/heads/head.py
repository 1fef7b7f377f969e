"""The head file: the ``Head`` dataclass (a fitted linear classifier over a run's labels), its
logits, its id, its safetensors format, and the loading and checks of ``--head FILE``."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..calibration import fit_differences
from ..errors import ConfigError

FORMAT = "zslabel-head"
VERSION = 1
METHOD = ("zero-shot-prior linear probe (L2-SP toward the zero-shot weights; CLAP-style init; labels without "
          "examples kept by distillation and calibrated stacking), lam by k-fold CV")
SOFTMAX, SIGMOID = "softmax", "sigmoid"


@dataclass
class Head:
    """A fitted linear head, as saved to / loaded from a file.

    Attributes:
        weights: (C, D) float32. bias: (C,) float32. scale: float, the exponentiated logit scale.
        score_kind: ``"softmax"`` or ``"sigmoid"`` (the model's).
        labels: the C label names in the run's order; templates: the run's prompt templates.
        checkpoint_digest: ``model.checkpoint_digest`` of the checkpoint whose label embeddings
            the head started from (and whose image embeddings it reads).
        model: model id (informational). method: the fitting method. params: its parameters
            (``lam``, ``rank``, the cross-validation table, ...). fit: facts and metrics of the fit.
        id: sha256 (16 hex digits) of everything else (tensors by their bytes, the rest as
            canonical JSON); set by ``compute_id``/``save``, checked by ``load_head``.
    """

    weights: np.ndarray
    bias: np.ndarray
    scale: float
    score_kind: str
    labels: list[str]
    templates: list[str]
    checkpoint_digest: str
    model: str | None = None
    method: str = METHOD
    params: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def logits(self, image_embeddings):
        """(N, D) L2-normalised image embeddings -> (N, C) float32 logits,
        ``scale * image_embeddings @ weights.T + bias``.

        Args:
            image_embeddings: a numpy array or a torch tensor (any device and float dtype; computed
                in float32, on the tensor's device: the weights are moved there once and kept).

        Returns:
            The same kind of array (numpy in, numpy out; tensor in, tensor on its device out).
        """
        if isinstance(image_embeddings, np.ndarray):
            x = np.asarray(image_embeddings, np.float32)
            return (np.float32(self.scale) * (x @ self.weights.T) + self.bias).astype(np.float32)

        w, b = self._on(image_embeddings.device)
        return float(self.scale) * (image_embeddings.float() @ w.T) + b

    def _on(self, device):
        import torch

        cache = self.__dict__.setdefault("_device_cache", {})
        key = str(device)
        if key not in cache:
            # torch.tensor copies: arrays unpickled by a Ray actor are read-only, which
            # torch.from_numpy warns about (and a write through the tensor would fault).
            cache[key] = (torch.tensor(np.asarray(self.weights, np.float32), device=device),
                          torch.tensor(np.asarray(self.bias, np.float32), device=device))
        return cache[key]

    def __getstate__(self):  # pickled to Ray actors: without tensors cached on a device
        state = dict(self.__dict__)
        state.pop("_device_cache", None)
        return state

    # ---- identity and serialisation ---------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors and ``id``, JSON-able."""
        return json.loads(json.dumps({
            "format": FORMAT, "version": VERSION, "score_kind": self.score_kind, "scale": float(self.scale),
            "labels": list(self.labels), "templates": list(self.templates),
            "checkpoint_digest": self.checkpoint_digest, "model": self.model, "method": self.method,
            "params": self.params, "fit": self.fit, "shape": list(self.weights.shape)}))

    def compute_id(self) -> str:
        """sha256 of the weights' and bias' float32 bytes and the canonical JSON of ``metadata()``,
        first 16 hex digits."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.weights, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.bias, np.float32).tobytes())
        h.update(json.dumps(self.metadata(), sort_keys=True, separators=(",", ":")).encode())
        return h.hexdigest()[:16]

    def to_bytes(self) -> bytes:
        """A safetensors file: tensors ``weights`` (C, D) and ``bias`` (C,) float32, and the
        metadata plus ``id`` as JSON under the header's ``__metadata__["zslabel"]``."""
        from safetensors.numpy import save

        self.id = self.compute_id()
        meta = {"zslabel": json.dumps({**self.metadata(), "id": self.id}, sort_keys=True)}
        return save({"weights": np.ascontiguousarray(self.weights, np.float32),
                     "bias": np.ascontiguousarray(self.bias, np.float32)}, metadata=meta)

    def save(self, path: str, storage_options: dict | None = None) -> str:
        """Write ``to_bytes()`` to a local path or fsspec URI (whole, then renamed where local);
        returns the id."""
        import fsspec

        data = self.to_bytes()
        with fsspec.open(path, "wb", **(storage_options or {})) as fh:
            fh.write(data)
        return self.id

    # ---- checks -----------------------------------------------------------------------------
    def check_compatible(self, *, checkpoint_digest: str, labels: list[str], templates: list[str],
                         score_kind: str, dim: int | None = None, source: str = "the head") -> None:
        """Refuse to use this head for a run it was not fitted for.

        Raises:
            ConfigError: naming every difference (checkpoint digest, labels, templates, score kind,
                embedding size).
        """
        problems = fit_differences(self, checkpoint_digest=checkpoint_digest, labels=labels, templates=templates,
                                   score_kind=score_kind)
        if dim is not None and dim != self.weights.shape[1]:
            problems.append(f"embedding size {self.weights.shape[1]} vs this run's {dim}")
        if problems:
            raise ConfigError(f"{source} (id {self.id}) was fitted for another setup: " + "; ".join(problems)
                              + ". Fit one for this run with `zslabel fit`")


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then the JSON header.
    if len(data) < 8:
        raise ValueError("file too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header length beyond the file")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def load_head(path: str, storage_options: dict | None = None) -> Head:
    """Read and validate a head file written by ``Head.save``.

    Raises:
        ConfigError: unreadable, not a zslabel head, another version, tensors of the wrong shape or
            not finite, or an ``id`` that does not match the content (edited or damaged file).
    """
    import fsspec
    from safetensors.numpy import load

    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read head file {path}: {exc}") from exc
    try:
        meta = json.loads(_safetensors_metadata(data)["zslabel"])
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors/JSON raise several types for a bad file
        raise ConfigError(f"{path} is not a zslabel head file (a safetensors file from `zslabel fit`): "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a zslabel head file (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise ConfigError(f"head file {path} has version {meta.get('version')}; this zslabel reads {VERSION}")
    try:
        head = Head(weights=np.asarray(tensors["weights"], np.float32), bias=np.asarray(tensors["bias"], np.float32),
                    scale=float(meta["scale"]), score_kind=meta["score_kind"], labels=list(meta["labels"]),
                    templates=list(meta["templates"]), checkpoint_digest=meta["checkpoint_digest"],
                    model=meta.get("model"), method=meta.get("method", METHOD), params=dict(meta.get("params") or {}),
                    fit=dict(meta.get("fit") or {}), id=meta.get("id", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"head file {path} lacks {exc}") from exc
    c = len(head.labels)
    if head.weights.ndim != 2 or head.weights.shape[0] != c or head.bias.shape != (c,):
        raise ConfigError(f"head file {path}: weights {head.weights.shape} and bias {head.bias.shape} do not fit "
                          f"its {c} labels")
    if not (np.isfinite(head.weights).all() and np.isfinite(head.bias).all() and math.isfinite(head.scale)):
        raise ConfigError(f"head file {path}: weights, bias and scale must be finite")
    if head.score_kind not in (SOFTMAX, SIGMOID):
        raise ConfigError(f"head file {path}: unknown score kind {head.score_kind!r}")
    if head.id != head.compute_id():
        raise ConfigError(f"head file {path}: its id {head.id!r} does not match its content "
                          f"({head.compute_id()}); the file was edited or damaged")
    return head


def load_for_run(path: str | None, storage_options: dict | None, *, checkpoint_digest: str, labels: list[str],
                 templates: list[str], score_kind: str, dim: int | None = None) -> Head | None:
    """``--head FILE`` of a label/relabel run: loaded, validated and checked against the run's
    checkpoint digest, labels, templates, score kind (and embedding size); None without a file.

    Raises:
        ConfigError: as ``load_head`` and ``Head.check_compatible``.
    """
    if not path:
        return None
    head = load_head(path, storage_options)
    head.check_compatible(checkpoint_digest=checkpoint_digest, labels=labels, templates=templates,
                          score_kind=score_kind, dim=dim, source=f"head file {path}")
    return head


def manifest_entry(head: Head | None, path: str | None) -> dict[str, Any] | None:
    """What a run manifest records of its head: id, file, method, lam, rank, examples."""
    if head is None:
        return None
    return {"id": head.id, "file": path, "method": head.method, "lam": head.params.get("lam"),
            "rank": head.params.get("rank"), "examples": head.fit.get("examples"),
            "labels_with_examples": head.fit.get("labels_with_examples")}
