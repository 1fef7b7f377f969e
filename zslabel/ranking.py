"""Zero-shot classifier maths: logits from embeddings, scores from logits, top-k.

Pure numpy/torch, no Ray. Formulas follow transformers' ``CLIPModel.forward`` /
``SiglipModel.forward`` and ``ZeroShotImageClassificationPipeline.postprocess``:

    logits = exp(logit_scale) * image_embeds @ label_embeds.T  (+ logit_bias for SigLIP)
    scores = softmax(logits, axis=-1)  for CLIP-family checkpoints   ("softmax")
    scores = sigmoid(logits)           for SigLIP-family checkpoints ("sigmoid")
"""

from __future__ import annotations

import numpy as np
import torch

SOFTMAX = "softmax"
SIGMOID = "sigmoid"
SCORE_KINDS = (SOFTMAX, SIGMOID)


def zero_shot_logits(image_embeds: torch.Tensor, label_embeds: torch.Tensor,
                     logit_scale: float, logit_bias: float = 0.0) -> torch.Tensor:
    """Logits of a zero-shot classifier.

    Args:
        image_embeds: (N, D) float, L2-normalised image embeddings.
        label_embeds: (C, D) float, L2-normalised label (class) embeddings.
        logit_scale: the *exponentiated* scale, ``model.logit_scale.exp()`` (CLIP: up to 100).
        logit_bias: SigLIP's ``logit_bias``; 0 for CLIP.

    Returns:
        (N, C) float32 logits, computed in float32 whatever the input dtype (half-precision
        towers are upcast here so softmax/sigmoid see full precision).
    """
    return logit_scale * (image_embeds.float() @ label_embeds.float().T) + logit_bias


def scores_from_logits(logits: torch.Tensor, score_kind: str) -> torch.Tensor:
    """(N, C) float32 logits -> (N, C) float32 scores in [0, 1].

    ``"softmax"``: over all candidate labels (each row sums to 1; CLIP). ``"sigmoid"``:
    independent per label (SigLIP). Raises ValueError for another ``score_kind``.
    """
    if score_kind == SOFTMAX:
        return torch.softmax(logits.float(), dim=-1)
    if score_kind == SIGMOID:
        return torch.sigmoid(logits.float())
    raise ValueError(f"unknown score kind {score_kind!r}; expected one of {SCORE_KINDS}")


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` labels per row, best first; ties keep label order (as the reference pipeline's
    stable sort does).

    Args:
        scores: (N, C) float32.
        k: wanted entries; clipped to C, so rows hold min(k, C) entries.

    Returns:
        ``(indices, values)``: (N, min(k, C)) int64 label indices and float32 scores.
    """
    k = min(int(k), scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(scores, order, axis=1).astype(np.float32)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (as transformers' ``_get_vector_norm``): (N, D) -> (N, D)."""
    return x / x.norm(p=2, dim=-1, keepdim=True)
