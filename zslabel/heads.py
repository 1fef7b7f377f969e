"""Few-shot heads: a linear classifier over a run's label set, fitted on stored image embeddings
with known labels, started from the zero-shot classifier and pulled toward it.

Pure numpy/torch, no Ray. The maths of ``zslabel fit`` (``fit.py``) and of ``--head`` on
``label``/``relabel``.

The model (a head)
------------------

    logits = scale * image_embeds @ weights.T + bias       image_embeds (N, D) L2-normalised
    scores = softmax(logits) (CLIP, "softmax") or sigmoid(logits) (SigLIP, "sigmoid")

The zero-shot classifier is the head ``weights = W0`` (the (C, D) L2-normalised label
embeddings), ``scale = exp(logit_scale)``, ``bias = logit_bias`` (0 for CLIP). ``ranking``'s
``zero_shot_logits`` is exactly this product, so a head slots in where the zero-shot logits were.

The method: a linear probe with a Gaussian prior centred on the zero-shot weights
--------------------------------------------------------------------------------

We fit ``weights = W0 + dW`` and ``bias = b0 + db`` by maximum a posteriori with an isotropic
Gaussian prior centred on the zero-shot classifier:

    minimise   sum_i loss(logits_i, y_i)  +  lam / 2 * (||scale * dW||_F^2 + ||db||^2)

``loss`` is the cross-entropy of the softmax (softmax models) or the sum over labels of the
binary cross-entropy of each label's sigmoid (sigmoid models: positives are a label's examples,
negatives every other example), so a SigLIP head stays a per-label multi-label classifier.

This is the "L2-SP" regulariser of Li, Grandvalet & Davoine (ICML 2018, "Explicit inductive bias
for transfer learning with convolutional networks": an L2 penalty toward the starting point
instead of toward 0) applied to the zero-shot-initialised linear probe of CLAP (Silva-Rodriguez,
Hajimaleki, Ben Ayed & Dolz, CVPR 2024, "A Closer Look at the Few-Shot Adaptation of Large
Vision-Language Models", eq. 5-6: a linear probe initialised with the class text embeddings and
penalised by its squared distance to them). Why this one, over WiSE-FT interpolation, Tip-Adapter-F
or LP++: it is the only one of them that is one convex problem whose two ends are exactly what
we promise, ``lam -> inf`` gives the zero-shot classifier (so with one example per label the
fit can only come out at zero-shot or where cross-validation measured it better) and
``lam -> 0`` gives the plain linear probe (so with many examples it approaches it); and it has a
single strength, which we can choose by cross-validation on the sample itself. CLAP sets its
(class-wise) strengths by an augmented Lagrangian instead, to avoid a validation set; we use
stratified k-fold cross-validation, which the issue asks for, and one global strength (with 1-2
examples per label, per-label strengths cannot be estimated). WiSE-FT (Wortsman et al. CVPR 2022)
interpolates the weights of a separately fitted probe, a path that is not the MAP of any prior
and whose end point still needs its own regularisation; Tip-Adapter-F (Zhang et al. ECCV 2022)
and LP++ (Huang et al. CVPR 2024) add a cache/visual-prototype branch whose size grows with the
examples, and LP++'s text-blending weights are not anchored to zero-shot.

The penalty is on ``scale * dW`` (the change of the logits per unit of embedding) and ``db`` in
logit units, so ``lam`` does not depend on the model's logit scale; it is a *sum* over examples,
a fixed prior precision, so the best ``lam`` depends little on the sample size and a ``lam``
chosen by cross-validation on a subsample carries to the whole sample.

Details that make the promises hold:

- Labels without examples keep their zero-shot weights (``dW_c = 0``): they are not
  parameters. With softmax scores they share one bias offset ``gamma >= 0``, the
  calibrated-stacking offset of generalised zero-shot learning (``stacking_offset``): a head
  sharpens the labels it saw, and without the offset those take images of the others. ``gamma``
  is set so that the head sends as many sample images to unexampled labels as zero-shot did,
  and the cross-validation scores each strength with its own offset.
- The softmax of the loss runs over the labels that have examples ("active" labels). With every
  label active this is the plain cross-entropy; with some labels never seen, the fit never
  learns "that unseen label is wrong for every image" (no image of it is in the sample), which
  would otherwise push probability away from them. At prediction time the softmax is over all C.
- Only the span of the sample's embeddings matters: at the optimum
  ``lam * scale * dW = -scale * G.T @ X`` (G: (N, C) gradient of the loss by the logits), so
  ``dW`` lies in the row space of ``X``. We solve in the top ``rank`` principal directions of
  ``X`` (eigenvectors of ``X.T @ X``): exact when ``rank`` >= rank(X) (a few shots, or ``D`` <=
  ``max_rank``); with more distinct examples than ``max_rank`` dimensions it restricts ``dW`` to
  the ``max_rank`` directions that carry the most of the sample's energy (the share kept is
  recorded in ``params["energy_kept"]``). Working in ``rank`` dimensions with the zero-shot
  logits precomputed makes each pass over the sample ``D / rank`` times cheaper.
- The strength ``lam`` is chosen by stratified k-fold cross-validation (``cross_validate``):
  a path of strengths from strong to weak, each fold warm-started from its previous solution,
  scored by the held-out negative log-likelihood (softmax: cross-entropy over all labels after
  the best temperature for the held-out rows, so confidence scaling alone wins nothing; sigmoid:
  mean binary cross-entropy), with zero-shot itself (``lam = inf``) as a candidate. The
  smallest mean held-out NLL wins; the path stops once the NLL has risen ``PATIENCE`` times in a
  row past its best.
- The solver is L-BFGS (``torch.optim.LBFGS`` with a strong-Wolfe line search) on the
  ``(active labels, rank + 1)`` parameters; the loss and its gradient are computed by hand in
  row chunks (``CHUNK`` rows), so memory is the sample plus its zero-shot logits plus one chunk.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, InputError

FORMAT = "zslabel-head"
VERSION = 1
METHOD = "zero-shot-prior linear probe (L2-SP toward the zero-shot weights; CLAP-style init), lam by k-fold CV"
SOFTMAX, SIGMOID = "softmax", "sigmoid"
# Candidate strengths, strong to weak (logit units, a sum over examples: see the module docstring).
LAMBDAS = tuple(float(v) for v in 10.0 ** np.arange(3.0, -2.01, -0.5))
# Iterations of one L-BFGS solve inside the cross-validation: ranking strengths needs the held-out
# NLL to ~1e-3, not the optimum to 1e-7, and the path warm-starts each solve from the last.
CV_MAX_ITER = 20
PATIENCE = 2
FOLDS = 5
MAX_RANK = 64
# Rows of the sample used for cross-validation at most, per label; beyond it the strength is chosen
# on a stratified subsample (the prior precision carries, see the docstring) to bound the cost.
CV_PER_LABEL = 16
# ... and at most this many rows in all (C = 1,000 labels: 4 per label): the cross-validation costs
# rows x labels x rank per evaluation, so without a total cap it grew with C squared.
CV_MAX_ROWS = 4096
# Above this many examples the head fitted on the fit split is the one saved (no refit on every
# example): the held-out 30% then add little, and a refit of 100,000 x 1,000 costs a minute.
REFIT_MAX_ROWS = 20_000
LARGE_CV = 1_000_000
CHUNK = 8192
SHOTS = (1, 2, 4, 8, 16)
TOP_K = 5
WORST = 10


# ---------------------------------------------------------------------------------------------
# the head


@dataclass
class Head:
    """A fitted linear head, as saved to / loaded from a file.

    Attributes:
        weights: (C, D) float32. bias: (C,) float32. scale: float, the exponentiated logit scale.
        score_kind: ``"softmax"`` or ``"sigmoid"`` (the model's).
        labels: the C label names in the run's order; templates: the run's prompt templates.
        checkpoint_digest: ``model.checkpoint_digest`` of the checkpoint whose label embeddings
            the head started from (and whose image embeddings it reads).
        model: model id (informational). method: the fitting method. params: its parameters
            (``lam``, ``rank``, the cross-validation table, ...). fit: facts and metrics of the fit.
        id: sha256 (16 hex digits) of everything else (tensors by their bytes, the rest as
            canonical JSON); set by ``compute_id``/``save``, checked by ``load_head``.
    """

    weights: np.ndarray
    bias: np.ndarray
    scale: float
    score_kind: str
    labels: list[str]
    templates: list[str]
    checkpoint_digest: str
    model: str | None = None
    method: str = METHOD
    params: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def logits(self, image_embeddings):
        """(N, D) L2-normalised image embeddings -> (N, C) float32 logits,
        ``scale * image_embeddings @ weights.T + bias``.

        Args:
            image_embeddings: a numpy array or a torch tensor (any device and float dtype; computed
                in float32, on the tensor's device: the weights are moved there once and kept).

        Returns:
            The same kind of array (numpy in, numpy out; tensor in, tensor on its device out).
        """
        if isinstance(image_embeddings, np.ndarray):
            x = np.asarray(image_embeddings, np.float32)
            return (np.float32(self.scale) * (x @ self.weights.T) + self.bias).astype(np.float32)

        w, b = self._on(image_embeddings.device)
        return float(self.scale) * (image_embeddings.float() @ w.T) + b

    def _on(self, device):
        import torch

        cache = self.__dict__.setdefault("_device_cache", {})
        key = str(device)
        if key not in cache:
            cache[key] = (torch.from_numpy(np.ascontiguousarray(self.weights, np.float32)).to(device),
                          torch.from_numpy(np.ascontiguousarray(self.bias, np.float32)).to(device))
        return cache[key]

    def __getstate__(self):  # pickled to Ray actors: without tensors cached on a device
        state = dict(self.__dict__)
        state.pop("_device_cache", None)
        return state

    # ---- identity and serialisation ---------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors and ``id``, JSON-able."""
        return json.loads(json.dumps({
            "format": FORMAT, "version": VERSION, "score_kind": self.score_kind, "scale": float(self.scale),
            "labels": list(self.labels), "templates": list(self.templates),
            "checkpoint_digest": self.checkpoint_digest, "model": self.model, "method": self.method,
            "params": self.params, "fit": self.fit, "shape": list(self.weights.shape)}))

    def compute_id(self) -> str:
        """sha256 of the weights' and bias' float32 bytes and the canonical JSON of ``metadata()``,
        first 16 hex digits."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.weights, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.bias, np.float32).tobytes())
        h.update(json.dumps(self.metadata(), sort_keys=True, separators=(",", ":")).encode())
        return h.hexdigest()[:16]

    def to_bytes(self) -> bytes:
        """A safetensors file: tensors ``weights`` (C, D) and ``bias`` (C,) float32, and the
        metadata plus ``id`` as JSON under the header's ``__metadata__["zslabel"]``."""
        from safetensors.numpy import save

        self.id = self.compute_id()
        meta = {"zslabel": json.dumps({**self.metadata(), "id": self.id}, sort_keys=True)}
        return save({"weights": np.ascontiguousarray(self.weights, np.float32),
                     "bias": np.ascontiguousarray(self.bias, np.float32)}, metadata=meta)

    def save(self, path: str, storage_options: dict | None = None) -> str:
        """Write ``to_bytes()`` to a local path or fsspec URI (whole, then renamed where local);
        returns the id."""
        import fsspec

        data = self.to_bytes()
        with fsspec.open(path, "wb", **(storage_options or {})) as fh:
            fh.write(data)
        return self.id

    # ---- checks -----------------------------------------------------------------------------
    def check_compatible(self, *, checkpoint_digest: str, labels: list[str], templates: list[str],
                         score_kind: str, dim: int | None = None, source: str = "the head") -> None:
        """Refuse to use this head for a run it was not fitted for.

        Raises:
            ConfigError: naming every difference (checkpoint digest, labels, templates, score kind,
                embedding size).
        """
        problems = []
        if checkpoint_digest != self.checkpoint_digest:
            problems.append(f"checkpoint digest {self.checkpoint_digest} (model {self.model!r}) vs this run's "
                            f"{checkpoint_digest}")
        if list(labels) != list(self.labels):
            added = [x for x in labels if x not in self.labels]
            removed = [x for x in self.labels if x not in labels]
            detail = ", ".join(filter(None, [f"run adds {added[:5]!r}" if added else "",
                                             f"run lacks {removed[:5]!r}" if removed else ""])) or "other order"
            problems.append(f"labels differ ({detail})")
        if list(templates) != list(self.templates):
            problems.append(f"templates {self.templates!r} vs this run's {list(templates)!r}")
        if score_kind != self.score_kind:
            problems.append(f"score kind {self.score_kind} vs this run's {score_kind}")
        if dim is not None and dim != self.weights.shape[1]:
            problems.append(f"embedding size {self.weights.shape[1]} vs this run's {dim}")
        if problems:
            raise ConfigError(f"{source} (id {self.id}) was fitted for another setup: " + "; ".join(problems)
                              + ". Fit one for this run with `zslabel fit`")


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then the JSON header.
    if len(data) < 8:
        raise ValueError("file too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header length beyond the file")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def load_head(path: str, storage_options: dict | None = None) -> Head:
    """Read and validate a head file written by ``Head.save``.

    Raises:
        ConfigError: unreadable, not a zslabel head, another version, tensors of the wrong shape or
            not finite, or an ``id`` that does not match the content (edited or damaged file).
    """
    import fsspec
    from safetensors.numpy import load

    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read head file {path}: {exc}") from exc
    try:
        meta = json.loads(_safetensors_metadata(data)["zslabel"])
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors/JSON raise several types for a bad file
        raise ConfigError(f"{path} is not a zslabel head file (a safetensors file from `zslabel fit`): "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a zslabel head file (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise ConfigError(f"head file {path} has version {meta.get('version')}; this zslabel reads {VERSION}")
    try:
        head = Head(weights=np.asarray(tensors["weights"], np.float32), bias=np.asarray(tensors["bias"], np.float32),
                    scale=float(meta["scale"]), score_kind=meta["score_kind"], labels=list(meta["labels"]),
                    templates=list(meta["templates"]), checkpoint_digest=meta["checkpoint_digest"],
                    model=meta.get("model"), method=meta.get("method", METHOD), params=dict(meta.get("params") or {}),
                    fit=dict(meta.get("fit") or {}), id=meta.get("id", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"head file {path} lacks {exc}") from exc
    c = len(head.labels)
    if head.weights.ndim != 2 or head.weights.shape[0] != c or head.bias.shape != (c,):
        raise ConfigError(f"head file {path}: weights {head.weights.shape} and bias {head.bias.shape} do not fit "
                          f"its {c} labels")
    if not (np.isfinite(head.weights).all() and np.isfinite(head.bias).all() and math.isfinite(head.scale)):
        raise ConfigError(f"head file {path}: weights, bias and scale must be finite")
    if head.score_kind not in (SOFTMAX, SIGMOID):
        raise ConfigError(f"head file {path}: unknown score kind {head.score_kind!r}")
    if head.id != head.compute_id():
        raise ConfigError(f"head file {path}: its id {head.id!r} does not match its content "
                          f"({head.compute_id()}); the file was edited or damaged")
    return head


def load_for_run(path: str | None, storage_options: dict | None, *, checkpoint_digest: str, labels: list[str],
                 templates: list[str], score_kind: str, dim: int | None = None) -> Head | None:
    """``--head FILE`` of a label/relabel run: loaded, validated and checked against the run's
    checkpoint digest, labels, templates, score kind (and embedding size); None without a file.

    Raises:
        ConfigError: as ``load_head`` and ``Head.check_compatible``.
    """
    if not path:
        return None
    head = load_head(path, storage_options)
    head.check_compatible(checkpoint_digest=checkpoint_digest, labels=labels, templates=templates,
                          score_kind=score_kind, dim=dim, source=f"head file {path}")
    return head


def manifest_entry(head: Head | None, path: str | None) -> dict[str, Any] | None:
    """What a run manifest records of its head: id, file, method, lam, rank, examples."""
    if head is None:
        return None
    return {"id": head.id, "file": path, "method": head.method, "lam": head.params.get("lam"),
            "rank": head.params.get("rank"), "examples": head.fit.get("examples"),
            "labels_with_examples": head.fit.get("labels_with_examples")}


# ---------------------------------------------------------------------------------------------
# metrics


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
    from .calibration import expected_calibration_error

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


# ---------------------------------------------------------------------------------------------
# fitting


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
    """The MAP problem on one set of rows, in the reduced basis (module docstring).

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
        self.mask = None
        self.offset = None      # (C,) added to the logits when scoring held-out rows (stacking)
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
            if want_grad:
                grad[:, :-1] += g.T @ u
                grad[:, -1] += g.sum(dim=0)
        total += 0.5 * lam * float((theta.double() ** 2).sum())
        if want_grad:
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
        from .calibration import _softmax_nll, fit_temperature

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


def check_sample(x: np.ndarray, y: np.ndarray, num_labels: int) -> None:
    """Refuse samples a head cannot be fitted on.

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
        which = "no label" if not len(y) else f"one label ({int(y[0])})"
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


# Work (rows x active labels x rank) below which the solver runs on one thread.
SMALL_WORK = 5e7


def fit_head(x: np.ndarray, y: np.ndarray, zs: ZeroShot, *, lambdas: tuple[float, ...] = LAMBDAS,
             folds: int = FOLDS, max_rank: int = MAX_RANK, cv_per_label: int = CV_PER_LABEL, seed: int = 0,
             lam: float | None = None, log=None) -> FitResult:
    """Fit a head on labeled embeddings (the method in the module docstring).

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
    z0 = (np.float32(zs.scale) * (x @ zs.weights[active].T) + np.float32(zs.bias)).astype(np.float32)
    t = remap[y]
    params: dict[str, Any] = {"rank": r, "energy_kept": kept, "active_labels": int(len(active)),
                              "lambdas": list(lambdas), "seed": seed}
    import os

    busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    with _torch_threads(1 if busy or len(y) * len(active) * r < SMALL_WORK else None):
        return _fit(x, y, zs, q, u, z0, t, active, params, lam, lambdas, folds, cv_per_label, seed, log, t0)


def _fit(x, y, zs, q, u, z0, t, active, params, lam, lambdas, folds, cv_per_label, seed, log, t0) -> FitResult:
    import torch

    c = zs.weights.shape[0]
    r = q.shape[1]
    if lam is None:
        # Cross-validation scores against all C labels (those without examples at zero-shot, as in
        # a run), on at most cv_per_label rows per label.
        per_label = max(1, min(cv_per_label, CV_MAX_ROWS // max(1, len(active)))) if cv_per_label else 0
        rows = per_label_subsample(y, per_label, seed) if per_label else np.arange(len(y))
        lam, cv = cross_validate(u[rows], zs.logits(x[rows]), y[rows], zs.score_kind, lambdas=lambdas, folds=folds,
                                 seed=seed, log=log)
        params.update(cv)
    params["lam"] = None if lam is None or math.isinf(lam) else float(lam)
    weights = zs.weights.copy()
    bias = np.full(c, zs.bias, np.float32)
    if params["lam"] is not None:
        problem = _Problem(u, z0, t, zs.score_kind)
        theta = torch.zeros((len(active), r + 1), dtype=torch.float32)
        # Warm start down a short path to the chosen strength (100x and 10x stronger first, a few
        # iterations each): from zero-shot straight at a weak strength L-BFGS needs many more
        # full passes; walking every grid point cost 5 of the 8 minutes at 100,000 x 1,000.
        for lv in (lam * 100, lam * 10):
            theta = _solve(problem, lv, theta, max_iter=CV_MAX_ITER)
        theta = _solve(problem, lam, theta)
        th = theta.numpy()
        weights[active] += (th[:, :-1] @ q.T) / np.float32(zs.scale)
        bias[active] += th[:, -1]
    unexampled = np.ones(c, bool)
    unexampled[active] = False
    params["unexampled_offset"] = 0.0
    if params["lam"] is not None and zs.score_kind == SOFTMAX and unexampled.any():
        z_head = _head_logits(FitResult(weights, bias, {}), zs)
        gamma = _offset_chunked(x, z_head, zs, unexampled)
        bias[unexampled] += np.float32(gamma)
        params["unexampled_offset"] = float(gamma)
    params["fit_seconds"] = time.perf_counter() - t0
    return FitResult(weights.astype(np.float32), bias.astype(np.float32), params)


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


def _offset_chunked(x, z_head, zs, unexampled) -> float:
    """``stacking_offset`` over a large sample, keeping only (N,) per-row quantities."""
    d, zs_unex = [], []
    for s in range(0, len(x), CHUNK):
        z, z0 = z_head(x[s:s + CHUNK]), zs.logits(x[s:s + CHUNK])
        d.append(z[:, ~unexampled].max(axis=1) - z[:, unexampled].max(axis=1))
        zs_unex.append(unexampled[z0.argmax(axis=1)])
    d, hit = np.sort(np.concatenate(d)), np.concatenate(zs_unex)
    k = int(math.ceil(hit.mean() * len(d) - 1e-9))
    return 0.0 if k == 0 else _just_above(d[k - 1])


def cross_validate(u: np.ndarray, z0: np.ndarray, t: np.ndarray, score_kind: str, *, lambdas, folds: int,
                   seed: int, log=None) -> tuple[float, dict[str, Any]]:
    """Choose the strength by stratified k-fold cross-validation (module docstring).

    Row folds (``stratified_folds``): each label's examples spread over ``k`` folds. Each fold's
    head is trained on the other folds (labels without rows there masked, as in the whole fit)
    and scored by the NLL of the held-out rows against all C labels (softmax: after the best
    temperature for them, ``_Problem.tempered_nll``). With softmax scores and
    labels without any example, the fold's head gets its calibrated-stacking offset
    (``stacking_offset``, from its own training rows) before scoring, as the final head does, so a
    weak strength that needs a large offset pays for it in the held-out NLL (images of labels with
    examples lost to the offset).

    Args:
        u: (N, r) reduced embeddings; z0: (N, C) zero-shot logits of all the run's labels; t: (N,)
            label index of each row.

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
    splits = []
    for f in range(k):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if len(te) and len(np.unique(t[tr])) >= 2:
            splits.append([_Problem(u[tr], z0[tr], t[tr], score_kind, trained=True),
                           _Problem(u[te], z0[te], t[te], score_kind), len(te),
                           torch.zeros((c, u.shape[1] + 1), dtype=torch.float32)])
    n_te = max(1, sum(sp[2] for sp in splits))

    def cv_loss() -> tuple[float, float]:
        total, offsets = 0.0, []
        for tr, te, m, th in splits:
            gamma = stacking_offset(tr.logits(th), tr.z0.numpy(), unexampled) if stacking else 0.0
            te.offset = torch.from_numpy((gamma * unexampled).astype(np.float32)) if gamma else None
            total += (te.tempered_nll(th) if score_kind == SOFTMAX else te.mean_nll(th)) * m
            offsets.append(gamma)
        return total / n_te, float(np.mean(offsets)) if offsets else 0.0

    nll0, _ = cv_loss()
    table = [{"lam": None, "nll": nll0, "offset": 0.0}]
    best_lam, best, rises = math.inf, nll0, 0
    for lv in lambdas:
        for sp in splits:
            sp[3] = _solve(sp[0], lv, sp[3], max_iter=CV_MAX_ITER)
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


# ---------------------------------------------------------------------------------------------
# the learning curve and the report


def head_from_fit(res: FitResult, zs: ZeroShot, **meta) -> Head:
    """A ``Head`` from a ``FitResult`` (``meta``: labels, templates, checkpoint_digest, model, fit)."""
    head = Head(weights=res.weights, bias=res.bias, scale=float(zs.scale), score_kind=zs.score_kind,
                params=res.params, **meta)
    head.id = head.compute_id()
    return head


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


def _head_logits(res: FitResult, zs: ZeroShot):
    w, b, s = res.weights, res.bias, np.float32(zs.scale)
    return lambda x: (s * (np.asarray(x, np.float32) @ w.T) + b).astype(np.float32)


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


def _lam(lam) -> str:
    return "inf (zero-shot won)" if lam is None else f"{lam:.3g}"


def report_text(head: Head, path: str | None = None) -> str:
    """Human summary of a fit: examples per label, held-out before/after, worst labels, curve."""
    f, p = head.fit, head.params
    counts = f.get("examples_per_label") or {}
    nonzero = [v for v in counts.values() if v]
    lines = [f"head {head.id} ({head.score_kind}, {len(head.labels)} labels): {head.method}",
             f"  examples: {f.get('examples')} over {f.get('labels_with_examples')} of {len(head.labels)} labels "
             f"(per label min {min(nonzero, default=0)}, median {int(np.median(nonzero)) if nonzero else 0}, "
             f"max {max(nonzero, default=0)}); labels without examples keep their zero-shot weights",
             f"  strength lam = {_lam(p.get('lam'))} by {p.get('folds')}-fold cross-validation on "
             f"{p.get('cv_rows')} examples; basis rank {p.get('rank')} (energy kept {p.get('energy_kept', 0):.4f})"]
    few = sorted(((v, k) for k, v in counts.items() if v), key=lambda t: (t[0], t[1]))[:5]
    if few:
        lines.append("  fewest examples: " + ", ".join(f"{k} {v}" for v, k in few))
    m = f.get("metrics") or {}
    if m.get("after"):
        lines.append(f"  held out ({m['after']['n']} images, fit on {f.get('fit_examples')}):"
                     f"{'':4}{'top-1':>7} {'top-5':>7} {'ECE':>7} {'NLL':>7}")
        for k in ("before", "after"):
            v = m[k]
            name = "zero-shot" if k == "before" else "head"
            lines.append(f"    {name:<34}{v['top1']:>7.3f} {v['top5']:>7.3f} {v['ece']:>7.4f} {v['nll']:>7.4f}")
    else:
        lines.append("  no held-out images (--holdout 0 or too few examples): nothing measured")
    if f.get("worst_labels"):
        lines.append("  worst labels (held-out top-1 after / before): " + ", ".join(
            f"{w['label']} {w['top1_after']:.2f}/{w['top1_before']:.2f} (n={w['held_out']})"
            for w in f["worst_labels"]))
    if f.get("learning_curve"):
        lines.append(f"  learning curve (held out): {'per label':>9} {'examples':>8} {'top-1':>7} {'top-5':>7} "
                     f"{'ECE':>7}  lam")
        zs = f["learning_curve"][0]
        lines.append(f"    {'zero-shot':<24}{'0':>9} {'0':>8} {zs['zero_shot_top1']:>7.3f} {zs['zero_shot_top5']:>7.3f} "
                     f"{zs['zero_shot_ece']:>7.4f}")
        for row in f["learning_curve"]:
            lines.append(f"    {'head':<24}{row['shots']:>9} {row['examples']:>8} {row['top1']:>7.3f} "
                         f"{row['top5']:>7.3f} {row['ece']:>7.4f}  {_lam(row['lam'])}")
    if path:
        lines.append(f"  written to {path}")
    return "\n".join(lines)


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
