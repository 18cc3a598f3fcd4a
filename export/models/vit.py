"""Small tubelet video ViT clip encoder, with the Adaptive Token Sampler in its later blocks.

8 RGB frames at 112 px -> 2×16×16 tubelets (4·7·7 = 196 tokens) + a cls token -> pre-norm
transformer blocks -> the cls token projected to D. One set of weights serves both encoders:
`forward(clips)` is the plain ViT; `forward(clips, budget)` samples tokens with ATS in `ats_blocks`
(thesis: blocks 3..end), each ATS block with its own K relative to the tokens it receives, as the
thesis sets K_n = max(ρ·#InputTokens_n, 8): every ATS block samples, so a clip keeps a share of a
share. K >= the tokens a block receives keeps them all, so budget 1 reproduces the plain ViT exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from export.adaptive.ats import adaptive_token_sampler, gather_rows, select_top_k
from export.models.pixels import clip_motion, embed_patches, motion_ramp, normalise
from export.models.s3d import PIXEL_MEAN, PIXEL_STD
from export.models.s3d_zoom import S3DZoom

K_FLOOR = 8  # the thesis's K_n = max(ρ·#InputTokens_n, 8)
# `MotionBudget` measures a clip's motion on every 4th pixel each way: the mean change is as good
# at a sixteenth of the reads, and over every pixel it cost a third of the ViT (docs/adaptive.md,
# session 28).
MOTION_STRIDE = 4


def block_k(budget: torch.Tensor, received: torch.Tensor | int) -> torch.Tensor:
    """An ATS block's K per sample: max(⌈budget·received⌉, K_FLOOR) for the non-cls tokens it
    receives (a budget of 1 keeps them all, see `adaptive_token_sampler`)."""
    return torch.ceil(budget * received).clamp(min=K_FLOOR).to(torch.int64)


class MotionBudget(nn.Module):
    """Spreads a request's budget over its clips by how much each one moves: a clip's budget is
    budget ** power, the power `still_power` at motion (`pixels.clip_motion` at `MOTION_STRIDE`)
    `low` and below, `moving_power` at `high` and above, linear in between. A budget of 1 stays 1
    (the plain ViT).

    Why: ATS keeps as many tokens as the cls attention is spread over, and in this data it spreads
    in clips where nothing happens (nothing to look at) and gathers on the diver in flight, so one
    ρ for every clip keeps more tokens before and after the dive than during it (docs/adaptive.md,
    session 28). The sampler is the thesis's; only each clip's K moves."""

    def __init__(self, low: float, high: float, still_power: float, moving_power: float):
        super().__init__()
        if not high > low:
            raise ValueError(f"the moving level {high} must be above the still one {low}")
        if min(still_power, moving_power) <= 0:
            raise ValueError(f"powers must be positive, got {still_power} and {moving_power}")
        self.low, self.high, self.still_power, self.moving_power = low, high, still_power, moving_power

    def forward(self, clips: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """uint8 clips (N, T, H, W, C) and their budgets (N,) -> each clip's budget (N,)."""
        ramp = motion_ramp(clip_motion(clips, MOTION_STRIDE), self.low, self.high)
        return budget ** (self.still_power + (self.moving_power - self.still_power) * ramp)

    def config(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high, "still_power": self.still_power, "moving_power": self.moving_power}


class Attention(nn.Module):
    def __init__(self, dim: int, *, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def probabilities(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention over the valid keys (N, h, n, n) and the values (N, h, n, dh);
        `mask` None: every token is valid (no padding yet, so no masking cost)."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5
        if mask is not None:
            # An added bias, not masked_fill over the scores: the same numbers, but ONNX Runtime
            # broadcasts an Add over the (N, h, n, n) scores much faster than a Where.
            bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
            scores = scores + bias.masked_fill(~mask, float("-inf"))[:, None, None, :]
        return scores.softmax(dim=-1), v


class Block(nn.Module):
    """Pre-norm transformer block; with `k`, ATS keeps K' + 1 rows of the attention output and the
    residual and FFN run on those tokens only."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        mlp_ratio: float = 4.0,
        top_k: bool = False,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.top_k = top_k
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, heads=heads)
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, k: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (N, n, dim) and their validity mask (N, n) or None (all valid) -> the same for
        the tokens this block keeps."""
        attn, v = self.attn.probabilities(self.norm1(x), mask)  # N, h, n, n; N, h, n, dh
        if k is None:
            attended, residual = (attn @ v).transpose(1, 2).flatten(2), x
        else:
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            if self.top_k:
                index, mask = select_top_k(attn, v, mask, k)
                attended, residual = gather_rows(x, attn, v, index, mask)
            else:
                attended, residual, mask, _ = adaptive_token_sampler(x, attn, v, mask, k)
        x = residual + self.attn.proj(attended)
        return x + self.mlp(self.norm2(x)), mask


class VideoViT(nn.Module):
    """Clip encoder; `forward` takes uint8 clips (N, T, H, W, C) exactly as the server sends them."""

    def __init__(
        self,
        *,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        feature_dim: int = 256,
        clip_frames: int = 8,
        frame_size: int = 112,
        tubelet: tuple[int, int] = (2, 16),
        ats_blocks: Sequence[int] = (2, 3, 4, 5),
        top_k: bool = False,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        """`top_k=True` replaces ATS's sampling by the K highest scores (the thesis's Table 7.1
        baseline; torch only, not exported)."""
        super().__init__()
        tubelet_frames, patch = tubelet
        if clip_frames % tubelet_frames or frame_size % patch:
            raise ValueError(f"tubelet {tubelet} does not tile {clip_frames}×{frame_size}²")
        if any(not 0 <= b < depth for b in ats_blocks):
            raise ValueError(f"ats_blocks {tuple(ats_blocks)} must index the {depth} blocks")
        self.clip_frames, self.frame_size, self.feature_dim = clip_frames, frame_size, feature_dim
        self.ats_blocks = tuple(sorted(ats_blocks))
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1, 1) * 255)
        self.embed = nn.Conv3d(3, dim, (tubelet_frames, patch, patch), stride=(tubelet_frames, patch, patch))
        self.tokens = (clip_frames // tubelet_frames) * (frame_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, self.tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(dim, heads=heads, mlp_ratio=mlp_ratio, top_k=top_k, norm_layer=norm_layer) for _ in range(depth)
        )
        self.norm = norm_layer(dim)
        self.proj = nn.Linear(dim, feature_dim)

    def forward_features(
        self, x: torch.Tensor, budget: torch.Tensor | None = None, *, k: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised video (N, 3, T, H, W) -> `forward_tokens` of its tubelet embeddings."""
        return self.forward_tokens(self.embed(x).flatten(2).transpose(1, 2), budget, k=k)

    def forward_tokens(
        self, tokens: torch.Tensor, budget: torch.Tensor | None = None, *, k: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tubelet embeddings (N, n, dim) -> cls features (N, dim) and, with ATS (`budget` or `k`,
        see `forward`), the tokens each ATS block kept per sample (N, len(ats_blocks)), cls included."""
        if budget is not None and k is not None:
            raise ValueError("give a budget or a fixed k, not both")
        if budget is not None and not budget.is_floating_point():
            raise ValueError("budget is a float share of the tokens; a fixed K per ATS block goes in k")
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.position
        mask = None
        kept = []
        budget = None if budget is None else budget.reshape(-1)  # one, or one per sample
        for i, block in enumerate(self.blocks):
            this_k = None
            if i in self.ats_blocks:
                if budget is not None:  # of the non-cls tokens this block receives: all, or what the last ATS block kept
                    this_k = block_k(budget, self.tokens if mask is None else mask.sum(dim=1) - 1)
                elif k is not None:
                    this_k = k[..., self.ats_blocks.index(i)]
            x, mask = block(x, mask, this_k)
            if this_k is not None:
                kept.append(mask.sum(dim=1))
        return self.norm(x[:, 0]), (torch.stack(kept, dim=1) if kept else None)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # N, D

    def forward(self, clips: torch.Tensor, budget: torch.Tensor | None = None, *, k: torch.Tensor | None = None):
        """uint8 clips -> features (N, D); with ATS, also the tokens each ATS block kept (N, blocks),
        cls included. `budget`: a float ρ (one, or one per clip (N,) / (N, 1)); each ATS block's K =
        `block_k`(ρ, the tokens it receives), as served. `k`: int64 K fixed per ATS block ((blocks,)
        for the batch or (N, blocks) per clip), as the top-K baseline runs at ATS's K'."""
        features, kept = self.forward_features(normalise(clips, self.mean, self.std), budget, k=k)
        return self._answer(features, kept, plain=budget is None and k is None)

    def forward_served(self, clips: torch.Tensor, budget: torch.Tensor | None = None, *,
                       k: torch.Tensor | None = None):
        """`forward` as the served graphs compute it: the tubelet embedding reads the uint8 clips
        (`pixels.embed_patches`), equal up to float rounding. Training keeps `forward`'s order of
        operations, so retraining reproduces the committed weights."""
        tokens = embed_patches(clips, self.embed, self.mean, self.std).flatten(1, 3)  # N, n, dim
        features, kept = self.forward_tokens(tokens, budget, k=k)
        return self._answer(features, kept, plain=budget is None and k is None)

    def _answer(self, features: torch.Tensor, kept: torch.Tensor | None, *, plain: bool):
        return self.forward_head(features) if plain else (self.forward_head(features), kept)

    def macs(self, kept: Sequence[int] | torch.Tensor | None = None):
        """Multiply-adds of one clip whose ATS blocks kept `kept` tokens (cls included; None: no ATS):
        an int for a list of counts, or per clip (N,) for a (N, blocks) tensor of counts (the
        served graph counts each clip's own work this way).

        Counted from the shapes each layer processes: a block receiving n tokens and keeping m
        computes q, k, v and the attention scores for all n, and A·V, the projection and the FFN
        for m (ATS's scoring and sorting are O(n·K), not counted)."""
        dim = self.cls.shape[-1]
        hidden = self.blocks[0].mlp[0].out_features
        kernel = self.embed.weight[0].numel()
        total = self.tokens * dim * kernel  # tubelet embedding
        n = self.tokens + 1
        per_block = [] if kept is None else (list(kept.unbind(-1)) if torch.is_tensor(kept) else list(kept))
        if per_block and len(per_block) != len(self.ats_blocks):
            raise ValueError(f"kept needs one count per ATS block ({len(self.ats_blocks)}), got {len(per_block)}")
        for i in range(len(self.blocks)):
            m = per_block[self.ats_blocks.index(i)] if per_block and i in self.ats_blocks else n
            total = total + n * dim * 3 * dim + n * n * dim  # qkv, QKᵀ
            total = total + m * n * dim + m * dim * dim + 2 * m * dim * hidden  # A·V, proj, FFN
            n = m
        return total + dim * self.feature_dim


class VideoViTZoom(VideoViT):
    """The ViT that also reads the diver's window: one token sequence of the full frame's tubelets
    and the window's, the window cut where the served `s3d_zoom`'s localiser puts it (that encoder's
    stem and localiser, frozen: `finder`), its crop sampled to `window_size` px (default: the
    frame's) and cut into as many tubelets as the frame, so each window token covers
    window_crop / (frame_size / patch) source pixels whatever `window_size` is: a smaller one only
    embeds fewer (interpolated) pixels per token.
    Why: the plain ViT sees the ~25-px diver in 16-px tubelets and cannot imitate the two-stream
    teacher's counts (docs/adaptive.md); the window's tokens are also where ATS has
    the most to drop outside the flight."""

    def __init__(self, finder: S3DZoom, *, window_size: int | None = None, **vit):
        super().__init__(**vit)
        window_size = self.frame_size if window_size is None else window_size
        grid = self.frame_size // self.embed.kernel_size[1]
        if finder.frame_size != self.frame_size:
            raise ValueError(f"the finder's frames must be {self.frame_size} px like the ViT's, got {finder.frame_size}")
        if window_size % grid:
            raise ValueError(f"a {window_size}-px window does not tile into the frame's {grid}x{grid} tubelets")
        if finder.full.stem_difference:
            raise ValueError("the finder's stem must read the plain normalised video the ViT reads")
        finder = copy.deepcopy(finder)
        # Only the full stream's stem and the localiser run: the teacher's readers of the frame and
        # the window would be dead weight in the ViT's state dict.
        del finder.window_stream
        finder.sample_windows_to(window_size)
        for reader in ("stage2", "stage3", "stage4", "proj"):
            delattr(finder.full, reader)
        self.finder = finder.eval().requires_grad_(False)
        dim = self.cls.shape[-1]
        kernel = (self.embed.kernel_size[0], window_size // grid, window_size // grid)
        self.window_embed = nn.Conv3d(3, dim, kernel, stride=kernel)
        self.tokens *= 2  # the window's tubelets tile it as the frame's tile the frame
        self.position = nn.Parameter(torch.randn(1, self.tokens + 1, dim) * 0.02)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.find(torch.zeros(1, 3, self.clip_frames, self.frame_size, self.frame_size))
        self.finder_macs = counter.get_total_flops() // 2

    def train(self, mode: bool = True):
        super().train(mode)
        self.finder.eval()  # frozen: its batch norms keep the teacher's statistics
        return self

    def find(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised video (N, 3, T, H, W) -> each clip's window (N, 3, T, H, W), at the centre the
        finder's localiser puts it."""
        return self.finder.window(x, self.finder.locate(self.finder.full.stem(x))[1])

    def forward_features(
        self, x: torch.Tensor, budget: torch.Tensor | None = None, *, k: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised video (N, 3, T, H, W) -> `forward_tokens` of the frame's and the window's
        tubelet embeddings."""
        tokens = torch.cat([self.embed(x).flatten(2), self.window_embed(self.find(x)).flatten(2)], dim=2)
        return self.forward_tokens(tokens.transpose(1, 2), budget, k=k)

    def forward_served(self, clips: torch.Tensor, budget: torch.Tensor | None = None, *,
                       k: torch.Tensor | None = None):
        """`forward` as the served graphs compute it, equal up to float rounding: both tubelet
        embeddings and the finder's stem read raw pixels (`pixels.embed_patches`), and the window is
        cut from the raw frames, not the normalised video (its bilinear weights sum to 1 per pixel,
        so cutting commutes with the per-channel normalisation): no normalised video is written.
        (Cutting the window from the channels-last bytes, or embedding it by a convolution instead of
        transposing it to channels last, changed nothing measurable in ONNX Runtime.)"""
        full = self.finder.full
        stem = full.stem[1:](full.patchify(clips, served=True))
        window = self.finder.window(clips.permute(0, 4, 1, 2, 3).float(), self.finder.locate(stem)[1])
        tokens = torch.cat([embed_patches(clips, self.embed, self.mean, self.std).flatten(1, 3),
                            embed_patches(window.permute(0, 2, 3, 4, 1), self.window_embed, self.mean,
                                          self.std).flatten(1, 3)], dim=1)
        features, kept = self.forward_tokens(tokens, budget, k=k)
        return self._answer(features, kept, plain=budget is None and k is None)

    def macs(self, kept: Sequence[int] | torch.Tensor | None = None):
        """`VideoViT.macs` (which embeds every token with the frame's kernel), the window's tokens
        with the window's kernel instead, plus the finder's stem, localiser and window cut."""
        window_tokens, dim = self.tokens // 2, self.cls.shape[-1]
        window_kernel = window_tokens * dim * (self.window_embed.weight[0].numel() - self.embed.weight[0].numel())
        return super().macs(kept) + window_kernel + self.finder_macs


# Shape-named variants (after timm): the same weights serve `vit` and `vit_ats`.
VARIANTS = {
    "vit_tiny_112": dict(dim=128, depth=6, heads=4, ats_blocks=(2, 3, 4, 5)),
    # The served one: a third of vit_tiny_112's multiply-adds (0.107 GMACs per clip), so it trains
    # and is evaluated on the shared 2 cores in the time box.
    "vit_mini_112": dict(dim=64, depth=6, heads=4, ats_blocks=(2, 3, 4, 5)),
}


# The zoom ViT (`VideoViTZoom`) at vit_mini_112's width and depth. Its tubelets span 4 frames, so the
# frame and the window together are vit_mini_112's 196 tokens: 2-frame tubelets (392 tokens) made a
# training step 5.5x as long.
ZOOM_VARIANTS = {
    "vit_zoom_mini_112": {**VARIANTS["vit_mini_112"], "tubelet": (4, 16)},
    # The window sampled to 56 px, not 112, in 4x8x8 tubelets: the same 32-px crop and tokens, a
    # quarter of the window's cut and embedding (the part of the ViT that ATS cannot save).
    "vit_zoom56_mini_112": {**VARIANTS["vit_mini_112"], "tubelet": (4, 16), "window_size": 56},
}


def create(name: str, finder: S3DZoom | None = None, **overrides) -> VideoViT:
    """A ViT variant; a zoom variant reads its window where `finder` (an s3d_zoom) puts it."""
    if name in ZOOM_VARIANTS:
        if finder is None:
            raise ValueError(f"{name} cuts its window where an s3d_zoom's localiser puts it: give that s3d_zoom")
        return VideoViTZoom(finder, **{**ZOOM_VARIANTS[name], **overrides})
    if name not in VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; known: {', '.join([*VARIANTS, *ZOOM_VARIANTS])}")
    if finder is not None:
        raise ValueError(f"{name} reads the full frame only: it takes no finder")
    return VideoViT(**{**VARIANTS[name], **overrides})
