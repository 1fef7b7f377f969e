"""From the collected facts to ``index.html``: the view model (plain dicts) and the Jinja2 page.

The template (``templates/index.html.j2``) is rendered with autoescaping on for every value, so
a label or path holding ``<script>`` or quotes shows as text, in attributes too. The page has
no script and references only files inside the report folder (thumbnails, figures): it opens
from disk with no server and makes no network request.
"""

from __future__ import annotations

import math
import posixpath
from typing import Any

import numpy as np

from .collect import CLOSE_MARGIN, Row, Scan
from .thumbs import Thumb

# Labels listed under "labels to review first".
ATTENTION = 5
# Labels shown in a thumbnail caption.
CAPTION_LABELS = 3


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pct(num: float, den: float) -> str:
    if not den:
        return "n/a"
    share = 100.0 * num / den
    return f"{share:.2f}%" if 0 < share < 1 else f"{share:.1f}%"


def short_name(path: str) -> str:
    """What a caption shows of a path: the file name (a tar member's name, without its shard)."""
    return posixpath.basename(path.rsplit("#", 1)[-1]) or path


def thumb_view(row: Row, thumb: Thumb, truth: str | None = None) -> dict[str, Any]:
    """One thumbnail's template data: image, caption lines and hover text (path, all labels)."""
    pairs = list(zip(row.labels, row.scores))
    hover = [row.path]
    if row.error:
        hover.append(row.error)
    hover += [f"{lab}: {sc:.4f}" for lab, sc in pairs]
    if truth is not None:
        hover.append(f"ground truth: {truth}")
    if thumb.note:
        hover.append(f"(no picture: {thumb.note})")
    if row.width and row.height:
        hover.append(f"{row.width} x {row.height} px")
    return {"src": thumb.src, "name": short_name(row.path), "path": row.path, "hover": "\n".join(hover),
            "labels": [(lab, f"{sc:.3f}") for lab, sc in pairs[:CAPTION_LABELS]], "error": row.error,
            "abstained": bool(row.abstained), "truth": truth, "placeholder": thumb.note is not None}


def run_facts(manifest: dict | None, scan: Scan) -> dict[str, Any]:
    """The "run at a glance" table: ``{"rows": [(name, value)], "labels": [...], "templates": [...]}``."""
    m = manifest or {}
    cfg = m.get("config") or {}
    model = m.get("model") or {}
    counts = m.get("counts") or {}
    timings = m.get("timings") or {}
    rows: list[tuple[str, str]] = []

    def add(name: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            rows.append((name, str(value)))

    modes = {None: "new output", "error": "new output", "resume": "--resume", "overwrite": "--overwrite"}
    run_id = f", run id {m['run_id']}" if m.get("run_id") else ""
    add("run", f"{m.get('kind', '?')} ({modes.get(m.get('mode'), m.get('mode'))}{run_id})" if m else
        "no run manifest: an unfinished run (or not a zslabel output); counts below are from the rows")
    add("model", model.get("id"))
    add("revision", model.get("revision"))
    add("checkpoint digest", (model.get("digest") or "")[:16])
    add("score kind", model.get("score_kind"))
    add("labels", len(m.get("labels") or scan.labels))
    add("templates", len(m.get("templates") or []))
    calib = m.get("calibration")
    if calib:
        ece = calib.get("held_out_ece") or {}
        add("calibration", f"{calib.get('kind')} id {calib.get('id')}"
            + (f", T = {calib['temperature']:.3f}" if calib.get("temperature") else "")
            + (f"; held-out ECE {_fmt(ece.get('before'))} -> {_fmt(ece.get('after'))}" if ece else ""))
    for key in ("head", "hierarchy"):  # ids of a trained head / label hierarchy, when a run records them
        entry = m.get(key)
        if isinstance(entry, dict):
            add(key, entry.get("id") or entry)
        elif entry:
            add(key, entry)
    if cfg.get("hierarchy") and not m.get("hierarchy"):
        add("hierarchy", "on (hier_label / hier_score / hier_path columns)")
    add("min score (abstain below)", cfg.get("min_score"))
    add("top-k", cfg.get("top_k"))
    add("input", cfg.get("input") or (m.get("relabel") or {}).get("source"))
    listed = counts.get("listed")
    add("listed", f"{listed:,}" if isinstance(listed, int) else None)
    rows_n = counts.get("rows", scan.rows)
    add("rows", f"{rows_n:,}")
    add("labeled", f"{counts.get('labeled', scan.labeled):,}")
    add("skipped (not images)", f"{counts.get('skipped', 0):,}")
    if counts.get("duplicates_removed"):
        add("duplicates removed", f"{counts['duplicates_removed']:,}")
    errs = counts.get("errors_by_code", scan.errors_by_code)
    add("errors", ", ".join(f"{c} {n:,}" for c, n in sorted(errs.items())) or "none")
    wall = timings.get("wall_s")
    if wall:
        add("wall time", f"{wall:.1f} s")
        add("rate", f"{rows_n / wall:.1f} images/s")
    bound = timings.get("bound")
    if bound:
        add("bound", f"{bound}-bound (decode needs {timings.get('decode_need_s')} s with "
            f"{timings.get('decode_slots')} slots, model {timings.get('model_need_s')} s with "
            f"{timings.get('model_actors')} actors; actors busy {_fmt(timings.get('model_utilisation'), 2)})")
    add("zslabel", (m.get("versions") or {}).get("zslabel"))
    return {"rows": rows, "labels": list(m.get("labels") or []), "templates": list(m.get("templates") or [])}


def label_table(scan: Scan, truth=None) -> list[dict[str, Any]]:
    """One dict per label with at least one top-1 image, ground-truth support or prediction,
    ordered worst first (see ``attention_key``)."""
    per_label = truth.report.per_label if truth is not None else {}
    ups = scan.runner_ups()
    confused_as: dict[str, tuple[str, int]] = {}
    if truth is not None:
        for c in truth.report.confusions:
            confused_as.setdefault(c["true"], (c["predicted"], c["count"]))
    out = []
    labeled_total = max(1, int(scan.top1_count.sum()))
    ids = {name: i for i, name in enumerate(scan.labels)}
    for name in list(scan.labels) + [n for n in per_label if n not in ids]:
        i = ids.get(name)
        n = int(scan.top1_count[i]) if i is not None else 0
        gt = per_label.get(name)
        if n == 0 and not gt:
            continue
        d = {"name": name, "id": i, "count": n, "share": _pct(n, labeled_total),
             "mean_score": scan.score_sum[i] / n if n else None,
             "mean_margin": scan.margin_sum[i] / n if n else None,
             "close": scan.close_count[i] / n if n else None,
             "abstained": scan.abstained_count[i] / n if (n and scan.has_abstained) else None,
             "runner_up": ups.get(i) if i is not None else None}
        if gt is not None:
            p, r = gt["precision"], gt["recall"]
            d.update(precision=p, recall=r, support=gt["support"], predicted=gt["predicted"],
                     f1=(2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else
                         (0.0 if (p is not None or r is not None) else None)),
                     confused_as=confused_as.get(name))
        out.append(d)
    out.sort(key=attention_key)
    return out


def attention_key(d: dict) -> tuple:
    """Worst first: with ground truth, lowest F1 (labels without one last); otherwise the largest
    share of close calls, then the smallest mean margin."""
    f1 = d.get("f1")
    if "support" in d:
        # Ties (often F1 0) by the images the label got wrong: missed plus wrongly given.
        wrong = ((d["support"] - (d["recall"] or 0) * d["support"])
                 + (d["predicted"] - (d["precision"] or 0) * d["predicted"]))
        return (0 if f1 is not None else 1, f1 if f1 is not None else 0.0, -round(wrong), -d["count"], d["name"])
    close = d["close"] if d["close"] is not None else -1.0
    margin = d["mean_margin"] if d["mean_margin"] is not None else 1.0
    return (1, 0.0, -close, margin, d["name"])


def attention_reasons(table: list[dict], has_truth: bool) -> list[dict[str, Any]]:
    """The first ``ATTENTION`` labels of ``table`` with one sentence each on why."""
    out = []
    for d in table[:ATTENTION]:
        parts = []
        if has_truth and d.get("support") is not None:
            parts.append(f"F1 {_fmt(d.get('f1'), 2)}: precision {_fmt(d.get('precision'), 2)} "
                         f"({d.get('predicted', 0)} predicted), recall {_fmt(d.get('recall'), 2)} "
                         f"({d.get('support', 0)} true images)")
            if d.get("confused_as"):
                parts.append(f"its images were most often called \u201c{d['confused_as'][0]}\u201d "
                             f"({d['confused_as'][1]} times)")
        if d["count"]:
            parts.append(f"{_pct(d['close'] * d['count'], d['count'])} of its {d['count']:,} top-1 images are close "
                         f"calls (margin to the runner-up < {CLOSE_MARGIN}), mean top-1 score "
                         f"{_fmt(d['mean_score'], 2)}")
            if d.get("runner_up"):
                parts.append(f"close calls were mostly against \u201c{d['runner_up'][0]}\u201d "
                             f"({d['runner_up'][1]:,})")
            if d.get("abstained"):
                parts.append(f"{100 * d['abstained']:.0f}% abstained")
        out.append({"name": d["name"], "id": d["id"], "why": "; ".join(parts)})
    return out


def format_table(table: list[dict]) -> list[dict]:
    """``label_table`` rows with numbers as display strings."""
    out = []
    for d in table:
        e = dict(d)
        e["mean_score"] = _fmt(d["mean_score"])
        e["mean_margin"] = _fmt(d["mean_margin"])
        e["close"] = _fmt(100 * d["close"], 0) + "%" if d["close"] is not None else "n/a"
        e["abstained"] = _fmt(100 * d["abstained"], 0) + "%" if d["abstained"] is not None else ""
        e["runner_up"] = f"{d['runner_up'][0]} ({d['runner_up'][1]:,})" if d.get("runner_up") else ""
        for k in ("precision", "recall", "f1"):
            if k in d:
                e[k] = _fmt(d[k])
        if d.get("confused_as"):
            e["confused_as"] = f"{d['confused_as'][0]} ({d['confused_as'][1]})"
        out.append(e)
    return out


def render_html(context: dict[str, Any]) -> str:
    """``index.html`` text from the template, autoescaped."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("zslabel.review", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template("index.html.j2").render(**context)


def histogram_of(scan: Scan) -> np.ndarray:
    """(B,) top-1 score histogram over all labels."""
    return scan.hist.sum(axis=0)
