"""Measuring heads: held-out metrics (top-1, top-5, ECE, NLL, worst labels), the learning curve,
and ``fit_report``, the whole ``zslabel fit`` computation (split, fit, measure, curve, refit)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from .cv import holdout_split, per_label_subsample
from .fitting import check_sample, fit_head
from .head import SOFTMAX
from .solve import CHUNK, FitResult, ZeroShot, _head_logits

# Above this many examples the head fitted on the fit split is the one saved (no refit on every
# example): the held-out 30% then add little, and a refit of 100,000 x 1,000 costs a minute.
REFIT_MAX_ROWS = 20_000
SHOTS = (1, 2, 4, 8, 16)
TOP_K = 5
WORST = 10


def _scores_np(z: np.ndarray, score_kind: str) -> np.ndarray:
    if score_kind == SOFTMAX:
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def evaluate_logits(logits_fn, x: np.ndarray, y: np.ndarray, score_kind: str, num_labels: int) -> dict[str, Any]:
    """Held-out metrics of a classifier, in row chunks (bounded memory).

    Args:
        logits_fn: (n, D) float32 -> (n, C) float32 logits.
        x: (N, D) float32 embeddings. y: (N,) int64 true label indices.

    Returns:
        ``{"n", "top1", "top5", "ece", "nll", "per_label": {"correct": [C], "n": [C]}}``: top-1 /
        top-5 accuracy, ECE (15 bins on the top-1 score, ``calibration.expected_calibration_error``),
        NLL (softmax: mean -log p_y over all C; sigmoid: mean binary cross-entropy over all pairs).
    """
    from ..calibration import expected_calibration_error

    n = len(y)
    conf = np.zeros(n, np.float64)
    right1 = np.zeros(n, bool)
    right5 = np.zeros(n, bool)
    nll = 0.0
    for s in range(0, n, CHUNK):
        z = np.asarray(logits_fn(x[s:s + CHUNK]), np.float64)
        yy = y[s:s + CHUNK]
        p = _scores_np(z, score_kind)
        top = p.argmax(axis=1)
        conf[s:s + len(yy)] = p[np.arange(len(yy)), top]
        right1[s:s + len(yy)] = top == yy
        k = min(TOP_K, z.shape[1])
        top5 = np.argpartition(-z, k - 1, axis=1)[:, :k]
        right5[s:s + len(yy)] = (top5 == yy[:, None]).any(axis=1)
        if score_kind == SOFTMAX:
            m = z.max(axis=1)
            nll += float((m + np.log(np.exp(z - m[:, None]).sum(axis=1)) - z[np.arange(len(yy)), yy]).sum())
        else:
            t = np.zeros_like(z)
            t[np.arange(len(yy)), yy] = 1.0
            nll += float((np.logaddexp(0.0, z) - t * z).mean(axis=1).sum())
    per_n = np.bincount(y, minlength=num_labels)
    per_ok = np.bincount(y[right1], minlength=num_labels)
    return {"n": int(n), "top1": float(right1.mean()) if n else None, "top5": float(right5.mean()) if n else None,
            "ece": expected_calibration_error(conf, right1), "nll": nll / n if n else None,
            "per_label": {"correct": per_ok.tolist(), "n": per_n.tolist()}}


def worst_labels(before: dict, after: dict, labels: list[str], n: int = WORST) -> list[dict[str, Any]]:
    """The ``n`` labels with the lowest held-out top-1 accuracy after fitting (ties: most held-out
    images first), with their accuracy before."""
    pb, pa = before["per_label"], after["per_label"]
    rows = []
    for c, name in enumerate(labels):
        m = pa["n"][c]
        if m:
            rows.append({"label": name, "held_out": int(m), "top1_before": pb["correct"][c] / m,
                         "top1_after": pa["correct"][c] / m})
    rows.sort(key=lambda r: (r["top1_after"], -r["held_out"], r["label"]))
    return rows[:n]


def curve_shots(y_fit: np.ndarray, shots: tuple[int, ...] = SHOTS) -> list[int]:
    """The shot counts the sample allows: those at most the median examples per label (among
    labels with examples) of the fit rows."""
    counts = np.bincount(np.asarray(y_fit, np.int64))
    counts = counts[counts > 0]
    if not len(counts):
        return []
    median = float(np.median(counts))
    return [k for k in shots if k <= median]


def learning_curve(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, zs: ZeroShot,
                   *, shots: tuple[int, ...] = SHOTS, seed: int = 0, log=None, **fit_kw) -> list[dict[str, Any]]:
    """Fit a head on ``k`` examples per label (fewer where a label has fewer) of the fit rows, for
    each ``k`` in ``shots``, and measure it on the evaluation rows (zero-shot alongside).

    Returns:
        ``[{"shots", "examples", "lam", "top1", "top5", "ece", "nll", "zero_shot_top1", ...}]``.
    """
    c = zs.weights.shape[0]
    before = evaluate_logits(zs.logits, x_eval, y_eval, zs.score_kind, c)
    out = []
    for k in shots:
        rows = per_label_subsample(y_fit, k, seed)
        if len(np.unique(y_fit[rows])) < 2:
            continue
        res = fit_head(x_fit[rows], y_fit[rows], zs, seed=seed, **fit_kw)
        m = evaluate_logits(_head_logits(res, zs), x_eval, y_eval, zs.score_kind, c)
        out.append({"shots": int(k), "examples": int(len(rows)), "lam": res.params["lam"],
                    "top1": m["top1"], "top5": m["top5"], "ece": m["ece"], "nll": m["nll"],
                    "zero_shot_top1": before["top1"], "zero_shot_top5": before["top5"],
                    "zero_shot_ece": before["ece"], "fit_seconds": res.params["fit_seconds"]})
        if log:
            log(f"  learning curve: {k} per label ({len(rows)} examples): top-1 {m['top1']:.3f} "
                f"(zero-shot {before['top1']:.3f}), lam {res.params['lam']}")
    return out


def fit_report(x: np.ndarray, y: np.ndarray, zs: ZeroShot, labels: list[str], *, holdout: float = 0.3,
               seed: int = 0, learning_curve_shots: tuple[int, ...] | None = SHOTS, log=None,
               **fit_kw) -> tuple[FitResult, dict[str, Any]]:
    """The whole ``zslabel fit`` computation on an in-memory sample.

    1. a stratified fit / held-out split (``holdout_split``);
    2. a head fitted on the fit rows (strength by cross-validation), measured on the held-out rows
       against zero-shot: top-1, top-5, ECE, NLL, worst labels;
    3. the learning curve (``learning_curve``) on the same held-out rows;
    4. the returned head: refitted on every row with the strength chosen in step 2 (more
       examples; the held-out figures are those of step 2's head); above ``REFIT_MAX_ROWS``
       examples, step 2's head itself.

    Returns:
        ``(FitResult of the final head, fit facts for ``Head.fit``)``.
    """
    c = zs.weights.shape[0]
    check_sample(x, y, c)
    fit_idx, held_idx = holdout_split(y, holdout, seed)
    counts = np.bincount(y, minlength=c)
    facts: dict[str, Any] = {"examples": int(len(y)), "labels_with_examples": int((counts > 0).sum()),
                             "examples_per_label": {labels[i]: int(counts[i]) for i in range(c)},
                             "holdout": float(holdout), "seed": int(seed), "fit_examples": int(len(fit_idx)),
                             "held_out_examples": int(len(held_idx))}
    t0 = time.perf_counter()
    if len(np.unique(y[fit_idx])) < 2:
        fit_idx, held_idx = np.arange(len(y)), np.zeros(0, np.int64)
    split_fit = fit_head(x[fit_idx], y[fit_idx], zs, seed=seed, log=log, **fit_kw)
    if len(held_idx):
        before = evaluate_logits(zs.logits, x[held_idx], y[held_idx], zs.score_kind, c)
        after = evaluate_logits(_head_logits(split_fit, zs), x[held_idx], y[held_idx], zs.score_kind, c)
        facts["metrics"] = {"before": {k: v for k, v in before.items() if k != "per_label"},
                            "after": {k: v for k, v in after.items() if k != "per_label"}}
        facts["worst_labels"] = worst_labels(before, after, labels)
        if learning_curve_shots:
            facts["learning_curve"] = learning_curve(
                x[fit_idx], y[fit_idx], x[held_idx], y[held_idx], zs,
                shots=tuple(curve_shots(y[fit_idx], learning_curve_shots)), seed=seed, log=log, **fit_kw)
    facts["split_params"] = {k: v for k, v in split_fit.params.items() if k != "lambdas"}
    facts["refit_on_all"] = bool(len(held_idx) and len(y) <= REFIT_MAX_ROWS)
    if not facts["refit_on_all"]:
        facts["seconds"] = time.perf_counter() - t0
        return split_fit, facts
    final = fit_head(x, y, zs, seed=seed, lam=math.inf if split_fit.params["lam"] is None else split_fit.params["lam"],
                     **{k: v for k, v in fit_kw.items() if k in ("lambdas", "max_rank")})
    # The final head keeps the cross-validation record of the split it was chosen on.
    final.params.update({k: split_fit.params[k] for k in ("folds", "cv_rows", "cv") if k in split_fit.params})
    facts["seconds"] = time.perf_counter() - t0
    return final, facts
