"""uint8 clips into an encoder: normalised video for training, or straight into a patchifying
convolution, the way the served graphs read them."""

from __future__ import annotations

import torch
from torch import nn


def normalise(clips: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 clips (N, T, H, W, C) -> normalised float video (N, C, T, H, W); `mean` and `std` hold
    one value per channel, in pixel units."""
    c = clips.shape[-1]
    return (clips.permute(0, 4, 1, 2, 3).float() - mean.reshape(1, c, 1, 1, 1)) / std.reshape(1, c, 1, 1, 1)


def can_embed_patches(conv: nn.Conv3d) -> bool:
    """Whether `embed_patches` computes this conv: its kernel is its stride, without padding."""
    return (tuple(conv.stride) == tuple(conv.kernel_size) and not any(conv.padding)
            and all(d == 1 for d in conv.dilation) and conv.groups == 1)


def embed_patches(clips: torch.Tensor, conv: nn.Conv3d, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`conv((clips − mean) / std)` for uint8 clips (N, T, H, W, C) and a conv whose kernel is its
    stride, returned channels last: (N, T', H', W', C_out).

    One matrix product over each patch's raw pixels, with the normalisation folded into the weights
    and the bias, and the clips cut into patches while still uint8: the float video is written once
    (the cast), not after each of transpose, cast, subtract and divide, and no im2col copy is made.
    Equal to the conv up to float rounding. `mean` and `std` hold one value per channel."""
    kernel = tuple(conv.kernel_size)
    if not can_embed_patches(conv):
        raise ValueError(f"embed_patches needs a conv whose kernel is its stride, without padding: {conv}")
    n, t, h, w, c = clips.shape
    kt, kh, kw = kernel
    if t % kt or h % kh or w % kw or c != conv.in_channels:
        raise ValueError(f"clips of shape {tuple(clips.shape)} do not tile into {kernel} patches of {conv.in_channels} channels")
    patches = clips.reshape(n, t // kt, kt, h // kh, kh, w // kw, kw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    patches = patches.reshape(n, t // kt, h // kh, w // kw, kt * kh * kw * c).float()
    scale = (1 / std).reshape(1, c, 1, 1, 1)
    weight = conv.weight * scale  # O, C, kt, kh, kw
    bias = -(weight * mean.reshape(1, c, 1, 1, 1)).sum(dim=(1, 2, 3, 4))
    if conv.bias is not None:
        bias = bias + conv.bias
    return patches @ weight.permute(0, 2, 3, 4, 1).reshape(conv.out_channels, -1).t() + bias


def clip_motion(clips: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Per uint8 clip (N, T, H, W, 3), the mean absolute change of its grey frames from one frame to
    the next, over every `stride`-th pixel of each row and column."""
    grey = clips[:, :, ::stride, ::stride].float().mean(dim=-1)
    return (grey[:, 1:] - grey[:, :-1]).abs().mean(dim=(1, 2, 3))


def motion_ramp(motion: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """0 at motion `low` and below, 1 at `high` and above, linear in between."""
    return ((motion - low) / max(high - low, 1e-6)).clamp(0.0, 1.0)
