"""The s3d clip encoder with Similarity Guided Sampling: after SGS every layer runs on the clip's
B' <= B kept bins instead of its T frames.

Where SGS goes decides what it can save: only the layers after it shrink. `PLACEMENTS` names the
points tried (after the stem's patchifying conv, after the stem, after stage 2 as the thesis does
for X3D, after stage 3); `macs`
counts a clip's multiply-adds for a given B' from the shapes each layer processes.

`bins`: what the layers after SGS get. "sums": the op's output as the thesis has it, O_b, the
linear kernel's weighted sums (eq. 6.6) in bin (Δ) order. "time_means": each kept bin divided by
its kernel mass Σ_t ψ(Δ_t, β_b), i.e. the weighted mean of its frames (as the thesis's Kronecker
kernel, eq. 6.5, averages), and the bins put in the order of their frames' mean time. The op is
the same; the mass and the mean time are its sums over two channels appended to the features
(ones, and the frame index). Why: the layers after SGS start from the trained s3d, whose temporal
convs saw single frames in time order; with sums in Δ order their input changes scale by up to 8x
from clip to clip (batch norm cannot undo a per-clip scale) and loses its order. With time-ordered
means a clip that keeps a bin per frame is exactly the s3d. (Measured only together with the
training schedule that came with it: docs/adaptive.md.)

Across a batch the kept bins are padded to the batch's largest B' (mask False). Padded frames are
zeroed before every temporal conv and pooled out at the end, so a clip's features do not depend
on its batch. The temporal max-pool after stage 3 rounds up (B' = 1 and odd B' pool to
ceil(B'/2) frames); on an even T it is the s3d's pool.

Served, the layers after SGS do not run on that padding (`after_sgs_compact`): the kept bins of
the whole batch become one stack of frames (Σ B' rows), every per-frame layer runs on the stack,
and each temporal conv reads a frame's neighbours in its own clip by index (a zero row at the
clip's ends, as the padded convolution sees). A batch then costs the sum of its clips' B', not
its size times the largest B'; the result is the padded computation's (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from export.adaptive.sgs import SimilarityGuidedSampling, similarity_guided_sampling
from export.models.s3d import S3D, SepConv3d

PLACEMENTS = ("patchify", "stem", "stage2", "stage3")
BIN_OUTPUTS = ("sums", "time_means")


class _Stack:
    """Kept bins of a batch as a stack of frames: row r is bin t of clip `clip[r]`; `before` /
    `after` the rows of its neighbours in that clip, or `len(clip)` (a zero row) at its ends. The
    kept bins are the first B' of each clip (SGS keeps them first), so a clip's rows are
    consecutive and `first[i]` is clip i's first row."""

    def __init__(self, mask: torch.Tensor):
        n, width = mask.shape
        flat = mask.reshape(-1).nonzero().squeeze(1)  # data-dependent: Σ B' rows
        torch._check(flat.shape[0] >= 1)  # every clip keeps a bin (lets the export skip empty-input guards)
        # clip and position of each row by lookup (a remainder by the symbolic width does not export)
        clip = torch.arange(n, device=mask.device)[:, None].expand(n, width).reshape(-1)
        position = torch.arange(width, device=mask.device)[None, :].expand(n, width).reshape(-1)
        self.mask, self.flat, self.clip, self.t = mask, flat, clip[flat], position[flat]
        self.kept = mask.sum(dim=1)  # N
        self.first = torch.cumsum(self.kept, dim=0) - self.kept
        row = torch.arange(flat.shape[0], device=mask.device)
        none = torch.full_like(row, flat.shape[0])
        self.before = torch.where(self.t >= 1, row - 1, none)
        self.after = torch.where(self.t + 1 < self.kept[self.clip], row + 1, none)

    def pooled(self, rows: torch.Tensor, stride: int) -> tuple[_Stack, torch.Tensor]:
        """Max over each clip's consecutive `stride` rows (round up: the last group may be short), as
        `S3DSGS._pool3` pools time; the new stack and its rows."""
        frames = F.pad(self.mask[:, None, :, None, None].to(rows.dtype), (0, 0, 0, 0, 0, stride - 1))
        pooled = _Stack(F.max_pool3d(frames, (stride, 1, 1))[:, 0, :, 0, 0] > 0)
        padded = torch.cat([rows, rows.new_zeros((1, *rows.shape[1:]))])
        none = rows.shape[0]
        out = None
        for j in range(stride):  # post-ReLU rows are >= 0: a missing one (the zero row) changes no max
            source = pooled.t * stride + j
            index = torch.where(source < self.kept[pooled.clip], self.first[pooled.clip] + source, none)
            out = padded[index] if out is None else torch.maximum(out, padded[index])
        return pooled, out


def _temporal(conv: nn.Conv3d, x: torch.Tensor, stack: _Stack) -> torch.Tensor:
    """A (k, 1, 1) temporal conv (k = 1 or 3, padding k // 2, no bias) on a stack of frames
    (M, C, 1, h, w): one conv over each frame and its neighbours stacked on the channels."""
    k = conv.kernel_size[0]
    if k == 1:
        return conv(x)
    if k != 3 or conv.bias is not None:
        raise ValueError(f"a compact temporal conv needs kernel 3 without bias, got {conv}")
    padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
    weight = conv.weight.permute(0, 2, 1, 3, 4).reshape(conv.out_channels, -1, 1, 1, 1)  # O, (t−1, t, t+1)·C
    return F.conv3d(torch.cat([padded[stack.before], x, padded[stack.after]], dim=1), weight)


def _stacked_stage(stage: SepConv3d, x: torch.Tensor, stack: _Stack) -> torch.Tensor:
    x = stage.act(stage.norm_s(stage.spatial(x)))
    return stage.act(stage.norm_t(_temporal(stage.temporal, x, stack)))


def _masked_stage(stage: SepConv3d, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`stage` on (N, C, T, H, W) whose padded frames (mask False) are held at 0 around the temporal conv."""
    keep = None if mask is None else mask[:, None, :, None, None].to(x.dtype)
    x = stage.act(stage.norm_s(stage.spatial(x)))
    if keep is not None:
        x = x * keep
    x = stage.act(stage.norm_t(stage.temporal(x)))
    return x if keep is None else x * keep


def sample_bins(sgs: SimilarityGuidedSampling, before: torch.Tensor, bins: torch.Tensor,
                output: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`sgs` on the features before it (N, C, T, h, w) -> (N, C, B', h, w) and the (N, B') mask, the
    bins as `output` ("sums" or "time_means", see the module docstring) asks."""
    if output == "sums":
        return sgs(before, bins)
    n, c, t = before.shape[:3]
    ones = before.new_ones((n, 1, *before.shape[2:]))
    time = torch.arange(t, dtype=before.dtype, device=before.device).view(1, 1, t, *[1] * (before.dim() - 3))
    extra = torch.cat([ones, ones * time], dim=1)  # N, 2, T, h, w
    sampled, mask = similarity_guided_sampling(torch.cat([before, extra], dim=1), sgs.similarity(before), bins)
    mass = sampled[:, c : c + 1].clamp(min=1e-6)  # Σ_t ψ per bin (0 on padded bins, whose sums are 0 too)
    means = sampled[:, :c] / mass
    mean_time = (sampled[:, c + 1 : c + 2] / mass).flatten(3)[:, 0, :, 0]  # N, B'
    # Padded bins last; bin position breaks ties (a stable sort does not export, TopK does).
    position = torch.arange(mask.shape[1], dtype=before.dtype, device=before.device) * 1e-4
    key = torch.where(mask, mean_time, float(t)) + position
    order = torch.topk(key, mask.shape[1], dim=1, largest=False).indices
    index = order.view(n, 1, -1, *[1] * (before.dim() - 3)).expand(n, c, -1, *means.shape[3:])
    return means.gather(2, index), mask.gather(1, order)


class S3DSGS(S3D):
    """`forward(clips, bins)` -> features (N, D) and the bins each clip kept, B' (N,)."""

    def __init__(self, *, sgs_after: str = "stem", similarity_dim: int | None = 8, similarity_centred: bool = False,
                 similarity: str = "frame", bins: str = "sums", **s3d_options):
        """`similarity_dim` None: no sampler of its own (`sgs` is None), only the layers before and
        after it: a stream of an encoder that samples once for several streams (`S3DZoomSGS`)."""
        super().__init__(**s3d_options)
        if sgs_after not in PLACEMENTS:
            raise ValueError(f"sgs_after must be one of {PLACEMENTS}, got {sgs_after!r}")
        if getattr(self, "per_frame", False):
            raise ValueError("SGS needs a temporal encoder (temporal_kernel_size=3)")
        if bins not in BIN_OUTPUTS:
            raise ValueError(f"bins must be one of {BIN_OUTPUTS}, got {bins!r}")
        self.sgs_after, self.bins = sgs_after, bins
        self.compact = True  # after_sgs_compact (False: the padded after_sgs, e.g. to compare)
        channels = {"patchify": self.stem[0].out_channels, "stem": self.stem[-3].out_channels,
                    "stage2": self.stage2.temporal.out_channels, "stage3": self.stage3.temporal.out_channels}[sgs_after]
        self.sgs = None if similarity_dim is None else SimilarityGuidedSampling(
            channels, similarity_dim=similarity_dim, centred=similarity_centred, similarity=similarity)
        self.temporal_stride = self.pool3.kernel_size[0] if isinstance(self.pool3.kernel_size, tuple) else 2

    def _pool3(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = F.max_pool3d(x, (1, 2, 2))
        if self.temporal_stride == 1:
            return x, mask
        # Round up: stride − 1 zero frames at the end (0 <= any ReLU output, so no max changes);
        # a fixed pad instead of ceil_mode, whose size check cannot be traced on a data-dependent T.
        extra = self.temporal_stride - 1
        x = F.max_pool3d(F.pad(x, (0, 0, 0, 0, 0, extra)), (self.temporal_stride, 1, 1))
        if mask is not None:
            frames = F.pad(mask[:, None, :, None, None].to(x.dtype), (0, 0, 0, 0, 0, extra))
            mask = F.max_pool3d(frames, (self.temporal_stride, 1, 1))[:, 0, :, 0, 0] > 0
        return x, mask

    def before_sgs(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised video (N, 3, T, H, W) -> the features SGS samples."""
        return self.after_patchify(self.stem[0](x))

    def after_patchify(self, patches: torch.Tensor) -> torch.Tensor:
        """The stem's patchifying convolution (`patchify`) -> the features SGS samples."""
        if self.sgs_after == "patchify":
            return self.stem[1:3](patches)  # N, C1, T, H/p, W/p: the patchify's norm and ReLU
        x = self.stem[1:](patches)  # N, C1, T, H/p, W/p
        if self.sgs_after == "stem":
            return x
        x = self.pool2(self.stage2(x))  # N, C2, T, H/2p, W/2p
        if self.sgs_after == "stage2":
            return x
        return self.stage3(x)  # N, C3, T, H/2p, W/2p

    def after_sgs(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.sgs_after == "patchify":  # the rest of the stem: temporal conv, norm, ReLU
            keep = None if mask is None else mask[:, None, :, None, None].to(x.dtype)
            x = self.stem[3:](x if keep is None else x * keep)
            x = x if keep is None else x * keep
        if self.sgs_after in ("patchify", "stem"):
            x = self.pool2(_masked_stage(self.stage2, x, mask))
        if self.sgs_after in ("patchify", "stem", "stage2"):
            x = _masked_stage(self.stage3, x, mask)
        x, mask = self._pool3(x, mask)
        x = _masked_stage(self.stage4, x, mask).mean(dim=(3, 4))  # N, C4, T'
        if mask is None:
            return x.mean(dim=2)
        keep = mask[:, None].to(x.dtype)
        return (x * keep).sum(dim=2) / keep.sum(dim=2)  # N, C4

    def after_sgs_compact(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`after_sgs` on the kept bins only (see the module docstring); patchify falls back to it."""
        if self.sgs_after == "patchify":
            return self.after_sgs(x, mask)
        stack = _Stack(mask)
        n, c, width, h, w = x.shape
        rows = x.transpose(1, 2).reshape(n * width, c, 1, h, w)
        rows = rows[stack.flat]  # M, C, 1, h, w
        if self.sgs_after == "stem":
            rows = self.pool2(_stacked_stage(self.stage2, rows, stack))
        if self.sgs_after in ("stem", "stage2"):
            rows = _stacked_stage(self.stage3, rows, stack)
        rows = F.max_pool3d(rows, (1, 2, 2))
        if self.temporal_stride > 1:
            stack, rows = stack.pooled(rows, self.temporal_stride)
        rows = _stacked_stage(self.stage4, rows, stack).mean(dim=(2, 3, 4))  # M', C4
        return rows.new_zeros((n, rows.shape[1])).index_add(0, stack.clip, rows) / stack.kept[:, None].to(rows.dtype)

    def sample(self, before: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SGS on the features before it: (N, C, B', h, w) and the (N, B') mask."""
        if self.sgs is None:
            raise ValueError("this s3d_sgs has no sampler of its own (similarity_dim=None)")
        return sample_bins(self.sgs, before, bins, self.bins)

    def forward_patches(self, patches: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stem's patchifying convolution (`patchify`) -> features (N, D) and B' (N,)."""
        sampled, mask = self.sample(self.after_patchify(patches), bins)  # N, C, B', h, w; N, B'
        after = self.after_sgs_compact if self.compact else self.after_sgs
        return self.forward_head(after(sampled, mask)), mask.sum(dim=1)

    def forward(self, clips: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_patches(self.patchify(clips), bins)

    def forward_served(self, clips: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` as the served graph computes it (see `S3D.patchify`)."""
        return self.forward_patches(self.patchify(clips, served=True), bins)

    def bins_for_budget(self, budget: float) -> int:
        """B for a compute budget in (0, 1]: ⌈budget·T⌉ bins; budget 1 is the thesis's B = T."""
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        return max(math.ceil(budget * self.clip_frames), 1)

    def macs(self, bins_kept: int) -> int:
        """Multiply-adds of one clip that kept `bins_kept` bins (`sgs_macs`)."""
        return sgs_macs(self, bins_kept, lambda sampled: self.forward_head(self.after_sgs(sampled, None)))


@torch.no_grad()
def sgs_macs(model: nn.Module, bins_kept: int, after_sgs: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Multiply-adds of one clip through an SGS encoder (its `before_sgs`, `sgs`, `bins`,
    `clip_frames`, `frame_size`) that kept `bins_kept` bins: convolutions, linear layers and
    matrix products before SGS, the similarity net, the SGS sum and `after_sgs(sampled)` (what
    follows SGS, to the clip feature), counted on the shapes each of them processes."""
    if not 1 <= bins_kept <= model.clip_frames:
        raise ValueError(f"bins_kept must be in 1..{model.clip_frames}, got {bins_kept}")
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, 3, model.clip_frames, model.frame_size, model.frame_size)
        with FlopCounterMode(display=False) as counter:
            before = model.before_sgs(x)
            model.sgs.similarity(before)
            _, c, t, *space = before.shape
            after_sgs(before.new_zeros(1, c, bins_kept, *space))
        channels = c if model.bins == "sums" else c + 2  # + the mass and mean-time channels
        sgs_sum = channels * bins_kept * t * space[0] * space[1]  # O_b = Σ_t I_t·w_tb
        return counter.get_total_flops() // 2 + sgs_sum
    finally:
        model.train(was_training)


def s3d_macs(model: S3D) -> int:
    """Multiply-adds of one clip through the plain s3d, counted the same way."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, model.clip_frames, model.frame_size, model.frame_size, 3, dtype=torch.uint8))
    return counter.get_total_flops() // 2


# Shape-named variants (after timm): SGS placement in the name.
VARIANTS = {f"s3d_sgs_{where}_112": dict(sgs_after=where) for where in PLACEMENTS}


def create(name: str, **overrides) -> S3DSGS:
    if name not in VARIANTS:
        raise ValueError(f"unknown s3d_sgs variant {name!r}; known: {', '.join(VARIANTS)}")
    return S3DSGS(**{**VARIANTS[name], **overrides})
