"""The MAP problem of a head and its solver: the zero-shot classifier a head starts from
(``ZeroShot``), a fit's result (``FitResult``), the L2-SP loss and gradient in the reduced basis
(``_Problem``), the preconditioned L-BFGS solve (``_solve``) and the principal basis (``_basis``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .head import SOFTMAX

CHUNK = 8192
# Iterations of one L-BFGS solve inside the cross-validation: ranking strengths needs the held-out
# NLL to ~1e-3, not the optimum to 1e-7, and the path warm-starts each solve from the last.
CV_MAX_ITER = 20


@dataclass
class ZeroShot:
    """The zero-shot classifier a head starts from.

    Attributes:
        weights: (C, D) float32 L2-normalised label embeddings (``labels.build_label_set``).
        scale: exponentiated logit scale; bias: SigLIP's logit bias (0 for CLIP).
        score_kind: ``"softmax"`` or ``"sigmoid"``.
    """

    weights: np.ndarray
    scale: float
    bias: float
    score_kind: str

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, C) float32 zero-shot logits (``ranking.zero_shot_logits``)."""
        return (np.float32(self.scale) * (np.asarray(x, np.float32) @ self.weights.T)
                + np.float32(self.bias)).astype(np.float32)


@dataclass
class FitResult:
    """A fitted head's tensors and how it was chosen.

    Attributes:
        weights: (C, D) float32; bias: (C,) float32.
        params: ``lam`` (None = zero-shot won the cross-validation), ``rank``, ``energy_kept``,
            ``folds``, ``cv`` (``[{"lam", "nll"}]`` along the path; ``lam`` None is zero-shot),
            ``cv_rows``, ``active_labels``.
    """

    weights: np.ndarray
    bias: np.ndarray
    params: dict[str, Any]


class _Problem:
    """The MAP problem on one set of rows, in the reduced basis (``zslabel.heads`` docstring).

    ``u`` (N, r) = X @ Q, ``z0`` (N, Ca) zero-shot logits of the active labels, ``t`` (N,) the
    active-label index of each row's truth. Parameters ``theta`` (Ca, r + 1): the change of the
    logits per unit of ``u`` (``scale * dW @ Q``) and the bias change.
    """

    def __init__(self, u: np.ndarray, z0: np.ndarray, t: np.ndarray, score_kind: str, trained: bool = False):
        import torch

        self.u = torch.from_numpy(np.ascontiguousarray(u, np.float32))
        self.z0 = torch.from_numpy(np.ascontiguousarray(z0, np.float32))
        self.t = torch.from_numpy(np.asarray(t, np.int64))
        self.kind = score_kind
        self.n = len(t)
        # A training problem (a cross-validation fold) ignores the columns of labels without rows in
        # it, as the whole fit ignores labels without examples: their logits are masked out of the
        # loss (so their parameters get no gradient and stay at zero-shot).
        self.mask: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None      # (C,) added to the logits when scoring held-out rows (stacking)
        if trained:
            has = np.zeros(z0.shape[1], bool)
            has[np.asarray(t, np.int64)] = True
            if not has.all():
                self.mask = torch.from_numpy(has)

    def loss_grad(self, theta, lam: float, want_grad: bool = True):
        """Sum of the data loss over rows plus ``lam / 2 * ||theta||^2``; gradient by hand, in chunks."""
        import torch

        a, b = theta[:, :-1], theta[:, -1]
        total = 0.0
        grad = torch.zeros_like(theta) if want_grad else None
        for s in range(0, self.n, CHUNK):
            u = self.u[s:s + CHUNK]
            z = torch.addmm(self.z0[s:s + CHUNK] + b, u, a.T)
            if self.offset is not None:
                z = z + self.offset
            t = self.t[s:s + CHUNK]
            rows = torch.arange(len(t))
            if self.mask is not None and self.kind == SOFTMAX:
                z = z.masked_fill(~self.mask, float("-inf"))
            if self.kind == SOFTMAX:
                lse = torch.logsumexp(z, dim=1)
                total += float((lse - z[rows, t]).double().sum())
                if want_grad:
                    g = torch.exp(z - lse[:, None])
                    g[rows, t] -= 1.0
            else:
                y = torch.zeros_like(z)
                y[rows, t] = 1.0
                pair = torch.nn.functional.softplus(z) - y * z
                if self.mask is not None:
                    pair = pair * self.mask
                total += float(pair.double().sum())
                if want_grad:
                    g = torch.sigmoid(z) - y
                    if self.mask is not None:
                        g = g * self.mask
            if grad is not None:    # want_grad
                grad[:, :-1] += g.T @ u
                grad[:, -1] += g.sum(dim=0)
        total += 0.5 * lam * float((theta.double() ** 2).sum())
        if grad is not None:
            grad += lam * theta
        return total, grad

    def logits(self, theta) -> np.ndarray:
        """(N, C) float32 logits of the rows under ``theta`` (without ``offset``)."""
        import torch

        a, b = theta[:, :-1], theta[:, -1]
        return torch.cat([torch.addmm(self.z0[s:s + CHUNK] + b, self.u[s:s + CHUNK], a.T)
                          for s in range(0, self.n, CHUNK)]).numpy()

    def tempered_nll(self, theta) -> float:
        """Held-out criterion of softmax heads: the mean NLL after the best temperature for these
        rows (``calibration.fit_temperature``, 30 golden-section steps), so a strength is judged by
        how it ranks labels, not by how it rescales confidence. Without this, a zero-shot model
        far from calibrated (ECE 0.5 on a synthetic test) let a weak prior win the NLL by
        sharpening alone while its top-1 fell from 0.98 to 0.90."""
        from ..calibration import _softmax_nll, fit_temperature

        z = self.logits(theta).astype(np.float64)
        if self.offset is not None:
            z = z + self.offset.numpy()
        t = self.t.numpy()
        return _softmax_nll(z / fit_temperature(z, t, iters=30), t)

    def mean_nll(self, theta) -> float:
        """Held-out criterion: mean over rows of the data loss (softmax: cross-entropy over the
        active labels; sigmoid: mean binary cross-entropy per label)."""
        total, _ = self.loss_grad(theta, 0.0, want_grad=False)
        per = self.n if self.kind == SOFTMAX else self.n * self.z0.shape[1]
        return total / max(1, per)


def _solve(problem: _Problem, lam: float, theta0, max_iter: int = 100):
    """L-BFGS minimiser of ``problem.loss_grad(., lam)`` from ``theta0`` (warm start).

    Preconditioned by a change of variables: in the principal basis ``u.T @ u`` is diagonal
    (its column energies ``e_j``), so the objective's curvature along column ``j`` is about
    ``h * e_j + lam`` (``h`` <= 1/4 bounds ``p (1 - p)``); optimising ``phi = theta * sqrt(h e + lam)``
    makes it near-isotropic, which cuts L-BFGS iterations several-fold at weak strengths
    (the minimiser is the same).
    """
    import torch

    n = max(1, problem.n)
    energy = torch.cat([(problem.u.double() ** 2).sum(dim=0), torch.tensor([float(n)], dtype=torch.float64)])
    precond = (1.0 / torch.sqrt((0.25 * energy + lam) / n)).float()        # (r + 1,)
    phi = (theta0 / precond).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([phi], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=1e-5,
                            tolerance_change=1e-7, line_search_fn="strong_wolfe")

    def closure():
        with torch.no_grad():
            value, grad = problem.loss_grad(phi.detach() * precond, lam)
        phi.grad = grad * precond / n   # mean objective: tolerances independent of the sample size
        return torch.tensor(value / n, dtype=torch.float64)

    opt.step(closure)
    return (phi.detach() * precond).contiguous()


def _basis(x: np.ndarray, max_rank: int) -> tuple[np.ndarray, int, float]:
    """Top principal directions of ``x`` (uncentred: eigenvectors of ``x.T @ x``): ``(Q (D, r),
    r, share of the energy kept)``; directions with eigenvalue below 1e-6 of the largest are
    dropped (numerical rank)."""
    g = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
    vals, vecs = np.linalg.eigh(g)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    top = vals[0] if len(vals) and vals[0] > 0 else 1.0
    r = int(min(max_rank, (vals > 1e-6 * top).sum()))
    r = max(r, 1)
    kept = float(vals[:r].clip(min=0).sum() / max(vals.clip(min=0).sum(), 1e-300))
    return vecs[:, :r].astype(np.float32), r, kept


def _head_logits(res: FitResult, zs: ZeroShot):
    w, b, s = res.weights, res.bias, np.float32(zs.scale)
    return lambda x: (s * (np.asarray(x, np.float32) @ w.T) + b).astype(np.float32)
