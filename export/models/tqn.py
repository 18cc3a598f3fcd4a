"""Temporal Query Network decoder: learnt queries read clip features and answer per query."""

from __future__ import annotations

import torch
from torch import nn


class QueryDecoderLayer(nn.Module):
    """Post-norm Transformer decoder layer that also returns its cross-attention weights."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d_model))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor):
        q = self.norm1(queries + self.dropout(self.self_attn(queries, queries, queries, need_weights=False)[0]))
        attended, weights = self.cross_attn(q, memory, memory, key_padding_mask=padding,
                                            need_weights=True, average_attn_weights=True)
        q = self.norm2(q + self.dropout(attended))
        q = self.norm3(q + self.dropout(self.ffn(q)))
        return q, weights  # B, Q, D ; B, Q, N


def fit_gaussian(features: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, eigenvalues and eigenvectors of (n, D) features' covariance, shrunk towards its
    mean variance by `shrinkage` (0-1), in float64."""
    if features.ndim != 2 or len(features) <= features.shape[1]:
        raise ValueError(f"need (n, D) features with n > D, got {tuple(features.shape)}")
    if not 0 < shrinkage <= 1:
        raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
    features = features.double()
    mean = features.mean(0)
    cov = torch.cov((features - mean).T)
    cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    values, vectors = torch.linalg.eigh(cov)
    return mean, values, vectors


def whitening(features: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 mean (D,) and whitening matrix (D, D) of `fit_gaussian`: z = (x - mean) @ whiten."""
    mean, values, vectors = fit_gaussian(features, shrinkage)
    return mean.float(), (vectors / values.sqrt()).float()


def domain_distance(features: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """(..., D) clip features -> (...) RMS whitened distance per clip, ~1 in domain; a video's
    in-domain score is minus its clips' mean."""
    return ((features - mean) @ whiten).pow(2).mean(-1).sqrt()


class TQNDecoder(nn.Module):
    """Queries x clip features -> per-query logits, last-layer attention (B, Q, N) and an
    in-domain score (B,).

    No positional encoding (as in the paper): answers must not depend on where in the video
    the action happens. Two things are set after training and travel with the weights (buffers):
    each head's calibration temperature (its logits are divided by it, so served probabilities
    are calibrated and the argmax is unchanged) and a Gaussian fit of training clip features
    (`set_domain`), from which `in_domain_score` = minus the mean over the video's clips of the
    clip's Mahalanobis distance / sqrt(D): near -1 for clips like the training data, far lower
    for anything else.
    """

    def __init__(
        self,
        *,
        head_sizes: dict[str, int],
        feature_dim: int = 256,
        d_model: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int = 512,
        dropout: float = 0.1,
        feature_dropout: float = 0.3,
        memory_mlp: bool = True,
    ):
        super().__init__()
        if not head_sizes:
            raise ValueError("head_sizes must name at least one query")
        self.query_names = tuple(head_sizes)
        self.feature_dim = feature_dim
        self.queries = nn.Parameter(torch.randn(len(head_sizes), d_model) * 0.02)
        # A non-linear memory lets a query's keys pick out an event whatever its attribute: with a
        # linear projection, clips of different take-offs can sit on both sides of idle clips and
        # no single key direction finds them all.
        self.input_proj = (
            nn.Sequential(nn.Linear(feature_dim, d_model), nn.ReLU(inplace=True), nn.Linear(d_model, d_model))
            if memory_mlp else nn.Linear(feature_dim, d_model)
        )
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.layers = nn.ModuleList(QueryDecoderLayer(d_model, num_heads, ffn_dim, dropout)
                                    for _ in range(num_layers))
        self.classifiers = nn.ModuleList(nn.Linear(d_model, n) for n in head_sizes.values())
        self.register_buffer("temperature", torch.ones(len(head_sizes)))
        self.register_buffer("domain_mean", torch.zeros(feature_dim))
        self.register_buffer("domain_whiten", torch.eye(feature_dim))

    @torch.no_grad()
    def set_domain(self, features: torch.Tensor, shrinkage: float = 0.1) -> None:
        """Fit the in-domain Gaussian to (n, D) training clip features (`whitening`)."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"need (n, {self.feature_dim}) features, got {tuple(features.shape)}")
        mean, whiten = whitening(features, shrinkage)
        self.domain_mean.copy_(mean)
        self.domain_whiten.copy_(whiten)

    def in_domain_score(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        distance = domain_distance(features, self.domain_mean, self.domain_whiten)  # B, N
        valid = mask.to(distance.dtype)
        return -(distance * valid).sum(1) / valid.sum(1).clamp(min=1.0)

    def forward_features(self, features: torch.Tensor, mask: torch.Tensor):
        memory = self.input_proj(self.feature_dropout(features))  # B, N, D
        padding = ~mask  # True where there is no clip
        q = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)  # B, Q, D
        weights = None
        for layer in self.layers:
            q, weights = layer(q, memory, padding)
        return q, weights

    def forward_head(self, responses: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(head(responses[:, i]) / self.temperature[i] for i, head in enumerate(self.classifiers))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns one logits tensor per query (in `query_names` order), the attention, then
        the in-domain score."""
        responses, attention = self.forward_features(features, mask)
        return (*self.forward_head(responses), attention, self.in_domain_score(features, mask))
