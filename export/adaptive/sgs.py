"""Similarity Guided Sampling (thesis chapter 6): fuse temporally redundant feature maps into
B' <= B similarity bins, B' chosen per clip by the data.

A similarity net maps each frame's feature map I_t to Z_t (L dims); Δ_t = ‖Z_t‖; B bins of
half-width γ = max Δ / (2B) with centres β_b = (2b − 1)γ; the linear kernel
O_b = Σ_t I_t · max(0, 1 − |Δ_t − β_b| / γ); bins no frame reaches are dropped.

Two choices the thesis leaves open, made here:
- The frame with the largest Δ sits exactly on the last bin's right edge (Δ_max = 2Bγ), where the
  linear kernel is 0, so it would vanish from every clip. Right of its centre the last bin's
  kernel therefore falls at half the slope, 1 − (Δ − β_B) / 2γ: the largest frame keeps weight
  1/2, and every frame near it still has a gradient through Δ (a flat kernel there had none, so a
  similarity net whose frames all started near Δ_max never learnt to tell them apart).
- If every Δ is 0 (Z = 0), the bins have no width; all frames are then treated as equal and
  summed into one bin.

The output is indexed by bin, i.e. ordered by Δ, not by time (O_b in the thesis). The sampling is
the custom op `vqs::similarity_guided_sampling` (one ONNX node of type `SimilarityGuidedSampling`,
domain `vqs`, see `export.adaptive.onnx_functions`). B is one value for the batch or one per clip
(a served batch mixes requests with different budgets). A batch is padded to its largest B' (zero
feature maps, `mask` False), kept bins first in bin order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

# Below this Δ_max a clip's similarity vectors are all (numerically) zero.
_FLAT = 1e-12


def bin_weights(z: torch.Tensor, bins: torch.Tensor | int) -> torch.Tensor:
    """Linear-kernel weight of frame t in bin b: (N, T, L) similarity vectors and B (one for the
    batch, or one per clip (N,)) -> (N, T, B_max); a clip's bins beyond its own B weigh 0."""
    per_clip = torch.as_tensor(bins, device=z.device).reshape(-1, 1)  # N or 1, 1
    b_max = int(per_clip.max())
    b = per_clip.to(z.dtype)
    delta = torch.linalg.vector_norm(z, dim=-1)  # N, T
    delta_max = delta.amax(dim=1, keepdim=True)  # N, 1
    flat = delta_max <= _FLAT
    # Δ in units of the half-width γ: x = Δ / γ = 2B Δ / Δ_max ∈ [0, 2B]; centres at 2b − 1.
    x = torch.where(flat, 2.0 * b, 2.0 * b * delta / torch.where(flat, 1.0, delta_max))
    number = torch.arange(1, b_max + 1, device=z.device)  # B_max
    centres = number.to(z.dtype) * 2 - 1
    offset = x.unsqueeze(-1) - centres  # N, T, B_max
    # Each clip's last bin falls at half the slope right of its centre (see module docstring).
    last = (number == per_clip).unsqueeze(1)  # N or 1, 1, B_max
    offset = torch.where(last & (offset > 0), 0.5 * offset, offset)
    weights = (1.0 - offset.abs()).clamp(min=0.0)
    return weights * (number <= per_clip).to(z.dtype).unsqueeze(1)


def sample(features: torch.Tensor, z: torch.Tensor, bins: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable reference of the op: features (N, C, T, *S), z (N, T, L), B (or B per clip) ->
    (sampled (N, C, B'max, *S), mask (N, B'max))."""
    n, c, t = features.shape[:3]
    weights = bin_weights(z, bins)  # N, T, B
    occupied = weights.sum(dim=1) > 0  # N, B
    kept = int(occupied.sum(dim=1).max())
    # Kept bins first, each group in bin order (the ONNX body orders them the same way).
    order = torch.argsort((~occupied).to(torch.int8), dim=1, stable=True)[:, :kept]  # N, B'
    chosen = weights.gather(2, order.unsqueeze(1).expand(n, t, kept))  # N, T, B'
    flat_features = features.reshape(n, c, t, -1)  # N, C, T, S
    sampled = chosen.transpose(1, 2).unsqueeze(1) @ flat_features  # N, C, B', S
    return sampled.reshape(n, c, kept, *features.shape[3:]), occupied.gather(1, order)


def _check(features: torch.Tensor, z: torch.Tensor, bins: torch.Tensor) -> None:
    if features.dim() < 3:
        raise ValueError(f"features must be (N, C, T, ...), got shape {tuple(features.shape)}")
    if z.dim() != 3 or z.shape[:2] != (features.shape[0], features.shape[2]):
        raise ValueError(f"z must be (N, T, L) matching features {tuple(features.shape)}, got {tuple(z.shape)}")
    if bins.dtype != torch.int64 or bins.dim() > 1 or bins.numel() not in (1, features.shape[0]):
        raise ValueError(f"bins must be int64, one value or one per clip, got {bins.dtype} of shape {tuple(bins.shape)}")


@torch.library.custom_op("vqs::similarity_guided_sampling", mutates_args=())
def similarity_guided_sampling(
    features: torch.Tensor, z: torch.Tensor, bins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if features.shape[0] == 0:
        raise ValueError("SGS needs at least one clip")
    _check(features, z, bins)
    if int(bins.min()) < 1:
        raise ValueError(f"bins must be >= 1, got {bins.tolist()}")
    with torch.no_grad():
        return sample(features, z, bins)


@similarity_guided_sampling.register_fake
def _(features, z, bins):
    ctx = torch.library.get_ctx()
    frames = features.shape[2]
    kept = ctx.new_dynamic_size(min=1, max=frames if isinstance(frames, int) else None)
    n, c = features.shape[:2]
    return (
        features.new_empty((n, c, kept, *features.shape[3:])),
        torch.empty((n, kept), dtype=torch.bool, device=features.device),
    )


def _setup_context(ctx, inputs, output):
    features, z, bins = inputs
    ctx.save_for_backward(features, z, bins)


def _backward(ctx, grad_sampled, _grad_mask):
    # Recompute the (deterministic) sampling with autograd: gradients reach I_t through the
    # kernel weights and the similarity net through Δ_t, γ and β_b (thesis eqs. 6.7, 6.8).
    features, z, bins = ctx.saved_tensors
    with torch.enable_grad():
        f = features.detach().requires_grad_()
        zz = z.detach().requires_grad_()
        sampled, _ = sample(f, zz, bins)
        grad_features, grad_z = torch.autograd.grad(sampled, (f, zz), grad_sampled)
    needs = ctx.needs_input_grad
    return (grad_features if needs[0] else None, grad_z if needs[1] else None, None)


similarity_guided_sampling.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.vqs.similarity_guided_sampling)
def _flops(features_shape, z_shape, bins_shape, *, out_shape, **kwargs) -> int:
    # O_b = Σ_t I_t·w_tb for the kept bins (the flop counter counts 2 per multiply-add).
    n, c, frames = features_shape[:3]
    kept = out_shape[0][2]
    return 2 * n * c * kept * frames * math.prod(features_shape[3:])


class SimilarityNet(nn.Module):
    """f_s: spatial global average pool, then two kernel-1 conv1d layers (C, then L channels).
    The ReLU between them is ours: without it the two layers are one linear map.

    `centred` (ours too): the pooled features minus their mean over the clip's frames, so Z_t is
    conv2's bias plus what frame t has that the clip's other frames lack. Early in the s3d the
    frames of a clip share most of their (post-ReLU, positive) features, so without it every Δ_t
    is within a few % of Δ_max and every frame lands in the last bin; with it a clip whose frames
    differ little against the bias collapses to few bins and one whose frames differ much spreads."""

    def __init__(self, in_channels: int, *, similarity_dim: int = 8, centred: bool = False):
        super().__init__()
        self.centred = centred
        self.conv1 = nn.Conv1d(in_channels, in_channels, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(in_channels, similarity_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.flatten(3).mean(dim=3)  # N, C, T
        if self.centred:
            pooled = pooled - pooled.mean(dim=2, keepdim=True)
        return self.conv2(self.act(self.conv1(pooled))).transpose(1, 2)  # N, T, L


class MotionSimilarityNet(nn.Module):
    """f_s that puts frames in time order, spaced by how much changed (ours): Δ_t = d + Σ_{s<=t} m_s,
    with m_s >= 0 read from the change between frames s−1 and s (each channel's mean absolute
    difference over space, two kernel-1 conv1d layers, softplus) and d = softplus(offset) > 0 one
    learnt value. Z_t = Δ_t (L = 1).

    Why: `SimilarityNet` bins frames by how alike their own features are, wherever they are in the
    clip, so a clip's bins mix frames from its start and end; a diver's rotation, read from frame
    to frame, is lost in those means. Here Δ is monotone in t, so a bin only ever holds
    neighbouring frames: a still clip (m ≈ 0) sits at Δ ≈ d, one bin; a clip that changes evenly
    at m per frame with d = m / 2 puts frame t at Δ = (t + 1/2) m, in bin t + 1 alone at B = T
    ((2t + 1) / (2T − 1) half-widths right of its centre), so it keeps every frame, and at B = T / 2
    pairs of neighbours (tested)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, in_channels, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(in_channels, 1, 1)
        self.offset = nn.Parameter(torch.zeros(()))

    def steps(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, T, *S) -> m (N, T − 1), the change from each frame to the next."""
        change = (features[:, :, 1:] - features[:, :, :-1]).abs().flatten(3).mean(dim=3)  # N, C, T − 1
        return F.softplus(self.conv2(self.act(self.conv1(change))))[:, 0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        steps = self.steps(features)
        start = steps.new_zeros((steps.shape[0], 1))
        return (F.softplus(self.offset) + torch.cat([start, steps.cumsum(dim=1)], dim=1)).unsqueeze(-1)  # N, T, 1


SIMILARITIES = ("frame", "motion")


class SimilarityGuidedSampling(nn.Module):
    """(N, C, T, H, W) features and a bin count B -> (N, C, B'max, H, W) and a (N, B'max) mask.
    `similarity`: "frame" (`SimilarityNet`, the thesis's) or "motion" (`MotionSimilarityNet`)."""

    def __init__(self, in_channels: int, *, similarity_dim: int = 8, centred: bool = False,
                 similarity: str = "frame"):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.similarity = (MotionSimilarityNet(in_channels) if similarity == "motion"
                           else SimilarityNet(in_channels, similarity_dim=similarity_dim, centred=centred))

    def forward(self, features: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return similarity_guided_sampling(features, self.similarity(features), bins)
