"""Temporal action parser (TransParser-style, issue 11) and its trained boundary-detector baseline.

frames (B, T, 112, 112, 3) -> 28 px -> per-frame CNN over each frame and its difference to the
previous frame -> a +-2-frame temporal conv -> two SPS units -> per-frame responses over m learnt
patterns. A sub-action starts where the arg-max pattern changes (after dropping runs shorter than
a minimum length). Why per-frame features: a clip of the served encoder spans 8 frames = 0.53 s,
as long as a whole take-off or entry (0.3-0.6 s), so clip features cannot place a boundary to
the 1-5 frame tolerances the issue measures; a frame CNN trained jointly with the parser sees
every frame, and the frame difference shows motion (crouch, spring, rotation, splash) at frame
rate without the cost of a 3D stem at stride 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from export import segments_eval
from export.models.embedder import FrameCNN, pool_served_frames


class SPSUnit(nn.Module):
    """Soft-Pattern-Strengthen: each step's feature attends (2 heads) to a learnt pattern miner
    of m patterns; the heads' results go through one linear layer, are added to the feature
    (amplification) and refined by an FFN."""

    def __init__(self, dim: int, patterns: int, heads: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must divide into {heads} heads")
        self.heads = heads
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
        alpha = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)  # B, H, T, m
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


class ActionParser(nn.Module):
    """`forward(served frames)` -> (responses (B, T, m), class logits (B, classes));
    `parse_small(28 px frames)` is the same on training-size frames and also returns features."""

    def __init__(self, *, classes: int, dim: int = 128, patterns: int = 8, units: int = 2):
        super().__init__()
        self.features = FrameFeatures(dim)
        self.units = nn.ModuleList(SPSUnit(dim, patterns) for _ in range(units))
        self.classifier = nn.Linear(dim, classes)

    def parse_small(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(frames)
        x, responses = f, None
        for unit in self.units:
            x, responses = unit(x)
        return responses, self.classifier(x.mean(dim=1)), f

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        responses, logits, _ = self.parse_small(pool_served_frames(frames))
        return responses, logits


def local_loss(responses: torch.Tensor, segments: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """TransParser's local loss (L_sim + margin) / L_dissim on responses (B, T, m).

    L_sim is the mean L2 distance between responses of frames in the same sub-action, L_dissim
    between frames of different sub-actions; the margin keeps the loss from being solved by
    collapsing every response. Means are taken per pair of sub-actions and then over pairs, so a
    4-frame entry weighs as much as a 150-frame idle stretch. `segments` (B, T) are sub-action
    indices; a window with one sub-action has no dissimilar pairs and is skipped.
    """
    b, t, _ = responses.shape
    diff = responses[:, :, None, :] - responses[:, None, :, :]
    dist = torch.sqrt((diff ** 2).sum(-1) + 1e-8)  # B, T, T (eps: sqrt has no gradient at 0)
    onehot = nn.functional.one_hot(segments.long()).float()  # B, T, K
    sums = onehot.transpose(1, 2) @ dist @ onehot  # B, K, K
    sizes = onehot.sum(1)  # B, K
    pairs = sizes[:, :, None] * sizes[:, None, :]
    present = pairs > 0
    block = sums / pairs.clamp_min(1)
    eye = torch.eye(block.shape[-1], dtype=torch.bool, device=block.device)
    losses = []
    for i in range(b):
        same, other = present[i] & eye, present[i] & ~eye
        if other.any():
            losses.append((block[i][same].mean() + margin) / block[i][other].mean())
    return torch.stack(losses).mean() if losses else responses.sum() * 0


@dataclass(frozen=True)
class Segment:
    start: int
    end: int  # exclusive
    pattern: int
    confidence: float  # mean arg-max response over the segment


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
