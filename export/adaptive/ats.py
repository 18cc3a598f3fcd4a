"""Adaptive Token Sampler (thesis chapter 7): keep the K' <= K tokens that matter to the class
token, K' chosen per sample by the data.

Score S_j = Σ_heads A_h[cls, j] · ‖V_h,j‖ (each head's attention and value vector) over the non-cls
tokens j, normalised to sum to 1; its CDF
is inverted deterministically at (2i − 1) / (2K), i = 1..K, each point taking the token whose CDF
value is nearest; repeated tokens are kept once; the cls token is always kept. The block's output
rows are the selected rows of the attention times V (A^s V); the residual and the FFN then run on
the same K' + 1 tokens.

Two rules beyond the thesis:
- K >= N (the sample's non-cls tokens) keeps every token: the full block, so one set of weights
  serves with and without ATS and a budget of 1 costs what the plain model costs. (The thesis
  samples even at K = N.)
- A batch is padded to its largest K' + 1 (zero rows, `mask` False), kept tokens first in token
  order, as the thesis does for mini-batches. The next attention must ignore padded keys (`mask`),
  which makes each sample's result independent of its batch. K is one value for the batch or one
per sample (a served batch mixes requests with different budgets).

The sampling is the custom op `vqs::adaptive_token_sampler` (one ONNX node of type
`AdaptiveTokenSampler`, domain `vqs`, see `export.adaptive.onnx_functions`).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

# Guards the normalisation when every score is 0 (no valid token attended).
_TINY = 1e-12


def significance(attn: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised scores S (N, n) of the non-cls tokens: attn (N, h, n+1, n+1), v (N, h, n+1, dh)."""
    scores = (attn[:, :, 0, 1:] * torch.linalg.vector_norm(v[:, :, 1:], dim=-1)).sum(dim=1)  # N, n
    scores = scores * mask[:, 1:]
    return scores / scores.sum(dim=1, keepdim=True).clamp(min=_TINY)


def select(
    attn: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, k: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices (N, K'max+1), cls first, kept tokens in token order, then padding; and their
    mask. K is one value for the batch or one per sample (N,)."""
    n_tokens = attn.shape[-1] - 1
    valid = mask[:, 1:]  # N, n
    # K >= n keeps every valid token of every sample anyway
    per_sample = torch.as_tensor(k, device=attn.device).reshape(-1, 1).clamp(max=n_tokens)  # N or 1, 1
    k_max = int(per_sample.max())
    cdf = significance(attn, v, mask).cumsum(dim=1)  # N, n
    i = torch.arange(1, k_max + 1, device=attn.device)  # K_max
    points = (i.to(cdf.dtype) * 2 - 1) / (2 * per_sample.to(cdf.dtype))  # N, K_max: (2i − 1) / 2K
    distance = (cdf.unsqueeze(1) - points.unsqueeze(2)).abs()  # N, K_max, n
    distance = distance.masked_fill(~valid.unsqueeze(1), float("inf"))
    picked = distance.argmin(dim=2)  # N, K_max (first of equals, as ONNX ArgMin)
    picked = torch.where(i <= per_sample, picked, n_tokens)  # a sample's points beyond its K: none
    chosen = torch.zeros(valid.shape[0], n_tokens + 1, dtype=torch.bool, device=attn.device)
    chosen = chosen.scatter(1, picked, True)[:, :n_tokens]
    keep_all = per_sample >= valid.sum(dim=1, keepdim=True)
    return _compact(torch.where(keep_all, valid, chosen & valid))


def select_top_k(
    attn: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, k: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The thesis's baseline (Table 7.1): the K highest-scoring tokens, K' = min(K, N) fixed; K is
    one value for the batch or one per sample (N,)."""
    scores = significance(attn, v, mask).masked_fill(~mask[:, 1:], -1.0)
    per_sample = torch.as_tensor(k, device=attn.device).reshape(-1, 1)  # N or 1, 1
    picked = scores.topk(min(int(per_sample.max()), scores.shape[1]), dim=1).indices  # best first
    within = (torch.arange(picked.shape[1], device=attn.device) < per_sample).expand_as(picked)
    return _compact(torch.zeros_like(mask[:, 1:]).scatter(1, picked, within) & mask[:, 1:])


def _compact(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen non-cls tokens (N, n) -> indices (N, K'max+1), cls first, then kept tokens in token
    order, then padding (index 0); and their mask."""
    kept = int(chosen.sum(dim=1).max())
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :kept]  # N, K'
    kept_mask = chosen.gather(1, order)
    index = torch.where(kept_mask, order + 1, 0)
    cls = torch.zeros_like(index[:, :1])
    return torch.cat([cls, index], dim=1), torch.cat([torch.ones_like(kept_mask[:, :1]), kept_mask], dim=1)


def gather_rows(
    x: torch.Tensor, attn: torch.Tensor, v: torch.Tensor, index: torch.Tensor, kept_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A^s V with heads merged (N, m, h·dh) and the residual rows x[index] (N, m, d), padding zeroed."""
    n, heads, tokens, _ = attn.shape
    m = index.shape[1]
    rows = attn.gather(2, index[:, None, :, None].expand(n, heads, m, tokens))  # N, h, m, n+1
    attended = (rows @ v).transpose(1, 2).reshape(n, m, -1)  # N, m, h·dh
    residual = x.gather(1, index.unsqueeze(-1).expand(n, m, x.shape[-1]))  # N, m, d
    keep = kept_mask.unsqueeze(-1).to(x.dtype)
    return attended * keep, residual * keep


def _check(x, attn, v, mask, k) -> None:
    if attn.dim() != 4 or attn.shape[2] != attn.shape[3]:
        raise ValueError(f"attn must be (N, heads, n+1, n+1), got {tuple(attn.shape)}")
    n, heads, tokens, _ = attn.shape
    if v.dim() != 4 or v.shape[:3] != (n, heads, tokens):
        raise ValueError(f"v must be (N, heads, n+1, dh) matching attn, got {tuple(v.shape)}")
    if x.dim() != 3 or x.shape[:2] != (n, tokens):
        raise ValueError(f"x must be (N, n+1, d) matching attn, got {tuple(x.shape)}")
    if mask.shape != (n, tokens) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (N, n+1), got {mask.dtype} {tuple(mask.shape)}")
    if k.dtype != torch.int64 or k.dim() > 1 or k.numel() not in (1, n):
        raise ValueError(f"k must be int64, one value or one per sample, got {k.dtype} of shape {tuple(k.shape)}")
    if tokens < 2:
        raise ValueError("ATS needs a cls token and at least one other token")


@torch.library.custom_op("vqs::adaptive_token_sampler", mutates_args=())
def adaptive_token_sampler(
    x: torch.Tensor, attn: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, n+1, d) the block's input tokens, attn (N, h, n+1, n+1) softmax attention, v
    (N, h, n+1, dh), mask (N, n+1) valid tokens, k the budget K (one, or one per sample) -> attended (N, m, h·dh),
    residual (N, m, d), kept mask (N, m), token index (N, m); m = K'max + 1."""
    _check(x, attn, v, mask, k)
    if int(k.min()) < 1:
        raise ValueError(f"k must be >= 1, got {k.tolist()}")
    with torch.no_grad():
        index, kept_mask = select(attn, v, mask, k)
        attended, residual = gather_rows(x, attn, v, index, kept_mask)
    return attended, residual, kept_mask, index


@adaptive_token_sampler.register_fake
def _(x, attn, v, mask, k):
    ctx = torch.library.get_ctx()
    tokens = attn.shape[2]
    m = ctx.new_dynamic_size(min=1, max=tokens if isinstance(tokens, int) else None)
    n, heads = attn.shape[:2]
    return (
        v.new_empty((n, m, heads * v.shape[3])),
        x.new_empty((n, m, x.shape[2])),
        torch.empty((n, m), dtype=torch.bool, device=x.device),
        torch.empty((n, m), dtype=torch.int64, device=x.device),
    )


def _setup_context(ctx, inputs, output):
    x, attn, v, _mask, _k = inputs
    _, _, kept_mask, index = output
    ctx.save_for_backward(x, attn, v, index, kept_mask)


def _backward(ctx, grad_attended, grad_residual, _grad_mask, _grad_index):
    # The choice of tokens is discrete; gradients flow through the gathered rows of A, V and x.
    x, attn, v, index, kept_mask = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (x, attn, v)]
        attended, residual = gather_rows(*inputs, index, kept_mask)
        outputs, grads_out = [], []
        for out, grad in ((attended, grad_attended), (residual, grad_residual)):
            if grad is not None:
                outputs.append(out)
                grads_out.append(grad)
        grads = torch.autograd.grad(outputs, inputs, grads_out, allow_unused=True)
    needs = ctx.needs_input_grad
    return tuple(g if needs[i] else None for i, g in enumerate(grads)) + (None, None)


adaptive_token_sampler.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.vqs.adaptive_token_sampler)
def _flops(x_shape, attn_shape, v_shape, mask_shape, k_shape, *, out_shape, **kwargs) -> int:
    # A^s V for the kept rows (the flop counter counts 2 per multiply-add).
    n, _, tokens, _ = attn_shape
    _, kept, width = out_shape[0]
    return 2 * n * kept * tokens * width
