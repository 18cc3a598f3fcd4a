"""Frame embedder (CARL-style, issue 11) and the per-frame CNN it shares with the action parser.

frames (B, T, 28, 28, 3) uint8 (the served 112 px frames as 4x4 means, see export/frames.py) ->
small 2D CNN per frame -> projection -> Transformer encoder with sine-cosine positions -> 128-d
L2-normalised embedding per frame. Trained self-supervised with the sequence contrastive loss
(`sequence_contrastive_loss`).

The sine-cosine positions are rotary (they turn each attention query and key by its frame's
angle), so attention sees only how far apart two frames are, never where a frame sits in the
video. Added absolute positions made time regressable from the embeddings of idle frames
(R^2 0.95 on held-out videos): a clock the embedding carried wherever the diver was.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

PIXEL_MEAN = 0.45 * 255
PIXEL_STD = 0.225 * 255


class FrameCNN(nn.Module):
    """Small 2D CNN applied to every frame on its own: (B, T, 28, 28, 3) -> (B, T, dim).

    With `motion`, each frame is stacked with its difference to the previous frame (6 input
    channels): still one frame's worth of context, but what moves is visible at frame rate.
    """

    def __init__(self, dim: int = 128, *, motion: bool = False, width: int = 8):
        super().__init__()
        self.motion = motion
        c1, c2, c3 = width, 2 * width, 4 * width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(6 if motion else 3, c1, 2), *block(c1, c1, 1),  # 14
            *block(c1, c2, 2),  # 7
            *block(c2, c3, 2),  # 4: keep the 4x4 layout, where the figure is matters
        )
        self.proj = nn.Linear(c3 * 16, dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]
        x = (frames.float() - PIXEL_MEAN) / PIXEL_STD
        x = x.permute(0, 1, 4, 2, 3)  # B, T, C, H, W
        if self.motion:
            previous = torch.cat([x[:, :1], x[:, :-1]], dim=1)
            x = torch.cat([x, x - previous], dim=2)
        x = self.body(x.flatten(0, 1))
        return self.proj(x.flatten(1)).view(b, t, -1)


def sine_cosine_positions(length: int | torch.Tensor, dim: int) -> torch.Tensor:
    """(length, dim) Transformer positional encoding: sin and cos of each frequency, interleaved."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = position * frequency
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary positions: x (..., T, d) with each pair of channels turned by the angle of its frame
    and frequency (`positions` = sine_cosine_positions(T, d)). The dot product of two rotated
    vectors depends on their frames' difference only."""
    sin, cos = positions[:, 0::2], positions[:, 1::2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention with rotary positions + FFN, written out so it exports to ONNX as
    plain ops."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, positions), rotate(k, positions)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias, dim=-1)
        x = x + self.drop(self.out((attn @ v).transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


def band_bias(length: int | torch.Tensor, radius: int) -> torch.Tensor:
    """(T, T) attention bias: 0 within `radius` frames, -inf beyond. Attention then sees the
    same neighbourhood in a 40-frame training view and a 300-frame video."""
    position = torch.arange(length)
    far = (position[:, None] - position[None, :]).abs() > radius
    return torch.zeros(far.shape).masked_fill(far, float("-inf"))


class FrameEmbedder(nn.Module):
    """(B, T, 28, 28, 3) frames (uint8, or float in 0..255 after augmentation) -> (B, T, out_dim).

    Attention is limited to `radius` frames, so with `layers` layers a frame's embedding depends
    on `layers * radius` frames either side: a window of a long video with that much context on
    both sides computes exactly what the whole video computes."""

    def __init__(self, *, dim: int = 128, layers: int = 2, heads: int = 4, out_dim: int = 128,
                 contextual: bool = True, radius: int = 16):
        super().__init__()
        self.dim, self.contextual, self.radius = dim, contextual, radius
        self.cnn = FrameCNN(dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, 2 * dim) for _ in range(layers if contextual else 0))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    @property
    def context_frames(self) -> int:
        return self.radius * len(self.layers)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.embed(frames)[0]

    def embed(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embeddings, frame features): the features are the CNN's output for each frame on its
        own, L2-normalised, before any frame sees its neighbours. A still picture has no motion, so
        its contextual embedding looks idle; its features compare with a video's features."""
        x = self.cnn(frames)
        features = F.normalize(x, dim=-1)
        if self.contextual:
            t = x.shape[1]
            positions = sine_cosine_positions(t, self.dim // self.layers[0].heads).to(x)
            bias = band_bias(t, self.radius).to(x)
            for layer in self.layers:
                x = layer(x, bias, positions)
        return F.normalize(self.head(self.norm(x)), dim=-1), features


class ServedEmbedder(nn.Module):
    """What Triton serves: frames -> (embeddings, frame_features), see `FrameEmbedder.embed`."""

    def __init__(self, embedder: FrameEmbedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder.embed(frames)


def sequence_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
                              *, sigma2: float = 10.0, temperature: float = 0.1) -> torch.Tensor:
    """CARL's SCL: for each frame of one view, KL from a Gaussian prior over its timestamp distance
    to the other view's frames, to the softmax of cosine similarities / temperature; both ways.

    z: (B, T, D) L2-normalised embeddings; t: (B, T) source timestamps in frames.
    """
    def one_way(za, zb, ta, tb):
        log_p = torch.log_softmax(za @ zb.transpose(1, 2) / temperature, dim=-1)
        prior = torch.softmax(-(ta[:, :, None] - tb[:, None, :]).float() ** 2 / (2 * sigma2), dim=-1)
        return (prior * (torch.log(prior.clamp_min(1e-12)) - log_p)).sum(-1).mean()

    return one_way(z1, z2, t1, t2) + one_way(z2, z1, t2, t1)
