"""``zslabel report OUT --output REPORT_DIR``: a static review report of a labeling run.

``REPORT_DIR/index.html`` plus ``thumbs/`` (JPEG thumbnails, longer side 160 px) and
``figures/`` (PNG), opened from disk in any browser: no server, no script, no network request.
It shows the run at a glance (from the run manifest), per label the top-1 count, score
distribution and thumbnail grids (most confident, least confident = smallest margin to the
runner-up, a random sample), abstained and errored rows, and with ground truth ``zslabel eval``'s
metrics, a confusion heat map, the most frequent confusions with example pairs and a
reliability diagram.

Scale: two streaming passes over the output's needed columns (``collect``), a bounded number
of thumbnails made by a bounded thread pool (``thumbs``). Reproducible: the same output and
``seed`` give the same folder, byte for byte.

Needs the ``report`` extra (matplotlib, Jinja2); Ray-free.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

from ..errors import ConfigError, OutputError
from ..store import refuse_inside_output

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'zslabel[report]'"
REPORT_JSON = "report.json"


def require_extra() -> None:
    """Raise ConfigError (exit 2) naming the missing package when the ``report`` extra is absent."""
    missing = []
    for module, dist in (("matplotlib", "matplotlib"), ("jinja2", "Jinja2")):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise ConfigError(f"zslabel report needs {' and '.join(missing)}, from the 'report' extra: {EXTRA_HINT} "
                          "(scripts/setup.sh installs it)")


@dataclass
class ReportResult:
    """What ``build_report`` wrote: the page, counts, thumbnails and the folder's size."""

    index: str
    rows: int
    thumbnails: int
    placeholders: int
    label_sections: int
    bytes: int
    seconds: float
    phases: dict[str, float]

    def line(self) -> str:
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        return (f"report of {self.rows:,} rows: {self.label_sections} label sections, {self.thumbnails} thumbnails "
                f"and {self.placeholders} placeholders (rows without a picture), "
                f"{self.bytes / 1e6:.1f} MB, {self.seconds:.1f} s ({phases}): "
                f"{self.index}")


def build_report(output: str, report_dir: str, *, ground_truth: str | None = None, seed: int = 0,
                 per_label: int = 6, max_label_sections: int = 60, workers: int = 8,
                 storage_options: dict | None = None, progress: bool = True,
                 overwrite: bool = False) -> ReportResult:
    """Write the report of the zslabel output ``output`` into the local folder ``report_dir``.

    Args:
        output: output folder (or one Parquet file) of ``zslabel label``/``relabel``; local or fsspec URI.
        report_dir: local folder to create (a folder holding only an earlier report is replaced
            with ``overwrite``).
        ground_truth: CSV/TSV/Parquet (path,label) or folder-per-class root (``zslabel eval``'s).
        seed: seed of the random samples.
        per_label: thumbnails per label in each of the three grids.
        max_label_sections: labels that get a section with grids (worst first); the table lists all.
        workers: threads making thumbnails.
        progress: show progress on stderr (``zslabel.progress``).

    Raises:
        ConfigError: the ``report`` extra is missing, or a bad argument.
        InputError: ``output`` is not a readable zslabel output, or the ground truth is unreadable
            or matches no row.
        OutputError: ``report_dir`` exists and is not an empty folder or (with ``overwrite``) an
            earlier report.
    """
    import time

    require_extra()
    from ..evaluate import load_ground_truth
    from ..progress import Progress
    from . import collect, render
    from . import truth as truth_mod

    if per_label < 1 or max_label_sections < 0 or workers < 1:
        raise ConfigError("--per-label and --workers must be >= 1, --max-label-sections >= 0")
    t0 = time.perf_counter()
    _check_folder(report_dir, overwrite)
    refuse_inside_output(report_dir, None, "a report")  # a local folder
    opened = collect.open_output(output, storage_options)  # fails before anything is written
    gt = load_ground_truth(ground_truth, storage_options) if ground_truth else None
    total = ((opened[2] or {}).get("counts") or {}).get("rows")
    with Progress(total, enabled=progress, unit="rows", desc="report: reading") as bar:
        scan = collect.scan_output(output, storage_options=storage_options, seed=seed, per_label=per_label,
                                   truth_filter=truth_mod.truth_filter(gt) if gt else None,
                                   on_rows=bar.update, opened=opened)
    result = truth_mod.evaluate_scan(scan, gt, output) if gt else None
    phases = {"reading": time.perf_counter() - t0}

    table = render.label_table(scan, result)
    sections = [d for d in table if d["id"] is not None and d["count"] > 0][:max_label_sections]
    # Rows to read and picture: only the sectioned labels' grids, the error and abstained samples
    # and the confusion examples (not every label's kept rows).
    shown: set[int] = set()
    for d in sections:
        for s in (scan.confident, scan.unsure, scan.sample):
            shown.update(s.of(d["id"]))
    shown |= scan.error_sample.all_refs() | scan.abstained_sample.all_refs()
    if result is not None:
        label_ids = {name: i for i, name in enumerate(scan.labels)}
        for c in result.confusion_examples:
            if c["reference"] is None and c["predicted"] in label_ids:
                kept = scan.confident.of(label_ids[c["predicted"]])
                if kept:
                    c["reference"], c["reference_kind"] = kept[0], "predicted"
            shown.update(c["wrong"])
            if c["reference"] is not None:
                shown.add(c["reference"])
    # Written into a staging folder beside report_dir and moved into place at the end: a failed
    # or interrupted report never leaves a half-written folder, nor removes an earlier report.
    final_dir = report_dir
    report_dir = _staging_folder(final_dir)
    try:
        written = _write(scan, result, sections, table, shown, report_dir, output=output, seed=seed,
                         per_label=per_label, workers=workers, storage_options=storage_options,
                         progress=progress, phases=phases)
        _swap(report_dir, final_dir)
    except BaseException:
        shutil.rmtree(report_dir, ignore_errors=True)
        raise
    written.index = os.path.join(final_dir, "index.html")
    written.seconds = time.perf_counter() - t0
    return written


def _write(scan, result, sections, table, shown, report_dir: str, *, output: str, seed: int, per_label: int,
           workers: int, storage_options, progress: bool, phases: dict) -> ReportResult:
    """Everything that writes: thumbnails, figures, index.html, report.json, into ``report_dir``."""
    import time

    from ..progress import Progress
    from . import collect, figures, render, thumbs

    t1 = time.perf_counter()
    rows = collect.read_rows(scan, shown)
    reader = thumbs.ImageReader(scan.manifest, storage_options)
    with Progress(len(rows), enabled=progress, unit="images", desc="report: thumbnails") as bar:
        made = thumbs.make_thumbnails([rows[r] for r in sorted(rows)], reader, report_dir, workers=workers,
                                      on_done=bar.update)

    phases["thumbnails"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    truth_of = {}
    if result is not None:
        truth_of = {int(r): t for r, t in zip(result.matched.refs, result.matched.truth)}

    def view(ref: int) -> dict:
        return render.thumb_view(rows[ref], made[ref], truth_of.get(ref))

    fig_dir = os.path.join(report_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    overall = render.histogram_of(scan)
    if scan.labeled:
        figures.overview(os.path.join(fig_dir, "overview.png"), scan.labels, scan.top1_count, overall)
    section_views = []
    histograms = figures.ScoreHistograms(collect.SCORE_BINS, overall) if sections else None
    for d in sections:
        i = d["id"]
        fig = f"figures/label-{i}.png"
        assert histograms is not None  # made whenever there are sections
        histograms.save(os.path.join(report_dir, fig), scan.hist[i])
        section_views.append({**render.format_table([d])[0], "figure": fig, "grids": [
            {"title": "most confident", "explain": "highest top-1 score",
             "thumbs": [view(r) for r in scan.confident.of(i)]},
            {"title": "least confident", "explain": "smallest margin between the top-1 and the runner-up score: "
             "look here first", "thumbs": [view(r) for r in scan.unsure.of(i)]},
            {"title": "random sample", "explain": f"uniform over its {d['count']:,} images (seed {seed})",
             "thumbs": [view(r) for r in scan.sample.of(i)]}]})
    errors = []
    for cid, code in enumerate(scan.error_codes):
        errors.append({"code": code, "count": scan.errors_by_code.get(code, 0),
                       "examples": [view(r) for r in sorted(scan.error_sample.of(cid), key=lambda r: rows[r].path)]})
    errors.sort(key=lambda e: (-e["count"], e["code"]))
    truth_view = _truth_view(result, report_dir, view, scan) if result is not None else None

    context = {
        "title": f"zslabel report: {output}",
        "output": output,
        "seed": seed,
        "run": render.run_facts(scan.manifest, scan),
        "scan": {"rows": f"{scan.rows:,}", "labeled": f"{scan.labeled:,}", "errored": f"{scan.errored:,}",
                 "no_label": scan.no_label, "abstained": f"{scan.abstained:,}" if scan.has_abstained else None,
                 "abstained_share": render._pct(scan.abstained, scan.labeled) if scan.has_abstained else None},
        "attention": render.attention_reasons(table, result is not None),
        "has_overview": bool(scan.labeled),
        "table": render.format_table(table),
        "has_truth": result is not None,
        "has_abstained": scan.has_abstained,
        "sections": section_views,
        "sections_cut": len([d for d in table if d["count"] > 0]) - len(sections),
        "per_label": per_label,
        "close_margin": collect.CLOSE_MARGIN,
        "abstained": [view(r) for r in scan.abstained_sample.of(0)],
        "min_score": ((scan.manifest or {}).get("config") or {}).get("min_score"),
        "errors": errors,
        "truth": truth_view,
    }
    index = os.path.join(report_dir, "index.html")
    with open(index, "w", encoding="utf-8") as fh:
        fh.write(render.render_html(context))
    with open(os.path.join(report_dir, REPORT_JSON), "w", encoding="utf-8") as fh:
        json.dump({"output": output, "seed": seed, "rows": scan.rows, "labeled": scan.labeled,
                   "errors_by_code": scan.errors_by_code, "per_label": per_label,
                   "label_sections": [d["name"] for d in sections],
                   "evaluation": result.report.to_dict() if result is not None else None,
                   # What a later --overwrite may delete: nothing else (``_check_folder``).
                   "files": sorted(_files_under(report_dir) | {REPORT_JSON})},
                  fh, indent=2, sort_keys=True)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(report_dir) for f in fs)
    placeholders = sum(1 for t in made.values() if t.note is not None)
    return ReportResult(index=index, rows=scan.rows, thumbnails=len(made) - placeholders, placeholders=placeholders,
                        label_sections=len(sections), bytes=size, seconds=0.0,
                        phases={**phases, "figures and page": time.perf_counter() - t1})


def _truth_view(result, report_dir: str, view, scan) -> dict:
    from . import figures
    from . import truth as truth_mod

    rep = result.report
    names, matrix, cut = truth_mod.confusion_matrix(result.matched)
    if len(names):
        figures.confusion_heatmap(os.path.join(report_dir, "figures", "confusion.png"), names, matrix)
    calib = (scan.manifest or {}).get("calibration")
    title = ("calibrated top-1 score (calibration " + str(calib.get("id")) + ")") if calib else "top-1 score"
    rel = result.reliability
    if rel.get("n"):
        figures.reliability_diagram(os.path.join(report_dir, "figures", "reliability.png"), rel["bins"],
                                    rel["ece"], title)

    def frac(v):
        return "n/a" if v is None else f"{v:.3f}"

    return {
        "source": rep.ground_truth,
        "facts": [
            ("ground-truth images", f"{rep.ground_truth_images:,}"),
            ("matched", f"{rep.matched:,} ({rep.matched_by_basename:,} by file name)"),
            ("in ground truth but not in the output", f"{rep.unmatched_ground_truth:,}"),
            ("matched rows with an error", f"{rep.errored:,}"),
            ("top-1 accuracy", f"{frac(rep.top1_accuracy)} ({rep.top1_correct:,}/{rep.labeled:,})"),
            # top-k for the k the run wrote (evaluate: top-5, or the run's --top-k when smaller)
            (f"top-{rep.top_k} accuracy", f"{frac(rep.topk_accuracy)} ({rep.topk_correct:,}/{rep.labeled:,})"),
            ("top-1 including errors", frac(rep.top1_including_errors)),
            ("macro precision / recall", f"{frac(rep.macro_precision)} / {frac(rep.macro_recall)}"),
        ] + ([("coverage / top-1 when answering", f"{frac(rep.coverage)} / {frac(rep.top1_accuracy_answered)}")]
             if rep.abstained is not None else [])
          + ([("ground-truth labels that are not candidates (always wrong)",
               ", ".join(result.not_candidates))] if result.not_candidates else []),
        "has_confusion": bool(len(names)),
        "confusion_cut": cut,
        "confusion_labels": len(names),
        "has_reliability": bool(rel.get("n")),
        "reliability_title": title,
        "ece": frac(rel.get("ece")),
        "confusions": [{"true": c["true"], "predicted": c["predicted"], "count": c["count"],
                        "wrong": [view(r) for r in c["wrong"]],
                        "reference": view(c["reference"]) if c["reference"] is not None else None,
                        "reference_kind": c["reference_kind"]}
                       for c in result.confusion_examples],
    }


def _files_under(folder: str) -> set[str]:
    """Every file (and link) below ``folder``, as ``/``-separated paths relative to it."""
    return {os.path.relpath(os.path.join(dp, f), folder).replace(os.sep, "/")
            for dp, dirs, fs in os.walk(folder) for f in fs + [d for d in dirs if os.path.islink(os.path.join(dp, d))]}


def _check_folder(report_dir: str, overwrite: bool) -> None:
    """``report_dir`` may be missing, an empty folder, or (``overwrite``) an earlier report
    holding nothing but the files it wrote (its ``report.json`` lists them): a file a user put
    beside a report (notes, an annotated copy) is never deleted with it.

    Raises:
        OutputError: anything else: a file, a folder holding other files (never deleted).
    """
    if not os.path.exists(report_dir):
        return
    if not os.path.isdir(report_dir):
        raise OutputError(f"{report_dir} exists and is not a folder")
    if not os.listdir(report_dir):
        return
    if not overwrite:
        raise OutputError(f"{report_dir} is not empty; pass --overwrite to replace an earlier report")
    try:
        with open(os.path.join(report_dir, REPORT_JSON), encoding="utf-8") as fh:
            recorded = json.load(fh).get("files")
    except (OSError, ValueError, AttributeError):
        raise OutputError(f"{report_dir} does not hold a zslabel report (no {REPORT_JSON}); refusing to "
                          "delete it") from None
    if not isinstance(recorded, list):
        raise OutputError(f"{report_dir} holds a report of an older zslabel, whose {REPORT_JSON} does not list "
                          "its files; refusing to delete it: remove it yourself, or write to another folder")
    foreign = sorted(_files_under(report_dir) - {str(f) for f in recorded})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{report_dir} holds files the earlier report did not write ({shown}); refusing to "
                          "delete them: move them out, or write the report to another folder")


def _staging_folder(report_dir: str) -> str:
    parent, name = os.path.split(os.path.abspath(report_dir))
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)  # mkdtemp's 0700 would stay on the moved report
    return path


def _swap(staging: str, report_dir: str) -> None:
    """Move the finished ``staging`` folder to ``report_dir`` (an earlier report there is removed
    only now; ``_check_folder`` allowed it)."""
    if os.path.exists(report_dir):
        shutil.rmtree(report_dir)
    os.replace(staging, report_dir)
