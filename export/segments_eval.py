"""Metrics for temporal parsing and frame embeddings (issue 11), as pure numpy functions.

Boundaries are frame indices of the first frame of a new segment; labels are per-frame ints.
The tables come from `python -m export.evaluate_segments`; this module only measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ABSOLUTE_FRAMES = (1, 2, 3, 4, 5)
ABSOLUTE_SECONDS = (0.1, 0.2, 0.3, 0.4, 0.5)
RELATIVE = tuple(round(0.05 * k, 2) for k in range(1, 11))  # TAPOS: 0.05 .. 0.5 of the length
SEGMENTAL_IOU = (0.10, 0.25, 0.50)


@dataclass(frozen=True)
class Counts:
    """Matched predictions, predictions and ground truths, summed over videos (micro average)."""

    matched: int = 0
    predicted: int = 0
    truth: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.matched + other.matched, self.predicted + other.predicted,
                      self.truth + other.truth)

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.matched / self.truth if self.truth else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def match_boundaries(predicted, truth, tolerance: float) -> Counts:
    """One-to-one matching: each truth boundary absorbs at most one prediction within `tolerance`.

    On a line, scanning both sorted lists and matching whenever the heads are within tolerance
    gives a maximum matching, so no prediction is counted twice and none is wasted.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    p = np.sort(np.asarray(predicted, float))
    g = np.sort(np.asarray(truth, float))
    i = j = matched = 0
    while i < len(p) and j < len(g):
        if abs(p[i] - g[j]) <= tolerance + 1e-9:
            matched, i, j = matched + 1, i + 1, j + 1
        elif p[i] < g[j]:
            i += 1
        else:
            j += 1
    return Counts(matched, len(p), len(g))


def boundary_scores(videos, tolerances) -> dict[float, Counts]:
    """Counts per tolerance summed over videos; `videos` yields (predicted, truth, scale) where a
    video's tolerance is `tolerance * scale` (1 for frames, fps for seconds, length for relative)."""
    totals = {t: Counts() for t in tolerances}
    for predicted, truth, scale in videos:
        for t in tolerances:
            totals[t] = totals[t] + match_boundaries(predicted, truth, t * scale)
    return totals


def average(counts: dict[float, Counts]) -> dict[str, float]:
    """F1, precision and recall averaged over thresholds (TAPOS reports the average F1)."""
    values = list(counts.values())
    return {name: float(np.mean([getattr(c, name) for c in values]))
            for name in ("f1", "precision", "recall")}


def boundaries_of(labels) -> np.ndarray:
    """Frames where the per-frame label changes (the first frame of each new segment)."""
    labels = np.asarray(labels)
    return np.flatnonzero(labels[1:] != labels[:-1]) + 1


def segments_of(labels) -> list[tuple[int, int, int]]:
    """(label, start, end) runs of a per-frame label sequence, end exclusive."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return []
    edges = [0, *boundaries_of(labels).tolist(), len(labels)]
    return [(int(labels[s]), s, e) for s, e in zip(edges[:-1], edges[1:])]


def labels_from_boundaries(boundaries, length: int, order=None) -> np.ndarray:
    """Per-frame segment index (or `order[segment]`, clipped to its last entry) from boundaries."""
    seg = np.searchsorted(np.sort(np.asarray(boundaries, int)), np.arange(length), side="right")
    if order is None:
        return seg
    order = np.asarray(order)
    return order[np.minimum(seg, len(order) - 1)]


def drop_short_segments(labels, min_length: int) -> np.ndarray:
    """Merge runs shorter than `min_length` frames into a neighbour, shortest first.

    A short run joins the neighbour whose label it shares on the other side when both sides
    agree (flicker), otherwise the longer neighbour.
    """
    labels = np.asarray(labels).copy()
    if min_length <= 1:
        return labels
    while True:
        runs = segments_of(labels)
        if len(runs) < 2:
            return labels
        k = min(range(len(runs)), key=lambda i: runs[i][2] - runs[i][1])
        label, s, e = runs[k]
        if e - s >= min_length:
            return labels
        left = runs[k - 1] if k > 0 else None
        right = runs[k + 1] if k + 1 < len(runs) else None
        if left is None or (right is not None and right[2] - right[1] > left[2] - left[1]):
            labels[s:e] = right[0]
        else:
            labels[s:e] = left[0]


def frame_accuracy(predicted, truth) -> float:
    """Mean over frames (MoF)."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape or truth.size == 0:
        raise ValueError(f"need equal non-empty shapes, got {predicted.shape} and {truth.shape}")
    return float((predicted == truth).mean())


def segmental_counts(predicted, truth, iou: float) -> Counts:
    """Segmental matching (Lea et al., MS-TCN's F1@k): a predicted segment is correct when its
    IoU with a not-yet-matched truth segment of the same label reaches `iou`."""
    pred, true = segments_of(predicted), segments_of(truth)
    used = [False] * len(true)
    matched = 0
    for label, s, e in pred:
        best, best_iou = -1, 0.0
        for k, (tl, ts, te) in enumerate(true):
            if tl != label:
                continue
            inter = max(0, min(e, te) - max(s, ts))
            union = max(e, te) - min(s, ts)
            if inter / union > best_iou:
                best, best_iou = k, inter / union
        if best >= 0 and best_iou >= iou and not used[best]:
            used[best] = True
            matched += 1
    return Counts(matched, len(pred), len(true))


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties in either sequence handled), O(n^2): sequences here are short."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("need two 1-d sequences of the same length >= 2")
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    dx, dy = dx[iu], dy[iu]
    denom = np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
    return float((dx * dy).sum() / denom) if denom else 0.0


def alignment_tau(a, b) -> float:
    """CARL/TCC Kendall's tau: each frame of `a` picks its nearest frame of `b` (cosine); tau
    between the frame order of `a` and the order of the picked frames."""
    a, b = _normalise(a), _normalise(b)
    nearest = np.argmax(a @ b.T, axis=1)
    return kendall_tau(np.arange(len(a)), nearest)


def retrieval_ap(queries, query_labels, gallery, gallery_labels, k: int) -> float:
    """Mean over queries of AP@k = sum_{i<=k} P@i * rel_i / k (cosine nearest neighbours).

    Dividing by k (not by the relevant items found) makes a query that finds only a few matching
    frames score low, which the lenient form would hide.
    """
    return float(retrieval_ap_per_query(queries, query_labels, gallery, gallery_labels, k).mean())


def retrieval_ap_per_query(queries, query_labels, gallery, gallery_labels, k: int) -> np.ndarray:
    """AP@k of each query (see `retrieval_ap`)."""
    q, g = _normalise(queries), _normalise(gallery)
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    if k < 1 or k > len(g):
        raise ValueError(f"k must be in 1..{len(g)}, got {k}")
    sims = q @ g.T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable"), 1)
    relevant = gallery_labels[top] == query_labels[:, None]
    precision_at = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    return (precision_at * relevant).sum(axis=1) / k


def balanced_accuracy(predicted, truth) -> float:
    """Mean over the classes present in `truth` of the recall of that class."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    classes = np.unique(truth)
    return float(np.mean([(predicted[truth == c] == c).mean() for c in classes]))


def r_squared(predicted, truth) -> float:
    truth, predicted = np.asarray(truth, float), np.asarray(predicted, float)
    total = ((truth - truth.mean()) ** 2).sum()
    return float(1 - ((truth - predicted) ** 2).sum() / total) if total else 0.0


def _normalise(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
