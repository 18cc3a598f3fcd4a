"""`s3d_zoom`: a clip encoder that finds the diver and looks closer (issue 8).

Two streams and a localiser:
- the full-frame stream is the plain `s3d` (take-off, pose and the null videos are read there);
- a localiser head on that stream's stem features (stride `stem_patch`, so a 14 x 14 grid at
  112 px) scores every cell of every frame; its soft-argmax, averaged over the clip's frames, is
  the clip's window centre. No localiser CNN of its own: the stem's features are shared;
- a window stream: a `window_crop`-px square of the frame at that centre, cut ONCE PER CLIP (the
  diver moves inside it) and sampled up to `window_size` px (bilinear, edges repeated), read by a
  narrower `s3d` with a `window_stem_patch` stem, so each of its stem patches covers
  window_crop / (window_size / window_stem_patch) source pixels (32 / 14 = 2.3 at the default,
  against 8 in the full stream: the magnification the twist needs, docs/recipe.md "What makes the
  twist readable").
The clip feature is the sum of the two streams' projections (a linear map of their concatenated
pooled features), `feature_dim` wide like `s3d`'s, so any decoder takes it unchanged.

The window follows the detached centre: the localiser learns only from its own target
(`localiser_loss`, where the figure is), never from the answers through the sampling. The window
is grid_sample's bilinear sample (border padding, align_corners=False) on a grid built from the
centre (`sampling_grid`; affine_grid has no ONNX export before opset 20), computed as a patch
gather and two small matrix products (`window`): ONNX Runtime's `GridSample` took ~57% of the
encoder's time, the matrix products ~9% (README "Speed").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from export.models.s3d import S3D


class S3DZoom(nn.Module):
    """Clip encoder; `forward` takes uint8 clips (B, T, H, W, C) exactly as the server sends them."""

    def __init__(
        self,
        *,
        channels: tuple[int, ...] = (24, 32, 64, 128),
        window_channels: tuple[int, ...] = (16, 24, 48, 96),
        feature_dim: int = 256,
        clip_frames: int = 8,
        frame_size: int = 112,
        stem_patch: int = 8,
        window_crop: int = 32,
        window_size: int = 56,
        window_stem_patch: int = 4,
        localiser_channels: int = 16,
        norm_layer: type[nn.Module] = nn.BatchNorm3d,
    ):
        super().__init__()
        if frame_size % stem_patch or window_size % window_stem_patch:
            raise ValueError(f"frame_size {frame_size} and window_size {window_size} must be multiples of "
                             f"their stem patches ({stem_patch}, {window_stem_patch})")
        if not 0 < window_crop <= frame_size:
            raise ValueError(f"window_crop must be in (0, frame_size={frame_size}], got {window_crop}")
        self.clip_frames, self.frame_size, self.feature_dim = clip_frames, frame_size, feature_dim
        self.window_crop = window_crop
        self.full = S3D(channels=channels, feature_dim=feature_dim, clip_frames=clip_frames,
                        frame_size=frame_size, stem_patch=stem_patch, norm_layer=norm_layer)
        self.window_stream = S3D(channels=window_channels, feature_dim=feature_dim, clip_frames=clip_frames,
                                 frame_size=window_size, stem_patch=window_stem_patch, norm_layer=norm_layer)
        c, k = channels[0], localiser_channels
        self.localiser = nn.Sequential(  # per frame on the stem's grid; receptive field 7 cells (56 px)
            nn.Conv3d(c, k, (1, 3, 3), padding=(0, 1, 1), bias=False), norm_layer(k), nn.ReLU(inplace=True),
            nn.Conv3d(k, k, (1, 3, 3), padding=(0, 2, 2), dilation=(1, 2, 2), bias=False), norm_layer(k),
            nn.ReLU(inplace=True),
            nn.Conv3d(k, 1, 1),
        )
        self.grid, self.stem_patch = frame_size // stem_patch, stem_patch
        middles = torch.arange(self.grid).float() * stem_patch + (stem_patch - 1) / 2  # px, each cell's middle
        self.register_buffer("cells", torch.stack([middles.repeat(self.grid),
                                                   middles.repeat_interleave(self.grid)], -1))  # G*G, 2 (x, y)
        self.sample_windows_to(window_size)

    def sample_windows_to(self, size: int) -> None:
        """Cut the windows `size` px square (the same crop, sampled more or less finely). The
        window stream reads `window_size` px, so only a finder without it (the zoom ViT's) may change it."""
        self.window_size = size
        # where each window pixel samples, in px from the window's centre
        self.register_buffer("offsets", (torch.arange(size).float() + 0.5 - size / 2) * self.window_crop / size)
        # source pixels that hold all of a window's taps along one axis: its positions span
        # `span` px, so their left taps at most floor(span) + 1 pixels (+ 1e-3: float rounding of
        # the positions), and the last one's right tap one more
        span = float(self.offsets[-1] - self.offsets[0])
        self.band = min(self.frame_size, math.floor(span + 1e-3) + 3)

    def locate(self, stem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem features (B, C1, T, G, G) -> heatmap logits (B, T, G*G) and the clip's centre (B, 2),
        px (x, y): the mean over frames of each frame's soft-argmax."""
        logits = self.localiser(stem).squeeze(1).flatten(2)  # B, T, G*G
        return logits, (logits.softmax(-1) @ self.cells).mean(1)

    def sampling_grid(self, centres: torch.Tensor) -> torch.Tensor:
        """grid_sample's grid (B, S, S, 2) for a window_crop-px square at each centre (px, pixel
        index coordinates), in normalised coordinates with align_corners=False: what `window` cuts."""
        x, y = self._normalised(centres[:, 0]), self._normalised(centres[:, 1])  # B, S
        s = self.window_size
        return torch.stack([x[:, None, :].expand(-1, s, s), y[:, :, None].expand(-1, s, s)], -1)

    def _normalised(self, centre: torch.Tensor) -> torch.Tensor:
        """Each window pixel's sampling position along one axis (B,) -> (B, S), normalised to [-1, 1]."""
        return (2 * (centre[:, None] + self.offsets) + 1) / self.frame_size - 1

    def _taps(self, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Along one axis, the first source pixel of each clip's band (B,) int64 and the bilinear
        weights of the band's pixels for every window pixel (B, S, band): at most 2 non-zero a row.
        The positions are grid_sample's to the bit: the normalised grid unnormalised as it does
        (align_corners=False: (g + 1) * n / 2 - 0.5, which its CPU kernel rounds once, as a fused
        multiply-add: here exact in float64, then rounded), clamped to the frame (border padding:
        edges repeated)."""
        n, band = self.frame_size, self.band
        at = (((self._normalised(centre) + 1).double() * (n / 2) - 0.5).float()).clamp(0, n - 1)  # B, S, px
        left = at.floor()
        start = left[:, :1].clamp(max=n - band)  # B, 1: the band holds every tap (positions ascend)
        frac, rel = (at - left)[..., None], (left - start)[..., None]  # B, S, 1
        k = torch.arange(band, device=centre.device, dtype=at.dtype)
        # the right tap of a position clamped to the last pixel weighs 0 (and may fall off the band)
        weights = (k == rel) * (1 - frac) + (k == rel + 1) * frac  # B, S, band
        return start[:, 0].long(), weights

    def window(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """The window of every frame of each clip at the clip's centre: (B, C, T, H, W) -> (B, C, T, S, S).

        Equal to grid_sample's bilinear sample on `sampling_grid(centres)` (border padding,
        align_corners=False) up to float rounding, cut the way ONNX Runtime runs fast: the window
        reads only a `band` x `band`-px patch of each frame (one gather of the patches of all
        frames), and bilinear sampling on a regular grid is separable, so each window is
        Wy . patch . Wx^T with 2-tap interpolation matrices (two small batched matrix products)."""
        b, c, t, h, w = x.shape
        if h != self.frame_size or w != self.frame_size:
            raise ValueError(f"window needs {self.frame_size} x {self.frame_size} frames, got {h} x {w}")
        x0, wx = self._taps(centres[:, 0])  # B; B, S, K
        y0, wy = self._taps(centres[:, 1])
        k = torch.arange(self.band, device=x.device)
        planes = torch.arange(c * t, device=x.device) * (h * w)  # C*T
        pixels = (y0[:, None] + k)[:, :, None] * w + (x0[:, None] + k)[:, None, :]  # B, K, K
        index = (planes[None, :, None, None] + pixels[:, None]).reshape(b, -1)  # B, C*T*K*K
        patches = x.reshape(b, -1).gather(1, index).reshape(b, c * t, self.band, self.band)  # B, C*T, K, K
        out = wy[:, None] @ patches @ wx.transpose(1, 2)[:, None]  # B, C*T, S, S
        return out.reshape(b, c, t, self.window_size, self.window_size)

    def forward_with_heatmap(self, clips: torch.Tensor, window_at: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (B, D), heatmap logits (B, T, G*G) and the localiser's window centres (B, 2) px.
        `window_at` (B, 2) px: cut the windows there instead (training only: the window stream can
        learn from the figure before the localiser has found it)."""
        x = self.full.prepare(clips)  # B, 3, T, H, W
        stem = self.full.stem(x)  # B, C1, T, G, G
        logits, centres = self.locate(stem)
        windows = self.window(x, centres.detach() if window_at is None else window_at)  # B, 3, T, S, S
        features = self.full.forward_head(self.full.forward_trunk(stem))
        return features + self.window_stream.forward_head(self.window_stream.forward_features(windows)), logits, centres

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_with_heatmap(clips)[0]

    def localiser_loss(self, logits: torch.Tensor, torso: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each frame's heatmap (B, T, G*G) against the cell holding the torso's
        middle (B, T, 2) px; frames whose target is NaN (no figure) are left out."""
        logits, torso = logits.reshape(-1, logits.shape[-1]), torso.reshape(-1, 2)
        shown = ~torso.isnan().any(-1)
        if not shown.any():
            return logits.sum() * 0
        cell = (torso[shown] // self.stem_patch).long().clamp(0, self.grid - 1)
        return F.cross_entropy(logits[shown], cell[:, 1] * self.grid + cell[:, 0])


def zoom_macs(model: S3DZoom) -> int:
    """Multiply-adds of one clip: convolutions, linear layers and the window's interpolation
    matrix products, as the graph computes them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, model.clip_frames, model.frame_size, model.frame_size, 3, dtype=torch.uint8))
    return counter.get_total_flops() // 2


def grid_sample_window(model: S3DZoom, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """`model.window(x, centres)` as grid_sample computes it (the cut `window` replaced; it exports
    as ONNX `GridSample`): the definition the tests and the cost bench hold `window` to."""
    b, c, t, h, w = x.shape
    out = F.grid_sample(x.reshape(b, c * t, h, w), model.sampling_grid(centres), mode="bilinear",
                        padding_mode="border", align_corners=False)  # B, C*T, S, S
    return out.reshape(b, c, t, model.window_size, model.window_size)


# Shape-named variants (after timm): window crop x sampled size, frame size ("_wide": the window
# read with the plain s3d's 24-32-64-128 channels). The 112-px window has FigureZoom's window
# reader (plain channels and stem at 112 px): the control for what the cheaper readers give up.
VARIANTS = {
    "s3d_zoom_32x56_112": dict(window_crop=32, window_size=56, window_stem_patch=4),
    "s3d_zoom_32x56_112_wide": dict(window_crop=32, window_size=56, window_stem_patch=4,
                                    window_channels=(24, 32, 64, 128)),
    "s3d_zoom_32x112_112": dict(window_crop=32, window_size=112, window_stem_patch=8,
                                window_channels=(24, 32, 64, 128)),
}


def create(name: str, **overrides) -> S3DZoom:
    if name not in VARIANTS:
        raise ValueError(f"unknown s3d_zoom variant {name!r}; known: {', '.join(VARIANTS)}")
    return S3DZoom(**{**VARIANTS[name], **overrides})
