"""SGS against hand-computed cases (thesis eqs. 6.1-6.6, with the last bin at half the slope right of its centre)."""

import pytest
import torch

from export.adaptive.sgs import MotionSimilarityNet, SimilarityGuidedSampling, bin_weights, similarity_guided_sampling


def _z_with_norms(*norms: float) -> torch.Tensor:
    """(1, T, 2) similarity vectors whose magnitudes Δ_t are `norms` (direction varies: only Δ counts)."""
    angles = torch.arange(len(norms), dtype=torch.float64)
    unit = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return (unit * torch.tensor(norms, dtype=torch.float64)[:, None]).unsqueeze(0)


def _frames(t: int, c: int = 3) -> torch.Tensor:
    """(1, C, T, 2, 2) features whose frame t is filled with t + 1 (frames are told apart by value)."""
    values = torch.arange(1, t + 1, dtype=torch.float64).view(1, 1, t, 1, 1)
    return values.expand(1, c, t, 2, 2).clone()


def _sgs(features, z, bins):
    return similarity_guided_sampling(features, z, torch.tensor(bins))


def test_all_equal_frames_fall_in_one_bin_and_are_summed():
    # Every Δ is Δ_max, the last bin's right edge, where its kernel weighs 1/2.
    features = torch.randn(1, 4, 6, 3, 3, dtype=torch.float64)
    z = torch.ones(1, 6, 8, dtype=torch.float64)
    for bins in (1, 2, 6, 12):
        sampled, mask = _sgs(features, z, bins)
        assert sampled.shape == (1, 4, 1, 3, 3) and mask.tolist() == [[True]]
        torch.testing.assert_close(sampled[:, :, 0], 0.5 * features.sum(dim=2))


def test_zero_similarity_vectors_count_as_equal():
    features = torch.randn(1, 2, 4, 1, 1, dtype=torch.float64)
    sampled, mask = _sgs(features, torch.zeros(1, 4, 8, dtype=torch.float64), 4)
    assert mask.tolist() == [[True]]
    torch.testing.assert_close(sampled[:, :, 0], 0.5 * features.sum(dim=2))


def test_distinct_frames_each_keep_a_bin_ordered_by_magnitude():
    # B = 4, Δ_max = 8: γ = 1, centres 1, 3, 5, 7; Δ = 5, 1, 3 hit bins 3, 1, 2 at weight 1, and
    # Δ = 8, the last bin's right edge, bin 4 at 1 − (8 − 7) / 2.
    sampled, mask = _sgs(_frames(4), _z_with_norms(5, 1, 8, 3), 4)
    assert mask.tolist() == [[True] * 4]
    assert sampled[0, 0, :, 0, 0].tolist() == pytest.approx([2.0, 4.0, 1.0, 0.5 * 3.0])


def test_linear_kernel_weights_by_hand():
    # B = 2, Δ_max = 8: γ = 2, centres 2 and 6. Δ = 1 -> bin 1 at 1 − 1/2; Δ = 5 -> bin 2 at
    # 1 − 1/2; Δ = 7 -> bin 2 at 1 − 1/4 and Δ = 8 at 1 − 2/4 (half the slope right of the last centre).
    weights = bin_weights(_z_with_norms(1, 5, 7, 8), 2)
    expected = torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.0, 0.75], [0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(weights[0], expected)
    sampled, _ = _sgs(_frames(4), _z_with_norms(1, 5, 7, 8), 2)
    assert sampled[0, 0, :, 0, 0].tolist() == pytest.approx([0.5 * 1, 0.5 * 2 + 0.75 * 3 + 0.5 * 4])


def test_empty_bins_are_dropped():
    # B = 4, γ = 1: Δ = 1 and 1.2 share bin 1 (weights 1 and 0.8), Δ = 8 is bin 4 (weight 1/2);
    # bins 2, 3 empty.
    sampled, mask = _sgs(_frames(3), _z_with_norms(1, 1.2, 8), 4)
    assert mask.tolist() == [[True, True]]
    assert sampled[0, 0, :, 0, 0].tolist() == pytest.approx([1 + 0.8 * 2, 0.5 * 3.0])


def test_the_largest_frame_always_keeps_half_weight_in_the_last_bin():
    torch.manual_seed(0)
    z = torch.randn(5, 8, 8, dtype=torch.float64)
    for bins in (1, 3, 8, 20):
        weights = bin_weights(z, bins)
        top = torch.linalg.vector_norm(z, dim=-1).argmax(dim=1)
        torch.testing.assert_close(weights[torch.arange(5), top, -1], torch.full((5,), 0.5, dtype=torch.float64))


def test_gradients_near_the_largest_delta_match_finite_differences():
    # B = 4, Δ_max = 8, β_4 = 7: every frame right of the last centre, where a flat kernel gave Δ
    # no gradient at all; here each has one, and it matches finite differences.
    features = _frames(4).requires_grad_()
    z = _z_with_norms(7.2, 7.5, 7.8, 8.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, zz: _sgs(f, zz, 4)[0], (features, z))
    sampled, mask = _sgs(features, z, 4)
    assert mask.tolist() == [[True]]
    sampled.sum().backward()
    # Raising a non-largest Δ towards Δ_max lowers its weight (slope −1/2γ), so the gradient on its
    # magnitude is negative; the largest frame's own Δ only sets the scale (x_max = 2B always).
    radial = (z.grad * z / torch.linalg.vector_norm(z, dim=-1, keepdim=True)).sum(dim=-1)[0]
    assert (radial[:3] < 0).all()


def test_a_batch_is_padded_to_its_largest_b_and_each_clip_matches_its_own_run():
    features = torch.cat([_frames(4), 10 * _frames(4)])
    z = torch.cat([_z_with_norms(2, 2, 2, 2), _z_with_norms(5, 1, 8, 3)])
    sampled, mask = _sgs(features, z, 4)
    assert sampled.shape == (2, 3, 4, 2, 2)
    assert mask.tolist() == [[True, False, False, False], [True] * 4]
    assert (sampled[0, :, 1:] == 0).all()
    for i in range(2):
        alone, alone_mask = _sgs(features[i : i + 1], z[i : i + 1], 4)
        kept = int(alone_mask.sum())
        torch.testing.assert_close(sampled[i : i + 1, :, :kept], alone)


def test_gradients_match_finite_differences():
    torch.manual_seed(1)
    features = torch.randn(2, 3, 6, 2, 2, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    for bins in (2, 6):
        assert torch.autograd.gradcheck(lambda f, zz: _sgs(f, zz, bins)[0], (features, z))


def test_the_similarity_net_learns_through_the_kernel():
    torch.manual_seed(2)
    module = SimilarityGuidedSampling(4, similarity_dim=8).double()
    features = torch.randn(2, 4, 8, 3, 3, dtype=torch.float64)
    sampled, _ = module(features, torch.tensor(8))
    sampled.square().sum().backward()
    for parameter in module.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_bins_is_a_run_time_input():
    torch.manual_seed(3)
    features = torch.randn(1, 2, 8, 1, 1)
    z = torch.randn(1, 8, 4)
    kept = [int(_sgs(features, z, bins)[1].sum()) for bins in (1, 2, 4, 8, 32)]
    assert kept[0] == 1 and kept[-1] > kept[1]  # one bin sums everything; more bins keep more
    assert all(k <= min(b, 8) for k, b in zip(kept, (1, 2, 4, 8, 32), strict=True))


@pytest.mark.parametrize("bins", [torch.tensor(0), torch.tensor(2.0), torch.tensor([2, 3])])
def test_bad_bins_are_refused(bins):
    with pytest.raises(ValueError, match="bins"):
        similarity_guided_sampling(torch.zeros(1, 1, 2, 1, 1), torch.ones(1, 2, 2), bins)


def _even_motion_net(channels: int, step: float) -> MotionSimilarityNet:
    """A motion net whose step m is `step` times each frame's mean absolute change (one hidden unit
    reads the channels' mean), with d = m / 2 for a clip that changes by 1 a frame."""
    net = MotionSimilarityNet(channels).double()
    with torch.no_grad():
        net.conv1.weight.zero_()
        net.conv1.bias.zero_()
        net.conv1.weight[0, :, 0] = 1.0 / channels
        net.conv2.weight.zero_()
        net.conv2.weight[0, 0, 0] = 50.0  # softplus(50 x) = 50 x to the bit for x >= 1
        net.conv2.bias.zero_()
        net.offset.copy_(torch.log(torch.expm1(torch.tensor(50.0 * step / 2))))
    return net


def test_motion_similarity_is_monotone_in_time_and_a_still_clip_one_bin_once_d_outweighs_its_steps():
    torch.manual_seed(4)
    net = MotionSimilarityNet(3).double()
    features = torch.randn(2, 3, 8, 4, 4, dtype=torch.float64)
    z = net(features)
    assert z.shape == (2, 8, 1) and (z[:, 1:] > z[:, :-1]).all() and (z > 0).all()
    still = features[:, :, :1].expand(-1, -1, 8, -1, -1).contiguous()
    steps = net.steps(still)
    torch.testing.assert_close(steps, steps[:, :1].expand_as(steps))  # no frame of a still clip stands out
    with torch.no_grad():  # what the prefit teaches idle clips: d far above their steps
        net.offset.fill_(float(steps.max()) * 100)
    for bins in (1, 4, 8):
        _, mask = similarity_guided_sampling(still, net(still), torch.tensor(bins))
        assert mask.tolist() == [[True], [True]]
    _, mask = similarity_guided_sampling(features, net(features * 1000), torch.tensor(8))
    assert mask.sum(dim=1).min() > 1  # a clip that changes far more than d spreads again


def test_an_evenly_changing_clip_keeps_every_frame_at_b_equal_t_and_pairs_of_neighbours_at_half():
    # Frame t is filled with t + 1: it changes by 1 a frame, so m = 50 and d = 25: Δ_t = 50 (t + 1/2).
    features = _frames(8)
    net = _even_motion_net(3, 1.0)
    weights = bin_weights(net(features), 8)[0]
    assert (weights > 0).sum(dim=1).tolist() == [1] * 8  # each frame in one bin ...
    assert weights.argmax(dim=1).tolist() == list(range(8))  # ... its own, in time order
    pairs = bin_weights(net(features), 4)[0]
    assert pairs.argmax(dim=1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_the_motion_net_learns_through_the_kernel():
    torch.manual_seed(5)
    module = SimilarityGuidedSampling(4, similarity="motion").double()
    features = torch.randn(2, 4, 8, 3, 3, dtype=torch.float64)
    sampled, _ = module(features, torch.tensor(4))
    sampled.square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_unknown_similarity_is_refused():
    with pytest.raises(ValueError, match="similarity"):
        SimilarityGuidedSampling(4, similarity="optical_flow")
