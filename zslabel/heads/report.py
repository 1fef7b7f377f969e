"""The text report of a fitted head (``zslabel fit`` prints it): examples, strength, held-out
before/after, worst labels, learning curve."""

from __future__ import annotations

import numpy as np

from .head import Head


def strength_text(lam: float | None) -> str:
    """A fitted strength as printed: three significant digits; None (zero-shot won the
    cross-validation) as ``inf (zero-shot won)``."""
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
             f"  strength lam = {strength_text(p.get('lam'))} by {p.get('folds')}-fold cross-validation on "
             f"{p.get('cv_rows')} examples; basis rank {p.get('rank')} (energy kept {p.get('energy_kept', 0):.4f})"]
    if p.get("lam") is None:
        lines.append("  the head's scores are the zero-shot ones: labeling with it changes nothing; more "
                     "labeled examples per label may let a head win")
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
        lines.append(f"    {'zero-shot':<24}{'0':>9} {'0':>8} {zs['zero_shot_top1']:>7.3f} "
                     f"{zs['zero_shot_top5']:>7.3f} {zs['zero_shot_ece']:>7.4f}")
        for row in f["learning_curve"]:
            lines.append(f"    {'head':<24}{row['shots']:>9} {row['examples']:>8} {row['top1']:>7.3f} "
                         f"{row['top5']:>7.3f} {row['ece']:>7.4f}  {strength_text(row['lam'])}"
                         + (" (the main fit's)" if row.get("lam_from_main_fit") else ""))
    if path:
        lines.append(f"  written to {path}")
    return "\n".join(lines)
