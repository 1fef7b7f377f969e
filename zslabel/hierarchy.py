"""Label hierarchies: labels written as paths (``animal/mammal/dog``) and the roll-up of leaf scores.

A label containing ``/`` is a path; its components name the nodes above it. The label as
written (the full path) is what the output's ``labels`` column holds; the text prompt of a path
label uses its last component only (``prompt_name``: ``"animal/mammal/dog"`` -> ``"dog"``), since
CLIP-family text towers were trained on captions, not on taxonomy paths. A label without ``/``
is its own prompt, as before.

Nodes are every path prefix of every label (``animal``, ``animal/mammal``,
``animal/mammal/dog``); a node's score rolls up the scores of the labels at or below it:

- softmax scores (CLIP-family; one label per image, scores sum to 1 over all labels): the
  **sum** over its descendant labels -- the probability that the image's label lies under
  that node.
- sigmoid scores (SigLIP-family; independent per label): **noisy-OR**,
  ``1 - prod(1 - s_leaf)`` -- the probability that at least one descendant label applies if
  the labels were independent. Summing could exceed 1; the maximum would ignore that several
  weak children together support their parent.

With ``--hierarchy`` (and ``--min-score S``) each labeled image gets the deepest node whose
rolled-up score reaches S (ties at the same depth: the higher score, then the first in label
order): ``hier_label`` (the node's path), ``hier_score`` and ``hier_path`` (its path components,
root first). No node reaching S leaves the three columns null. With calibrated
scores S reads as the estimated probability that the answer is right.

Pure numpy, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .output import HIER_LABEL, HIER_PATH, HIER_SCORE

SEPARATOR = "/"


def prompt_name(label: str) -> str:
    """The text a label puts into its prompt templates: the last path component, stripped
    (``"animal/mammal/dog"`` -> ``"dog"``; ``"red circle"`` -> ``"red circle"``)."""
    return label.rsplit(SEPARATOR, 1)[-1].strip() if SEPARATOR in label else label


def is_hierarchical(labels: list[str]) -> bool:
    """Whether any label is a path (contains ``/``)."""
    return any(SEPARATOR in x for x in labels)


def split_path(label: str) -> list[str]:
    """Stripped components of a path label (``" a / b "`` -> ``["a", "b"]``)."""
    return [p.strip() for p in label.split(SEPARATOR)]


@dataclass(frozen=True)
class Hierarchy:
    """The node tree of a label list.

    Attributes:
        labels: the C labels (leaves as written).
        nodes: M node paths (components joined by ``/``), parents before children.
        depth: (M,) int64, 1 for top-level nodes.
        membership: (C, M) float32, 1 where label c lies at or below node m.
    """

    labels: tuple[str, ...]
    nodes: tuple[str, ...]
    depth: np.ndarray
    membership: np.ndarray

    @classmethod
    def from_labels(cls, labels: list[str]) -> "Hierarchy":
        """Build the tree; a label that is a prefix of another is a node with its own score too.

        Raises:
            ValueError: a path with an empty component (``"a//b"``, ``"/a"``).
        """
        index: dict[str, int] = {}
        nodes: list[str] = []
        for label in labels:
            parts = split_path(label)
            if any(not p for p in parts):
                raise ValueError(f"label {label!r} has an empty path component")
            for d in range(1, len(parts) + 1):
                node = SEPARATOR.join(parts[:d])
                if node not in index:
                    index[node] = len(nodes)
                    nodes.append(node)
        member = np.zeros((len(labels), len(nodes)), np.float32)
        for c, label in enumerate(labels):
            parts = split_path(label)
            for d in range(1, len(parts) + 1):
                member[c, index[SEPARATOR.join(parts[:d])]] = 1.0
        depth = np.array([n.count(SEPARATOR) + 1 for n in nodes], np.int64)
        return cls(tuple(labels), tuple(nodes), depth, member)

    def rollup(self, scores: np.ndarray, score_kind: str) -> np.ndarray:
        """Node scores from label scores (module docstring).

        Args:
            scores: (N, C) float32 label scores in [0, 1].
            score_kind: ``"softmax"`` (sum) or ``"sigmoid"`` (noisy-OR).

        Returns:
            (N, M) float32 node scores, clipped to [0, 1] (float rounding of sums).
        """
        s = np.asarray(scores, np.float64)
        if score_kind == "softmax":
            out = s @ self.membership.astype(np.float64)
        elif score_kind == "sigmoid":
            # prod(1 - s) over members as exp(sum(log1p(-s))); s = 1 gives log(0) = -inf -> 0.
            with np.errstate(divide="ignore"):
                out = 1.0 - np.exp(np.log1p(-np.clip(s, 0.0, 1.0)) @ self.membership.astype(np.float64))
        else:
            raise ValueError(f"unknown score kind {score_kind!r}")
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def deepest(self, node_scores: np.ndarray, min_score: float) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the deepest node whose score is >= ``min_score``.

        Args:
            node_scores: (N, M) float32 from ``rollup``.

        Returns:
            ``(node index (N,) int64, -1 where no node qualifies; its score (N,) float32, NaN there)``.
            Ties at equal depth go to the higher score, then the earlier node.
        """
        s = np.asarray(node_scores, np.float32)
        n = s.shape[0]
        ok = s >= np.float32(min_score)
        # Rank key: depth first, then score; non-qualifying nodes get -inf.
        key = np.where(ok, self.depth[None, :] * 4.0 + s.astype(np.float64), -np.inf)
        best = np.argmax(key, axis=1) if s.shape[1] else np.zeros(n, np.int64)
        found = ok[np.arange(n), best] if s.shape[1] else np.zeros(n, bool)
        idx = np.where(found, best, -1).astype(np.int64)
        val = np.where(found, s[np.arange(n), best] if s.shape[1] else np.nan, np.nan).astype(np.float32)
        return idx, val

    def path_of(self, node: int) -> list[str]:
        """The node's path components, root first (``"a/b/c"`` -> ``["a", "b", "c"]``)."""
        return self.nodes[node].split(SEPARATOR)

    def columns(self, scores: np.ndarray, ok: np.ndarray, score_kind: str, min_score: float) -> dict[str, list]:
        """The ``output.HIERARCHY_FIELDS`` columns of a batch.

        Args:
            scores: (M, C) float32 scores of the M rows where ``ok`` is True.
            ok: (N,) bool labeled rows.

        Returns:
            ``{"hier_label": [N], "hier_score": [N], "hier_path": [N]}`` python lists, None on
            error rows and rows where no node reaches ``min_score``.
        """
        n = len(ok)
        labels: list = [None] * n
        values: list = [None] * n
        paths: list = [None] * n
        rows = np.flatnonzero(ok)
        if len(rows):
            idx, val = self.deepest(self.rollup(scores, score_kind), min_score)
            for r, i, v in zip(rows, idx, val):
                if i >= 0:
                    labels[r], values[r], paths[r] = self.nodes[i], float(v), self.path_of(int(i))
        return {HIER_LABEL: labels, HIER_SCORE: values, HIER_PATH: paths}


def check_options(hierarchy: bool, min_score: float | None) -> None:
    """Raise ConfigError when ``--hierarchy`` is given without ``--min-score`` (the roll-up
    needs the score a node must reach)."""
    from .errors import ConfigError

    if hierarchy and min_score is None:
        raise ConfigError("--hierarchy needs --min-score S: the output names the deepest label path whose "
                          "rolled-up score reaches S")
