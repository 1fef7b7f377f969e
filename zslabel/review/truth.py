"""Ground truth for the report, through ``zslabel.evaluate`` (its reader, matching and metrics).

The output is never joined whole: ``scan_output`` keeps only the rows whose file name occurs in
the ground truth (a superset of both ways ``evaluate`` matches: full path, then unique file
name), this module writes those rows to a temporary Parquet file and runs
``evaluate.evaluate`` on it, so the numbers are exactly ``zslabel eval``'s. Then, for the
figures and examples, per matched image: its truth, first label, top-1 score and row reference.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..calibration import ECE_BINS, expected_calibration_error
from ..errors import InputError
from ..evaluate import (
    EvalReport,
    GroundTruth,
    evaluate,
    label_key,
    match_ground_truth,
    normalise_path,
    read_predictions,
)
from ..output import ABSTAINED, ERROR, LABELS, PATH
from ..store import MANIFEST_NAME
from .collect import Scan, basename_of

# Confusions shown with example pairs, and misclassified examples per confusion.
CONFUSION_EXAMPLES = 3


def truth_filter(gt: GroundTruth):
    """``paths -> (N,) bool``: rows whose file name is a ground-truth file name (the only rows
    ``evaluate`` can match)."""
    names = {basename_of(p) for p in gt.paths}

    def keep(paths: list[str]) -> np.ndarray:
        return np.fromiter((basename_of(p) in names for p in paths), bool, len(paths))

    return keep


@dataclass
class Matched:
    """Matched, labeled images with a first label: (M,) arrays. ``refs`` int64 row references,
    ``scores`` float64 top-1 scores; ``truth`` and ``predicted`` label names."""

    refs: np.ndarray
    scores: np.ndarray
    truth: list[str]
    predicted: list[str]


@dataclass
class TruthResult:
    """``report``: ``evaluate``'s report of the matched rows (its ``predictions`` is the output
    URI; ``predicted_rows`` / ``unmatched_predictions`` count the candidate rows only).
    ``matched``: per image, for figures. ``reliability``: 15-bin table (``ECE_BINS``)."""

    report: EvalReport
    matched: Matched
    not_candidates: list[str] | None
    reliability: dict = field(default_factory=dict)
    confusion_examples: list[dict] = field(default_factory=list)


def evaluate_scan(scan: Scan, gt: GroundTruth, output_uri: str, top_confusions: int = 10) -> TruthResult:
    """Evaluate the candidate rows ``scan`` kept against ``gt``.

    Raises:
        InputError: no output row has a ground-truth file name, or none matches (evaluate's message).
    """
    rows = scan.truth_rows or {}
    if not rows.get("ref"):
        raise InputError(f"no output row matches the ground truth {gt.source}: no row's file name is among its "
                         f"{len(gt.paths)} images (e.g. {', '.join(repr(p) for p in gt.paths[:2])}); check that "
                         "both describe the same images")
    cols = {PATH: pa.array(rows["path"], pa.string()), LABELS: pa.array(rows["labels"], pa.list_(pa.string())),
            ERROR: pa.array(rows["error"], pa.string())}
    if scan.has_abstained:
        cols[ABSTAINED] = pa.array(rows["abstained"], pa.bool_())
    with tempfile.TemporaryDirectory(prefix="zslabel-report-") as tmp:
        pq.write_table(pa.table(cols), os.path.join(tmp, "candidates.parquet"))
        if scan.manifest is not None:
            # The run's manifest beside the subset, so that evaluate decides top-k as for the run.
            with open(os.path.join(tmp, MANIFEST_NAME), "w") as fh:
                json.dump(scan.manifest, fh)
        report = evaluate(tmp, gt, top_confusions=top_confusions)
        preds, _, _, _ = read_predictions(tmp)
    report.predictions = output_uri
    labels = (scan.manifest or {}).get("labels")
    not_candidates = sorted(set(gt.labels) - set(labels)) if labels is not None else None
    report.ground_truth_labels_not_candidates = not_candidates

    # The row read_predictions used for each path: its first row, or the first labeled one when
    # the first failed (a manifest listing a URI twice).
    chosen: dict[str, int] = {}
    for i, (p, err) in enumerate(zip(rows["path"], rows["error"])):
        key = normalise_path(p)
        if key not in chosen or (rows["error"][chosen[key]] is not None and err is None):
            chosen[key] = i
    matches, _, _ = match_ground_truth(gt, preds)
    refs, scores, truth, predicted = [], [], [], []
    for gi, key in matches:
        i = chosen[key]
        if rows["error"][i] is not None or not rows["labels"][i]:
            continue
        refs.append(rows["ref"][i])
        scores.append(float(rows["scores"][i][0]))
        truth.append(gt.labels[gi])
        predicted.append(label_key(rows["labels"][i][0]))
    matched = Matched(np.array(refs, np.int64), np.array(scores, np.float64), truth, predicted)
    result = TruthResult(report=report, matched=matched, not_candidates=not_candidates)
    result.reliability = reliability(matched)
    result.confusion_examples = confusion_examples(report, matched)
    return result


def reliability(m: Matched, bins: int = ECE_BINS) -> dict:
    """Reliability table of the top-1 score: per bin ``((b-1)/B, b/B]``, images, mean score and
    accuracy (None when empty), plus ECE (``calibration.expected_calibration_error``)."""
    correct = np.array([t == p for t, p in zip(m.truth, m.predicted)], bool)
    idx = np.clip(np.ceil(m.scores * bins).astype(np.int64) - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        sel = idx == b
        table.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(sel.sum()),
                      "confidence": float(m.scores[sel].mean()) if sel.any() else None,
                      "accuracy": float(correct[sel].mean()) if sel.any() else None})
    return {"bins": table, "ece": expected_calibration_error(m.scores, correct, bins) if len(correct) else None,
            "n": int(len(correct))}


def confusion_examples(report: EvalReport, m: Matched) -> list[dict]:
    """For each of the report's confusions: ``{"true", "predicted", "count", "wrong": [refs],
    "reference": ref or None, "reference_kind"}``: its most confident misclassified images, and
    what the model took them for: the most confident correctly labeled image of the predicted
    label (``"correct"``), else an image whose ground truth is that label (``"truth"``), else
    None (the caller may show the label's most confident image, ``"predicted"``)."""
    order = np.argsort(-m.scores, kind="stable")
    wrong: dict[tuple[str, str], list[int]] = {}
    right: dict[str, int] = {}
    true_of: dict[str, int] = {}
    for i in order:
        t, p = m.truth[i], m.predicted[i]
        true_of.setdefault(t, int(m.refs[i]))
        if t == p:
            right.setdefault(t, int(m.refs[i]))
        elif len(wrong.setdefault((t, p), [])) < CONFUSION_EXAMPLES:
            wrong[(t, p)].append(int(m.refs[i]))
    out = []
    for c in report.confusions:
        p = c["predicted"]
        ref, kind = (right[p], "correct") if p in right else (true_of[p], "truth") if p in true_of else (None, None)
        out.append({**c, "wrong": wrong.get((c["true"], p), []), "reference": ref, "reference_kind": kind})
    return out


def confusion_matrix(m: Matched, max_labels: int = 30) -> tuple[list[str], np.ndarray, bool]:
    """``(labels, counts (L, L) int64 with rows = truth, columns = first label, cut)``; with more
    than ``max_labels`` labels, the ones involved in the most errors (``cut`` True)."""
    names = sorted(set(m.truth) | set(m.predicted))
    cut = len(names) > max_labels
    if cut:
        errors: Counter[str] = Counter()
        for t, p in zip(m.truth, m.predicted):
            if t != p:
                errors[t] += 1
                errors[p] += 1
        names = sorted(sorted(names, key=lambda x: (-errors[x], x))[:max_labels])
    pos = {n: i for i, n in enumerate(names)}
    mat = np.zeros((len(names), len(names)), np.int64)
    for t, p in zip(m.truth, m.predicted):
        if t in pos and p in pos:
            mat[pos[t], pos[p]] += 1
    return names, mat, cut
