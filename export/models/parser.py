"""Temporal action parser (TransParser-style, issue 11) and its trained boundary-detector baseline.

frames (B, T, 28, 28, 3) uint8 (the served 112 px frames as 4x4 means) -> per-frame CNN over each
frame and its difference to the previous frame, with a +-2-frame temporal conv (`FrameFeatures`)
-> a temporal-conv front end (+-4 frames more) -> two SPS units -> per-frame responses over m
learnt patterns. Why per-frame features: a clip of the served encoder spans 8 frames = 0.53 s, as
long as a whole take-off or entry (0.3-0.6 s), so clip features cannot place a boundary to the
1-5 frame tolerances the issue measures; a frame CNN sees every frame, and the frame difference
shows motion (crouch, spring, rotation, splash) at frame rate without a 3D stem at stride 1.

Decoding. TransParser starts a sub-action where the arg-max pattern changes; here the change is
measured softly: the pattern-change score of frame t is the total-variation distance between the
mean responses of the `change_window` frames before t and from t on (1 when the pattern
distribution switches completely, 0 inside a steady sub-action). Scores that are not the maximum
within +-(min_segment_frames - 1) are zeroed in the graph, so no two boundaries come closer
than the minimum segment length; `decode_segments` keeps those above a threshold (at most
`max_boundaries`). The arg-max decoding stays available (`parse_responses`) for comparison.

Losses: the paper's local loss (all pairs of a window, and again on pairs at most a few frames
apart) and global classification loss, plus a boundary loss on the pattern-change score
(`boundary_loss`, beyond the paper). Measured on validation (README): the paper's losses alone
leave the responses on two or three patterns for five sub-actions, so take-off and flight rarely
get a pattern of their own; the boundary loss teaches the patterns to switch where a sub-action
starts and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from export import segments_eval
from export.models.embedder import FrameCNN
from torch.nn import functional as F


class SPSUnit(nn.Module):
    """Soft-Pattern-Strengthen: each step's feature attends (2 heads) to a learnt pattern miner
    of m patterns; the heads' results go through one linear layer, are added to the feature
    (amplification) and refined by an FFN.

    With `scale`, a query meets a key by `scale` times their cosine instead of their scaled dot
    product: the responses cannot saturate to one-hot, where the local loss stops teaching
    (measured: unbounded responses collapsed the five sub-actions onto two patterns)."""

    def __init__(self, dim: int, patterns: int, heads: int = 2, scale: float | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must divide into {heads} heads")
        self.heads, self.scale = heads, scale
        self.miner = nn.Parameter(torch.randn(patterns, dim) / math.sqrt(dim))
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.merge = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, dim))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f (B, T, D) -> refined features (B, T, D), responses (B, T, m) averaged over heads."""
        b, t, d = f.shape
        m, h = self.miner.shape[0], self.heads
        q = self.query(f).view(b, t, h, d // h).transpose(1, 2)  # B, H, T, d/h
        k = self.key(self.miner).view(m, h, d // h).transpose(0, 1)  # H, m, d/h
        v = self.value(self.miner).view(m, h, d // h).transpose(0, 1)
        if self.scale is None:
            logits = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        else:
            logits = self.scale * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        alpha = torch.softmax(logits, dim=-1)  # B, H, T, m
        r = self.merge((alpha @ v).transpose(1, 2).reshape(b, t, d))
        x = self.norm1(f + r)
        return self.norm2(x + self.ffn(x)), alpha.mean(dim=1)


class FrameFeatures(nn.Module):
    """Per-frame CNN (frame + frame difference) and a small temporal conv for +-2 frames of context."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.cnn = FrameCNN(dim, motion=True)
        self.temporal = nn.Conv1d(dim, dim, 5, padding=2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        f = self.cnn(frames)
        return self.norm(f + torch.relu(self.temporal(f.transpose(1, 2))).transpose(1, 2))


class TemporalFrontEnd(nn.Module):
    """Two +-2-frame temporal convs with a residual: each frame's feature sees what happens 4
    frames either side before the SPS units, which look at one frame at a time. The last conv
    starts at zero, so the front end starts as the identity on stage-1 features."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(dim, dim, 5, padding=2), nn.Conv1d(dim, dim, 5, padding=2)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.norm = nn.LayerNorm(dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv1(f.transpose(1, 2)))).transpose(1, 2)
        return self.norm(f + x)


class ActionParser(nn.Module):
    """`forward(frames)` -> (responses (B, T, m), class logits (B, classes)); `heads(features)` is
    the same from `FrameFeatures` output (stage 2 trains the heads on frozen features)."""

    def __init__(self, *, classes: int, dim: int = 128, patterns: int = 8, units: int = 2, front: bool = False,
                 change_window: int = 2, min_segment_frames: int = 3, scale: float | None = None):
        super().__init__()
        if change_window < 1 or min_segment_frames < 1:
            raise ValueError("change_window and min_segment_frames must be at least 1")
        self.change_window, self.min_segment_frames = change_window, min_segment_frames
        self.features = FrameFeatures(dim)
        self.front = TemporalFrontEnd(dim) if front else nn.Identity()
        self.units = nn.ModuleList(SPSUnit(dim, patterns, scale=scale) for _ in range(units))
        self.classifier = nn.Linear(dim, classes)

    @property
    def context_frames(self) -> int:
        """How far (in frames) an output looks either side: motion 1, stage-1 conv 2, front end 4,
        the change window and the non-maximum suppression."""
        front = 4 if isinstance(self.front, TemporalFrontEnd) else 0
        return 1 + 2 + front + self.change_window + self.min_segment_frames - 1

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, responses = self.front(features), None
        for unit in self.units:
            x, responses = unit(x)
        return responses, self.classifier(x.mean(dim=1))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.features(frames))

    def boundary_scores(self, responses: torch.Tensor) -> torch.Tensor:
        return suppress_non_maxima(change_scores(responses, self.change_window), self.min_segment_frames - 1)


class ServedParser(nn.Module):
    """What Triton serves: frames -> (responses, boundary_scores), see the module docstring."""

    def __init__(self, parser: ActionParser):
        super().__init__()
        self.parser = parser

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        responses, _ = self.parser(frames)
        return responses, self.parser.boundary_scores(responses)


def change_scores(responses: torch.Tensor, window: int) -> torch.Tensor:
    """(B, T, m) responses -> (B, T): total-variation distance between the mean responses of
    frames [t - window, t) and [t, t + window) (edges repeat the first and last frame); frame 0
    has nothing before it and scores 0. Written with cumulative sums and slices, which export to
    ONNX with a dynamic T (padding and pooling ops pinned T to the example's)."""
    x = torch.cat([responses[:, :1].repeat(1, window, 1), responses, responses[:, -1:].repeat(1, window, 1)], 1)
    sums = torch.cat([torch.zeros_like(x[:, :1]), torch.cumsum(x, dim=1)], 1)  # sums[s] = x[0] + .. + x[s-1]
    before = sums[:, window:-window - 1] - sums[:, :-2 * window - 1]
    after = sums[:, 2 * window:-1] - sums[:, window:-window - 1]
    score = 0.5 * (after - before).abs().sum(dim=-1) / window
    return torch.cat([torch.zeros_like(score[:, :1]), score[:, 1:]], dim=1)


def suppress_non_maxima(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """Zero every score that is below the maximum within +-radius frames (scores are >= 0)."""
    pad = torch.zeros_like(scores[:, :1]).repeat(1, radius)
    padded = torch.cat([pad, scores, pad], 1)
    peaks = scores
    for shift in range(2 * radius + 1):
        peaks = torch.maximum(peaks, padded[:, shift:padded.shape[1] - 2 * radius + shift])
    return torch.where(scores >= peaks, scores, torch.zeros_like(scores))


def local_loss(responses: torch.Tensor, segments: torch.Tensor, margin: float = 0.1,
               radius: int | None = None) -> torch.Tensor:
    """TransParser's local loss (L_sim + margin) / L_dissim on responses (B, T, m).

    L_sim is the mean L2 distance between responses of frames in the same sub-action, L_dissim
    between frames of different sub-actions; the margin keeps the loss from being solved by
    collapsing every response. Means are taken per pair of sub-actions and then over pairs, so a
    4-frame entry weighs as much as a 150-frame idle stretch. With `radius`, only pairs of frames
    at most that far apart count: the same pull and push where a boundary is decided. `segments`
    (B, T) are sub-action indices; a window with one sub-action has no dissimilar pairs and is
    skipped.
    """
    b, t, _ = responses.shape
    diff = responses[:, :, None, :] - responses[:, None, :, :]
    dist = torch.sqrt((diff ** 2).sum(-1) + 1e-8)  # B, T, T (eps: sqrt has no gradient at 0)
    position = torch.arange(t, device=responses.device)
    near = ((position[:, None] - position[None, :]).abs() <= (radius if radius is not None else t)).float()
    onehot = nn.functional.one_hot(segments.long()).float()  # B, T, K
    sums = onehot.transpose(1, 2) @ (dist * near) @ onehot  # B, K, K
    pairs = onehot.transpose(1, 2) @ near @ onehot
    present = pairs > 0
    block = sums / pairs.clamp_min(1)
    eye = torch.eye(block.shape[-1], dtype=torch.bool, device=block.device)
    losses = []
    for i in range(b):
        same, other = present[i] & eye, present[i] & ~eye
        if other.any():
            losses.append((block[i][same].mean() + margin) / block[i][other].mean())
    return torch.stack(losses).mean() if losses else responses.sum() * 0


def boundary_loss(scores: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Balanced binary cross-entropy of pattern-change scores (B, T) in [0, 1] against the frames
    where a sub-action starts: the mean over starts plus the mean over the other frames, so the
    patterns switch exactly there and hold still elsewhere."""
    p = scores.clamp(1e-4, 1 - 1e-4)
    positive = starts > 0.5
    terms = -torch.where(positive, torch.log(p), torch.log(1 - p))
    rest = terms[~positive].mean()
    return rest + terms[positive].mean() if positive.any() else rest


@dataclass(frozen=True)
class Segment:
    start: int
    end: int  # exclusive
    pattern: int
    confidence: float  # mean arg-max response over the segment


def decode_segments(boundary_scores: np.ndarray, responses: np.ndarray, threshold: float,
                    max_boundaries: int = 0) -> tuple[list[Segment], np.ndarray]:
    """One video's served outputs -> (segments, boundary frames), the gateway's decoding.

    Boundaries: frames after the first whose (already non-max-suppressed) score exceeds `threshold`, the
    `max_boundaries` highest if that is > 0 (ties: the earlier frame), sorted. Segments run
    between them; each takes the pattern with the highest mean response over it, that mean its
    confidence."""
    if max_boundaries < 0:
        raise ValueError(f"max_boundaries must be >= 0, got {max_boundaries}")
    if len(boundary_scores) != len(responses):
        raise ValueError(f"{len(boundary_scores)} scores for {len(responses)} frames of responses")
    candidates = np.flatnonzero(boundary_scores > threshold)
    candidates = candidates[candidates > 0]  # nothing ends at frame 0
    if max_boundaries and len(candidates) > max_boundaries:
        order = np.lexsort((candidates, -boundary_scores[candidates]))
        candidates = candidates[order[:max_boundaries]]
    boundaries = np.sort(candidates)
    edges = [0, *boundaries.tolist(), len(responses)]
    segments = []
    for start, end in zip(edges[:-1], edges[1:]):
        if end > start:
            mean = responses[start:end].mean(axis=0)
            pattern = int(np.argmax(mean))
            segments.append(Segment(start, end, pattern, float(mean[pattern])))
    return segments, boundaries


def parse_responses(responses: np.ndarray, min_length: int, smooth: int = 1) -> list[Segment]:
    """Responses (T, m) of one video -> segments where the arg-max pattern changes, runs shorter
    than `min_length` frames merged into a neighbour. `smooth` > 1 first averages the responses
    over that many frames (centred), which removes one-frame flicker before the arg-max."""
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        padded = np.pad(responses, ((smooth // 2, smooth - 1 - smooth // 2), (0, 0)), mode="edge")
        smoothed = np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(responses.shape[1])], 1)
    else:
        smoothed = responses
    labels = segments_eval.drop_short_segments(np.argmax(smoothed, axis=1), min_length)
    return [Segment(s, e, p, float(responses[s:e, p].mean()))
            for p, s, e in segments_eval.segments_of(labels)]


class BoundaryDetector(nn.Module):
    """TAPOS's boundary-detection baseline: a two-layer temporal conv net over per-frame features
    predicting, per frame, whether a sub-action starts there (trained with weighted BCE)."""

    def __init__(self, dim: int = 128, hidden: int = 64, kernel: int = 5):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(dim, hidden, kernel, padding=kernel // 2), nn.ReLU(inplace=True),
                                 nn.Conv1d(hidden, 1, kernel, padding=kernel // 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.transpose(1, 2)).squeeze(1)  # B, T logits


def pick_peaks(scores: np.ndarray, threshold: float, min_distance: int) -> np.ndarray:
    """Frames whose score passes `threshold`, one per run above it (its maximum), and no two
    closer than `min_distance` (the higher wins)."""
    above = np.flatnonzero(scores > threshold)
    if above.size == 0:
        return above
    runs = np.split(above, np.flatnonzero(np.diff(above) > 1) + 1)
    peaks = sorted((r[np.argmax(scores[r])] for r in runs), key=lambda i: -scores[i])
    kept: list[int] = []
    for p in peaks:
        if all(abs(p - k) >= min_distance for k in kept):
            kept.append(int(p))
    return np.asarray(sorted(kept), int)
