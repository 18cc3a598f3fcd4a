"""The two-stream `s3d_zoom` clip encoder with Similarity Guided Sampling once, after the stems.

Both streams' stems give (N, C1, T, G, G) on the same G x G grid (14 x 14 in every `s3d_zoom`
variant). The localiser reads the full stem on all T frames and the window is cut from all T raw
frames, as in `S3DZoom`; then the two stem outputs are concatenated on the channels and go through
ONE `SimilarityGuidedSampling` node, are split back, and each stream's trunk (stages 2-4 and its
pooling, `S3DSGS.after_sgs` / `after_sgs_compact`) runs on the same kept B' bins. The clip feature
is the sum of the two projections, as `S3DZoom`'s.

The similarity net reads the concatenation, not the full stem alone: what makes two frames
redundant for the queries is mostly the diver, whom the window stream sees magnified
(window_size / window_crop: 3.5x in `s3d_zoom_32x112_112`; a twist turns a few full-stem cells at
most), while the full stem also sees the moving background and the take-off board. The net is two 1x1 layers on pooled channels, so reading 48 channels
instead of 24 costs nothing measurable.

Weights start from a served `S3DZoom`: its state dict loads with only the sampler (`sgs.*`)
missing. With a bin per frame and time-ordered means (`bins="time_means"`) the model is that
`S3DZoom` exactly (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from export.adaptive.sgs import SimilarityGuidedSampling
from export.models import s3d_zoom
from export.models.s3d_sgs import BIN_OUTPUTS, S3DSGS, sample_bins, sgs_macs
from export.models.s3d_zoom import S3DZoom

# Where SGS can go in the two-stream encoder: after the stems only (the localiser and the window cut
# need every frame's full stem; an earlier point saves nothing more, a later one needs a node per stream).
PLACEMENTS = ("stem",)


class S3DZoomSGS(S3DZoom):
    """`forward(clips, bins)` -> features (N, D) and the bins each clip kept, B' (N,)."""

    def __init__(
        self,
        *,
        sgs_after: str = "stem",
        similarity_dim: int = 8,
        similarity_centred: bool = False,
        similarity: str = "frame",
        bins: str = "sums",
        channels: tuple[int, ...] = (24, 32, 64, 128),
        window_channels: tuple[int, ...] = (16, 24, 48, 96),
        feature_dim: int = 256,
        clip_frames: int = 8,
        frame_size: int = 112,
        stem_patch: int = 8,
        window_size: int = 56,
        window_stem_patch: int = 4,
        norm_layer: type[nn.Module] = nn.BatchNorm3d,
        **zoom_options,
    ):
        if sgs_after not in PLACEMENTS:
            raise ValueError(f"sgs_after must be one of {PLACEMENTS} for s3d_zoom, got {sgs_after!r}")
        if bins not in BIN_OUTPUTS:
            raise ValueError(f"bins must be one of {BIN_OUTPUTS}, got {bins!r}")
        if frame_size // stem_patch != window_size // window_stem_patch:
            raise ValueError(f"SGS samples both stems at once: their grids must match, got {frame_size // stem_patch} "
                             f"(full) and {window_size // window_stem_patch} (window)")
        shared = dict(feature_dim=feature_dim, clip_frames=clip_frames, frame_size=frame_size, stem_patch=stem_patch,
                      window_size=window_size, window_stem_patch=window_stem_patch, norm_layer=norm_layer)
        super().__init__(channels=channels, window_channels=window_channels, **shared, **zoom_options)
        # The streams again, as S3DSGS trunks without a sampler of their own (same parameter names).
        stream = dict(sgs_after=sgs_after, similarity_dim=None, bins=bins, feature_dim=feature_dim,
                      clip_frames=clip_frames, norm_layer=norm_layer)
        self.full = S3DSGS(channels=channels, frame_size=frame_size, stem_patch=stem_patch, **stream)
        self.window_stream = S3DSGS(channels=window_channels, frame_size=window_size, stem_patch=window_stem_patch,
                                    **stream)
        self.sgs_after, self.bins = sgs_after, bins
        self.compact = True  # the streams' after_sgs_compact (False: the padded after_sgs, e.g. to compare)
        self.full_channels = channels[0]
        self.sgs = SimilarityGuidedSampling(channels[0] + window_channels[0], similarity_dim=similarity_dim,
                                            centred=similarity_centred, similarity=similarity)

    def prepare(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 clips (N, T, H, W, C) -> the normalised video both stems read (N, C, T, H, W)."""
        return self.full.prepare(clips)

    def before_sgs(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised video (N, 3, T, H, W) -> both stems on the channels (N, C1 + C1w, T, G, G)."""
        stem = self.full.before_sgs(x)  # N, C1, T, G, G
        _, centres = self.locate(stem)
        window = self.window_stream.before_sgs(self.window(x, centres.detach()))  # N, C1w, T, G, G
        return torch.cat([stem, window], dim=1)

    def after_sgs(self, sampled: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Both trunks on the sampled bins (N, C1 + C1w, B', G, G) with one mask -> features (N, D)."""
        full, window = sampled[:, : self.full_channels], sampled[:, self.full_channels :]
        if mask is not None and self.compact:
            pooled = self.full.after_sgs_compact(full, mask), self.window_stream.after_sgs_compact(window, mask)
        else:
            pooled = self.full.after_sgs(full, mask), self.window_stream.after_sgs(window, mask)
        return self.full.forward_head(pooled[0]) + self.window_stream.forward_head(pooled[1])

    def forward(self, clips: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sampled, mask = sample_bins(self.sgs, self.before_sgs(self.prepare(clips)), bins, self.bins)
        return self.after_sgs(sampled, mask), mask.sum(dim=1)

    def forward_served(self, clips: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the served graph computes: `forward` (the served `S3DZoom` graph has no separate path)."""
        return self.forward(clips, bins)

    def bins_for_budget(self, budget: float) -> int:
        return self.full.bins_for_budget(budget)

    def macs(self, bins_kept: int) -> int:
        """Multiply-adds of one clip that kept `bins_kept` bins (`sgs_macs`): both stems, the
        localiser, the window cut, the similarity net, the SGS sum and both trunks."""
        return sgs_macs(self, bins_kept, lambda sampled: self.after_sgs(sampled, None))


def create(name: str, **overrides) -> S3DZoomSGS:
    """The `s3d_zoom` variant `name` with SGS after its stems (`overrides`: SGS and zoom options)."""
    if name not in s3d_zoom.VARIANTS:
        raise ValueError(f"unknown s3d_zoom variant {name!r}; known: {', '.join(s3d_zoom.VARIANTS)}")
    return S3DZoomSGS(**{**s3d_zoom.VARIANTS[name], **overrides})


def from_config(config: dict) -> S3DSGS | S3DZoomSGS:
    """An s3d_sgs encoder from its model.json `config`: the served encoder's config (an `s3d_zoom`
    `variant`, or a plain s3d's options) with the SGS options."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    variant = options.pop("variant", None)
    return create(variant, **options) if variant is not None else S3DSGS(**options)
