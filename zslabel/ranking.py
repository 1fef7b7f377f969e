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


def ensemble(template_embeddings: np.ndarray) -> np.ndarray:
    """Prompt ensembling: the label (class) embeddings of a zero-shot classifier from the
    embeddings of each label's prompts, one per template (CLIP paper, Radford et al. 2021,
    sec. 3.1.4; open_clip ``build_zero_shot_classifier``).

    Args:
        template_embeddings: (C, T, D) float, L2-normalised prompt embeddings.

    Returns:
        (C, D) float32, L2-normalised: the mean over the T templates, renormalised.
    """
    mean = template_embeddings.astype(np.float32).mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


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


def top_k(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` labels per row, best first; ties keep label order (as the reference pipeline's
    stable sort does).

    Args:
        scores: (N, C) float32, a numpy array or a torch tensor on any device. A tensor stays
            on its device: only the (N, min(k, C)) result is copied to the host.
        k: wanted entries; clipped to C, so rows hold min(k, C) entries.

    Returns:
        ``(indices, values)``: (N, min(k, C)) int64 label indices and float32 scores (numpy).
    """
    import torch

    idx, val = top_k_tensor(torch.as_tensor(scores), k)
    return idx.cpu().numpy().astype(np.int64), val.cpu().numpy().astype(np.float32)


def top_k_tensor(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k`` on ``scores``' device: (N, min(k, C)) int64 indices and float scores, tensors.

    ``torch.topk`` selects in O(C) per row but does not define the order of equal values, nor
    which of several values equal to the k-th it keeps. Rows where that matters (a tie inside
    the top k, or the k-th value shared with a label outside it) are redone with a stable
    descending sort of those rows only, which orders ties by label index exactly as
    ``np.argsort(-scores, kind="stable")``; other rows have one correct answer, so topk's is it.
    """
    import torch

    n, c = scores.shape
    k = min(int(k), c)
    if n == 0 or k == 0:
        return (torch.zeros((n, k), dtype=torch.int64, device=scores.device),
                torch.zeros((n, k), dtype=scores.dtype, device=scores.device))
    val, idx = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    kth = val[:, -1:]
    tied = (scores >= kth).sum(dim=1) > k
    if k > 1:
        tied |= (val[:, 1:] == val[:, :-1]).any(dim=1)
    if bool(tied.any()):
        rows = torch.nonzero(tied).flatten()
        sub_val, sub_idx = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        val, idx = val.clone(), idx.clone()
        val[rows], idx[rows] = sub_val[:, :k], sub_idx[:, :k]
    return idx, val


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


def rank(scores, rule: RankingRule) -> Ranked:
    """Apply ``rule`` to an (M, C) float32 score matrix (finite values in [0, 1]): a numpy
    array or a torch tensor on any device (CUDA included: the selection runs there and only the
    kept entries are copied to the host, never the (M, C) matrix).

    Top-k as ``top_k``; multi-label keeps ``scores >= threshold`` ordered by score, ties in
    label order (stable sort, as ``top_k``). Abstention compares each row's maximum score
    with ``min_score`` (strictly below abstains).
    """
    import torch

    t = torch.as_tensor(scores)
    m, c = t.shape
    if rule.multi_label:
        keep = t >= float(np.float32(rule.threshold))
        counts_t = keep.sum(dim=1)
        width = int(counts_t.max()) if m else 0
        # Kept entries are the row's ``width`` best at most: select those, then drop the rest.
        idx_t, val_t = top_k_tensor(t, width)
        counts = counts_t.cpu().numpy().astype(np.int64)
        idx, val = idx_t.cpu().numpy(), val_t.cpu().numpy()
        mask = np.arange(width)[None, :] < counts[:, None]
        indices, values = idx[mask].astype(np.int64), val[mask].astype(np.float32)
    else:
        idx_t, val_t = top_k_tensor(t, rule.top_k)
        counts = np.full(m, idx_t.shape[1], np.int64)
        indices = idx_t.cpu().numpy().astype(np.int64).ravel()
        values = val_t.cpu().numpy().astype(np.float32).ravel()
    abstained = None
    if rule.min_score is not None:
        best = t.max(dim=1).values.cpu().numpy() if c and m else np.zeros(m, np.float32)
        abstained = best < np.float32(rule.min_score)
    return Ranked(indices, values, counts, abstained)
