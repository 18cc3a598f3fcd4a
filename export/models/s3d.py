"""Small separable 3D CNN clip encoder (S3D-like): 8 RGB frames -> one D-dim feature."""

from __future__ import annotations

import torch
from torch import nn

from export.models.pixels import can_embed_patches, embed_patches, normalise

# Kinetics-style normalisation, applied inside the graph so servers send raw uint8 frames.
PIXEL_MEAN = (0.43, 0.4, 0.37)
PIXEL_STD = (0.23, 0.22, 0.22)


class SepConv3d(nn.Module):
    """Spatial k×k conv then temporal k conv, each followed by norm and ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        temporal_kernel_size: int = 3,
        norm_layer: type[nn.Module] = nn.BatchNorm3d,
    ):
        super().__init__()
        pad, tpad = kernel_size // 2, temporal_kernel_size // 2
        self.spatial = nn.Conv3d(in_channels, out_channels, (1, kernel_size, kernel_size),
                                 padding=(0, pad, pad), bias=False)
        self.norm_s = norm_layer(out_channels)
        self.temporal = nn.Conv3d(out_channels, out_channels, (temporal_kernel_size, 1, 1),
                                  padding=(tpad, 0, 0), bias=False)
        self.norm_t = norm_layer(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm_s(self.spatial(x)))
        return self.act(self.norm_t(self.temporal(x)))


class S3D(nn.Module):
    """Clip encoder; `forward` takes uint8 clips (B, T, H, W, C) exactly as the server sends them."""

    def __init__(
        self,
        *,
        channels: tuple[int, ...] = (24, 32, 64, 128),
        feature_dim: int = 256,
        clip_frames: int = 8,
        frame_size: int = 112,
        stem_patch: int = 8,
        temporal_kernel_size: int = 3,
        stem_temporal_kernel: int = 1,
        stem_difference: bool = False,
        stem_pool: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm3d,
    ):
        """`temporal_kernel_size=1` makes every layer per-frame (a 2D CNN whose frame features
        are max- and mean-pooled over time): the single-frame control, which cannot see motion.
        `stem_temporal_kernel=3` lets the patchifying stem itself span 3 frames, so motion inside
        a patch (a limb turning by a few pixels) is seen at pixel level, before patchify
        compresses each patch. `stem_difference` gives the stem each frame's difference from the
        previous one (zero for the first) beside its pixels, so what moved between two frames is
        an input, not something the network must learn to compute across patches. `stem_pool` = 2
        with `stem_patch` = 4 keeps the stem (and its temporal convolution) at twice the spatial
        resolution and max-pools to the stride-8 grid after it."""
        super().__init__()
        if temporal_kernel_size not in (1, 3):
            raise ValueError(f"temporal_kernel_size must be 1 or 3, got {temporal_kernel_size}")
        if stem_temporal_kernel not in (1, 3) or (temporal_kernel_size == 1 and stem_temporal_kernel != 1):
            raise ValueError(f"stem_temporal_kernel must be 1 or 3 (1 for a per-frame encoder), got {stem_temporal_kernel}")
        if stem_difference and temporal_kernel_size == 1:
            raise ValueError("stem_difference shows motion: a per-frame encoder cannot have it")
        tk, stk = temporal_kernel_size, stem_temporal_kernel
        self.per_frame = tk == 1
        if len(channels) != 4:
            raise ValueError(f"channels needs 4 stages, got {channels}")
        self.clip_frames, self.frame_size, self.feature_dim = clip_frames, frame_size, feature_dim
        self.stem_difference = stem_difference
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1, 1) * 255)
        c1, c2, c3, c4 = channels
        if stem_pool not in (1, 2):
            raise ValueError(f"stem_pool must be 1 or 2, got {stem_pool}")
        self.stem = nn.Sequential(  # patchify: stride stem_patch, keeps all frames
            nn.Conv3d(6 if stem_difference else 3, c1, (stk, stem_patch, stem_patch), stride=(1, stem_patch, stem_patch),
                      padding=(stk // 2, 0, 0), bias=False),
            norm_layer(c1),
            nn.ReLU(inplace=True),
            nn.Conv3d(c1, c1, (tk, 1, 1), padding=(tk // 2, 0, 0), bias=False),
            norm_layer(c1),
            nn.ReLU(inplace=True),
            *([nn.MaxPool3d((1, stem_pool, stem_pool))] if stem_pool > 1 else []),
        )
        self.stage2 = SepConv3d(c1, c2, temporal_kernel_size=tk, norm_layer=norm_layer)
        self.pool2 = nn.MaxPool3d((1, 2, 2))
        self.stage3 = SepConv3d(c2, c3, temporal_kernel_size=tk, norm_layer=norm_layer)
        self.pool3 = nn.MaxPool3d((2 if tk > 1 else 1, 2, 2))
        self.stage4 = SepConv3d(c3, c4, temporal_kernel_size=tk, norm_layer=norm_layer)
        self.proj = nn.Linear(c4, feature_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_trunk(self.stem(x))  # the stem: B, C1, T, H/p, W/p

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stages 2-4 and the pooling, from the stem's features (B, C1, T, H/p, W/p) to (B, C4)."""
        x = self.pool2(self.stage2(x))  # B, C2, T, H/2p, W/2p
        x = self.pool3(self.stage3(x))  # B, C3, T/2, H/4p, W/4p
        x = self.stage4(x)
        if self.per_frame:  # max over frames of per-frame features: no motion can get through
            return x.mean(dim=(3, 4)).amax(dim=2)  # B, C4
        return x.mean(dim=(2, 3, 4))  # B, C4

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # B, D

    def prepare(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 clips (B, T, H, W, C) -> the stem's normalised input (B, C, T, H, W)."""
        x = normalise(clips, self.mean, self.std)
        if self.stem_difference:
            x = torch.cat([x, torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], 2)], 1)
        return x

    def patchify(self, clips: torch.Tensor, *, served: bool = False) -> torch.Tensor:
        """uint8 clips -> the stem's patchifying convolution (B, C1, T, H/p, W/p). `served`: as the
        served graphs compute it, from the raw clips (`pixels.embed_patches`, where the stem allows
        it), equal up to float rounding. Training keeps the convolution of `prepare`'s normalised
        video, so retraining reproduces the committed weights."""
        conv = self.stem[0]
        if served and not self.stem_difference and can_embed_patches(conv):
            return embed_patches(clips, conv, self.mean, self.std).permute(0, 4, 1, 2, 3)
        return conv(self.prepare(clips))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_trunk(self.stem[1:](self.patchify(clips))))

    def forward_served(self, clips: torch.Tensor) -> torch.Tensor:
        """`forward` as the served graph computes it (see `patchify`)."""
        return self.forward_head(self.forward_trunk(self.stem[1:](self.patchify(clips, served=True))))
