"""Fitting a head on a labeled sample: the sample's checks, the basis and zero-shot logits, the
strength by cross-validation (``cv.py``), the solve (``solve.py``), the stacking offset of labels
without examples, and the ``Head`` made of the result."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ..errors import InputError
from .cv import FOLDS, LAMBDAS, _just_above, cross_validate, per_label_subsample
from .head import SOFTMAX, Head
from .solve import CV_MAX_ITER, FitResult, ZeroShot, _basis, _chunk_rows, _Problem, _solve

MAX_RANK = 64
# Rows of the sample used for cross-validation at most, per label; beyond it the strength is chosen
# on a stratified subsample (the prior precision carries, see the docstring) to bound the cost.
CV_PER_LABEL = 16
# ... and at most this many rows in all (C = 1,000 labels: 4 per label): the cross-validation costs
# rows x labels x rank per evaluation, so without a total cap it grew with C squared. Not fewer:
# with 2 per label (3 folds) every held-out row's label has one training row, a 1-shot
# cross-validation, and at 100,000 x 1,000 it chose zero-shot (held-out top-1 0.012) where 4 per
# label chose lam 0.01 (0.974).
CV_MAX_ROWS = 4096
# Iterations of the solve on each subsample level of the final fit (``_solve_path``) and on the
# whole sample, and the change of the mean objective (per example) in one iteration below which
# they stop: far below the sampling error of a held-out NLL (0.01 at 30,000 images). At 70,000
# x 1,000 (after the levels) it stopped the whole-sample solve after 18 passes at top-1 0.9721 on
# 10,000 held-out images; 3e-5 took 30 passes (0.9729), 1e-5 64 (0.9725). Only samples large
# enough for levels use it (``_solve_path``); smaller ones keep L-BFGS's default, 1e-7.
LEVEL_MAX_ITER = 30
FINAL_MAX_ITER = 100
FINAL_TOL = 1e-4
# Work (rows x active labels x rank) below which the solver runs on one thread.
SMALL_WORK = 5e7


def check_sample(x: np.ndarray, y: np.ndarray, num_labels: int, labels: list[str] | None = None) -> None:
    """Refuse samples a head cannot be fitted on. ``labels``: the (C,) label names, to name a
    lone label in the message (else its index).

    Raises:
        InputError: non-finite embeddings (count), label indices out of range, fewer than two
            distinct labels among the examples.
    """
    x = np.asarray(x)
    bad = ~np.isfinite(x).all(axis=1) if x.size else np.zeros(len(x), bool)
    if bad.any():
        raise InputError(f"{int(bad.sum())} of {len(x)} sample embeddings are NaN/infinite (or all zeros); "
                         "the run's stored embeddings are damaged: relabel or re-embed those images")
    if len(y) and (y.min() < 0 or y.max() >= num_labels):
        raise InputError("ground-truth label index out of range")
    if len(np.unique(y)) < 2:
        which = "no label" if not len(y) else f"one label ({labels[int(y[0])] if labels else int(y[0])!r})"
        raise InputError(f"the sample's ground truth has examples of {which}: a head needs at least two "
                         "labels with examples (it learns to tell labels apart)")


class _torch_threads:
    """Run a block with ``n`` torch intra-op threads, restoring the previous count after.

    The solver runs on one thread for small problems, and for any problem on a machine whose
    load average exceeds its cores: several threads spin-waiting on each other made a 768 x 48
    evaluation 20x slower there (0.3 s instead of 13 ms at load average 17 on 2 cores)."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)


def fit_head(x: np.ndarray, y: np.ndarray, zs: ZeroShot, *, lambdas: tuple[float, ...] = LAMBDAS,
             folds: int = FOLDS, max_rank: int = MAX_RANK, cv_per_label: int = CV_PER_LABEL, seed: int = 0,
             lam: float | None = None, log=None, zs_logits: np.ndarray | None = None) -> FitResult:
    """Fit a head on labeled embeddings (the method in the ``zslabel.heads`` docstring).

    Args:
        x: (N, D) float32 L2-normalised image embeddings of the labeled sample.
        y: (N,) int64 true label index of each row, in [0, C).
        zs: the zero-shot classifier (C labels) the head starts from and is pulled toward.
        lambdas: candidate strengths, strong to weak (cross-validation path).
        folds: k of the stratified k-fold cross-validation (at most N).
        max_rank: dimensions of the basis the change is solved in (exact when >= rank(x)).
        cv_per_label: cross-validate on at most this many rows per label (stratified subsample).
        seed: seed of the folds and subsample.
        lam: skip the cross-validation and use this strength (``float("inf")``: zero-shot), e.g.
            to refit the whole sample with the strength chosen on its fit split.
        log: optional callable(str) for progress lines.
        zs_logits: (N, C) float32 ``zs.logits(x)`` when the caller has them (``fit_report`` computes
            them once for the main fit and its learning curve); computed here otherwise.

    Returns:
        ``FitResult``. Labels without examples get ``zs``'s weights and bias exactly.

    Raises:
        InputError: ``check_sample``'s refusals.
    """

    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    c, d = zs.weights.shape
    check_sample(x, y, c)
    t0 = time.perf_counter()
    active = np.unique(y)
    remap = np.full(c, -1, np.int64)
    remap[active] = np.arange(len(active))
    q, r, kept = _basis(x, max_rank)
    u = x @ q                                                    # (N, r)
    zl = zs.logits(x) if zs_logits is None else np.asarray(zs_logits, np.float32)
    t = remap[y]
    params: dict[str, Any] = {"rank": r, "energy_kept": kept, "active_labels": int(len(active)),
                              "lambdas": list(lambdas), "seed": seed}
    import os

    busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    with _torch_threads(1 if busy or len(y) * len(active) * r < SMALL_WORK else None):
        return _fit(x, y, zs, q, u, zl, t, active, params, lam, lambdas, folds, cv_per_label, seed, log, t0)


def _fit(x, y, zs, q, u, zl, t, active, params, lam, lambdas, folds, cv_per_label, seed, log, t0) -> FitResult:
    import torch

    c = zs.weights.shape[0]
    r = q.shape[1]
    per_label = max(1, min(cv_per_label, CV_MAX_ROWS // max(1, len(active)))) if cv_per_label else 0
    if lam is None:
        # Cross-validation scores against all C labels (those without examples at zero-shot, as in
        # a run), on at most cv_per_label rows per label.
        rows = per_label_subsample(y, per_label, seed) if per_label else np.arange(len(y))
        lam, cv = cross_validate(u[rows], zl[rows], y[rows], zs.score_kind, lambdas=lambdas, folds=folds,
                                 seed=seed, log=log)
        params.update(cv, cv_per_label=int(per_label))
    params["lam"] = None if lam is None or math.isinf(lam) else float(lam)
    weights = zs.weights.copy()
    bias = np.full(c, zs.bias, np.float32)
    unexampled = np.ones(c, bool)
    unexampled[active] = False
    low_rank = None
    if params["lam"] is not None:
        z0 = zl if len(active) == c else zl[:, active]
        zu = None
        if zs.score_kind == SOFTMAX and unexampled.any():
            # Log-sum-exp of the zero-shot logits of the labels without examples, for the distillation.
            step = _chunk_rows(c)
            zu = np.concatenate([torch.logsumexp(torch.from_numpy(zl[s:s + step][:, unexampled]), dim=1).numpy()
                                 for s in range(0, len(x), step)])
        theta = _solve_path(u, z0, t, y, zs.score_kind, zu, lam, per_label, seed, params, log)
        th = theta.numpy()
        weights[active] += (th[:, :-1] @ q.T) / np.float32(zs.scale)
        bias[active] += th[:, -1]
        a = np.zeros((c, r), np.float32)
        a[active] = th[:, :-1]
        low_rank = (q, a)
    params["unexampled_offset"] = 0.0
    if params["lam"] is not None and zs.score_kind == SOFTMAX and unexampled.any():
        gamma = _offset_chunked(x, zl, FitResult(weights, bias, {}, low_rank), zs, unexampled)
        bias[unexampled] += np.float32(gamma)
        params["unexampled_offset"] = float(gamma)
    params["fit_seconds"] = time.perf_counter() - t0
    return FitResult(weights.astype(np.float32), bias.astype(np.float32), params, low_rank)


def _solve_path(u, z0, t, y, score_kind, zu, lam, per_label, seed, params, log=None):
    """The final solve at strength ``lam``, from zero-shot: (Ca, r + 1) float32 ``theta``.

    1. Large samples: stratified subsamples first (``per_label`` rows per label, the
       cross-validation's size, then 4x more, ...) while a subsample has at most half of the
       rows, each solved at ``lam * n_sub / N`` (the same prior per row, so its minimiser
       estimates the whole sample's: sample-average approximation, the "dynamic sample size" of
       Byrd, Chin, Nocedal & Wu, Math. Program. 2012) and warm-starting the next. A pass over a
       level costs a quarter of the next one's or less, and the whole sample, where a pass costs
       the most, starts near its optimum (at 70,000 x 1,000 it stopped after 18 passes; the
       path of 2. ran up to 140 iterations there, all on every row).
    2. Otherwise: 100x and 10x the chosen strength first, a few iterations each: from zero-shot
       straight at a weak strength L-BFGS needs many more passes; the final solve then runs to
       L-BFGS's tight default tolerance (``FINAL_TOL`` is for the large samples of 1.).

    ``params["levels"]``: the row counts of the levels.
    """
    import torch

    n = len(t)
    theta = torch.zeros((z0.shape[1], u.shape[1] + 1), dtype=torch.float32)
    levels = []
    m = per_label
    while m:
        rows = per_label_subsample(y, m, seed)
        if len(rows) * 2 > n:
            break
        levels.append(rows)
        m *= 4
    for rows in levels:
        t1 = time.perf_counter()
        sub = _Problem(u[rows], z0[rows], t[rows], score_kind, zu=None if zu is None else zu[rows])
        theta = _solve(sub, lam * len(rows) / n, theta, max_iter=LEVEL_MAX_ITER, tol=FINAL_TOL)
        if log:
            log(f"  fit: warm start on {len(rows)} of {n} examples ({time.perf_counter() - t1:.1f} s)")
    problem = _Problem(u, z0, t, score_kind, zu=zu)
    if not levels:
        for lv in (lam * 100, lam * 10):
            theta = _solve(problem, lv, theta, max_iter=CV_MAX_ITER)
    params["levels"] = [int(len(rows)) for rows in levels]
    t1 = time.perf_counter()
    # The loose tolerance only where a pass is expensive: small samples (no levels) keep L-BFGS's
    # tight default, as cheap there as it was.
    theta = _solve(problem, lam, theta, max_iter=FINAL_MAX_ITER, tol=FINAL_TOL if levels else 1e-7)
    if log and levels:
        log(f"  fit: {n} examples ({time.perf_counter() - t1:.1f} s)")
    return theta


def _offset_chunked(x, zl, res: FitResult, zs, unexampled) -> float:
    """``stacking_offset`` over a large sample, keeping only (N,) per-row quantities.

    ``zl``: (N, C) float32 zero-shot logits of ``x``; the head's are ``zl + res.delta_logits``."""
    gaps, zs_unex = [], []
    step = _chunk_rows(len(unexampled))
    for s in range(0, len(x), step):
        z0 = zl[s:s + step]
        z = z0 + res.delta_logits(x[s:s + step], zs)
        gaps.append(z[:, ~unexampled].max(axis=1) - z[:, unexampled].max(axis=1))
        zs_unex.append(unexampled[z0.argmax(axis=1)])
    d, hit = np.sort(np.concatenate(gaps)), np.concatenate(zs_unex)
    k = int(math.ceil(hit.mean() * len(d) - 1e-9))
    return 0.0 if k == 0 else _just_above(d[k - 1])


def head_from_fit(res: FitResult, zs: ZeroShot, **meta) -> Head:
    """A ``Head`` from a ``FitResult`` (``meta``: labels, templates, checkpoint_digest, model, fit)."""
    head = Head(weights=res.weights, bias=res.bias, scale=float(zs.scale), score_kind=zs.score_kind,
                params=res.params, **meta)
    head.id = head.compute_id()
    return head
