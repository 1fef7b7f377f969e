"""Measure a labeling run against ground truth: top-1/top-5 accuracy, per-label precision and
recall, the most confused pairs, unmatched and errored rows.

Ground truth is either a table (CSV/TSV/Parquet with a path column and a label column) or a
folder-per-class root (each image's parent folder name is its label). No Ray, no model.
A ``.json`` file is a Label Studio JSON export (``label_studio_ground_truth``): each annotated
task's chosen label, matched to rows by its image (``zslabel export --format label-studio``).

Matching predictions to ground truth:
    1. by full path, after normalising both sides (``file://`` dropped, ``.``/``..`` resolved,
       local paths made absolute; relative paths in a ground-truth table are relative to the
       table's folder, as in input manifests);
    2. for entries still unmatched, by file name (basename) -- only when that name occurs
       exactly once among the unmatched ground-truth entries AND exactly once among the
       unmatched predictions, so a name shared by two images is never guessed.
    Several prediction rows for one path (a manifest listing a URI twice) count once: the first
    labeled row is used, the rest are counted in ``duplicate_predictions``.

Definitions (over matched images; "labeled" = matched rows without ``error``):
    top1_accuracy            = #(labeled, first label == truth) / #labeled
    top5_accuracy            = #(labeled, truth among the first 5 labels) / #labeled; only when
                               the run wrote 5 labels per image, or all of its labels (null otherwise)
    topk_accuracy            = the same for k = ``top_k``: 5, or the run's --top-k when it is
                               smaller and the run has more labels than that (a top-3 run reports
                               top-3, never a "top-5" that saw 3 labels). The run's top-k and
                               label count come from its manifest; without one, from the most
                               labels any row holds (``max_labels_per_row``).
    top1_including_errors    = #(labeled, first label == truth) / #matched (an errored row is wrong)
    precision(L)             = #(labeled, first label == L == truth) / #(labeled, first label == L);
                               null when L was never predicted
    recall(L)                = #(labeled, first label == L == truth) / #(labeled, truth == L);
                               null when L has no labeled image
    macro_precision / recall = mean over labels where defined
    confusions               = (truth, first label) pairs with truth != first label, by count
    A labeled row with an empty label list (multi-label, nothing above the threshold) has no
    first label: it is wrong and counted in ``no_prediction``. With an ``abstained`` column,
    ``top1_accuracy_answered`` is top-1 accuracy over labeled rows that did not abstain and
    ``coverage`` = #answered / #labeled. Labels compare as exact strings (stripped, NFC); a
    ground-truth label that is not a candidate label but equals exactly one candidate after
    case folding (``Dog`` for ``dog``, as Excel and humans write them) is read as that candidate,
    with one warning listing the mappings (:func:`as_candidates`; ``calibrate`` and ``fit``
    map the same way); any other unknown label stays unknown (always wrong).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import posixpath
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError, error_code
from .output import ABSTAINED, ERROR, LABELS, PATH
from .storage import comparable_path, uri_maker
from .store import footer_checked_batches, output_filesystem, output_parquet_files, read_manifest
from .textfiles import decode_text

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "uri", "url", "file", "filename", "image")
LABEL_COLUMNS = ("label", "class", "category")
TOP_K = 5
EXAMPLES = 5


def normalise_path(path: str) -> str:
    """A comparable form of a ground-truth or output path (``storage.comparable_path``): local
    paths (and ``file:`` URIs) absolute and collapsed, remote URIs collapsed with their protocol
    kept (``s3://b/x/../y.jpg`` -> ``s3://b/y.jpg``); surrounding blanks dropped."""
    return comparable_path(path.strip(), normalise_remote=True)


def label_key(name: str) -> str:
    """A label's text as ground truth is matched to a run's labels: stripped and in Unicode NFC,
    so a class folder named on macOS (NFD ``café``) is the label typed ``café``."""
    return unicodedata.normalize("NFC", name.strip())


def fold_key(name: str) -> str:
    """:func:`label_key` case-folded: ``" Dog"``, ``"DOG"`` and ``"dog"`` fold alike."""
    return unicodedata.normalize("NFC", label_key(name).casefold())


def map_to_candidates(truth_labels, candidates, what: str = "ground-truth") -> dict[str, str]:
    """Ground-truth labels that are not ``candidates`` but equal exactly one of them by
    :func:`fold_key` (case, surrounding blanks, Unicode form), mapped to it; one warning lists
    the mappings. A label folding to no candidate, or to several (``Dog`` and ``dog`` both
    candidates), is not mapped.

    Args:
        truth_labels: ground-truth labels (as :func:`label_key` gives them).
        candidates: the label texts they may name (as :func:`label_key` gives them).
    """
    known = set(candidates)
    folded: dict[str, set[str]] = {}
    for c in known:
        folded.setdefault(fold_key(c), set()).add(c)
    mapping = {}
    for t in sorted(set(truth_labels) - known):
        hits = folded.get(fold_key(t), set())
        if len(hits) == 1:
            mapping[t] = next(iter(hits))
    if mapping:
        shown = ", ".join(f"{t!r} -> {c!r}" for t, c in list(mapping.items())[:20])
        more = f" and {len(mapping) - 20} more" if len(mapping) > 20 else ""
        log.warning("%d %s labels are not candidate labels but differ from one only in case, surrounding blanks "
                    "or Unicode form, and are read as it: %s%s", len(mapping), what, shown, more)
    return mapping


def as_candidates(gt: GroundTruth, candidates, what: str = "ground-truth") -> tuple[GroundTruth, dict[str, str]]:
    """``gt`` with each label :func:`map_to_candidates` maps read as its candidate (the one
    place eval, calibrate and fit apply it), and the mapping (empty: ``gt`` itself)."""
    mapped = map_to_candidates(gt.labels, candidates, what)
    if mapped:
        gt = dataclasses.replace(gt, labels=tuple(mapped.get(x, x) for x in gt.labels))
    return gt, mapped


def _basename(path: str) -> str:
    # A tar member "shard.tar#dir/x.jpg" is named by its member's file name.
    return posixpath.basename(path.rsplit("#", 1)[-1])


@dataclass(frozen=True)
class GroundTruth:
    """Known labels of images.

    Attributes:
        source: where it was read from.
        kind: ``"table"`` (CSV/TSV/Parquet), ``"folders"`` (folder-per-class root) or
            ``"label-studio"`` (a Label Studio JSON export).
        paths: normalised full paths (see ``normalise_path``), unique.
        labels: the label of each path.
        skipped: folder mode: images directly under the root, which have no class folder;
            Label Studio: tasks without a usable annotation.
    """

    source: str
    kind: str
    paths: tuple[str, ...]
    labels: tuple[str, ...]
    skipped: int = 0


def load_ground_truth(uri: str, storage_options: dict | None = None) -> GroundTruth:
    """Read ground truth from a table file or a folder-per-class root (local path or fsspec URI).

    A ``.json`` file is read as a Label Studio JSON export (:func:`label_studio_ground_truth`).
    A table needs a header with a path column (one of ``PATH_COLUMNS``) and a label column (one
    of ``LABEL_COLUMNS``), case-insensitive. Relative paths are relative to the table's folder.
    In a folder root, every image file (``sources.IMAGE_EXTENSIONS``, hidden files skipped)
    at any depth is labeled with the name of the folder holding it.

    Raises:
        InputError: missing file, no usable columns, an empty path or label, one path given two
            different labels, or no images at all.
    """
    fs, root = output_filesystem(uri, storage_options)
    try:
        is_dir = fs.isdir(root)
        exists = is_dir or fs.exists(root)
    except Exception as exc:  # noqa: BLE001 - storage errors differ per backend
        raise InputError(f"cannot open ground truth {uri}: {type(exc).__name__}: {exc}") from exc
    if not exists:
        raise InputError(f"ground truth {uri} does not exist")
    to_uri = uri_maker(uri, fs)
    if is_dir:
        return _folder_ground_truth(uri, fs, root, to_uri)
    if root.lower().endswith(".json"):
        return label_studio_ground_truth(uri, fs, root)
    table = _read_table(uri, fs, root)
    lower = {c.lower(): c for c in table.column_names}
    path_col = next((lower[c] for c in PATH_COLUMNS if c in lower), None)
    label_col = next((lower[c] for c in LABEL_COLUMNS if c in lower), None)
    if path_col is None or label_col is None:
        raise InputError(f"ground truth {uri} needs a header with a path column ({', '.join(PATH_COLUMNS)}) and "
                         f"a label column ({', '.join(LABEL_COLUMNS)}); it has {', '.join(table.column_names)}")
    base = to_uri(posixpath.dirname(root))
    pairs = []
    for i, (p, label) in enumerate(zip(table.column(path_col).to_pylist(), table.column(label_col).to_pylist())):
        p = "" if p is None else str(p).strip()
        label = "" if label is None else str(label).strip()
        if not p or not label:
            raise InputError(f"ground truth {uri} row {i + 1} has an empty path or label ({p!r}, {label!r})")
        if not (p.startswith("/") or "://" in p):
            p = posixpath.join(base, p)
        pairs.append((normalise_path(p), label))
    return _dedupe(uri, "table", pairs, 0)


def label_studio_ground_truth(uri: str, fs, root: str) -> GroundTruth:
    """Ground truth from a Label Studio JSON export (Export > JSON, or
    ``GET /api/projects/{id}/export?exportType=JSON``): the humans' choice per task.

    Each task's label is the single choice of its latest annotation (by ``updated_at``, then
    ``created_at``, then ``id``) that was not cancelled ("skipped"); a ``choices`` result of the
    ``Choices`` control named ``label`` is preferred when an annotation has several. The image is
    the task's ``data.zslabel_path`` (written by ``zslabel export --format label-studio``), else
    its image reference (``data.image``, else the first string in ``data``) with a local-files
    URL turned back into a path (``/data/local-files/?d=x/y.jpg`` -> ``/x/y.jpg``; the file name
    still matches when the export used another ``--image-root``).

    Tasks without a usable label (no annotation, only cancelled ones, no choice or several
    choices, no image) are counted in ``skipped``, by reason in a log line; tasks whose image
    matches no row are counted by ``evaluate``/``calibrate`` as unmatched ground truth.

    Raises:
        InputError: not JSON, not a list of Label Studio tasks, or no task with a usable label.
    """
    from .exports.label_studio import DATA_PATH, path_from_reference

    try:
        with fs.open(root, "rb") as fh:
            tasks = json.loads(decode_text(fh.read(), uri))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read ground truth {uri} as JSON: {exc}") from exc
    if isinstance(tasks, dict) and isinstance(tasks.get("tasks"), list):
        tasks = tasks["tasks"]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict)
                                              for t in tasks):
        raise InputError(f"ground truth {uri} is JSON but not a Label Studio export (a list of tasks, each with "
                         "'data' and 'annotations'); CSV/TSV/Parquet tables and class folders are the other forms")
    pairs: list[tuple[str, str]] = []
    why: Counter = Counter()
    for t in tasks:
        data = t["data"]
        ref = data.get(DATA_PATH) or data.get("image") or next(
            (v for v in data.values() if isinstance(v, str) and v), None)
        annotations = [a for a in t.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not annotations:
            why["no annotation" if not t.get("annotations") else "only cancelled annotations"] += 1
            continue
        latest = max(annotations, key=lambda a: (str(a.get("updated_at") or ""), str(a.get("created_at") or ""),
                                                 a.get("id") or 0))
        results = [r for r in latest.get("result") or [] if isinstance(r, dict) and r.get("type") == "choices"]
        if len(results) > 1:
            results = [r for r in results if r.get("from_name") == "label"] or results[:0]
        choices = (results[0].get("value") or {}).get("choices") if results else None
        if not choices or len(choices) != 1:
            why["no single choice in the latest annotation"] += 1
            continue
        if not ref:
            why["no image in data"] += 1
            continue
        path = ref if data.get(DATA_PATH) else path_from_reference(ref)
        pairs.append((normalise_path(path), str(choices[0]).strip()))
    skipped = sum(why.values())
    if skipped:
        log.warning("%s: %d of %d Label Studio tasks give no label and are not ground truth (%s)", uri, skipped,
                    len(tasks), ", ".join(f"{n} {w}" for w, n in why.most_common()))
    if not pairs:
        raise InputError(f"ground truth {uri}: none of its {len(tasks)} Label Studio tasks has an annotation with "
                         "one chosen label (annotate some tasks, then export the project as JSON)")
    return _dedupe(uri, "label-studio", pairs, skipped)


def _read_table(uri: str, fs, root: str) -> pa.Table:
    name = root.lower()
    try:
        if name.endswith(".parquet"):
            with fs.open(root, "rb") as fh:
                return pq.read_table(fh)
        # The csv module keeps every cell as text: labels like "1" or "007" stay labels.
        with fs.open(root, "rb") as fh:
            text = decode_text(fh.read(), uri)
        rows = list(csv.reader(io.StringIO(text), delimiter="\t" if name.endswith(".tsv") else ","))
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read ground truth {uri}: {exc}") from exc
    if not rows:
        raise InputError(f"ground truth {uri} is empty")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if any(c.strip() for c in r)]
    return pa.table({h: pa.array([r[j] if j < len(r) else None for r in body], pa.string())
                     for j, h in enumerate(header)})


def _folder_ground_truth(uri: str, fs, root: str, to_uri) -> GroundTruth:
    from .sources import IMAGE_EXTENSIONS
    from .sources.common import extension

    root = root.rstrip("/")
    pairs, skipped = [], 0
    for f in sorted(fs.find(root)):
        rel = posixpath.relpath(f, root)
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or extension(f) not in IMAGE_EXTENSIONS:
            continue
        if len(parts) < 2:
            skipped += 1  # directly under the root: no class folder
            continue
        pairs.append((normalise_path(to_uri(f)), parts[-2]))
    if skipped:
        log.warning("%d images directly under %s have no class folder and are not ground truth", skipped, uri)
    return _dedupe(uri, "folders", pairs, skipped)


def _dedupe(uri: str, kind: str, pairs: list[tuple[str, str]], skipped: int) -> GroundTruth:
    seen: dict[str, str] = {}
    for p, label in ((p, label_key(label)) for p, label in pairs):
        if p in seen and seen[p] != label:
            raise InputError(f"ground truth {uri} gives {p} two labels: {seen[p]!r} and {label!r}")
        seen.setdefault(p, label)
    if not seen:
        raise InputError(f"ground truth {uri} holds no images")
    return GroundTruth(uri, kind, tuple(seen), tuple(seen.values()), skipped)


@dataclass
class EvalReport:
    """Evaluation of one predictions dataset against ground truth (definitions: module docstring).

    Fractions are in [0, 1], or None when their denominator is 0.
    """

    predictions: str
    ground_truth: str
    ground_truth_images: int
    predicted_rows: int
    matched: int
    matched_by_basename: int
    unmatched_ground_truth: int
    unmatched_predictions: int
    duplicate_predictions: int
    errored: int
    errors_by_code: dict[str, int]
    labeled: int
    top1_correct: int
    top5_correct: int | None
    top1_accuracy: float | None
    top5_accuracy: float | None
    top1_including_errors: float | None
    max_labels_per_row: int
    no_prediction: int
    abstained: int | None
    top1_accuracy_answered: float | None
    coverage: float | None
    per_label: dict[str, dict[str, Any]]
    macro_precision: float | None
    macro_recall: float | None
    confusions: list[dict[str, Any]]
    ground_truth_labels_not_candidates: list[str] | None
    ground_truth_skipped: int = 0
    ground_truth_labels_mapped: dict[str, str] = field(default_factory=dict)  # map_to_candidates
    examples: dict[str, list[str]] = field(default_factory=dict)
    top_k: int = TOP_K                 # k of the top-k line: TOP_K, or the run's smaller --top-k
    topk_correct: int = 0
    topk_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def write_json(self, path: str, storage_options: dict | None = None) -> None:
        """Write ``to_dict()`` as JSON to a local path or fsspec URI."""
        import fsspec

        with fsspec.open(path, "w", **(storage_options or {})) as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)

    def text(self) -> str:
        """A human report for the terminal."""
        def frac(v, num=None, den=None):
            s = "n/a" if v is None else f"{v:.3f}"
            return s + (f" ({num}/{den})" if den is not None else "")

        errs = ", ".join(f"{c}={n}" for c, n in sorted(self.errors_by_code.items()))
        lines = [
            f"evaluation of {self.predictions} against {self.ground_truth}",
            f"  ground-truth images {self.ground_truth_images}, matched {self.matched} "
            f"({self.matched_by_basename} by file name); in ground truth but not predicted "
            f"{self.unmatched_ground_truth}; predicted but not in ground truth {self.unmatched_predictions}",
            f"  errored {self.errored}" + (f" ({errs})" if errs else "") + f"; labeled {self.labeled}",
            f"  top-1 accuracy {frac(self.top1_accuracy, self.top1_correct, self.labeled)}",
            (f"  top-{self.top_k} accuracy {frac(self.topk_accuracy, self.topk_correct, self.labeled)}"
             + (f"  [the run wrote {self.top_k} labels per image: no top-{TOP_K}]" if self.top_k < TOP_K else ""))
            if self.top_k > 1 else f"  no top-{TOP_K} accuracy: the run wrote 1 label per image",
            f"  top-1 including errors {frac(self.top1_including_errors, self.top1_correct, self.matched)}",
        ]
        if self.ground_truth_skipped:
            lines.append(f"  ground-truth entries without a usable label (not counted): {self.ground_truth_skipped}")
        if self.no_prediction:
            lines.append(f"  labeled rows with no label above the threshold: {self.no_prediction}")
        if self.abstained is not None:
            lines.append(f"  abstained {self.abstained}; coverage {frac(self.coverage)}; top-1 accuracy "
                         f"when answering {frac(self.top1_accuracy_answered)}")
        if self.ground_truth_labels_mapped:
            lines.append("  ground-truth labels read as the candidate label they differ from only in case: "
                         + ", ".join(f"{t} -> {c}" for t, c in self.ground_truth_labels_mapped.items()))
        if self.ground_truth_labels_not_candidates:
            lines.append("  ground-truth labels that were not candidate labels (always wrong): "
                         + ", ".join(self.ground_truth_labels_not_candidates))
        width = max([len(k) for k in self.per_label] + [5])
        lines.append(f"  {'label':<{width}}  precision  recall  support  predicted")
        for name, m in self.per_label.items():
            lines.append(f"  {name:<{width}}  {frac(m['precision']):>9}  {frac(m['recall']):>6}  "
                         f"{m['support']:>7}  {m['predicted']:>9}")
        lines.append(f"  {'(macro)':<{width}}  {frac(self.macro_precision):>9}  {frac(self.macro_recall):>6}")
        if self.confusions:
            lines.append("  most confused (truth -> predicted: count):")
            for c in self.confusions:
                lines.append(f"    {c['true']} -> {c['predicted']}: {c['count']}")
        return "\n".join(lines)


@dataclass
class _Prediction:
    labels: list[str] | None
    error: str | None
    abstained: bool | None


def read_predictions(uri: str, storage_options: dict | None = None
                     ) -> tuple[dict[str, _Prediction], int, bool, dict | None]:
    """Read ``path``, the first ``TOP_K`` ``labels``, ``error`` (and ``abstained``) of an output.

    Streams file by file and batch by batch, keeping only those fields per row.

    Returns:
        ``({normalised path: prediction}, duplicate rows, has abstained column, run manifest or None)``.

    Raises:
        InputError: no Parquet files, or no ``path``/``labels``/``error`` columns.
    """
    fs, files, root = output_parquet_files(uri, storage_options)
    preds: dict[str, _Prediction] = {}
    duplicates = 0
    has_abstained = False
    for f in files:
        with fs.open(f, "rb") as fh:
            reader = pq.ParquetFile(fh)
            names = reader.schema_arrow.names
            wanted = [PATH, LABELS, ERROR]
            missing = [c for c in wanted if c not in names]
            if missing:
                raise InputError(f"{f} is not a zslabel output: no {', '.join(missing)} column")
            has_abstained = has_abstained or ABSTAINED in names
            cols = wanted + ([ABSTAINED] if ABSTAINED in names else [])
            for batch in footer_checked_batches(reader, f, columns=cols):
                d = batch.to_pydict()
                abst = d.get(ABSTAINED, [None] * batch.num_rows)
                for p, labels, err, a in zip(d[PATH], d[LABELS], d[ERROR], abst):
                    key = normalise_path(p)
                    pred = _Prediction(None if labels is None else labels[:TOP_K], err, a)
                    old = preds.get(key)
                    if old is None:
                        preds[key] = pred
                        continue
                    duplicates += 1
                    if old.error is not None and err is None:
                        preds[key] = pred
    return preds, duplicates, has_abstained, read_manifest(root, storage_options)


def match_ground_truth(gt: GroundTruth, keys) -> tuple[list[tuple[int, str]], list[int], int]:
    """Match ground-truth entries to prediction keys (normalised paths), as the module docstring
    says: by full path, then by a file name unique on both sides among the unmatched.

    Args:
        gt: the ground truth. keys: collection of normalised prediction paths (unique).

    Returns:
        ``([(ground-truth index, prediction key)], [unmatched ground-truth indices], number
        matched by file name)``.
    """
    matches: list[tuple[int, str]] = []        # (gt index, prediction key)
    unmatched_gt = []
    for i, p in enumerate(gt.paths):
        if p in keys:
            matches.append((i, p))
        else:
            unmatched_gt.append(i)
    used = {p for _, p in matches}
    left_preds = [p for p in keys if p not in used]
    pred_names = Counter(_basename(p) for p in left_preds)
    gt_names = Counter(_basename(gt.paths[i]) for i in unmatched_gt)
    by_name = {_basename(p): p for p in left_preds}
    still_unmatched, by_basename = [], 0
    for i in unmatched_gt:
        name = _basename(gt.paths[i])
        if pred_names[name] == 1 and gt_names[name] == 1:
            matches.append((i, by_name[name]))
            used.add(by_name[name])
            by_basename += 1
        else:
            still_unmatched.append(i)
    return matches, still_unmatched, by_basename


def evaluate(predictions: str, ground_truth: GroundTruth | str, *, storage_options: dict | None = None,
             top_confusions: int = 10) -> EvalReport:
    """Compare a run's output (folder or Parquet file) with ground truth; see the module docstring.

    Args:
        predictions: output folder (or one Parquet file) of ``zslabel label``/``relabel``.
        ground_truth: a ``GroundTruth`` or a URI for ``load_ground_truth``.
        storage_options: fsspec options for both.
        top_confusions: how many confused pairs to report.

    Raises:
        InputError: unreadable predictions or ground truth, or no prediction matches any
            ground-truth image (the message shows what was compared, with examples).
    """
    gt = ground_truth if isinstance(ground_truth, GroundTruth) else load_ground_truth(ground_truth, storage_options)
    preds, duplicates, has_abstained, manifest = read_predictions(predictions, storage_options)
    candidates = (manifest or {}).get("labels")
    gt, mapped = as_candidates(gt, map(label_key, candidates)) if candidates is not None else (gt, {})

    matches, still_unmatched, by_basename = match_ground_truth(gt, preds)
    used = {p for _, p in matches}

    if not matches:
        raise InputError(_no_match_message(gt, list(preds)))

    errors_by_code: Counter = Counter()
    top1 = labeled = no_pred = max_k = 0
    top_hits = [0] * (TOP_K + 1)  # top_hits[k]: labeled rows with the truth among the first k labels
    abstained = answered = answered_correct = 0
    support: Counter = Counter()
    predicted: Counter = Counter()
    correct: Counter = Counter()
    confused: Counter = Counter()
    for i, key in matches:
        truth, pred = gt.labels[i], preds[key]
        if pred.error is not None:
            errors_by_code[error_code(pred.error)] += 1
            continue
        labeled += 1
        labels = [label_key(x) for x in (pred.labels or [])]
        max_k = max(max_k, len(labels))
        first = labels[0] if labels else None
        hit = first == truth
        top1 += hit
        if truth in labels[:TOP_K]:
            for k in range(labels.index(truth) + 1, TOP_K + 1):
                top_hits[k] += 1
        support[truth] += 1
        if first is None:
            no_pred += 1
        else:
            predicted[first] += 1
            if hit:
                correct[truth] += 1
            else:
                confused[(truth, first)] += 1
        if pred.abstained:
            abstained += 1
        else:
            answered += 1
            answered_correct += hit

    all_labels = sorted(set(gt.labels) | set(predicted))
    per_label = {}
    for name in all_labels:
        per_label[name] = {
            "support": support[name], "predicted": predicted[name], "correct": correct[name],
            "precision": _ratio(correct[name], predicted[name]), "recall": _ratio(correct[name], support[name])}
    precisions = [m["precision"] for m in per_label.values() if m["precision"] is not None]
    recalls = [m["recall"] for m in per_label.values() if m["recall"] is not None]
    confusions = [{"true": t, "predicted": p, "count": n}
                  for (t, p), n in sorted(confused.items(), key=lambda kv: (-kv[1], kv[0]))[:top_confusions]]
    not_candidates = sorted(set(gt.labels) - set(map(label_key, candidates))) if candidates is not None else None
    matched = len(matches)
    errored = sum(errors_by_code.values())
    k = _report_k(manifest, max_k)
    top5 = top_hits[TOP_K] if k == TOP_K else None
    return EvalReport(
        predictions=predictions, ground_truth=gt.source, ground_truth_images=len(gt.paths),
        predicted_rows=len(preds), matched=matched, matched_by_basename=by_basename,
        unmatched_ground_truth=len(still_unmatched), unmatched_predictions=len(preds) - len(used),
        duplicate_predictions=duplicates, errored=errored, errors_by_code=dict(sorted(errors_by_code.items())),
        labeled=labeled, top1_correct=top1, top5_correct=top5, top1_accuracy=_ratio(top1, labeled),
        top5_accuracy=None if top5 is None else _ratio(top5, labeled), top1_including_errors=_ratio(top1, matched),
        top_k=k, topk_correct=top_hits[k], topk_accuracy=_ratio(top_hits[k], labeled),
        max_labels_per_row=max_k, no_prediction=no_pred,
        abstained=abstained if has_abstained else None,
        top1_accuracy_answered=_ratio(answered_correct, answered) if has_abstained else None,
        coverage=_ratio(answered, labeled) if has_abstained else None,
        per_label=per_label, macro_precision=_mean(precisions), macro_recall=_mean(recalls),
        confusions=confusions, ground_truth_labels_not_candidates=not_candidates,
        ground_truth_skipped=gt.skipped, ground_truth_labels_mapped=mapped,
        examples={"unmatched_ground_truth": [gt.paths[i] for i in still_unmatched[:EXAMPLES]],
                  "unmatched_predictions": [p for p in preds if p not in used][:EXAMPLES]})


def _no_match_message(gt: GroundTruth, pred_paths: list[str]) -> str:
    """Why evaluating would be meaningless: what was compared, with examples from each side."""
    def some(paths) -> str:
        return ", ".join(repr(p) for p in list(paths)[:2]) or "none"

    side = ("paths of its path column (relative ones taken from the table's folder)" if gt.kind == "table"
            else "image files under its class folders")
    if gt.kind == "label-studio":
        side = "annotated tasks' images (data.zslabel_path, else the image reference)"
    return (f"no prediction matches the ground truth: compared the predictions' 'path' column "
            f"({len(pred_paths)} rows, e.g. {some(pred_paths)}) with the ground truth's {side} "
            f"({len(gt.paths)} images, e.g. {some(gt.paths)}), as normalised full paths and then as "
            "unique file names. Check that both describe the same images (same folder or URI prefix).")


def _report_k(manifest: dict | None, max_labels_per_row: int) -> int:
    """k for the top-k line: ``TOP_K`` when the run wrote that many labels per image (or all its
    labels), else the run's ``top_k`` (from the manifest; without one, the most labels a row has)."""
    config = (manifest or {}).get("config") or {}
    run_k, n_labels = config.get("top_k"), len((manifest or {}).get("labels") or [])
    if isinstance(run_k, int) and run_k > 0:
        if run_k >= TOP_K or (n_labels and run_k >= n_labels):
            return TOP_K
        return run_k
    return max(1, min(TOP_K, max_labels_per_row)) if max_labels_per_row else TOP_K


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
