"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no
display, no global figure state) and saved as small PNGs.

Every text drawn from data (label names) is drawn with ``parse_math=False``: matplotlib would
otherwise read ``$...$`` in a label as TeX. PNGs carry no date, so a report is byte-reproducible.
"""

from __future__ import annotations

import numpy as np

DPI = 96
# PNG metadata without matplotlib's version string: reports of the same output and seed match
# byte for byte across matplotlib patch releases.
METADATA = {"Software": None}
BLUE, GREY, RED = "#3b6ea8", "#b9b9b9", "#c0392b"


def _figure(w_in: float, h_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w_in, h_in), dpi=DPI, layout="constrained")


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: str) -> None:
    fig.savefig(path, format="png", metadata=METADATA)


class ScoreHistograms:
    """Top-1 score distributions of single labels, one PNG each, drawn on one reused figure.

    Building a matplotlib figure costs far more than drawing it; a report draws up to
    ``--max-label-sections`` of these, so the axes, bars and outline are made once and only
    their heights change per label (fixed margins: no layout engine per figure).

    Args:
        bins: equal-width bins on [0, 1].
        overall: (bins,) all labels' histogram, drawn as a grey outline scaled to each label's
            total, for comparison.
    """

    def __init__(self, bins: int, overall: np.ndarray):
        from matplotlib.figure import Figure

        self.overall = overall.astype(float)
        self.fig = Figure(figsize=(3.4, 1.35), dpi=DPI)
        self.fig.subplots_adjust(left=0.13, right=0.97, top=0.95, bottom=0.27)
        ax = self.ax = self.fig.add_subplot()
        edges = np.linspace(0, 1, bins + 1)
        self.bars = ax.bar(edges[:-1], np.zeros(bins), width=1 / bins, align="edge", color=BLUE, linewidth=0)
        self.outline = ax.stairs(np.zeros(bins), edges, color=GREY, linewidth=1)
        ax.set_xlim(0, 1)
        # Few text items: text layout is most of a small figure's drawing time.
        ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
        ax.set_xlabel("top-1 score", fontsize=7, labelpad=1)
        ax.tick_params(labelsize=6)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)

    def save(self, path: str, counts: np.ndarray) -> None:
        """Draw one label's ``counts`` (bins,) images per bin and save the PNG to ``path``."""
        for bar, v in zip(self.bars, counts):
            bar.set_height(float(v))
        total = float(counts.sum())
        scaled = self.overall * (total / self.overall.sum()) if self.overall.sum() and total else self.overall * 0
        self.outline.set_data(scaled)
        top = int(counts.max(initial=0))
        self.ax.set_ylim(0, max(1.0, top, float(scaled.max(initial=0))) * 1.05)
        self.ax.set_yticks([0, top] if top else [0], ["0", f"{top:,}"] if top else ["0"])
        _save(self.fig, path)


def overview(path: str, names: list[str], counts: np.ndarray, hist: np.ndarray) -> None:
    """Left: images per top-1 label (the 30 most frequent); right: top-1 score distribution of
    all labeled images (``hist`` (B,))."""
    order = np.argsort(-counts, kind="stable")[:30]
    order = order[counts[order] > 0]
    fig = _figure(8.4, max(2.2, 0.16 * len(order) + 0.8))
    left, right = fig.subplots(1, 2, width_ratios=[1.25, 1])
    y = np.arange(len(order))
    left.barh(y, counts[order], color=BLUE)
    left.set_yticks(y, [names[i] for i in order], fontsize=6, parse_math=False)
    left.invert_yaxis()
    left.set_xlabel("images (top-1)", fontsize=7)
    left.set_title("images per label" + (" (30 most frequent)" if len(counts) > 30 else ""), fontsize=8)
    bins = len(hist)
    right.bar(np.linspace(0, 1, bins + 1)[:-1], hist, width=1 / bins, align="edge", color=BLUE, linewidth=0)
    right.set_xlim(0, 1)
    right.set_xlabel("top-1 score", fontsize=7)
    right.set_title("top-1 score, all labeled images", fontsize=8)
    _integer_ticks(left.xaxis)
    _integer_ticks(right.yaxis)
    for ax in (left, right):
        ax.tick_params(labelsize=6)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    _save(fig, path)


def confusion_heatmap(path: str, names: list[str], matrix: np.ndarray) -> None:
    """Rows = true label, columns = first label; colour = share of the row (recall on the
    diagonal); counts written in cells when the matrix is small."""
    n = len(names)
    size = min(9.0, max(3.2, 0.28 * n + 1.6))
    fig = _figure(size + 0.9, size)
    ax = fig.add_subplot()
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ticks = np.arange(n)
    fs = 7 if n <= 20 else 5
    ax.set_xticks(ticks, names, rotation=90, fontsize=fs, parse_math=False)
    ax.set_yticks(ticks, names, fontsize=fs, parse_math=False)
    ax.set_xlabel("predicted (first label)", fontsize=7)
    ax.set_ylabel("true label", fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.7, label="share of the true label's images")
    _save(fig, path)


def reliability_diagram(path: str, bins: list[dict], ece: float | None, title: str) -> None:
    """Accuracy per top-1 score bin against the diagonal (perfect calibration), with the images
    per bin below; ``bins`` as ``truth.reliability``."""
    fig = _figure(4.2, 4.0)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    lo = np.array([b["lo"] for b in bins])
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.1
    acc = np.array([b["accuracy"] if b["accuracy"] is not None else np.nan for b in bins])
    conf = np.array([b["confidence"] if b["confidence"] is not None else np.nan for b in bins])
    top.plot([0, 1], [0, 1], color=GREY, linewidth=1, linestyle="--", label="perfectly calibrated")
    top.bar(lo, np.nan_to_num(acc), width=width, align="edge", color=BLUE, edgecolor="white", label="accuracy")
    top.plot(conf, acc, "o", color=RED, markersize=3, label="mean score in bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("top-1 accuracy", fontsize=7)
    top.set_title(title + (f"  (ECE {ece:.3f})" if ece is not None else ""), fontsize=8, parse_math=False)
    top.legend(fontsize=6, loc="upper left")
    bottom.bar(lo, [b["n"] for b in bins], width=width, align="edge", color=GREY)
    bottom.set_xlabel("top-1 score", fontsize=7)
    bottom.set_ylabel("images", fontsize=7)
    _integer_ticks(bottom.yaxis)
    for ax in (top, bottom):
        ax.tick_params(labelsize=6)
    _save(fig, path)
