"""Zero-shot classifier maths: logits from embeddings, scores from logits, top-k.

Pure numpy/torch, no Ray. Formulas follow transformers' ``CLIPModel.forward`` /
``SiglipModel.forward`` and ``ZeroShotImageClassificationPipeline.postprocess``:

    logits = exp(logit_scale) * image_embeds @ label_embeds.T  (+ logit_bias for SigLIP)
    scores = softmax(logits, axis=-1)  for CLIP-family checkpoints   ("softmax")
    scores = sigmoid(logits)           for SigLIP-family checkpoints ("sigmoid")

What a row keeps (``RankingRule``): the top-k labels, or with ``multi_label`` every label whose
independent sigmoid score is >= ``threshold``; with ``min_score`` a row whose best score is
below it is marked abstained (its labels are still written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are made: validating a RankingRule needs none
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
    import torch

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


@dataclass(frozen=True)
class RankingRule:
    """Which labels a labeled row keeps, and when it abstains.

    Attributes:
        top_k: labels kept per row, best first (clipped to C); ignored with ``multi_label``.
        min_score: a row whose best score (over all C labels) is below this abstains; None
            disables abstention (no ``abstained`` column). In [0, 1].
        multi_label: keep every label with score >= ``threshold`` instead of the top k (only
            for independent per-label scores, i.e. ``"sigmoid"``; softmax scores compete and
            sum to 1, so a fixed threshold on them is not a per-label decision).
        threshold: the multi-label cut, in [0, 1]; required with ``multi_label`` only.
    """

    top_k: int = 5
    min_score: float | None = None
    multi_label: bool = False
    threshold: float | None = None

    def validate(self) -> None:
        """Raise ConfigError for out-of-range values or flags that need one another."""
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be >= 1 (got {self.top_k})")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"--min-score must be in [0, 1] (got {self.min_score})")
        if self.multi_label and self.threshold is None:
            raise ConfigError("--multi-label needs --threshold T (keep every label with score >= T)")
        if self.threshold is not None and not self.multi_label:
            raise ConfigError("--threshold applies to --multi-label only; add --multi-label or drop --threshold")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1] (got {self.threshold})")

    def check_score_kind(self, score_kind: str, model: str = "the model") -> None:
        """Raise ConfigError when ``multi_label`` is asked of a softmax (CLIP-family) model."""
        if self.multi_label and score_kind != SIGMOID:
            raise ConfigError(
                f"--multi-label needs independent per-label (sigmoid) scores, as SigLIP-family models give; "
                f"{model} gives {score_kind} scores, which compete across labels and sum to 1. "
                "Use --top-k (and --min-score to abstain) with this model, or a SigLIP checkpoint")


@dataclass
class Ranked:
    """Ragged per-row results of ``rank`` for M labeled rows.

    Attributes:
        indices: (E,) int64 label indices, row after row, best first within a row.
        scores: (E,) float32 matching scores.
        counts: (M,) int64 entries per row (sum = E); 0 is an empty (not null) list.
        abstained: (M,) bool (best score < ``min_score``), or None without ``min_score``.
    """

    indices: np.ndarray
    scores: np.ndarray
    counts: np.ndarray
    abstained: np.ndarray | None


def rank(scores: np.ndarray, rule: RankingRule) -> Ranked:
    """Apply ``rule`` to an (M, C) float32 score matrix (finite values in [0, 1]).

    Top-k as ``top_k``; multi-label keeps ``scores >= threshold`` ordered by score, ties in
    label order (stable sort, as ``top_k``). Abstention compares each row's maximum score
    with ``min_score`` (strictly below abstains).
    """
    m, c = scores.shape
    if rule.multi_label:
        order = np.argsort(-scores, axis=1, kind="stable")
        ordered = np.take_along_axis(scores, order, axis=1)
        keep = ordered >= np.float32(rule.threshold)  # sorted descending, so kept entries lead each row
        counts = keep.sum(axis=1).astype(np.int64)
        indices, values = order[keep].astype(np.int64), ordered[keep].astype(np.float32)
    else:
        idx, val = top_k(scores, rule.top_k)
        counts = np.full(m, idx.shape[1], np.int64)
        indices, values = idx.ravel(), val.ravel()
    abstained = None
    if rule.min_score is not None:
        best = scores.max(axis=1) if c else np.zeros(m, np.float32)
        abstained = best < np.float32(rule.min_score)
    return Ranked(indices, values, counts, abstained)
