"""The one scoring function: image embeddings -> ranked labels, for every command that labels.

Used by the labeler actor (``stages.Labeler``, embeddings fresh from the image tower) and by
``relabel`` (embeddings read back from an output), so the two cannot drift apart. Ray-free.

Steps, in order (each optional step only when configured):

1. logits: ``ZeroShotClassifier.logits``: ``logit_scale * img @ labels.T (+ logit_bias)``
   (``ranking.zero_shot_logits``; transformers' ``CLIPModel.forward`` / ``SiglipModel.forward``),
   or a fitted head's logits when one replaces the zero-shot classifier;
2. calibration: ``Calibration.adjust_logits`` (temperature / Platt, per label);
3. scores: softmax over labels (CLIP) or independent sigmoid (SigLIP);
4. non-finite check: a row with any NaN/inf score becomes a ``non_finite_scores`` error row;
5. ranking: top-k, multi-label threshold, abstention (``ranking.rank``);
6. hierarchy: rolled-up ``hier_*`` columns (``hierarchy.Hierarchy.columns``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import NON_FINITE_SCORES, error_string
from .ranking import Ranked, RankingRule, rank, scores_from_logits, zero_shot_logits

if TYPE_CHECKING:
    import torch

    from .calibration import Calibration
    from .hierarchy import Hierarchy

NON_FINITE_MESSAGE = "model output has NaN or infinite scores"


@dataclass
class ZeroShotClassifier:
    """The (C, D) zero-shot classifier and everything applied after it.

    Attributes:
        label_embeddings: (C, D) float32 torch tensor, L2-normalised, on the scoring device.
        label_names: (C,) object array of label names, as written to the output.
        logit_scale: the model's ``exp(logit_scale)`` (a plain float, e.g. 100.0 for CLIP).
        logit_bias: SigLIP's ``logit_bias``; 0.0 for CLIP.
        score_kind: "softmax" or "sigmoid".
        rule: what a row keeps (top-k, multi-label, abstention).
        calibration: applied to the logits, or None.
        hierarchy: adds the ``hier_*`` columns (needs ``rule.min_score``), or None.
        head: a fitted head (an object with ``logits(image_embeddings) -> (N, C)`` on the same
            device) used instead of the zero-shot logits, or None.
    """

    label_embeddings: "torch.Tensor"
    label_names: np.ndarray
    logit_scale: float
    logit_bias: float
    score_kind: str
    rule: RankingRule
    calibration: "Calibration | None" = None
    hierarchy: "Hierarchy | None" = None
    head: Any = None

    def logits(self, image_embeddings: "torch.Tensor") -> "torch.Tensor":
        """(N, D) L2-normalised image embeddings -> (N, C) float32 logits (same device)."""
        if self.head is not None:
            logits = self.head.logits(image_embeddings)
        else:
            logits = zero_shot_logits(image_embeddings, self.label_embeddings, self.logit_scale, self.logit_bias)
        if self.calibration is not None:
            logits = self.calibration.adjust_logits(logits)
        return logits


@dataclass
class Scored:
    """What :func:`score_rows` gives for a batch of N rows.

    Attributes:
        errors: (N,) object array: None for a labeled row, else its ``code: detail`` string
            (input errors as given, plus ``non_finite_scores`` rows found here).
        ok: (N,) bool: rows that carry labels (``errors`` is None).
        ranked: ranking of the ``ok`` rows in order (None when there are none).
        embeddings: (M, D) image embeddings of the ``ok`` rows (same type as given), or None
            when there are none.
        hierarchy_columns: ``hier_*`` column values for all N rows ({} without a hierarchy).
    """

    errors: np.ndarray
    ok: np.ndarray
    ranked: Ranked | None
    embeddings: Any
    hierarchy_columns: dict[str, list] = field(default_factory=dict)


def score_rows(classifier: ZeroShotClassifier, errors: np.ndarray, embed) -> Scored:
    """Score the rows of a batch that have no error yet.

    Args:
        classifier: the classifier and its post-processing.
        errors: (N,) object array, None (or "") for rows to score, else the row's error string.
        embed: callable ``(rows: (M,) int64 indices) -> (M, D) torch tensor`` of L2-normalised
            image embeddings, called once with the rows to score (so a caller can run the
            image tower on only those).

    Returns:
        Scored; scores stay on the embeddings' device until ranking picks the kept entries (the
        (N, C) matrix is 56 MB per 640 images at 21,843 labels); only with a hierarchy does the
        whole score matrix reach the host.
    """
    import torch

    errors = np.array([e if isinstance(e, str) and e else None for e in errors], dtype=object)
    ok = np.array([e is None for e in errors], dtype=bool)
    rows = np.flatnonzero(ok)
    ranked = emb = None
    host_scores = np.zeros((0, len(classifier.label_names)), np.float32)
    if len(rows):
        emb = embed(rows)
        scores = scores_from_logits(classifier.logits(emb), classifier.score_kind)
        finite_t = torch.isfinite(scores).all(dim=1)
        finite = finite_t.cpu().numpy()
        if not finite.all():
            for r in rows[~finite]:
                errors[r] = error_string(NON_FINITE_SCORES, NON_FINITE_MESSAGE)
            ok[rows[~finite]] = False
            scores, emb = scores[finite_t], emb[finite_t]
        ranked = rank(scores, classifier.rule)
        if classifier.hierarchy is not None:
            host_scores = scores.float().cpu().numpy()
    hier: dict[str, list] = {}
    if classifier.hierarchy is not None:
        assert classifier.rule.min_score is not None  # options.validate: --hierarchy needs --min-score
        hier = classifier.hierarchy.columns(host_scores, ok, classifier.score_kind, classifier.rule.min_score)
    return Scored(errors, ok, ranked, emb if ok.any() else None, hier)
