"""The TQN paper's two baselines, as heads over the same clip encoder's features.

For a fair comparison both get the TQN decoder's key/value capacity: every clip feature goes
through the same two-layer MLP (feature_dim -> hidden_dim -> hidden_dim) as the TQN's memory
projection before it is pooled (average pooling) or classified (short-term).
"""

from __future__ import annotations

import torch
from torch import nn


class QueryHeads(nn.Module):
    """Per-clip MLP (`project`) and one linear classifier per query (`classify`)."""

    def __init__(self, *, head_sizes: dict[str, int], feature_dim: int = 256, hidden_dim: int = 128,
                 dropout: float = 0.3):
        super().__init__()
        self.query_names = tuple(head_sizes)
        self.project = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                     nn.Linear(hidden_dim, hidden_dim))
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleList(nn.Linear(hidden_dim, n) for n in head_sizes.values())

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.dropout(x)
        return tuple(head(x) for head in self.classifiers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-clip logits for (..., feature_dim) features."""
        return self.classify(self.project(x))


class Baseline(nn.Module):
    """A baseline over a video's clip features (B, N, feature_dim) and their mask (B, N), with
    `QueryHeads` of the TQN's capacity."""

    def __init__(self, *, head_sizes: dict[str, int], feature_dim: int = 256, hidden_dim: int = 128,
                 dropout: float = 0.3):
        super().__init__()
        self.heads = QueryHeads(head_sizes=head_sizes, feature_dim=feature_dim, hidden_dim=hidden_dim,
                                dropout=dropout)
        self.query_names = self.heads.query_names


class AveragePooling(Baseline):
    """Long-term baseline: project every clip, average over the video's clips, classify per query."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights = mask.float() / mask.float().sum(dim=1, keepdim=True)  # B, N
        pooled = torch.einsum("bn,bnd->bd", weights, self.heads.project(features))  # B, hidden
        return self.heads.classify(pooled)


class ShortTerm(Baseline):
    """Short-term baseline: classify each clip alone; average clip probabilities at test."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Log of the clip-averaged probabilities (B, n) per query, usable as logits."""
        weights = (mask.float() / mask.float().sum(dim=1, keepdim=True)).unsqueeze(-1)  # B, N, 1
        return tuple(torch.log((logits.softmax(-1) * weights).sum(1) + 1e-9)
                     for logits in self.heads(features))
