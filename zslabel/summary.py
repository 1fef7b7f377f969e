"""What a finished run reports, for ``label`` and ``relabel`` alike: the run manifest, the
``RunSummary`` line, and the error budget check. Ray-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ErrorBudgetExceeded

MANIFEST_VERSION = 1


@dataclass
class RunCounts:
    """Counts over the committed output of a run (all rows, not only this run's).

    ``model_images``: rows this run passed to the model (written by this run and decoded:
    labeled or ``non_finite_scores``); ``written``: rows this run wrote; ``carried_over``: rows
    kept from earlier runs.
    """

    rows: int
    labeled: int
    errors_by_code: dict[str, int]
    written: int
    model_images: int
    carried_over: int
    files: int


@dataclass
class RunSummary:
    """What a finished run did. Times in seconds; ``images_per_second`` counts output rows."""

    output: str
    rows: int
    labeled: int
    errors_by_code: dict[str, int]
    skipped: int
    listed: int | None
    wall_seconds: float
    images_per_second: float
    manifest_path: str
    timings: dict[str, Any] = field(default_factory=dict)   # seconds, plus stage_timings' facts
    model_images: int = 0      # rows this run sent to the model (resume: fewer than ``rows``)
    carried_over: int = 0      # rows kept from earlier runs of this output (``--resume``)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # ``sources.SKIP_REASONS`` keys
    duplicates_removed: int = 0  # listed entries dropped as repeats (``--dedupe``)

    def line(self) -> str:
        """One human line for the end of a run."""
        errs = ", ".join(f"{c}={n}" for c, n in sorted(self.errors_by_code.items())) or "none"
        why = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped_by_reason.items()))
        # The rate is the whole run's (start-up and model load included), below the progress
        # line's (labeling only); a run that labeled nothing has none.
        idle = bool(self.carried_over) and not self.model_images
        timing = (f"{self.wall_seconds:.1f} s" if idle else
                  f"{self.wall_seconds:.1f} s in all, {self.images_per_second:.1f} images/s")
        return (("nothing to label: every input already has its row; " if idle else "")
                + f"labeled {self.labeled} of {self.rows} images; errors: {errs}; skipped {self.skipped} "
                f"listed {'entry' if self.skipped == 1 else 'entries'}"
                f"{f' ({why})' if why else ''}"
                + (f"; {self.duplicates_removed} duplicates removed (--dedupe)" if self.duplicates_removed else "")
                + f"; {timing}; output: {self.output}"
                + (f" ({self.carried_over} rows kept from earlier runs; the model ran on {self.model_images})"
                   if self.carried_over and not idle else ""))


@dataclass
class RunFacts:
    """What a run knows besides its committed rows, for its manifest.

    Attributes:
        kind: "label" or "relabel".
        config: the run's options as recorded (``public_dict``, storage options redacted).
        model: ``id``, ``revision``, ``local_path``, ``digest``, ``model_type``, ``score_kind``
            and ``stamp`` (``storage.local_stamp`` of a local checkpoint folder, else None);
            ``library`` (``transformers`` or ``open_clip``) and ``architecture`` (``ZeroShotModel``).
        labels, templates: as embedded. preprocess: ``PreprocessSpec.fingerprint_dict()``.
        input_counts: ``skipped``, ``listed``, ``duplicates_removed`` of the inputs.
        extra: further top-level manifest keys (``actor_pool``, ``relabel``, ``input_stamp``,
            ``input_files``).
    """

    kind: str
    config: dict[str, Any]
    model: dict[str, Any]
    labels: list[str]
    templates: list[str]
    preprocess: dict | None
    input_counts: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def run_manifest(facts: RunFacts, counts: RunCounts, *, timings: dict[str, Any], retried_rows: int,
                 files_this_run: int) -> dict[str, Any]:
    """The run manifest (JSON-able) of a run about to commit; the store adds ``run_id`` and the
    fingerprint. Never holds secrets (``facts.config`` is ``public_dict``).

    Args:
        counts: over the committed rows (``store.WriteSession.counts``).
        timings: seconds per phase, ``wall_s`` included. retried_rows: error rows removed for
            recomputation. files_this_run: files this run committed.
    """
    return {
        "zslabel_run": MANIFEST_VERSION,
        "kind": facts.kind,
        "config": facts.config,
        "model": facts.model,
        "labels": list(facts.labels),
        "templates": list(facts.templates),
        "preprocess": facts.preprocess,
        "counts": {"rows": counts.rows, "labeled": counts.labeled, "errors_by_code": counts.errors_by_code,
                   "skipped": facts.input_counts.get("skipped", 0), "listed": facts.input_counts.get("listed"),
                   "duplicates_removed": facts.input_counts.get("duplicates_removed", 0),
                   **({"skipped_by_reason": facts.input_counts["skipped_by_reason"]}
                      if facts.input_counts.get("skipped_by_reason") else {}),
                   "model_images": counts.model_images, "written_this_run": counts.written,
                   "carried_over": counts.carried_over, "retried_errors": retried_rows,
                   "files": counts.files, "files_this_run": files_this_run},
        "mode": facts.config.get("mode"),
        "timings": timings,
        "versions": package_versions(),
        **facts.extra,
    }


def summary_of_finished(uri: str, manifest: dict, manifest_path: str, started: float) -> RunSummary:
    """The summary of a finished run that a ``--resume`` found complete (nothing run again)."""
    c = manifest.get("counts") or {}
    wall = time.perf_counter() - started
    rows = c.get("rows", 0)
    return RunSummary(output=uri, rows=rows, labeled=c.get("labeled", 0), errors_by_code=c.get("errors_by_code", {}),
                      skipped=c.get("skipped", 0), listed=c.get("listed"), wall_seconds=wall,
                      images_per_second=0.0, manifest_path=manifest_path, timings={"wall_s": wall},
                      model_images=0, carried_over=rows, skipped_by_reason=dict(c.get("skipped_by_reason") or {}),
                      duplicates_removed=c.get("duplicates_removed", 0))


def check_error_budget(summary: RunSummary, max_error_fraction: float | None) -> None:
    """Raise ErrorBudgetExceeded when more than ``max_error_fraction`` of the rows failed."""
    rows, failed = summary.rows, summary.rows - summary.labeled
    if max_error_fraction is not None and rows and failed / rows > max_error_fraction:
        raise ErrorBudgetExceeded(
            f"{failed} of {rows} images failed ({failed / rows:.1%}), more than --max-error-fraction "
            f"{max_error_fraction:.1%}; the {rows} rows are written to {summary.output}", summary=summary)


def model_id(model: str) -> str:
    """``model`` as given, or its absolute path when it names a local folder (recorded so,
    relabel finds it from any folder)."""
    local = Path(model).expanduser()
    return str(local.resolve()) if local.is_dir() else model


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results, for the run manifest."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("zslabel", "ray", "torch", "transformers", "pyarrow", "pillow", "numpy", "fsspec"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    for pkg in ("open_clip_torch", "timm", "torchvision"):  # the open-clip extra, where installed
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
