"""Calibration of zero-shot scores from a small labeled sample: fit, measure, save, load, apply.

Zero-shot scores are not probabilities of being right: CLIP softmax scores depend on the number
of labels and the templates, SigLIP sigmoid scores of correct labels sit far below 0.5. A
calibration is an affine map of the logits, per label, fitted on a few hundred images with known
labels; the usual softmax/sigmoid then turns the mapped logits into calibrated scores:

    calibrated logits = a[c] * logits[:, c] + b[c]        (a: (C,), b: (C,))

- ``"temperature"`` (softmax / CLIP-family models): ``a[c] = 1 / T``, ``b[c] = 0``, one scalar
  ``T > 0`` minimising the negative log-likelihood of ``softmax(logits / T)`` on the fit split
  (temperature scaling, Guo et al. 2017, "On Calibration of Modern Neural Networks", sec. 4.2).
  The NLL is convex in ``1/T`` (a log-sum-exp of linear functions minus a linear term), so it is
  unimodal in ``log T`` and a bounded golden-section search finds the minimum. The argmax (top-1
  label) of an image never changes.
- ``"platt"`` (sigmoid / SigLIP-family models): Platt scaling (Platt 1999, "Probabilistic
  Outputs for Support Vector Machines ...") of each label's logit, so that the calibrated score
  of label ``c`` estimates P(``c`` is the image's label). Every (image, label) pair of the fit
  split is a binary example (positive when the label is the ground truth). One global ``(a, b)``
  is fitted on all pairs; a label with at least ``MIN_POSITIVES_PER_LABEL`` positives in the fit
  split gets its own ``(a[c], b[c])``, fitted on its own pairs (others keep the global pair).
  Targets are Platt's smoothed ones, ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``, so a few
  examples never give infinite slopes. ``thresholds[c]`` is the *raw* sigmoid score at which the
  calibrated score reaches 0.5, i.e. ``sigmoid(-b[c] / a[c])``: the per-label threshold to use
  on uncalibrated scores (``--multi-label --threshold`` on calibrated scores is then 0.5).

Metrics (``metrics``), computed on the held-out split, before (identity map) and after:

- ECE, expected calibration error of the top-1 confidence (the highest score of an image) with
  ``ECE_BINS`` = 15 equal-width bins (Guo et al. 2017, eq. 3):
  ``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``, bins ``((m-1)/M, m/M]``.
- top-1 accuracy, and top-1 accuracy at coverages: of the ``ceil(q * n)`` most confident images
  (stable order on ties), the fraction whose top-1 label is right (``COVERAGES``).
- NLL of the true label (softmax: mean ``-log p_y``; sigmoid: mean binary cross-entropy over
  all pairs).

The fit/held-out split is a deterministic permutation (``numpy.random.default_rng(seed)``).

Pure numpy/torch, no Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError

TEMPERATURE = "temperature"
PLATT = "platt"
KINDS = (TEMPERATURE, PLATT)
FORMAT = "zslabel-calibration"
VERSION = 1
ECE_BINS = 15
COVERAGES = (1.0, 0.8, 0.5)
MIN_POSITIVES_PER_LABEL = 20
# Golden-section search range of T: logits already include the model's logit_scale, so the
# best T of real checkpoints lies near 1; 1e-3..1e3 is far outside anything useful.
LOG_T_RANGE = (math.log(1e-3), math.log(1e3))


# ---------------------------------------------------------------------------------------------
# metrics


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width bins (Guo et al. 2017, eq. 3).

    Args:
        confidence: (N,) float, top-1 confidence in [0, 1].
        correct: (N,) bool, whether the top-1 label is right.

    Returns:
        ``sum_m |B_m| / N * |acc(B_m) - conf(B_m)|`` over bins ``((m-1)/M, m/M]`` (a confidence
        of exactly 0 falls in the first bin); 0.0 for N = 0.
    """
    conf = np.asarray(confidence, np.float64)
    ok = np.asarray(correct, bool)
    n = len(conf)
    if n == 0:
        return 0.0
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for m in range(bins):
        sel = idx == m
        if sel.any():
            total += sel.sum() / n * abs(ok[sel].mean() - conf[sel].mean())
    return float(total)


def accuracy_at_coverage(confidence: np.ndarray, correct: np.ndarray,
                         coverages: tuple[float, ...] = COVERAGES) -> dict[str, float | None]:
    """Top-1 accuracy of the ``ceil(q * N)`` most confident rows, for each coverage ``q``.

    Args:
        confidence: (N,) float. correct: (N,) bool.

    Returns:
        ``{"1.0": acc, "0.8": acc, ...}`` (keys are ``f"{q:g}"``-like strings with one decimal);
        None for N = 0.
    """
    conf = np.asarray(confidence, np.float64)
    ok = np.asarray(correct, bool)
    order = np.argsort(-conf, kind="stable")
    out: dict[str, float | None] = {}
    for q in coverages:
        k = int(math.ceil(q * len(conf)))
        out[f"{q:.1f}"] = float(ok[order[:k]].mean()) if k else None
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


def _softmax_nll(z: np.ndarray, y: np.ndarray) -> float:
    m = z.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def _bce(z: np.ndarray, t: np.ndarray) -> float:
    # log(1 + exp(-z)) for t = 1 and log(1 + exp(z)) for t = 0, stably.
    return float(np.mean(np.logaddexp(0.0, z) - t * z))


def score_metrics(scores: np.ndarray, y: np.ndarray, score_kind: str, logits: np.ndarray) -> dict[str, Any]:
    """Metrics of one (N, C) score matrix against true label indices ``y`` (N,) int64.

    ``logits`` (N, C) are the (possibly calibrated) logits the scores came from, for the NLL.
    Returns ``{"n", "ece", "top1_accuracy", "accuracy_at_coverage", "nll", "mean_confidence"}``.
    """
    top = scores.argmax(axis=1)
    conf = scores[np.arange(len(y)), top]
    correct = top == y
    if score_kind == "softmax":
        nll = _softmax_nll(logits, y)
    else:
        t = np.zeros_like(logits)
        t[np.arange(len(y)), y] = 1.0
        nll = _bce(logits, t)
    return {"n": int(len(y)), "ece": expected_calibration_error(conf, correct),
            "top1_accuracy": float(correct.mean()) if len(y) else None,
            "accuracy_at_coverage": accuracy_at_coverage(conf, correct), "nll": nll,
            "mean_confidence": float(conf.mean()) if len(y) else None}


# ---------------------------------------------------------------------------------------------
# fitting


def split_indices(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (fit, held-out) index split of ``n`` rows: a ``default_rng(seed)``
    permutation, the first ``round(holdout * n)`` rows held out. Both (K,) int64, sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(holdout * n))
    return np.sort(perm[k:]).astype(np.int64), np.sort(perm[:k]).astype(np.int64)


def fit_temperature(logits: np.ndarray, y: np.ndarray, iters: int = 100) -> float:
    """Temperature T minimising mean NLL of ``softmax(logits / T)`` (Guo et al. 2017, sec. 4.2).

    Args:
        logits: (N, C) float logits (already multiplied by the model's logit_scale).
        y: (N,) int64 true label indices in [0, C).
        iters: golden-section iterations over ``log T`` in ``LOG_T_RANGE`` (100 shrink the
            bracket by 0.618^100, far below float precision).

    Returns:
        T > 0 (float). The NLL is convex in 1/T, hence unimodal in log T.
    """
    z = np.asarray(logits, np.float64)
    f = lambda log_t: _softmax_nll(z / math.exp(log_t), y)  # noqa: E731
    lo, hi = LOG_T_RANGE
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = f(d)
    return float(math.exp((lo + hi) / 2))


def fit_logistic(z: np.ndarray, t: np.ndarray, iters: int = 50, ridge: float = 1e-6) -> tuple[float, float]:
    """Platt's fit: ``(a, b)`` minimising mean cross-entropy of ``sigmoid(a * z + b)`` vs ``t``.

    Newton's method with step halving (the loss is convex in (a, b)); ``ridge`` keeps the 2x2
    Hessian invertible when ``z`` is constant.

    Args:
        z: (N,) float logits. t: (N,) float targets in [0, 1] (smoothed, see the module docstring).

    Returns:
        ``(a, b)`` floats.
    """
    z = np.asarray(z, np.float64)
    t = np.asarray(t, np.float64)
    a, b = 1.0, 0.0
    loss = lambda a_, b_: _bce(a_ * z + b_, t)  # noqa: E731
    current = loss(a, b)
    for _ in range(iters):
        p = _sigmoid(a * z + b)
        r = p - t
        grad = np.array([np.mean(r * z), np.mean(r)])
        w = p * (1 - p)
        hess = np.array([[np.mean(w * z * z) + ridge, np.mean(w * z)], [np.mean(w * z), np.mean(w) + ridge]])
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            na, nb = a - scale * step[0], b - scale * step[1]
            new = loss(na, nb)
            if new <= current:
                break
            scale /= 2
        else:
            break
        converged = current - new < 1e-12
        a, b, current = na, nb, new
        if converged:
            break
    return float(a), float(b)


def _platt_targets(positive: np.ndarray) -> np.ndarray:
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    return np.where(positive, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))


def fit_platt(logits: np.ndarray, y: np.ndarray, min_positives: int = MIN_POSITIVES_PER_LABEL
              ) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """Per-label Platt scaling of sigmoid logits (see the module docstring).

    Args:
        logits: (N, C) float sigmoid logits. y: (N,) int64 true label indices.
        min_positives: a label needs this many positives among the N images for its own fit.

    Returns:
        ``(a, b, per_label)``: (C,) float64 slopes and intercepts, and for each label whether it
        got its own fit (else the global pair).
    """
    z = np.asarray(logits, np.float64)
    n, c = z.shape
    pos = np.zeros((n, c), bool)
    pos[np.arange(n), y] = True
    ga, gb = fit_logistic(z.ravel(), _platt_targets(pos.ravel()))
    a, b, own = np.full(c, ga), np.full(c, gb), []
    for j in range(c):
        enough = pos[:, j].sum() >= min_positives and (~pos[:, j]).sum() >= min_positives
        if enough:
            a[j], b[j] = fit_logistic(z[:, j], _platt_targets(pos[:, j]))
        own.append(bool(enough))
    return a, b, own


# ---------------------------------------------------------------------------------------------
# the calibration file


@dataclass
class Calibration:
    """A fitted calibration, as saved to / loaded from JSON.

    Attributes:
        kind: ``"temperature"`` or ``"platt"``.
        score_kind: ``"softmax"`` or ``"sigmoid"``, the model's (temperature needs softmax,
            platt sigmoid).
        labels: the C label names, in the run's order (parameters are per label in this order).
        templates: the prompt templates of the run the fit came from.
        checkpoint_digest: ``model.checkpoint_digest`` of the checkpoint (weights hash).
        model: model id as recorded in the run manifest (informational).
        params: ``{"temperature": T}``, or ``{"a": [C], "b": [C], "per_label_fit": [C] bool,
            "thresholds": [C] raw-score thresholds, "min_positives"}``.
        fit: facts about the fit data (counts, source, split, seed).
        metrics: ``{"before": ..., "after": ...}`` on the held-out split (``score_metrics``).
        head: id of the head (``heads.Head``) whose logits it was fitted on; None for zero-shot
            logits. A calibration fitted on one is refused with another (or with none).
        id: sha256 (16 hex digits) of the canonical JSON of everything else.
    """

    kind: str
    score_kind: str
    labels: list[str]
    templates: list[str]
    checkpoint_digest: str
    model: str | None
    params: dict[str, Any]
    fit: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    head: str | None = None

    # ---- maths ----------------------------------------------------------------------------
    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)``: (C,) float32 slope and intercept of the per-label affine map of logits."""
        c = len(self.labels)
        if self.kind == TEMPERATURE:
            return np.full(c, 1.0 / self.params["temperature"], np.float32), np.zeros(c, np.float32)
        return np.asarray(self.params["a"], np.float32), np.asarray(self.params["b"], np.float32)

    def adjust_logits(self, logits):
        """Calibrated logits: ``a * logits + b`` per label column (module docstring).

        Args:
            logits: (N, C) float32 ``torch.Tensor`` (any device) or numpy array.

        Returns:
            Same type, device and shape, float32. ``ranking.scores_from_logits`` of it with the
            model's score kind gives the calibrated scores.
        """
        a, b = self.coefficients()
        if isinstance(logits, np.ndarray):
            return (logits.astype(np.float32) * a + b).astype(np.float32)
        import torch

        at = torch.from_numpy(a).to(logits.device)
        bt = torch.from_numpy(b).to(logits.device)
        return logits.float() * at + bt

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) logits -> (N, C) float64 calibrated scores (numpy; for metrics)."""
        z = self.adjust_logits(np.asarray(logits, np.float32)).astype(np.float64)
        return _softmax(z) if self.score_kind == "softmax" else _sigmoid(z)

    # ---- serialisation ----------------------------------------------------------------------
    def content(self) -> dict[str, Any]:
        """Everything but ``id``, JSON-able. ``head`` only when set, so files written before heads
        existed keep their ids."""
        return json.loads(json.dumps({
            "format": FORMAT, "version": VERSION, "kind": self.kind, "score_kind": self.score_kind,
            "labels": list(self.labels), "templates": list(self.templates),
            "checkpoint_digest": self.checkpoint_digest, "model": self.model, "params": self.params,
            "fit": self.fit, "metrics": self.metrics, **({"head": self.head} if self.head else {})}))

    def compute_id(self) -> str:
        """sha256 of the canonical (sorted keys, compact) JSON of ``content()``, 16 hex digits."""
        text = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """JSON text with ``id`` set."""
        self.id = self.compute_id()
        return json.dumps({**self.content(), "id": self.id}, indent=2, sort_keys=True) + "\n"

    def save(self, path: str, storage_options: dict | None = None) -> str:
        """Write ``to_json()`` to a local path or fsspec URI; returns the id."""
        import fsspec

        text = self.to_json()
        with fsspec.open(path, "w", **(storage_options or {})) as fh:
            fh.write(text)
        return self.id

    # ---- checks -----------------------------------------------------------------------------
    def check_compatible(self, *, checkpoint_digest: str, labels: list[str], templates: list[str],
                         score_kind: str, source: str = "the calibration", head: str | None = None) -> None:
        """Refuse to apply this calibration to a run it was not fitted for.

        Raises:
            ConfigError: naming every difference (checkpoint digest, labels, templates, score kind).
        """
        problems = fit_differences(self, checkpoint_digest=checkpoint_digest, labels=labels, templates=templates,
                                   score_kind=score_kind)
        if (head or None) != (self.head or None):
            fitted = f"head {self.head}" if self.head else "the zero-shot classifier"
            problems.append(f"fitted on the logits of {fitted}, "
                            f"this run uses {f'head {head}' if head else 'no head (zero-shot)'}")
        if problems:
            raise ConfigError(f"{source} (id {self.id}) was fitted for another setup: " + "; ".join(problems)
                              + ". Fit one for this run with `zslabel calibrate`")


def _some(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names``, and how many more there are."""
    more = len(names) - shown
    return repr(names[:shown]) + (f" and {more} more" if more > 0 else "")


def fit_differences(fitted: Any, *, checkpoint_digest: str, labels: list[str], templates: list[str],
                    score_kind: str) -> list[str]:
    """What differs between the run a file was fitted on (``fitted``: a calibration or a head,
    with ``checkpoint_digest``, ``model``, ``labels``, ``templates``, ``score_kind``) and this
    run: one human phrase per difference, empty when it fits."""
    problems = []
    if checkpoint_digest != fitted.checkpoint_digest:
        problems.append(f"checkpoint digest {fitted.checkpoint_digest} (model {fitted.model!r}) vs this run's "
                        f"{checkpoint_digest}")
    if list(labels) != list(fitted.labels):
        added = [x for x in labels if x not in fitted.labels]
        removed = [x for x in fitted.labels if x not in labels]
        detail = ", ".join(filter(None, [f"run adds {_some(added)}" if added else "",
                                         f"run lacks {_some(removed)}" if removed else ""])) or "other order"
        problems.append(f"labels differ ({detail})")
    if list(templates) != list(fitted.templates):
        problems.append(f"templates {fitted.templates!r} vs this run's {list(templates)!r}")
    if score_kind != fitted.score_kind:
        problems.append(f"score kind {fitted.score_kind} vs this run's {score_kind}")
    return problems


def load_calibration(path: str, storage_options: dict | None = None) -> Calibration:
    """Read and validate a calibration file written by ``Calibration.save``.

    Raises:
        ConfigError: unreadable, not JSON, not a zslabel calibration, an unknown kind, parameters
            of the wrong length or not finite (T <= 0), or an ``id`` that does not match the
            content (edited or damaged file).
    """
    import fsspec

    try:
        with fsspec.open(path, "r", **(storage_options or {})) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read calibration file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a zslabel calibration file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise ConfigError(f"calibration file {path} has version {data.get('version')}; this zslabel reads {VERSION}")
    try:
        calib = Calibration(kind=data["kind"], score_kind=data["score_kind"], labels=list(data["labels"]),
                            templates=list(data["templates"]), checkpoint_digest=data["checkpoint_digest"],
                            model=data.get("model"), params=dict(data["params"]), fit=data.get("fit") or {},
                            metrics=data.get("metrics") or {}, id=data.get("id", ""), head=data.get("head"))
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"calibration file {path} lacks {exc}") from exc
    expected = {TEMPERATURE: "softmax", PLATT: "sigmoid"}.get(calib.kind)
    if expected is None:
        raise ConfigError(f"calibration file {path}: unknown kind {calib.kind!r} (expected one of {KINDS})")
    if calib.score_kind != expected:
        raise ConfigError(f"calibration file {path}: kind {calib.kind} needs {expected} scores, not {calib.score_kind}")
    c = len(calib.labels)
    try:
        if calib.kind == TEMPERATURE:
            t = float(calib.params["temperature"])
            if not (math.isfinite(t) and t > 0):
                raise ConfigError(f"calibration file {path}: temperature must be finite and > 0 (got {t})")
        else:
            a, b = np.asarray(calib.params["a"], float), np.asarray(calib.params["b"], float)
            if a.shape != (c,) or b.shape != (c,) or not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise ConfigError(f"calibration file {path}: 'a' and 'b' must be {c} finite numbers each")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"calibration file {path}: bad parameters: {exc}") from exc
    if calib.id != calib.compute_id():
        raise ConfigError(f"calibration file {path}: its id {calib.id!r} does not match its content "
                          f"({calib.compute_id()}); the file was edited or damaged")
    return calib


def check_holdout(holdout: float) -> None:
    """Raise ConfigError unless the held-out fraction is in (0, 1): the metrics need held-out rows."""
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"--holdout must be in (0, 1) (got {holdout})")


def fit_calibration(logits: np.ndarray, y: np.ndarray, score_kind: str, *, labels: list[str],
                    templates: list[str], checkpoint_digest: str, model: str | None = None,
                    holdout: float = 0.3, seed: int = 0, fit_info: dict | None = None,
                    min_positives: int = MIN_POSITIVES_PER_LABEL, head: str | None = None) -> Calibration:
    """Fit on a deterministic fit split, measure before/after on the held-out split.

    Args:
        logits: (N, C) float32 logits of the labeled sample (``ranking.zero_shot_logits``).
        y: (N,) int64 true label index of each row.
        score_kind: ``"softmax"`` (temperature scaling) or ``"sigmoid"`` (Platt scaling).
        labels, templates, checkpoint_digest, model: recorded for ``check_compatible``.
        holdout: fraction of rows held out for the metrics, in (0, 1).
        seed: seed of the split.
        fit_info: extra facts for the file's ``fit`` section (source, matching counts).
        head: id of the head the logits came from (None: zero-shot logits).

    Returns:
        ``Calibration`` with ``id`` set.

    Raises:
        ConfigError: holdout outside (0, 1), or fewer than 2 rows on either side of the split.
    """
    check_holdout(holdout)
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    fit_idx, held_idx = split_indices(len(y), holdout, seed)
    if len(fit_idx) < 2 or len(held_idx) < 2:
        raise ConfigError(f"{len(y)} labeled images split {len(fit_idx)}/{len(held_idx)} (fit/held out) with "
                          f"--holdout {holdout}: need at least 2 on each side; label more images")
    zf, yf = logits[fit_idx], y[fit_idx]
    if score_kind == "softmax":
        params: dict[str, Any]
        kind, params = TEMPERATURE, {"temperature": fit_temperature(zf, yf)}
    elif score_kind == "sigmoid":
        a, b, own = fit_platt(zf, yf, min_positives)
        with np.errstate(divide="ignore", invalid="ignore"):
            thresholds = _sigmoid(np.where(a != 0, -b / a, np.inf))
        kind, params = PLATT, {"a": a.tolist(), "b": b.tolist(), "per_label_fit": own,
                               "thresholds": thresholds.tolist(), "min_positives": int(min_positives)}
    else:
        raise ConfigError(f"unknown score kind {score_kind!r}")
    calib = Calibration(kind=kind, score_kind=score_kind, labels=list(labels), templates=list(templates),
                        checkpoint_digest=checkpoint_digest, model=model, params=params, head=head)
    zh, yh = logits[held_idx], y[held_idx]
    raw = _softmax(zh) if score_kind == "softmax" else _sigmoid(zh)
    adjusted = calib.adjust_logits(zh.astype(np.float32)).astype(np.float64)
    calib.metrics = {"split": "held_out", "before": score_metrics(raw, yh, score_kind, zh),
                     "after": score_metrics(calib.scores(zh), yh, score_kind, adjusted)}
    calib.fit = {"images": int(len(y)), "fit_images": int(len(fit_idx)), "held_out_images": int(len(held_idx)),
                 "holdout": float(holdout), "seed": int(seed), "labels_with_truth": int(len(np.unique(y))),
                 **(fit_info or {})}
    calib.id = calib.compute_id()
    return calib


def load_for_run(path: str | None, storage_options: dict | None, *, checkpoint_digest: str, labels: list[str],
                 templates: list[str], score_kind: str, head: str | None = None) -> Calibration | None:
    """``--calibration FILE`` of a label/relabel run: loaded, validated and checked against the
    run's checkpoint digest, labels, templates, score kind and head id (None: no head); None
    without a file.

    Raises:
        ConfigError: as ``load_calibration`` and ``Calibration.check_compatible``.
    """
    if not path:
        return None
    calib = load_calibration(path, storage_options)
    calib.check_compatible(checkpoint_digest=checkpoint_digest, labels=labels, templates=templates,
                           score_kind=score_kind, source=f"calibration file {path}", head=head)
    return calib


def manifest_entry(calib: Calibration | None, path: str | None) -> dict[str, Any] | None:
    """What a run manifest records of its calibration: id, file, kind, parameters (temperature,
    or how many labels have their own Platt fit) and the held-out ECE before/after."""
    if calib is None:
        return None
    entry: dict[str, Any] = {"id": calib.id, "file": path, "kind": calib.kind, "head": calib.head}
    if calib.kind == TEMPERATURE:
        entry["temperature"] = calib.params["temperature"]
    else:
        entry["labels_with_own_fit"] = int(sum(calib.params.get("per_label_fit", [])))
    entry["held_out_ece"] = {k: (calib.metrics.get(k) or {}).get("ece") for k in ("before", "after")}
    return entry
