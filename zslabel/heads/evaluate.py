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
from .report import strength_text
from .solve import FitResult, ZeroShot, _chunk_rows

# Above this many examples the head fitted on the fit split is the one saved (no refit on every
# example): the held-out 30% then add little, and a refit of 100,000 x 1,000 costs a minute.
REFIT_MAX_ROWS = 20_000
SHOTS = (1, 2, 4, 8, 16)
TOP_K = 5
WORST = 10


class _Metrics:
    """Held-out metrics of one classifier, accumulated over row chunks: per row only the top-1
    confidence and whether top-1 / top-5 are right (``evaluate_logits``' figures)."""

    def __init__(self, n: int, num_labels: int, score_kind: str):
        self.n, self.c, self.kind = n, num_labels, score_kind
        self.conf = np.zeros(n, np.float64)
        self.right1 = np.zeros(n, bool)
        self.right5 = np.zeros(n, bool)
        self.nll = 0.0
        self.y = np.zeros(n, np.int64)

    def add(self, s: int, z, y: np.ndarray) -> None:
        """Rows ``s .. s + len(y)``: ``z`` (n, C) float32 logits (numpy or torch), ``y`` (n,) int64.

        float32 throughout (a fused log-softmax; ``topk`` instead of a float64 softmax and
        ``argpartition``): the figures are reported to 3-4 digits."""
        import torch

        z = torch.as_tensor(z, dtype=torch.float32)
        yy = torch.from_numpy(np.asarray(y, np.int64))
        rows = torch.arange(len(yy))
        if self.kind == SOFTMAX:
            ls = torch.log_softmax(z, dim=1)
            best, top = ls.max(dim=1)
            conf = best.exp()
            self.nll -= float(ls[rows, yy].double().sum())
        else:
            best, top = z.max(dim=1)
            conf = torch.sigmoid(best)
            t = torch.zeros_like(z)
            t[rows, yy] = 1.0
            self.nll += float((torch.nn.functional.softplus(z) - t * z).double().mean(dim=1).sum())
        k = min(TOP_K, z.shape[1])
        top5 = torch.topk(z, k, dim=1).indices
        e = s + len(yy)
        self.conf[s:e] = conf.double().numpy()
        self.right1[s:e] = (top == yy).numpy()
        self.right5[s:e] = (top5 == yy[:, None]).any(dim=1).numpy()
        self.y[s:e] = y

    def result(self) -> dict[str, Any]:
        from ..calibration import expected_calibration_error

        n, y = self.n, self.y
        per_n = np.bincount(y, minlength=self.c)
        per_ok = np.bincount(y[self.right1], minlength=self.c)
        return {"n": int(n), "top1": float(self.right1.mean()) if n else None,
                "top5": float(self.right5.mean()) if n else None,
                "ece": expected_calibration_error(self.conf, self.right1), "nll": self.nll / n if n else None,
                "per_label": {"correct": per_ok.tolist(), "n": per_n.tolist()}}


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
    m = _Metrics(len(y), num_labels, score_kind)
    step = _chunk_rows(num_labels)
    for s in range(0, len(y), step):
        m.add(s, logits_fn(x[s:s + step]), y[s:s + step])
    return m.result()


def _evaluate_heads(x: np.ndarray, y: np.ndarray, zs: ZeroShot, fits: list[FitResult]) -> list[dict[str, Any]]:
    """``evaluate_logits`` of zero-shot and of each head in ``fits``, in one pass over ``x``: per
    chunk the zero-shot logits once (the (n, D) x (D, C) product), each head's as those plus its
    ``FitResult.delta_logits`` (rank r). Returns ``[zero-shot metrics] + [metrics of each fit]``."""
    c = zs.weights.shape[0]
    ms = [_Metrics(len(y), c, zs.score_kind) for _ in range(len(fits) + 1)]
    step = _chunk_rows(c)
    for s in range(0, len(y), step):
        xc, yc = x[s:s + step], y[s:s + step]
        z0 = zs.logits(xc)
        ms[0].add(s, z0, yc)
        for m, res in zip(ms[1:], fits):
            m.add(s, z0 + res.delta_logits(xc, zs), yc)
    return [m.result() for m in ms]


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


def _curve_fits(x_fit, y_fit, zs, shots, seed, shared, zs_logits, log, fit_kw) -> list[tuple[int, int, FitResult]]:
    out = []
    for k in shots:
        rows = per_label_subsample(y_fit, k, seed)
        if len(np.unique(y_fit[rows])) < 2:
            continue
        kw = dict(fit_kw)
        if shared is not None and k >= shared[0]:
            kw["lam"] = shared[1]
        res = fit_head(x_fit[rows], y_fit[rows], zs, seed=seed,
                       zs_logits=None if zs_logits is None else zs_logits[rows], **kw)
        res.params["cv_shared"] = "lam" in kw
        out.append((int(k), int(len(rows)), res))
        if log:
            log(f"  learning curve: fitted {k} per label ({len(rows)} examples), lam {strength_text(res.params['lam'])}"
                + (" (the main fit's cross-validation)" if "lam" in kw else ""))
    return out


def _curve_rows(fits, before: dict, after: list[dict], log=None) -> list[dict[str, Any]]:
    out = []
    for (k, n, res), m in zip(fits, after):
        out.append({"shots": k, "examples": n, "lam": res.params["lam"],
                    "top1": m["top1"], "top5": m["top5"], "ece": m["ece"], "nll": m["nll"],
                    "zero_shot_top1": before["top1"], "zero_shot_top5": before["top5"],
                    "zero_shot_ece": before["ece"], "fit_seconds": res.params["fit_seconds"],
                    "lam_from_main_fit": bool(res.params.get("cv_shared"))})
        if log:
            log(f"  learning curve: {k} per label ({n} examples): top-1 {m['top1']:.3f} "
                f"(zero-shot {before['top1']:.3f}), lam {strength_text(res.params['lam'])}")
    return out


def learning_curve(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, zs: ZeroShot,
                   *, shots: tuple[int, ...] = SHOTS, seed: int = 0, log=None, shared: tuple[int, float] | None = None,
                   **fit_kw) -> list[dict[str, Any]]:
    """Fit a head on ``k`` examples per label (fewer where a label has fewer) of the fit rows, for
    each ``k`` in ``shots``, and measure it on the evaluation rows (zero-shot alongside; all heads
    in one pass over them, ``_evaluate_heads``).

    Args:
        shared: ``(per_label, lam)``: points with at least ``per_label`` shots take strength ``lam``
            instead of cross-validating (``fit_report`` passes its main fit's: their
            cross-validation would run on a subsample of that same size drawn from the same rows).

    Returns:
        ``[{"shots", "examples", "lam", "top1", "top5", "ece", "nll", "zero_shot_top1", ...}]``.
    """
    fits = _curve_fits(x_fit, y_fit, zs, shots, seed, shared, None, log, fit_kw)
    metrics = _evaluate_heads(x_eval, y_eval, zs, [res for _, _, res in fits])
    return _curve_rows(fits, metrics[0], metrics[1:], log)


def fit_report(x: np.ndarray, y: np.ndarray, zs: ZeroShot, labels: list[str], *, holdout: float = 0.3,
               seed: int = 0, learning_curve_shots: tuple[int, ...] | None = SHOTS, log=None,
               **fit_kw) -> tuple[FitResult, dict[str, Any]]:
    """The whole ``zslabel fit`` computation on an in-memory sample.

    1. a stratified fit / held-out split (``holdout_split``);
    2. a head fitted on the fit rows (strength by cross-validation);
    3. the learning curve's heads (``learning_curve``), on subsamples of the fit rows; points
       whose cross-validation would run on a subsample as large as step 2's take its strength;
    4. one pass over the held-out rows measures zero-shot, step 2's head and the curve's heads:
       top-1, top-5, ECE, NLL, worst labels;
    5. the returned head: refitted on every row with the strength chosen in step 2 (more
       examples; the held-out figures are those of step 2's head); above ``REFIT_MAX_ROWS``
       examples, step 2's head itself.

    Memory: ``x``, the fit rows' copy and their (rows, C) float32 zero-shot logits (computed once,
    shared by steps 2 and 3), one chunk of held-out rows.

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
    x_fit, y_fit = x[fit_idx], y[fit_idx]
    zl_fit = zs.logits(x_fit)
    split_fit = fit_head(x_fit, y_fit, zs, seed=seed, log=log, zs_logits=zl_fit, **fit_kw)
    curve: list[tuple[int, int, FitResult]] = []
    if len(held_idx) and learning_curve_shots:
        shared = None
        if split_fit.params.get("cv_per_label"):
            shared = (int(split_fit.params["cv_per_label"]),
                      math.inf if split_fit.params["lam"] is None else float(split_fit.params["lam"]))
        curve = _curve_fits(x_fit, y_fit, zs, tuple(curve_shots(y_fit, learning_curve_shots)), seed, shared,
                            zl_fit, log, fit_kw)
    del zl_fit, x_fit
    if len(held_idx):
        xh, yh = x[held_idx], y[held_idx]
        metrics = _evaluate_heads(xh, yh, zs, [split_fit] + [res for _, _, res in curve])
        before, after = metrics[0], metrics[1]
        facts["metrics"] = {"before": {k: v for k, v in before.items() if k != "per_label"},
                            "after": {k: v for k, v in after.items() if k != "per_label"}}
        facts["worst_labels"] = worst_labels(before, after, labels)
        if learning_curve_shots:
            facts["learning_curve"] = _curve_rows(curve, before, metrics[2:], log)
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
