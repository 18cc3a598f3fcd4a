"""ATS against hand-computed cases (thesis eqs. 7.3-7.6, K >= N keeps every token)."""

import pytest
import torch

from export.adaptive.ats import adaptive_token_sampler, significance


def _inputs(cls_row: list[float], *, batch: int = 1, heads: int = 1, dim: int = 4, seed: int = 0):
    """Attention whose cls row is `cls_row` (every other row random), unit-norm values."""
    torch.manual_seed(seed)
    tokens = len(cls_row)
    attn = torch.softmax(torch.randn(batch, heads, tokens, tokens, dtype=torch.float64), dim=-1)
    attn[:, :, 0] = torch.tensor(cls_row, dtype=torch.float64)
    v = torch.nn.functional.normalize(torch.randn(batch, heads, tokens, dim, dtype=torch.float64), dim=-1)
    x = torch.randn(batch, tokens, heads * dim, dtype=torch.float64)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    return x, attn, v, mask


def _ats(x, attn, v, mask, k):
    return adaptive_token_sampler(x, attn, v, mask, torch.tensor(k))


def test_balanced_scores_sample_evenly_and_keep_k():
    # 8 equal scores: CDF j/8; points (2i − 1)/8 = 1/8, 3/8, 5/8, 7/8 hit tokens 1, 3, 5, 7 exactly.
    x, attn, v, mask = _inputs([1 / 9] * 9)
    _, _, kept, index = _ats(x, attn, v, mask, 4)
    assert index.tolist() == [[0, 1, 3, 5, 7]] and kept.all()


def test_inverse_transform_sampling_by_hand():
    # Non-cls scores 1/2, 1/4, 1/8, 1/8 -> CDF .5, .75, .875, 1.
    x, attn, v, mask = _inputs([0.5, 0.25, 0.125, 0.0625, 0.0625])
    expected = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    torch.testing.assert_close(significance(attn, v, mask)[0], expected)
    # K = 2: points .25, .75 -> tokens 1, 2.
    assert _ats(x, attn, v, mask, 2)[3].tolist() == [[0, 1, 2]]
    # K = 3: points 1/6, 1/2, 5/6 -> tokens 1, 1, 3: token 1 is kept once, so K' = 2 < K.
    assert _ats(x, attn, v, mask, 3)[3].tolist() == [[0, 1, 3]]


def test_a_dominant_token_is_all_that_is_kept():
    # Token 1 holds ~all the score: every CDF value is ~1, and the first of the nearest wins.
    x, attn, v, mask = _inputs([0.3, 0.6996, 0.0001, 0.0001, 0.0001, 0.0001])
    for k in (1, 2, 4):
        assert _ats(x, attn, v, mask, k)[3].tolist() == [[0, 1]]
    # Behind a token of ~0 score, points below the jump take that token: nearest CDF value, not
    # the first CDF value above the point.
    x, attn, v, mask = _inputs([0.3, 0.0001, 0.6996, 0.0001, 0.0001, 0.0001])
    assert _ats(x, attn, v, mask, 1)[3].tolist() == [[0, 2]]
    assert _ats(x, attn, v, mask, 2)[3].tolist() == [[0, 1, 2]]


def test_scores_sum_heads_and_weigh_by_value_norm():
    x, attn, v, mask = _inputs([0.2] * 5, heads=2)
    attn[0, 1, 0] = torch.tensor([0.2, 0.4, 0.1, 0.1, 0.2], dtype=torch.float64)
    v[0, :, 4] *= 3  # token 4's values are 3x longer in both heads
    raw = torch.tensor([0.2 + 0.4, 0.2 + 0.1, 0.2 + 0.1, 3 * (0.2 + 0.2)], dtype=torch.float64)
    torch.testing.assert_close(significance(attn, v, mask)[0], raw / raw.sum())
    v[0, :, 2] = 0  # a token whose values are 0 contributes nothing and is never sampled
    assert significance(attn, v, mask)[0, 1] == 0
    assert 2 not in _ats(x, attn, v, mask, 3)[3].tolist()[0]


def test_k_at_least_n_keeps_every_token_and_is_the_plain_block():
    x, attn, v, mask = _inputs([0.3, 0.6996, 0.0001, 0.0001, 0.0001, 0.0001], batch=2, heads=2)
    for k in (5, 6, 100):
        attended, residual, kept, index = _ats(x, attn, v, mask, k)
        assert index.tolist() == [list(range(6))] * 2 and kept.all()
        torch.testing.assert_close(attended, (attn @ v).transpose(1, 2).reshape(2, 6, -1))
        torch.testing.assert_close(residual, x)


def test_output_is_the_selected_rows_of_attention_times_v():
    x, attn, v, mask = _inputs([0.5, 0.25, 0.125, 0.0625, 0.0625], heads=2)
    attended, residual, _, index = _ats(x, attn, v, mask, 2)
    rows = index[0]
    torch.testing.assert_close(attended[0], (attn[0][:, rows] @ v[0]).transpose(0, 1).reshape(len(rows), -1))
    torch.testing.assert_close(residual[0], x[0, rows])


def test_a_batch_is_padded_with_a_mask_and_each_sample_matches_its_own_run():
    x, attn, v, mask = _inputs([0.3, 0.6996, 0.0001, 0.0001, 0.0001, 0.0001], batch=3, heads=2)
    attn[1, :, 0] = 1 / 6  # balanced: keeps more
    mask[2, 4:] = False  # tokens 4, 5 are padding from an earlier block
    attn[2, :, :, 4:] = 0
    attn[2, :, 0] = torch.tensor([0.2, 0.2, 0.2, 0.4, 0.0, 0.0], dtype=torch.float64)
    attended, residual, kept, index = _ats(x, attn, v, mask, 4)
    assert kept.shape == (3, 5)
    assert kept.sum(dim=1).tolist() == [2, 5, 4]
    assert (index[~kept] == 0).all() and (attended[~kept] == 0).all() and (residual[~kept] == 0).all()
    assert not {4, 5} & set(index[2].tolist())  # padding is never sampled
    for i in range(3):
        t = 4 if i == 2 else 6  # sample 2 alone is its 4 valid tokens
        a, r, m, idx = _ats(x[i : i + 1, :t], attn[i : i + 1, :, :t, :t], v[i : i + 1, :, :t], mask[i : i + 1, :t], 4)
        width = idx.shape[1]
        assert index[i, :width].tolist() == idx[0].tolist()
        torch.testing.assert_close(attended[i, :width], a[0])
        torch.testing.assert_close(residual[i, :width], r[0])


def test_gradients_flow_through_the_kept_rows():
    x, attn, v, mask = _inputs([0.5, 0.25, 0.125, 0.0625, 0.0625], batch=2, heads=2)
    for t in (x, attn, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: _ats(a, b, c, mask, 3)[:2], (x, attn, v))


@pytest.mark.parametrize("k", [torch.tensor(0), torch.tensor(2.0)])
def test_bad_k_is_refused(k):
    x, attn, v, mask = _inputs([0.5, 0.5])
    with pytest.raises(ValueError, match="k must"):
        adaptive_token_sampler(x, attn, v, mask, k)


def test_top_k_keeps_the_highest_scores():
    from export.adaptive.ats import select_top_k

    x, attn, v, mask = _inputs([0.2, 0.1, 0.4, 0.05, 0.25])
    index, kept = select_top_k(attn, v, mask, 2)
    assert index.tolist() == [[0, 2, 4]] and kept.all()
    mask[0, 2] = False  # an invalid token is never taken
    assert select_top_k(attn, v, mask, 2)[0].tolist() == [[0, 1, 4]]


def test_top_k_takes_one_k_per_sample():
    from export.adaptive.ats import select_top_k

    x, attn, v, mask = _inputs([0.2, 0.1, 0.4, 0.05, 0.25])
    attn, v, mask = attn.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), mask.expand(2, -1)
    index, kept = select_top_k(attn, v, mask, torch.tensor([3, 1]))
    assert index.tolist() == [[0, 1, 2, 4], [0, 2, 0, 0]]
    assert kept.tolist() == [[True] * 4, [True, True, False, False]]
