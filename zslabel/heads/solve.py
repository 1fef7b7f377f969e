"""The MAP problem of a head and its solver: the zero-shot classifier a head starts from
(``ZeroShot``), a fit's result (``FitResult``), the L2-SP loss and gradient in the reduced basis
(``_Problem``), the preconditioned L-BFGS solve (``_solve``), the principal basis (``_basis``) and
the temperature-scaled held-out NLL (``_tempered_nll``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .head import SOFTMAX

# Rows of embeddings per chunk where a chunk is (rows, D), and logits per chunk where it is
# (rows, C) (``_chunk_rows``): 2**21 float32 logits are 8 MB, so the loss's two (rows, C) buffers
# stay small and cache-friendly at any C (8,192 rows x 1,000 labels were 2 x 33 MB; the time per
# logit was the same from 256 to 8,192 rows).
CHUNK = 8192
CHUNK_CELLS = 2 ** 21
# Iterations of one L-BFGS solve inside the cross-validation: ranking strengths needs the held-out
# NLL to ~1e-3, not the optimum to 1e-7, and the path warm-starts each solve from the last.
CV_MAX_ITER = 20
# Weight of the distillation term that keeps, on every sample image, the zero-shot split of the
# probability between labels with and without examples (``_Problem``; the ``zslabel.heads``
# docstring). Large on purpose: the term stands for a constraint (the head only re-ranks the
# labels it saw), not for a trade-off. On 16 random halves of the shapes model's labels (seeds
# 0-15, with the stacking offset) the unexampled half's worst change of top-1 vs zero-shot was
# -4.4 points with weight 1 (LwF's default), -2.1 with 10, -1.3 with 30 and -0.8 with 100 (-10.6
# without the term); the labels with examples gained 6.3, 5.9, 5.7 and 5.5 points on average
# (7.3 without).
DISTILL_WEIGHT = 100.0


def _chunk_rows(c: int) -> int:
    """Rows per chunk of (rows, ``c``) logits: ``CHUNK_CELLS / c``, between 256 and ``CHUNK``."""
    return int(max(256, min(CHUNK, CHUNK_CELLS // max(1, c))))


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
        z = np.asarray(x, np.float32) @ self.weights.T
        z *= np.float32(self.scale)
        z += np.float32(self.bias)
        return z


@dataclass
class FitResult:
    """A fitted head's tensors and how it was chosen.

    Attributes:
        weights: (C, D) float32; bias: (C,) float32.
        params: ``lam`` (None = zero-shot won the cross-validation), ``rank``, ``energy_kept``,
            ``folds``, ``cv`` (``[{"lam", "nll"}]`` along the path; ``lam`` None is zero-shot),
            ``cv_rows``, ``active_labels``.
        low_rank: ``(q (D, r), a (C, r))`` float32 with ``scale * (weights - W0) = a @ q.T``, or None
            (zero-shot weights): lets ``delta_logits`` compute the head's change of the logits in
            ``r`` instead of ``D`` dimensions (``evaluate.fit_report`` measures several heads on
            one pass of zero-shot logits). Not saved in the head file.
    """

    weights: np.ndarray
    bias: np.ndarray
    params: dict[str, Any]
    low_rank: tuple[np.ndarray, np.ndarray] | None = None

    def delta_logits(self, x: np.ndarray, zs: ZeroShot) -> np.ndarray:
        """(n, D) -> (n, C) float32: the head's logits minus ``zs``'s (same ``x``)."""
        out = np.broadcast_to(self.bias - np.float32(zs.bias), (len(x), len(self.bias))).copy()
        x = np.asarray(x, np.float32)
        if self.low_rank is not None:
            q, a = self.low_rank
            out += (x @ q) @ a.T
        elif self.weights is not zs.weights and not np.array_equal(self.weights, zs.weights):
            out += np.float32(zs.scale) * (x @ (self.weights - zs.weights).T)   # made without fit_head
        return out


class _Problem:
    """The MAP problem on one set of rows, in the reduced basis (``zslabel.heads`` docstring).

    ``u`` (N, r + 1) = ``[X @ Q, 1]``, ``z0`` (N, Ca) float32 zero-shot logits of the active labels
    (used in place, not copied, when given float32), ``t`` (N,) the active-label index of each
    row's truth. Parameters ``theta`` (Ca, r + 1): the change of the logits per unit of ``X @ Q``
    (``scale * dW @ Q``) and the bias change, so the logits are ``z0 + u @ theta.T``.

    ``zu`` (N,), softmax only: the log-sum-exp of the zero-shot logits of the labels without
    examples. With it the loss adds, per row, ``DISTILL_WEIGHT`` times the binary cross-entropy
    between the zero-shot probability ``q0`` of "a label without examples" and the head's ``q``,
    ``q = sigmoid(zu - logsumexp(active logits))`` (the distillation of Li & Hoiem, "Learning
    without Forgetting", TPAMI 2018, applied to that two-way split): the head may re-rank the
    labels it saw but not take probability away from the others. Its gradient by the active
    logits is ``DISTILL_WEIGHT * (q0 - q) * softmax(active logits)``.
    """

    def __init__(self, u: np.ndarray, z0: np.ndarray, t: np.ndarray, score_kind: str, trained: bool = False,
                 zu: np.ndarray | None = None):
        import torch

        u = np.asarray(u, np.float32)
        self.u = torch.from_numpy(np.concatenate([u, np.ones((len(u), 1), np.float32)], axis=1))
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
        self.step = _chunk_rows(self.z0.shape[1])
        self.zu: torch.Tensor | None = None
        self.q0: torch.Tensor | None = None
        if zu is not None and score_kind == SOFTMAX:
            self.zu = torch.from_numpy(np.ascontiguousarray(zu, np.float32))
            q0 = []
            for s in range(0, self.n, self.step):
                z = self.z0[s:s + self.step]
                if self.mask is not None:
                    z = z.masked_fill(~self.mask, float("-inf"))
                q0.append(torch.sigmoid(self.zu[s:s + self.step] - torch.logsumexp(z, dim=1)))
            self.q0 = torch.cat(q0) if q0 else torch.zeros(0)

    def loss_grad(self, theta, lam: float, want_grad: bool = True):
        """Sum of the data loss over rows plus ``lam / 2 * ||theta||^2``; gradient by hand, in chunks.

        Per chunk: one matrix product for the logits, one fused log-softmax, its exponential in
        place (the softmax), one matrix product for the gradient: (chunk, Ca) float32 twice at most.
        """
        import torch

        total = 0.0
        grad = torch.zeros_like(theta) if want_grad else None
        for s in range(0, self.n, self.step):
            u = self.u[s:s + self.step]
            z = torch.addmm(self.z0[s:s + self.step], u, theta.T)
            if self.offset is not None:
                z += self.offset
            t = self.t[s:s + self.step]
            rows = torch.arange(len(t))
            if self.kind == SOFTMAX:
                if self.mask is not None:
                    z.masked_fill_(~self.mask, float("-inf"))
                ls = torch.log_softmax(z, dim=1)
                lt = ls[rows, t]
                total -= float(lt.double().sum())
                if self.zu is not None and self.q0 is not None:
                    q0 = self.q0[s:s + self.step]
                    sd = self.zu[s:s + self.step] - (z[rows, t] - lt)        # zu - logsumexp(active logits)
                    sp = torch.nn.functional.softplus
                    total += DISTILL_WEIGHT * float((q0 * sp(-sd) + (1 - q0) * sp(sd)).double().sum())
                del z
                if grad is not None:
                    g = ls.exp_()
                    if self.zu is not None:
                        g *= (1.0 + DISTILL_WEIGHT * (q0 - torch.sigmoid(sd)))[:, None]
                    g[rows, t] -= 1.0
            else:
                y = torch.zeros_like(z)
                y[rows, t] = 1.0
                pair = torch.nn.functional.softplus(z) - y * z
                if self.mask is not None:
                    pair = pair * self.mask
                total += float(pair.double().sum())
                if grad is not None:
                    g = torch.sigmoid(z) - y
                    if self.mask is not None:
                        g = g * self.mask
            if grad is not None:
                grad.addmm_(g.T, u)
        total += 0.5 * lam * float((theta.double() ** 2).sum())
        if grad is not None:
            grad += lam * theta
        return total, grad

    def logits(self, theta):
        """(N, C) float32 torch logits of the rows under ``theta`` (without ``offset``)."""
        import torch

        return torch.cat([torch.addmm(self.z0[s:s + self.step], self.u[s:s + self.step], theta.T)
                          for s in range(0, self.n, self.step)])

    def tempered_nll(self, theta) -> float:
        """Held-out criterion of softmax heads: the mean NLL after the best temperature for these
        rows (``_tempered_nll``), so a strength is judged by how it ranks labels, not by how it
        rescales confidence. Without this, a zero-shot model far from calibrated (ECE 0.5 on a
        synthetic test) let a weak prior win the NLL by sharpening alone while its top-1 fell
        from 0.98 to 0.90."""
        z = self.logits(theta)
        if self.offset is not None:
            z += self.offset
        return _tempered_nll(z, self.t)

    def mean_nll(self, theta) -> float:
        """Held-out criterion: mean over rows of the data loss (softmax: cross-entropy over the
        active labels; sigmoid: mean binary cross-entropy per label)."""
        total, _ = self.loss_grad(theta, 0.0, want_grad=False)
        per = self.n if self.kind == SOFTMAX else self.n * self.z0.shape[1]
        return total / max(1, per)


def _tempered_nll(z, t, log_range: tuple[float, float] = (-3.0, 3.0), iters: int = 30) -> float:
    """``min over T`` of the mean NLL of ``softmax(z / T)`` (Guo et al. 2017, sec. 4.2, as
    ``calibration.fit_temperature``, same range of ``T``: 1e-3 .. 1e3).

    The NLL is convex in ``b = 1 / T``, with derivatives ``mean(E_p[z] - z_t)`` and
    ``mean(Var_p[z])`` under ``p = softmax(b z)``; Newton's method on ``b``, kept inside a bracket
    that each derivative's sign shrinks (bisection in ``log b`` when a step leaves it), converges
    in about 5 passes over ``z`` where golden-section search took 30.

    Args:
        z: (n, C) float32 torch logits (finite); t: (n,) int64 torch true label indices.

    Returns:
        The minimal mean NLL (float).
    """
    import torch

    rows = torch.arange(len(t))
    zt = z[rows, t].double()
    lo, hi = 10.0 ** log_range[0], 10.0 ** log_range[1]
    b = 1.0

    def nll(b: float) -> float:
        return float((torch.logsumexp(z * b, dim=1).double() - b * zt).mean())

    for _ in range(iters):
        p = torch.softmax(z * b, dim=1)
        ez = (p * z).sum(dim=1).double()
        d1 = float((ez - zt).mean())
        d2 = float(((p * z * z).sum(dim=1).double() - ez ** 2).clamp(min=0).mean())
        if d1 == 0:
            break
        if d1 > 0:
            hi = b
        else:
            lo = b
        step = b - d1 / d2 if d2 > 0 else -1.0
        new = step if lo < step < hi else float(np.sqrt(lo * hi))
        if abs(new - b) <= 1e-6 * b or hi - lo <= 1e-9 * hi:
            b = new
            break
        b = new
    return nll(b)


def _solve(problem: _Problem, lam: float, theta0, max_iter: int = 100, tol: float = 1e-7):
    """L-BFGS minimiser of ``problem.loss_grad(., lam)`` from ``theta0`` (warm start); stops after
    ``max_iter`` iterations or once an iteration changes the mean objective (or a preconditioned
    parameter) by less than ``tol``.

    Preconditioned by a change of variables: in the principal basis ``u.T @ u`` is diagonal
    (its column energies ``e_j``), so the objective's curvature along column ``j`` is about
    ``h * e_j + lam`` (``h`` <= 1/4 bounds ``p (1 - p)``); optimising ``phi = theta * sqrt(h e + lam)``
    makes it near-isotropic, which cuts L-BFGS iterations several-fold at weak strengths
    (the minimiser is the same).
    """
    import torch

    n = max(1, problem.n)
    energy = (problem.u.double() ** 2).sum(dim=0)     # the last column (the bias) has energy n
    precond = (1.0 / torch.sqrt((0.25 * energy + lam) / n)).float()        # (r + 1,)
    phi = (theta0 / precond).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([phi], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=1e-5,
                            tolerance_change=tol, line_search_fn="strong_wolfe")

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
    dropped (numerical rank).

    ``x.T @ x`` is summed in float64 over float32 products of ``CHUNK`` rows: no float64 copy of
    ``x`` (it was the fit's largest temporary) and a float32 matrix product, while the sum over
    many rows keeps float64's precision."""
    d = x.shape[1]
    g = np.zeros((d, d), np.float64)
    for s in range(0, len(x), CHUNK):
        c = np.asarray(x[s:s + CHUNK], np.float32)
        g += c.T @ c
    vals, vecs = np.linalg.eigh(g)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    top = vals[0] if len(vals) and vals[0] > 0 else 1.0
    r = int(min(max_rank, (vals > 1e-6 * top).sum()))
    r = max(r, 1)
    kept = float(vals[:r].clip(min=0).sum() / max(vals.clip(min=0).sum(), 1e-300))
    return np.ascontiguousarray(vecs[:, :r], np.float32), r, kept


def _head_logits(res: FitResult, zs: ZeroShot):
    w, b, s = res.weights, res.bias, np.float32(zs.scale)
    return lambda x: (s * (np.asarray(x, np.float32) @ w.T) + b).astype(np.float32)
