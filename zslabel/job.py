"""The skeleton every command that writes an output shares (``label``, ``relabel``):

    prepare   everything that needs neither Ray nor images, in two steps a command may call
              apart (``label`` plans its input between them):
      check   options validated, the output inspected and checked against the mode
              (``store.OutputStore.check``), a ``--resume`` with nothing to do answered; then
              the output claimed (one run at a time, ``store.claim``); no torch, no Ray: seconds
      load    the checkpoint resolved and digested, the label embeddings built (text tower
              once), head, calibration and hierarchy loaded, before Ray starts
    begin     the write session: fingerprint of everything that changes rows, resume set,
              staging (``store.OutputStore.begin``)
    finish    counts over the committed rows, the accounting check (every listed input is a
              row, a counted skip or a counted duplicate), the run manifest (what every command
              records, ``PreparedJob.run_facts``, with the command's own facts; the commit), the
              error budget

The commands add only what is theirs in between (``pipeline``: the Ray Data chain; ``relabel``:
a loop over stored embeddings). Ray-free.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np
import pyarrow as pa

from .calibration import Calibration, load_for_run
from .calibration import manifest_entry as calibration_manifest_entry
from .errors import ConfigError
from .heads import manifest_entry as head_manifest_entry
from .hierarchy import Hierarchy
from .interrupts import ctrl_c_ignored
from .labels import LabelSet
from .options import LabelingOptions
from .ranking import RankingRule
from .scoring import ZeroShotClassifier
from .storage import local_stamp
from .store import MANIFEST_NAME, Accounting, OutputStore, WriteSession, fingerprint_fields
from .summary import RunFacts, RunSummary, check_error_budget, model_id, run_manifest

if TYPE_CHECKING:
    from .decode import PreprocessSpec
    from .heads import Head

log = logging.getLogger(__name__)


@dataclass
class PreparedJob:
    """What :func:`prepare` gives (see the module docstring).

    Attributes:
        options: the command's options (validated: labels merged, templates checked).
        rule: the ranking rule. store: the output store, checked against the mode and claimed.
        started: ``time.perf_counter()`` at the start. timings: seconds per phase so far.
        stamps: ``{"input": ..., "model": ...}`` (``storage.local_stamp``; None when not local).
        checkpoint: the resolved checkpoint folder. digest: ``model.checkpoint_digest``.
        label_set: names, templates and (C, D) float32 L2-normalised label embeddings.
        score_kind, model_type, logit_scale, logit_bias, preprocess, library, architecture: from
            the loaded model (``preprocess``: its ``PreprocessSpec``; ``logit_bias`` 0.0 for CLIP;
            ``library``: "transformers" or "open_clip").
        calibration, hierarchy, head: loaded and checked against the model and labels, or None.
    """

    options: LabelingOptions
    rule: RankingRule
    store: OutputStore
    started: float
    timings: dict[str, Any]
    stamps: dict[str, str | None]
    checkpoint: str
    digest: str
    label_set: LabelSet
    score_kind: str
    model_type: str
    logit_scale: float
    logit_bias: float
    preprocess: PreprocessSpec
    library: str = "transformers"
    architecture: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # options.result_settings(), once in prepare
    calibration: Calibration | None = None
    hierarchy: Hierarchy | None = None
    head: Head | None = None  # replacing the zero-shot logits, checked against the model and labels

    @property
    def labels(self) -> list[str]:
        return list(self.label_set.names)

    @property
    def embedding_dim(self) -> int:
        """D, the width of the label (and image) embeddings."""
        return int(self.label_set.embeddings.shape[1])

    @property
    def templates(self) -> list[str]:
        return list(self.label_set.templates)

    def classifier(self, device: str = "cpu") -> ZeroShotClassifier:
        """The zero-shot classifier of this job, its label embeddings on ``device``."""
        import torch

        return ZeroShotClassifier(torch.from_numpy(np.asarray(self.label_set.embeddings)).to(device),
                                  np.asarray(self.label_set.names, dtype=object), self.logit_scale,
                                  self.logit_bias, self.score_kind, self.rule, calibration=self.calibration,
                                  hierarchy=self.hierarchy, head=self.head)

    def run_facts(self, kind: str, *, config: dict[str, Any], preprocess: dict | None,
                  input_counts: dict[str, Any], extra: dict[str, Any]) -> RunFacts:
        """The manifest facts of this run (``summary.RunFacts``): what every command records of
        its model, labels, templates, input stamp, calibration and head, plus the command's own.

        Args:
            kind: "label" or "relabel". config: the options as recorded (``public_dict``).
            preprocess: the preprocessing fingerprint dict. input_counts: ``skipped``,
                ``listed``, ``duplicates_removed`` (and ``skipped_by_reason``).
            extra: further top-level manifest keys.
        """
        opts = self.options
        # A local checkpoint is recorded absolute (``summary.model_id``), so relabel finds it from any folder.
        model = {"id": model_id(opts.model or ""), "revision": opts.revision, "local_path": self.checkpoint,
                 "digest": self.digest, "model_type": self.model_type, "score_kind": self.score_kind,
                 "stamp": self.stamps["model"], "library": self.library, "architecture": self.architecture}
        return RunFacts(kind=kind, config=config, model=model, labels=self.labels, templates=self.templates,
                        preprocess=preprocess, input_counts=input_counts,
                        extra={**extra, "input_stamp": self.stamps["input"],
                               "calibration": calibration_manifest_entry(self.calibration, opts.calibration),
                               "head": head_manifest_entry(self.head, opts.head)})

    def claimed(self):
        """Hold the output's claim for the block; given up however the block ends."""
        return claim_held(self.store)


@contextmanager
def claim_held(store: OutputStore):
    """Hold ``store``'s claim (``check`` made it) for the block; given up however the block ends."""
    try:
        yield store
    finally:
        give_up_claim(store)


def give_up_claim(store: OutputStore) -> None:
    """Give up ``store``'s claim (``OutputStore.release``) whole: a further Ctrl-C meanwhile is
    ignored. A job interrupted by two of them (a terminal's and ``timeout``'s, sent together)
    was cut short in its clean-up by the second: the claim stayed, and the command said
    "committed files are kept" of an output that held nothing but the claim."""
    with ctrl_c_ignored():
        store.release()


class FinishedRun(NamedTuple):
    """A finished run that a ``--resume`` with unchanged settings, input and model found: the
    arguments of ``summary.summary_of_finished`` (output, its manifest dict, the manifest's path,
    and the ``time.perf_counter()`` the command started at)."""

    output: str
    manifest: dict
    manifest_path: str
    started: float


class CheckedJob(NamedTuple):
    """What :func:`check` gives a job that has work to do: the validated options, the ranking
    rule, the checked and claimed output store, ``time.perf_counter()`` at the start, the
    options' ``result_settings()`` and the input and model stamps (``storage.local_stamp``)."""

    options: LabelingOptions
    rule: RankingRule
    store: OutputStore
    started: float
    settings: dict[str, Any]
    stamps: dict[str, str | None]

    def claimed(self):
        """Hold the output's claim for the block; given up however the block ends."""
        return claim_held(self.store)


def check(options: LabelingOptions, input_uri: str, *,
          check_input: Callable[[], None] | None = None) -> CheckedJob | FinishedRun:
    """The first half of :func:`prepare`: the options, the output against the mode, the input,
    and the ``--resume`` short-cut; then the output claimed (one run at a time, ``store.claim``:
    it exists from here on, so an input folder holding it lists it on every run alike). Neither
    torch nor Ray is imported; it takes seconds.

    Args:
        options: the command's options. input_uri: the input (or relabel source), for the
            ``--resume`` short-cut's stamp.
        check_input: called after the options and output are checked (the input exists).

    Returns:
        :class:`CheckedJob`, holding the output's claim (give it up with
        ``CheckedJob.claimed``); or, for a ``--resume`` of a finished run with unchanged settings,
        input and model, that run (:class:`FinishedRun`: nothing claimed or run; the command
        answers with ``summary.summary_of_finished``).

    Raises:
        ConfigError, InputError, OutputError (OutputInUse when another run holds the output).
    """
    started = time.perf_counter()
    rule = options.validate()
    if not options.model:
        raise ConfigError("no model given: pass --model")
    # Read once: it loads the calibration and head files (by content id), so a missing or
    # damaged one fails here; their fit is checked with the model (``load``).
    settings = options.result_settings()
    # Without the output: an output inside the input folder changes with every run.
    stamps = {"input": local_stamp(input_uri, exclude=options.output), "model": local_stamp(options.model)}
    store = OutputStore.open(options.output, options.storage_options)
    store.check(options.mode, settings)
    if check_input is not None:
        check_input()
    done = store.finished_unchanged(options.mode, options.retry_errors, stamps)
    if done is not None:
        log.info("%s holds a finished run of this job with unchanged input and model: nothing to do", options.output)
        return FinishedRun(options.output, done, store.state.path(MANIFEST_NAME), started)
    store.claim(options.mode, settings)
    return CheckedJob(options, rule, store, started, settings, stamps)


def load(checked: CheckedJob, *, device: str = "cpu", spec_overrides: dict[str, Any] | None = None,
         check_model: Callable[[str], None] | None = None) -> PreparedJob:
    """The second half of :func:`prepare`: the checkpoint resolved and digested, the label
    embeddings built (text tower once), head, calibration and hierarchy loaded and checked
    against them. Before Ray and images; the output stays claimed (by :func:`check`).

    Args:
        checked: from :func:`check`.
        device: where the text tower runs; "auto": CUDA when this process sees a GPU, else the CPU.
        spec_overrides: decode limits passed to the model's preprocessing spec.
        check_model: called with the checkpoint digest before the text tower runs (relabel:
            the source's embeddings must come from this checkpoint).

    Returns:
        The prepared job (its ``store`` is ``checked.store``, still claimed).

    Raises:
        ConfigError, ModelLoadError (the claim is kept: the caller gives it up).
    """
    options, rule, store, started, settings, stamps = checked
    model = options.model
    assert model, "check() refuses a job without a model"
    loading = time.perf_counter()
    # torch and transformers only now: everything in ``check`` fails (or finishes) without them.
    from .labels import build_label_set
    from .model import checkpoint_digest, load_model, resolve_checkpoint

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_checkpoint(model, options.revision, options.storage_options)
    digest = checkpoint_digest(path)
    if check_model is not None:
        check_model(digest)
    # The text tower in float32 (the label embeddings are the classifier's weights), batched;
    # its result is cached on disk (labels.build_label_set).
    text_model = load_model(path, device=device, **(spec_overrides or {}))
    label_set = build_label_set(list(options.labels), list(options.templates), text_model, digest=digest)
    rule.check_score_kind(text_model.score_kind, model)  # before any image is read
    job = PreparedJob(options, rule, store, started, {}, stamps, str(path), digest, label_set, text_model.score_kind,
                      text_model.model_type, text_model.logit_scale, text_model.logit_bias, text_model.preprocess,
                      text_model.library, text_model.architecture)
    del text_model
    from .heads import load_for_run as load_head_for_run

    job.head = load_head_for_run(options.head, options.storage_options, checkpoint_digest=digest, labels=job.labels,
                                 templates=job.templates, score_kind=job.score_kind,
                                 dim=int(label_set.embeddings.shape[1]))
    job.calibration = load_for_run(options.calibration, options.storage_options, checkpoint_digest=digest,
                                   labels=job.labels, templates=job.templates, score_kind=job.score_kind,
                                   head=job.head.id if job.head is not None else None)
    job.hierarchy = Hierarchy.from_labels(job.labels) if options.hierarchy else None
    job.timings["model_and_labels_s"] = time.perf_counter() - loading
    job.settings = settings
    return job


def prepare(options: LabelingOptions, input_uri: str, *, device: str = "cpu",
            spec_overrides: dict[str, Any] | None = None,
            check_input: Callable[[], None] | None = None,
            check_model: Callable[[str], None] | None = None) -> PreparedJob | FinishedRun:
    """Everything before Ray and images (see the module docstring): :func:`check`, then
    :func:`load` (their arguments, returns and errors); the claim is given up if ``load``
    fails, else held by the prepared job (``PreparedJob.claimed``). A command that has work of
    its own between the two (``label`` plans its input there) calls them itself."""
    checked = check(options, input_uri, check_input=check_input)
    if isinstance(checked, FinishedRun):
        return checked
    try:
        return load(checked, device=device, spec_overrides=spec_overrides, check_model=check_model)
    except BaseException:
        give_up_claim(checked.store)
        raise


def begin(job: PreparedJob, schema: pa.Schema, *, preprocess: dict | None,
          extra_fields: dict[str, Any] | None = None, planned_paths: pa.Array | pa.ChunkedArray | None = None,
          planned_files: list[str] | None = None) -> WriteSession:
    """Start the write session: the fingerprint of every setting that changes rows (the
    options' ``result_settings`` plus what the model and the output schema add), then
    ``store.OutputStore.begin`` with the mode.

    Args:
        schema: the output schema. preprocess: the preprocessing spec's fingerprint dict (a
            relabel: its source's). extra_fields: more fingerprint fields (relabel: its source's
            fingerprint). planned_paths, planned_files: for the resume input checks
            (``sources.InputPlan``).

    Raises:
        OutputError: see ``store.session.begin``.
    """
    opts = job.options
    fields = fingerprint_fields(job.settings, checkpoint_digest=job.digest,
                                model_type=job.model_type, score_kind=job.score_kind, preprocess=preprocess,
                                schema=schema)
    fields.update(extra_fields or {})
    return job.store.begin(opts.mode, fields, retry_errors=opts.retry_errors,
                                     planned_paths=planned_paths, planned_files=planned_files)


def finish(job: PreparedJob, session: WriteSession, kind: str, *, config: dict[str, Any], preprocess: dict | None,
           input_counts: dict[str, Any], extra: dict[str, Any], files_this_run: int,
           accounting: Accounting) -> RunSummary:
    """Count the committed rows, check them against the inputs, commit the manifest, and
    apply the error budget.

    Args:
        kind, config, preprocess, input_counts, extra: the command's own facts, recorded with
            what every command records (:meth:`PreparedJob.run_facts`, which says what each is).
        files_this_run: files this run committed. accounting: the listed, skipped and duplicate
            inputs the committed rows must account for.

    Raises:
        AccountingError: the rows do not account for every listed input (nothing committed;
            exit 1). OutputError: the claim was lost, or files of another run appeared.
        ErrorBudgetExceeded: after the commit, when more than ``max_error_fraction`` rows failed.
    """
    counts = session.counts()
    accounting.check(session.target.uri, counts.rows)
    facts = job.run_facts(kind, config=config, preprocess=preprocess, input_counts=input_counts, extra=extra)
    job.timings["wall_s"] = wall = time.perf_counter() - job.started
    manifest = run_manifest(facts, counts, timings=job.timings, retried_rows=session.retried_rows,
                            files_this_run=files_this_run)
    path = session.commit(manifest)
    summary = RunSummary(output=session.target.uri, rows=counts.rows, labeled=counts.labeled,
                         errors_by_code=counts.errors_by_code, skipped=facts.input_counts.get("skipped", 0),
                         listed=facts.input_counts.get("listed"), wall_seconds=wall,
                         images_per_second=counts.rows / wall if wall else 0.0, manifest_path=path,
                         timings=job.timings, model_images=counts.model_images, carried_over=counts.carried_over,
                         skipped_by_reason=dict(facts.input_counts.get("skipped_by_reason") or {}),
                         duplicates_removed=facts.input_counts.get("duplicates_removed") or 0)
    check_error_budget(summary, job.options.max_error_fraction)
    return summary
