"""Choosing a head's strength: stratified folds and subsamples, the fit / held-out split, the
calibrated-stacking offset of labels without examples, and the cross-validation along the path
of strengths."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from .head import SOFTMAX
from .solve import CV_MAX_ITER, _Problem, _solve

if TYPE_CHECKING:
    import torch

# Candidate strengths, strong to weak (logit units, a sum over examples: see the ``zslabel.heads`` docstring).
LAMBDAS = tuple(float(v) for v in 10.0 ** np.arange(3.0, -2.01, -0.5))
PATIENCE = 2
FOLDS = 5
LARGE_CV = 250_000


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) int64 fold of each row: each label's rows, shuffled, go round-robin to the ``k`` folds
    from a random starting fold, so every fold gets ``floor`` or ``ceil`` of ``n_c / k`` of
    each label (a label with one example lands in one random fold)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y, np.int64)
    order = np.lexsort((rng.random(len(y)), y))                # by label, random within a label
    ys = y[order]
    first = np.searchsorted(ys, ys, side="left")                # start of each row's label run
    rank = np.arange(len(y)) - first                              # position within its label
    start = rng.integers(0, k, size=int(y.max()) + 1 if len(y) else 1)
    folds = np.empty(len(y), np.int64)
    folds[order] = (start[ys] + rank) % k
    return folds


def per_label_subsample(y: np.ndarray, per_label: int, seed: int) -> np.ndarray:
    """Sorted (M,) int64 row indices: at most ``per_label`` rows of each label, chosen at random
    (``default_rng(seed)``); labels with fewer keep all theirs."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y, np.int64)
    order = np.lexsort((rng.random(len(y)), y))
    ys = y[order]
    rank = np.arange(len(y)) - np.searchsorted(ys, ys, side="left")
    return np.sort(order[rank < per_label]).astype(np.int64)


def holdout_split(y: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit, held-out) split: of each label's ``n`` rows, ``round(holdout * n)`` held
    out, but always at least one kept for fitting (a label with one example is fitted, not
    measured). Both sorted (K,) int64.

    Raises:
        ConfigError: ``holdout`` outside [0, 1).
    """
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"--holdout must be in [0, 1) (got {holdout})")
    rng = np.random.default_rng(seed)
    y = np.asarray(y, np.int64)
    order = np.lexsort((rng.random(len(y)), y))
    ys = y[order]
    first = np.searchsorted(ys, ys, side="left")
    count = np.searchsorted(ys, ys, side="right") - first
    rank = np.arange(len(y)) - first
    held = rank < np.minimum(np.round(holdout * count), count - 1)
    return np.sort(order[~held]).astype(np.int64), np.sort(order[held]).astype(np.int64)


def stacking_offset(z: np.ndarray, z0: np.ndarray, unexampled: np.ndarray) -> float:
    """Calibrated-stacking offset of the labels without examples (Chao, Changpinyo, Gong & Sha,
    ECCV 2016, "An Empirical Study and Analysis of Generalized Zero-Shot Learning for Object
    Recognition in the Wild", sec. 3.2: add one constant to the unseen classes' scores).

    A head sharpens the labels it saw: their logits spread further apart, so the best of them
    beats an unexampled label's unchanged logit more often and takes its images (on the shapes
    model with half of the labels unexampled, lam 0.3 took those labels from 64% to 45% top-1,
    while the mean logit change stayed 0). ``gamma`` is the smallest offset >= 0 at which the head
    sends as many of the sample's images to unexampled labels as zero-shot did: the head may then
    re-rank the labels it saw, but does not shift mass away from the others.

    Args:
        z: (n, C) head logits of the sample's images; z0: (n, C) their zero-shot logits.
        unexampled: (C,) bool, the labels without examples.

    Returns:
        gamma (float, >= 0); 0 when every label has examples or zero-shot sent no image there.
    """
    if not unexampled.any() or unexampled.all() or not len(z):
        return 0.0
    target = float(unexampled[np.asarray(z0).argmax(axis=1)].mean())
    k = int(math.ceil(target * len(z) - 1e-9))
    if k == 0:
        return 0.0
    # Row i goes to an unexampled label once gamma >= its best exampled minus best unexampled logit.
    d = np.sort(np.asarray(z)[:, ~unexampled].max(axis=1) - np.asarray(z)[:, unexampled].max(axis=1))
    return _just_above(d[k - 1])


def _just_above(d: float) -> float:
    # At gamma == d the two logits tie and argmax keeps the lower label index, which may be the
    # exampled one: step just past the tie (float32 logits: relative 1e-6).
    return float(max(0.0, d + 1e-6 * max(1.0, abs(float(d)))))


@dataclass
class _Split:
    """One cross-validation fold: the problem trained on the other folds, the held-out problem,
    its row count, and the parameters along the path (each solve warm-starts from the last)."""

    train: _Problem
    test: _Problem
    n_test: int
    theta: torch.Tensor  # (C, r + 1)


def cross_validate(u: np.ndarray, z0: np.ndarray, t: np.ndarray, score_kind: str, *, lambdas, folds: int,
                   seed: int, log=None) -> tuple[float, dict[str, Any]]:
    """Choose the strength by stratified k-fold cross-validation (``zslabel.heads`` docstring).

    Row folds (``stratified_folds``): each label's examples spread over ``k`` folds. Each fold's
    head is trained on the other folds (labels without rows there masked, as in the whole fit)
    and scored by the NLL of the held-out rows against all C labels (softmax: after the best
    temperature for them, ``_Problem.tempered_nll``). With softmax scores and
    labels without any example, the fold's head gets its calibrated-stacking offset
    (``stacking_offset``, from its own training rows) before scoring, as the final head does, so a
    weak strength that needs a large offset pays for it in the held-out NLL (images of labels with
    examples lost to the offset).

    With softmax scores and labels without any example, each fold's head is also fitted with
    the distillation term of those labels (``_Problem``'s ``zu``), as the final head is; the
    labels that only lack rows in a fold's training part are masked, as before.

    Args:
        u: (N, r) reduced embeddings; z0: (N, C) float32 zero-shot logits of all the run's labels;
            t: (N,) label index of each row.

    Returns:
        ``(lam, info)``: the strength with the smallest mean held-out NLL (``inf``: zero-shot
        itself), and ``{"folds", "cv_rows", "cv": [{"lam", "nll", "offset"}]}``.
    """
    import torch

    t = np.asarray(t, np.int64)
    n, c = z0.shape
    # Large problems (rows x labels above LARGE_CV) use 3 folds: each fold costs a full path of solves.
    k = int(max(2, min(folds if n * c <= LARGE_CV else min(folds, 3), n)))
    fold = stratified_folds(t, k, seed)
    unexampled = np.bincount(t, minlength=c) == 0
    stacking = score_kind == SOFTMAX and unexampled.any()
    zu = torch.logsumexp(torch.from_numpy(z0[:, unexampled]), dim=1).numpy() if stacking else None
    splits: list[_Split] = []
    for f in range(k):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if len(te) and len(np.unique(t[tr])) >= 2:
            splits.append(_Split(_Problem(u[tr], z0[tr], t[tr], score_kind, trained=True,
                                          zu=None if zu is None else zu[tr]),
                                 _Problem(u[te], z0[te], t[te], score_kind), len(te),
                                 torch.zeros((c, u.shape[1] + 1), dtype=torch.float32)))
    n_te = max(1, sum(sp.n_test for sp in splits))

    def cv_loss() -> tuple[float, float]:
        total, offsets = 0.0, []
        for sp in splits:
            tr, te, m, th = sp.train, sp.test, sp.n_test, sp.theta
            gamma = stacking_offset(tr.logits(th).numpy(), tr.z0.numpy(), unexampled) if stacking else 0.0
            te.offset = torch.from_numpy((gamma * unexampled).astype(np.float32)) if gamma else None
            total += (te.tempered_nll(th) if score_kind == SOFTMAX else te.mean_nll(th)) * m
            offsets.append(gamma)
        return total / n_te, float(np.mean(offsets)) if offsets else 0.0

    nll0, _ = cv_loss()
    table = [{"lam": None, "nll": nll0, "offset": 0.0}]
    best_lam, best, rises = math.inf, nll0, 0
    for lv in lambdas:
        for sp in splits:
            sp.theta = _solve(sp.train, lv, sp.theta, max_iter=CV_MAX_ITER)
        nll, off = cv_loss()
        table.append({"lam": float(lv), "nll": nll, "offset": off})
        if log:
            log(f"  cross-validation: lam {lv:g}: held-out NLL {nll:.4f}"
                + (f" (mean unexampled offset {off:.3f})" if stacking else ""))
        if nll < best:
            best_lam, best, rises = lv, nll, 0
        elif nll > best + 1e-3 * abs(best):
            # Only a real rise counts: at strong strengths the NLL can sit flat (a weak zero-shot
            # classifier, D >> examples) before the weaker ones improve on it.
            rises += 1
            if rises >= PATIENCE:
                break
    return best_lam, {"folds": k, "cv_rows": int(n), "cv": table}
