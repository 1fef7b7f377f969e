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
  parameters. With softmax scores two things keep the head from taking their images:

  * a distillation term (Li & Hoiem, "Learning without Forgetting", TPAMI 2018) on the split of
    probability between the labels with examples and those without: per sample image, with
    ``q0`` and ``q`` the zero-shot's and the head's probability of "a label without examples",
    ``DISTILL_WEIGHT * (-q0 log q - (1 - q0) log(1 - q))`` joins the loss (``_Problem``). The head
    may then re-rank the labels it saw but not move probability from the others to them on any
    sample image. Without it a head learns whatever tells the labels it saw apart, e.g. "blue"
    for the only blue label with examples, and takes the images of the other blue labels: on 16
    random halves of the shapes model's labels the unexampled half lost up to 10.6 points of top-1
    (6 halves lost more than 2); with it the worst lost 0.8;
  * one shared bias offset ``gamma >= 0``, the calibrated-stacking offset of generalised
    zero-shot learning (``stacking_offset``): ``gamma`` is set so that the head sends as many
    sample images to unexampled labels as zero-shot did (arg-max decisions, which the
    probability split above does not pin down), and the cross-validation scores each strength
    with its own offset.
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
  row chunks (``CHUNK_CELLS`` logits: two matrix products and one fused log-softmax per chunk), so
  memory is the sample plus its zero-shot logits plus one chunk. On large samples the final
  solve starts on stratified subsamples at the same prior per row (``fitting._solve_path``), so
  the whole sample needs few passes, and stops once an iteration changes the mean objective by
  less than ``FINAL_TOL``.
- Cost at scale (``fit_report``): the zero-shot logits of the fit rows are computed once and
  shared by the main fit and the learning curve; learning-curve points with at least as many
  examples per label as the main cross-validation's subsample take the main fit's strength
  (their own cross-validation would run on an equally large subsample of the same rows); one
  pass over the held-out rows measures zero-shot and every head (each head's logits are the
  zero-shot ones plus a rank-``r`` change, ``FitResult.delta_logits``).

Modules
-------

- ``head.py``: the ``Head`` dataclass, its logits, id and safetensors file format; ``load_head``,
  ``load_for_run`` (``--head FILE``), ``manifest_entry``.
- ``solve.py``: ``ZeroShot``, ``FitResult``, the MAP problem in the reduced basis and its L-BFGS solver.
- ``cv.py``: stratified folds and subsamples, the held-out split, the stacking offset, the
  cross-validation of the strength.
- ``fitting.py``: ``check_sample``, ``fit_head``, ``head_from_fit``.
- ``evaluate.py``: held-out metrics, the learning curve, ``fit_report`` (the whole ``zslabel fit``).
- ``report.py``: ``report_text``.

Every name below is re-exported here, so ``from zslabel.heads import X`` and ``heads.X`` work as
they did when this was one module.
"""

from .cv import (
    FOLDS,
    LAMBDAS,
    LARGE_CV,
    PATIENCE,
    _just_above,
    cross_validate,
    holdout_split,
    per_label_subsample,
    stacking_offset,
    stratified_folds,
)
from .evaluate import (
    REFIT_MAX_ROWS,
    SHOTS,
    TOP_K,
    WORST,
    curve_shots,
    evaluate_logits,
    fit_report,
    learning_curve,
    worst_labels,
)
from .fitting import (
    CV_MAX_ROWS,
    CV_PER_LABEL,
    FINAL_TOL,
    MAX_RANK,
    SMALL_WORK,
    _fit,
    _offset_chunked,
    _torch_threads,
    check_sample,
    fit_head,
    head_from_fit,
)
from .head import (
    FORMAT,
    METHOD,
    SIGMOID,
    SOFTMAX,
    VERSION,
    Head,
    _safetensors_metadata,
    load_for_run,
    load_head,
    manifest_entry,
)
from .report import report_text, strength_text
from .solve import (
    CHUNK,
    CHUNK_CELLS,
    CV_MAX_ITER,
    DISTILL_WEIGHT,
    FitResult,
    ZeroShot,
    _basis,
    _head_logits,
    _Problem,
    _solve,
    _tempered_nll,
)

__all__ = [
    "CHUNK", "CHUNK_CELLS", "CV_MAX_ITER", "CV_MAX_ROWS", "CV_PER_LABEL", "DISTILL_WEIGHT", "FINAL_TOL",
    "FOLDS", "FORMAT", "LAMBDAS", "LARGE_CV", "MAX_RANK",
    "METHOD", "PATIENCE", "REFIT_MAX_ROWS", "SHOTS", "SIGMOID", "SMALL_WORK", "SOFTMAX", "TOP_K", "VERSION", "WORST",
    "FitResult", "Head", "ZeroShot", "check_sample", "cross_validate", "curve_shots", "evaluate_logits", "fit_head",
    "fit_report", "head_from_fit", "holdout_split", "learning_curve", "load_for_run", "load_head", "manifest_entry",
    "per_label_subsample", "report_text", "stacking_offset", "strength_text", "stratified_folds", "worst_labels",
    # private helpers the tests reach for (``heads._head_logits``) and the rest, as the module had them
    "_Problem", "_basis", "_fit", "_head_logits", "_just_above", "_offset_chunked", "_safetensors_metadata",
    "_solve", "_tempered_nll", "_torch_threads",
]
