"""The encoders with adaptive modules: ViT with ATS, s3d with SGS (untrained weights, small inputs)."""

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from export.models.s3d import S3D
from export.models.s3d_sgs import BIN_OUTPUTS, PLACEMENTS, S3DSGS, s3d_macs
from export.models.s3d_sgs import create as create_s3d_sgs
from export.models.vit import K_FLOOR, VideoViT, block_k
from export.models.vit import create as create_vit


def _counted_macs(model, *args, **kwargs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


def _clips(n: int, seed: int = 0, frames: int = 8, size: int = 112) -> torch.Tensor:
    """uint8 clips whose frames differ in brightness (so SGS has something to tell apart)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 255, (n, frames, size, size, 3), generator=g)
    gain = torch.rand(n, frames, 1, 1, 1, generator=g)
    return (noise * gain).to(torch.uint8)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = VideoViT(dim=32, depth=4, heads=2, frame_size=64, ats_blocks=(1, 2, 3)).eval()
    with torch.no_grad():  # sharper attention than at init, as after training: K' varies per clip
        for block in model.blocks:
            block.attn.qkv.weight[:32].mul_(8)
    return model


def test_vit_with_k_covering_every_token_is_the_plain_vit(vit):
    clips = _clips(2, frames=8, size=64)
    with torch.no_grad():
        plain = vit(clips)
        same, kept = vit(clips, k=torch.tensor([vit.tokens] * 3))
    torch.testing.assert_close(same, plain)
    assert (kept == vit.tokens + 1).all()


def test_vit_ats_keeps_at_most_k_and_varies_per_clip(vit):
    with torch.no_grad():
        _, kept = vit(_clips(6, seed=1, size=64), k=torch.tensor([20, 10, 5]))
    assert (kept[:, 0] <= 21).all() and (kept[:, 1] <= 11).all() and (kept[:, 2] <= 6).all()
    assert (kept[:, 1:] <= kept[:, :-1]).all()  # a block cannot keep more than it received
    assert len(set(kept[:, 0].tolist())) > 1


def test_vit_clip_features_do_not_depend_on_the_batch(vit):
    clips = _clips(4, seed=2, size=64)
    k = torch.tensor([20, 10, 5])
    with torch.no_grad():
        batched, kept = vit(clips, k=k)
        for i in range(4):
            alone, alone_kept = vit(clips[i : i + 1], k=k)
            torch.testing.assert_close(alone[0], batched[i], atol=1e-5, rtol=1e-5)
            assert alone_kept[0].tolist() == kept[i].tolist()


def test_vit_macs_are_the_counted_shapes(vit):
    clip = _clips(1, seed=3, size=64)
    assert vit.macs() == _counted_macs(vit, clip)
    with torch.no_grad():
        _, kept = vit(clip, k=torch.tensor([20, 10, 5]))
    assert vit.macs(kept[0].tolist()) == _counted_macs(vit, clip, k=torch.tensor([20, 10, 5])) < vit.macs()
    with torch.no_grad():
        _, kept = vit(clip, torch.tensor(0.5))
    assert vit.macs(kept[0].tolist()) == _counted_macs(vit, clip, torch.tensor(0.5)) < vit.macs()


@pytest.mark.parametrize(("variant", "dim"), [("vit_tiny_112", 128), ("vit_mini_112", 64)])
def test_vit_variants_are_the_issue_shape(variant, dim):
    model = create_vit(variant)
    assert model.tokens == 196 and model.ats_blocks == (2, 3, 4, 5) and model.feature_dim == 256
    assert model.cls.shape[-1] == dim and len(model.blocks) == 6
    with pytest.raises(ValueError, match="unknown"):
        create_vit("vit_huge")


def _finder():
    from export.models.s3d_zoom import S3DZoom

    torch.manual_seed(0)
    finder = S3DZoom(frame_size=64, window_crop=16, window_size=64, window_stem_patch=8).eval()
    with torch.no_grad():  # batch norms with statistics of their own, so a training step would move them
        for module in finder.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
    return finder


@pytest.fixture(scope="module")
def zoom_vit():
    from export.models.vit import VideoViTZoom

    return VideoViTZoom(_finder(), dim=32, depth=4, heads=2, frame_size=64, tubelet=(4, 16), ats_blocks=(1, 2, 3)).eval()


def test_zoom_vit_reads_the_frame_and_the_window_at_the_finders_centre(zoom_vit):
    from export.models.s3d_zoom import grid_sample_window

    finder = zoom_vit.finder
    clips = _clips(2, seed=4, size=64)
    x = finder.full.prepare(clips)
    _, centres = finder.locate(finder.full.stem(x))
    with torch.no_grad():
        torch.testing.assert_close(zoom_vit.find(x), grid_sample_window(finder, x, centres), atol=1e-5, rtol=1e-5)
        plain = zoom_vit(clips)
        same, kept = zoom_vit(clips, torch.tensor(1.0))
        zoom_vit.window_embed.weight.mul_(2)
        moved = zoom_vit(clips)
        zoom_vit.window_embed.weight.div_(2)
    assert zoom_vit.tokens == 2 * 2 * 4 * 4  # the frame's and the window's 2 x 4 x 4 tubelets
    torch.testing.assert_close(same, plain)  # budget 1: ATS keeps every token
    assert (kept == zoom_vit.tokens + 1).all()
    assert not torch.allclose(moved, plain)  # the window's tokens reach the features


def test_zoom_vit_macs_are_the_counted_shapes_finder_included(zoom_vit):
    clip = _clips(1, seed=5, size=64)
    assert zoom_vit.macs() == _counted_macs(zoom_vit, clip) > zoom_vit.finder_macs > 0
    with torch.no_grad():
        _, kept = zoom_vit(clip, torch.tensor(0.5))
    assert zoom_vit.macs(kept[0].tolist()) == _counted_macs(zoom_vit, clip, torch.tensor(0.5)) < zoom_vit.macs()


def test_zoom_vit_trains_around_a_fixed_finder(zoom_vit):
    import copy

    model = copy.deepcopy(zoom_vit).train()
    finder_before = {k: v.clone() for k, v in model.finder.state_dict().items()}
    embed_before = model.window_embed.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(_clips(4, seed=6, size=64)).pow(2).mean().backward()
    opt.step()
    assert not model.finder.training
    assert all(torch.equal(v, finder_before[k]) for k, v in model.finder.state_dict().items())
    assert not torch.equal(model.window_embed.weight, embed_before)


def test_zoom_vit_with_a_smaller_window_cuts_the_same_crop_into_as_many_tokens(zoom_vit):
    from export.models.s3d_zoom import grid_sample_window
    from export.models.vit import VideoViTZoom

    small = VideoViTZoom(_finder(), window_size=32, dim=32, depth=4, heads=2, frame_size=64, tubelet=(4, 16),
                         ats_blocks=(1, 2, 3)).eval()
    clips = _clips(2, seed=8, size=64)
    x = small.finder.full.prepare(clips)
    _, centres = small.finder.locate(small.finder.full.stem(x))
    with torch.no_grad():
        window = small.find(x)
        torch.testing.assert_close(window, grid_sample_window(small.finder, x, centres), atol=1e-5, rtol=1e-5)
    assert window.shape == (2, 3, 8, 32, 32) and small.window_embed.kernel_size == (4, 8, 8)
    # the same 16-px crop: each of the 32 px samples midway between two of the 64-px window's
    fine, coarse = zoom_vit.finder.sampling_grid(centres), small.finder.sampling_grid(centres)
    torch.testing.assert_close(coarse, fine.unflatten(2, (32, 2)).mean(3).unflatten(1, (32, 2)).mean(2))
    assert small.tokens == zoom_vit.tokens
    assert small.macs() == _counted_macs(small, clips[:1]) < zoom_vit.macs()
    with pytest.raises(ValueError, match="does not tile"):
        VideoViTZoom(_finder(), window_size=30, dim=32, depth=2, heads=2, frame_size=64, tubelet=(4, 16),
                     ats_blocks=(1,))


def test_zoom_vit_variant_needs_an_s3d_zoom_and_frames_of_its_size(zoom_vit):
    from export.models.s3d_zoom import S3DZoom
    from export.models.vit import VideoViTZoom

    small = S3DZoom(frame_size=64, window_crop=16, window_size=64, window_stem_patch=8)
    with pytest.raises(ValueError, match="s3d_zoom"):
        create_vit("vit_zoom_mini_112")
    with pytest.raises(ValueError, match="no finder"):
        create_vit("vit_mini_112", finder=small)
    with pytest.raises(ValueError, match="112 px"):
        VideoViTZoom(small, dim=32, depth=2, heads=2, ats_blocks=(1,))  # a 64-px finder for 112-px frames


def _sharpen(model: S3DSGS) -> S3DSGS:
    with torch.no_grad():  # a similarity net that tells frames apart (at init its biases dominate Δ)
        model.sgs.similarity.conv1.bias.zero_()
        model.sgs.similarity.conv2.bias.zero_()
    return model.eval()


def _s3d_sgs(where: str, bins: str) -> S3DSGS:
    return _sharpen(create_s3d_sgs(f"s3d_sgs_{where}_112", frame_size=64, bins=bins,
                                   similarity_centred=bins == "time_means"))


@pytest.mark.parametrize("bins", BIN_OUTPUTS)
@pytest.mark.parametrize("where", PLACEMENTS)
def test_s3d_sgs_clip_features_do_not_depend_on_the_batch(where, bins):
    torch.manual_seed(0)
    model = _s3d_sgs(where, bins)
    clips = _clips(4, seed=4, size=64)
    with torch.no_grad():
        batched, kept = model(clips, torch.tensor(8))
        assert len(set(kept.tolist())) > 1 and kept.max() < 8
        assert (batched[0] - batched[1:]).abs().amax(dim=1).min() > 1e-5  # clips are told apart
        for i in range(4):
            alone, alone_kept = model(clips[i : i + 1], torch.tensor(8))
            assert int(alone_kept) == int(kept[i])
            torch.testing.assert_close(alone[0], batched[i], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("bins", BIN_OUTPUTS)
@pytest.mark.parametrize("where", PLACEMENTS)
def test_s3d_sgs_on_the_kept_bins_only_is_the_padded_computation(where, bins):
    """after_sgs_compact (the batch's kept bins as one stack of frames) against after_sgs (padded to
    the batch's largest B'), in a batch whose clips keep different B' at different budgets."""
    torch.manual_seed(0)
    model = _s3d_sgs(where, bins)
    clips = _clips(5, seed=7, size=64)
    budgets = torch.tensor([8, 3, 1, 8, 5])
    with torch.no_grad():
        model.compact = True
        compact, kept = model(clips, budgets)
        model.compact = False
        padded, padded_kept = model(clips, budgets)
    assert torch.equal(kept, padded_kept) and len(set(kept.tolist())) > 1
    torch.testing.assert_close(compact, padded, atol=1e-6, rtol=1e-5)


def test_s3d_sgs_one_bin_still_pools():
    torch.manual_seed(0)
    model = create_s3d_sgs("s3d_sgs_stem_112", frame_size=64).eval()
    with torch.no_grad():
        features, kept = model(_clips(2, size=64), torch.tensor(1))
    assert kept.tolist() == [1, 1] and features.shape == (2, 256) and torch.isfinite(features).all()


@pytest.mark.parametrize("bins", BIN_OUTPUTS)
@pytest.mark.parametrize("where", PLACEMENTS)
def test_s3d_sgs_macs_are_the_counted_shapes(where, bins):
    torch.manual_seed(0)
    model = _s3d_sgs(where, bins)
    clip = _clips(1, seed=5, size=64)
    with torch.no_grad():
        _, kept = model(clip, torch.tensor(8))
    assert model.macs(int(kept)) == _counted_macs(model, clip, torch.tensor(8))
    table = [model.macs(b) for b in (1, 4, 8)]
    assert table == sorted(table)
    # With every bin kept, SGS only adds its similarity net and sum to the s3d.
    plain = s3d_macs(S3D(frame_size=64))
    assert plain < table[-1] < 1.02 * plain


class _FixedSimilarity(torch.nn.Module):
    """Δ_t = `norms[t]` for every clip (the similarity net replaced by a constant)."""

    def __init__(self, norms: list[float]):
        super().__init__()
        self.norms = torch.tensor(norms)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norms.view(1, -1, 1).expand(features.shape[0], -1, 1)


@pytest.mark.parametrize("where", PLACEMENTS)
def test_time_ordered_means_with_a_bin_per_frame_are_the_s3d(where):
    # B = 8, Δ_max = 16: γ = 1, frames at the centres 1, 3, ..., 13 and at Δ_max (the last bin, weight
    # 1/2), in scrambled time order: one frame per bin, so each bin's mean is its frame and the
    # time order puts them back: the s3d exactly. In Δ order (sums) the frames come out scrambled.
    torch.manual_seed(0)
    plain = S3D(frame_size=64).eval()
    clips = _clips(3, seed=6, size=64)
    scrambled = [5.0, 16.0, 1.0, 9.0, 13.0, 3.0, 11.0, 7.0]
    got = {}
    for bins in BIN_OUTPUTS:
        model = create_s3d_sgs(f"s3d_sgs_{where}_112", frame_size=64, bins=bins).eval()
        model.load_state_dict(plain.state_dict(), strict=False)
        model.sgs.similarity = _FixedSimilarity(scrambled)
        with torch.no_grad():
            got[bins], kept = model(clips, torch.tensor(8))
        assert kept.tolist() == [8, 8, 8]
    with torch.no_grad():
        expected = plain(clips)
    torch.testing.assert_close(got["time_means"], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got["sums"], expected, atol=1e-5, rtol=1e-4)


def test_s3d_sgs_refuses_unknown_options():
    with pytest.raises(ValueError, match="sgs_after"):
        S3DSGS(sgs_after="head")
    with pytest.raises(ValueError, match="bins"):
        S3DSGS(bins="medians")


def test_vit_top_k_baseline_keeps_exactly_k(vit):
    top_k = VideoViT(dim=32, depth=4, heads=2, frame_size=64, ats_blocks=(1, 2, 3), top_k=True).eval()
    top_k.load_state_dict(vit.state_dict())
    with torch.no_grad():
        _, kept = top_k(_clips(3, seed=6, size=64), k=torch.tensor([20, 10, 5]))
    assert kept.tolist() == [[21, 11, 6]] * 3


def test_budget_maps_to_k_and_bins():
    # K = max(ceil(budget * tokens received), 8), per sample
    assert block_k(torch.tensor([1.0, 0.5, 0.3, 0.01]), 196).tolist() == [196, 98, 59, 8]
    assert block_k(torch.tensor(0.5), torch.tensor([90, 15, 3])).tolist() == [45, 8, 8]
    assert block_k(torch.tensor([0.5, 0.25]), torch.tensor([90, 90])).tolist() == [45, 23]
    sgs = create_s3d_sgs("s3d_sgs_stem_112")
    assert [sgs.bins_for_budget(b) for b in (1.0, 0.5, 0.3, 0.01)] == [8, 4, 3, 1]


def test_served_budget_mapping_is_the_models_own():
    """The knob the gateway reports, max(ceil(budget * budget_units), budget_floor), is the first
    ATS block's K (it receives every token) and the SGS bins."""
    from export.adaptive_export import budget_to_units

    vit, sgs = create_vit("vit_tiny_112"), create_s3d_sgs("s3d_sgs_stem_112")
    budgets = [1.0, 0.75, 0.5, 0.3, 0.2, 0.1, 0.04, 0.01]
    column = torch.tensor(budgets).unsqueeze(1)
    assert block_k(column[:, 0], vit.tokens).tolist() == [max(math.ceil(b * vit.tokens), K_FLOOR) for b in budgets]
    assert budget_to_units(column, sgs.clip_frames, 1)[:, 0].tolist() == [sgs.bins_for_budget(b) for b in budgets]


def test_every_ats_block_samples_a_share_of_what_it_receives(vit):
    with torch.no_grad():
        _, kept = vit(_clips(6, seed=7, size=64), torch.tensor(0.5))
    received = torch.cat([torch.full_like(kept[:, :1], vit.tokens), kept[:, :-1] - 1], dim=1)  # non-cls
    k = block_k(torch.tensor(0.5), received)
    assert (kept - 1 <= k).all()
    sampled = received > K_FLOOR  # K < received: the block drops tokens
    assert sampled[:, 1:].any() and (kept[sampled] - 1 < received[sampled]).all()
    assert (kept[~sampled] - 1 == received[~sampled]).all()  # K >= received keeps them all


def test_vit_budgets_per_clip_match_each_clip_alone_and_budget_one_is_the_plain_vit(vit):
    clips = _clips(4, seed=8, size=64)
    budgets = torch.tensor([1.0, 0.5, 0.3, 0.8])
    with torch.no_grad():
        plain = vit(clips)
        batched, kept = vit(clips, budgets.unsqueeze(1))
        for i in range(4):
            alone, alone_kept = vit(clips[i : i + 1], budgets[i])
            torch.testing.assert_close(alone[0], batched[i], atol=1e-5, rtol=1e-5)
            assert alone_kept[0].tolist() == kept[i].tolist()
    torch.testing.assert_close(batched[0], plain[0], atol=1e-5, rtol=1e-5)
    assert kept[0].tolist() == [vit.tokens + 1] * 3 and (kept[1:] < vit.tokens + 1).all()


def test_served_vit_graphs_read_the_uint8_clips_as_the_trained_vit_does(vit):
    """The served wrappers embed the tubelets from the raw clips (normalisation folded into one
    matrix product); their features and kept counts are the torch ViT's."""
    from export.adaptive_export import ServedViT, ServedViTATS

    clips, budgets = _clips(4, seed=9, size=64), torch.tensor([[1.0], [0.5], [0.3], [0.8]])
    with torch.no_grad():
        torch.testing.assert_close(ServedViT(vit)(clips), vit(clips), atol=1e-4, rtol=1e-4)
        features, kept, gmacs = ServedViTATS(vit)(clips, budgets)
        want, want_kept = vit(clips, budgets)
    torch.testing.assert_close(features, want, atol=1e-4, rtol=1e-4)
    assert kept.tolist() == (want_kept - 1).tolist()
    assert gmacs[:, 0].tolist() == pytest.approx((vit.macs(want_kept) / 1e9).tolist())


@pytest.mark.parametrize("where", PLACEMENTS)
def test_served_s3d_graphs_read_the_uint8_clips_as_the_trained_encoders_do(where):
    """The served s3d and s3d_sgs graphs take the stem's patchify from the raw clips (normalisation
    folded into one matrix product); training keeps the convolution of the normalised video."""
    torch.manual_seed(0)
    s3d, sgs = S3D().eval(), S3DSGS(sgs_after=where, bins="time_means").eval()
    clips, bins = _clips(3, seed=10), torch.tensor([8, 3, 1])
    with torch.no_grad():
        assert torch.equal(s3d(clips), s3d.forward_head(s3d.forward_features(s3d.prepare(clips))))
        torch.testing.assert_close(s3d.forward_served(clips), s3d(clips), atol=1e-4, rtol=1e-4)
        served, served_kept = sgs.forward_served(clips, bins)
        trained, kept = sgs(clips, bins)
    torch.testing.assert_close(served, trained, atol=1e-4, rtol=1e-4)
    assert served_kept.tolist() == kept.tolist()


def test_vit_macs_per_clip_from_a_tensor_of_kept_counts(vit):
    kept = torch.tensor([[33, 20, 9], [5, 5, 5]])
    assert vit.macs(kept).tolist() == [vit.macs([33, 20, 9]), vit.macs([5, 5, 5])]


def _curve(points):
    from export.train_adaptive import HEADS

    return {str(b): {"accuracy": {q: a for q in HEADS}, "gmacs_per_clip": g} for b, a, g in points}


def test_budget_choice_takes_the_cheapest_budget_within_a_point_of_the_plain_encoder():
    from export.train_adaptive import HEADS, _choose_budget

    plain = {q: 0.80 for q in HEADS}
    assert _choose_budget(_curve([(1.0, 0.80, 0.10), (0.5, 0.795, 0.08), (0.25, 0.70, 0.05)]), plain) == 0.5
    assert _choose_budget(_curve([(0.5, 0.5, 0.05)]), plain) == 1.0  # none close: full budget


def test_budget_choice_prefers_the_more_accurate_of_equally_cheap_budgets():
    from export.train_adaptive import HEADS, _choose_budget

    plain = {q: 0.80 for q in HEADS}
    # 0.5 and 0.25 do the same work (within SAME_COST): the better answer wins, not the smaller budget
    assert _choose_budget(_curve([(1.0, 0.80, 0.0186), (0.5, 0.80, 0.01811), (0.25, 0.795, 0.0181)]), plain) == 0.5
    # a real saving still wins over a better answer
    assert _choose_budget(_curve([(1.0, 0.80, 0.0186), (0.5, 0.80, 0.0181), (0.25, 0.795, 0.0150)]), plain) == 0.25
    # equal cost and equal answers: the smaller budget
    assert _choose_budget(_curve([(0.5, 0.80, 0.0181), (0.25, 0.80, 0.0181)]), plain) == 0.25


def test_install_replaces_model_directories_whole(tmp_path):
    from export.adaptive_export import install

    repository, staged = tmp_path / "repo", tmp_path / "staged"
    (repository / "clip_encoder_vit" / "1").mkdir(parents=True)
    (repository / "clip_encoder_vit" / "1" / "stale.onnx").write_text("old")
    (repository / "clip_encoder_vit" / "config.pbtxt").write_text("old")
    (staged / "clip_encoder_vit" / "1").mkdir(parents=True)
    (staged / "clip_encoder_vit" / "config.pbtxt").write_text("new")
    assert install(staged, repository) == ["clip_encoder_vit"]
    assert (repository / "clip_encoder_vit" / "config.pbtxt").read_text() == "new"
    assert not (repository / "clip_encoder_vit" / "1" / "stale.onnx").exists()
    assert not any(staged.iterdir())


def test_ats_token_cost_is_the_share_of_points_on_distinct_tokens():
    from export.train_adaptive import ats_token_cost

    n = 40
    mask = torch.ones(3, n + 1, dtype=torch.bool)
    uniform = torch.full((n,), 1.0 / n)
    one_hot = torch.zeros(n).index_fill(0, torch.tensor([7]), 1.0)
    halves = torch.zeros(n).index_fill(0, torch.tensor([3, 30]), 0.5)
    scores = torch.stack([uniform, one_hot, halves])
    budgets = torch.tensor([0.5, 0.5, 0.5])  # K = max(ceil(0.5 * 40), 8) = 20
    cost = ats_token_cost([(scores, mask), (scores, mask)], budgets)
    # uniform: 40 tokens of 1/40 hold 20 points between them; one token: 1 of 20; two halves: 2 of 20
    torch.testing.assert_close(cost, torch.tensor([1.0, 1 / 20, 2 / 20]))


def test_ats_token_cost_falls_as_the_significance_gathers():
    from export.train_adaptive import ats_token_cost

    mask = torch.ones(1, 41, dtype=torch.bool)
    logits = (torch.randn(1, 40, generator=torch.Generator().manual_seed(0)) * 1.5).requires_grad_()
    cost = ats_token_cost([(logits.softmax(dim=1), mask)], torch.tensor([0.25]))  # K = 10
    cost.sum().backward()
    assert float(logits.grad.abs().max()) > 0
    with torch.no_grad():
        lower = ats_token_cost([((logits - 0.5 * logits.grad).softmax(dim=1), mask)], torch.tensor([0.25]))
    assert lower.item() < cost.item() <= 1.0


def test_distinct_shares_are_per_ats_block_and_their_mean_is_the_token_cost():
    from export.train_adaptive import ats_token_cost, distinct_shares

    n = 40
    mask = torch.ones(2, n + 1, dtype=torch.bool)
    uniform = torch.full((2, n), 1.0 / n)
    one_hot = torch.zeros(2, n).index_fill(1, torch.tensor([7]), 1.0)
    budgets = torch.tensor([0.5, 1.0])  # K = 20, 40
    shares = distinct_shares([(uniform, mask), (one_hot, mask)], budgets)
    torch.testing.assert_close(shares, torch.tensor([[1.0, 1 / 20], [1.0, 1 / 40]]))
    torch.testing.assert_close(ats_token_cost([(uniform, mask), (one_hot, mask)], budgets), shares.mean(dim=1))


def test_share_target_maps_still_clips_to_the_still_share_and_moving_ones_up_to_the_moving_share():
    from export.train_adaptive import share_target

    target = share_target(torch.tensor([1.0, 4.0, 5.0, 6.0, 9.0]), 4.0, 6.0, 0.3, 0.9)
    torch.testing.assert_close(target, torch.tensor([0.3, 0.3, 0.6, 0.9, 0.9]))


def test_significance_recorder_records_each_ats_block_and_restores_the_model(vit):
    from export.train_adaptive import _SignificanceRecorder

    clips = _clips(2, seed=3, size=64)
    with torch.no_grad():
        before = vit(clips, torch.tensor([0.5, 1.0]))
        with _SignificanceRecorder(vit) as recorder:
            recorder.recording = True
            inside = vit(clips, torch.tensor([0.5, 1.0]))
        after = vit(clips, torch.tensor([0.5, 1.0]))
    assert len(recorder.scores) == len(vit.ats_blocks)
    # each block scores the tokens it receives: all, then what the block before kept (cls included)
    for (s, mask), received in zip(recorder.scores, [torch.full((2,), vit.tokens + 1), *before[1][:, :-1].unbind(1)]):
        assert mask.sum(dim=1).tolist() == received.tolist() and mask.shape == (2, s.shape[1] + 1)
        torch.testing.assert_close(s.sum(dim=1), torch.ones(2))
    for a, b, c in zip(before, inside, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert all("probabilities" not in vars(vit.blocks[i].attn) for i in vit.ats_blocks)


def test_vit_student_distils_on_once_and_caches_the_history(tmp_path, monkeypatch):
    from dataclasses import replace

    from export import train_adaptive
    from export.train_adaptive import MORE_SEED, SEED, STUDENT, TEACHER_KEY, AdaptiveBudget, vit_student

    calls = []

    def fake_distill(teacher, datasets, budget, rng, student=None, checkpoint=None, steps=None, motion=None):
        calls.append((steps, rng.integers(1 << 30)))
        with torch.no_grad():
            student.proj.bias.add_(1.0)  # a distillation run that leaves a mark on the weights
        return student

    monkeypatch.setattr(train_adaptive, "distill_vit", fake_distill)
    def small(variant):
        return VideoViT(dim=16, depth=2, heads=2, frame_size=32, ats_blocks=(1,))

    monkeypatch.setattr(train_adaptive, "create_vit", small)
    budget = replace(AdaptiveBudget(), vit_variant="vit_mini_112", vit_steps=7, vit_more_steps=3, ats_distill_share=0,
                     vit_ats_steps=0)
    cached = small(None).state_dict()
    torch.save({"state": cached, "history": [{"steps": 7, "from": "scratch", TEACHER_KEY: "s3d"}]},
               tmp_path / STUDENT.format(variant="vit_mini_112", seed=SEED))

    vit, history = vit_student(None, "s3d", [], tmp_path, budget, np.random.default_rng(0))
    more = {"steps": 3, "from": "the student above, distilled on", TEACHER_KEY: "s3d"}
    # the second run draws from its own seed, not the build's generator
    assert calls == [(3, np.random.default_rng(MORE_SEED).integers(1 << 30))]
    assert history == [{"steps": 7, "from": "scratch", TEACHER_KEY: "s3d"}, more]
    torch.testing.assert_close(vit.proj.bias, cached["proj.bias"] + 1.0)
    # the cache now holds the longer student: a second build starts from it and distils no more
    again, history_again = vit_student(None, "s3d", [], tmp_path, budget, np.random.default_rng(0))
    assert len(calls) == 1 and history_again == history
    torch.testing.assert_close(again.state_dict(), vit.state_dict())
    # a build of another seed neither reads that student nor shares its draws: it distils its own
    calls.clear()
    _, other = vit_student(None, "s3d", [], tmp_path, budget, np.random.default_rng(0), seed=SEED + 2)
    assert calls == [(None, np.random.default_rng(0).integers(1 << 30)),
                     (3, np.random.default_rng(MORE_SEED + 2).integers(1 << 30))]
    assert (tmp_path / STUDENT.format(variant="vit_mini_112", seed=SEED + 2)).exists()


def test_vit_student_runs_the_ats_stage_after_the_cached_runs_and_redoes_a_student_of_other_runs(tmp_path, monkeypatch):
    from dataclasses import replace

    from export import train_adaptive
    from export.models.vit import MotionBudget
    from export.train_adaptive import (ATS_STAGE_SEED, SEED, SPREAD_STAGE_SEED, STUDENT, TEACHER_KEY, AdaptiveBudget,
                                       vit_student)

    calls = []

    def fake_distill(teacher, datasets, budget, rng, student=None, checkpoint=None, steps=None, motion=None):
        calls.append((steps, budget.ats_distill_share, rng.integers(1 << 30), motion))
        return student

    monkeypatch.setattr(train_adaptive, "distill_vit", fake_distill)
    monkeypatch.setattr(train_adaptive, "create_vit",
                        lambda variant: VideoViT(dim=16, depth=2, heads=2, frame_size=32, ats_blocks=(1,)))
    budget = replace(AdaptiveBudget(), vit_variant="vit_mini_112", vit_steps=7, vit_more_steps=3,
                     ats_distill_share=0.5, vit_ats_steps=2, vit_ats_share=1.0)
    first = {"steps": 7, "from": "scratch", TEACHER_KEY: "s3d", "ats_distill_share": 0.5}
    more = {"steps": 3, "from": "the student above, distilled on", TEACHER_KEY: "s3d", "ats_distill_share": 0.5}
    cache = tmp_path / STUDENT.format(variant="vit_mini_112", seed=SEED)
    state = VideoViT(dim=16, depth=2, heads=2, frame_size=32, ats_blocks=(1,)).state_dict()
    torch.save({"state": state, "history": [first, more]}, cache)

    _, history = vit_student(None, "s3d", [], tmp_path, budget, np.random.default_rng(0))
    # only the third run, every clip through ATS, with its own draws
    assert calls == [(2, 1.0, np.random.default_rng(ATS_STAGE_SEED).integers(1 << 30), None)]
    ats = {"steps": 2, "from": "the student above, distilled on with ATS", TEACHER_KEY: "s3d", "ats_distill_share": 1.0}
    assert history == [first, more, ats]
    # with vit_ats's motion budgets, a fourth run after the cached three, through them
    calls.clear()
    motion = MotionBudget(low=2.0, high=10.0, still_power=1.25, moving_power=0.5)
    _, spread = vit_student(None, "s3d", [], tmp_path, replace(budget, vit_spread_steps=4), np.random.default_rng(0),
                            motion=motion)
    assert calls == [(4, 1.0, np.random.default_rng(SPREAD_STAGE_SEED).integers(1 << 30), motion)]
    assert spread == [first, more, ats, {"steps": 4, "from": "the student above, distilled on with ATS at vit_ats's "
                                         "motion budgets", TEACHER_KEY: "s3d", "ats_distill_share": 1.0,
                                         "budget_by_motion": motion.config()}]
    torch.save({"state": state, "history": [first, more, ats]}, cache)
    # a student whose second run was not this budget's is distilled anew, every run in order
    calls.clear()
    torch.save({"state": state, "history": [first, {**more, "steps": 5}]}, cache)
    _, again = vit_student(None, "s3d", [], tmp_path, budget, np.random.default_rng(0))
    assert [c[:2] for c in calls] == [(None, 0.5), (3, 0.5), (2, 1.0)] and again == history


def test_vit_student_distils_anew_over_a_cached_student_of_another_step_count(tmp_path, monkeypatch):
    """A --quick build's student (20 steps) left beside the data is not a full build's: the build
    distils from scratch and the cache then holds its own student."""
    from dataclasses import replace

    from export import train_adaptive
    from export.train_adaptive import SEED, STUDENT, TEACHER_KEY, AdaptiveBudget, vit_student

    calls = []

    def fake_distill(teacher, datasets, budget, rng, student=None, checkpoint=None, steps=None, motion=None):
        calls.append(steps)
        return student

    monkeypatch.setattr(train_adaptive, "distill_vit", fake_distill)
    monkeypatch.setattr(train_adaptive, "create_vit",
                        lambda variant: VideoViT(dim=16, depth=2, heads=2, frame_size=32, ats_blocks=(1,)))
    budget = replace(AdaptiveBudget(), vit_variant="vit_mini_112", vit_steps=7, vit_more_steps=0, ats_distill_share=0,
                     vit_ats_steps=0)
    cache = tmp_path / STUDENT.format(variant="vit_mini_112", seed=SEED)
    quick = {"steps": 20, "from": "scratch", TEACHER_KEY: "s3d"}
    torch.save({"state": {}, "history": [quick]}, cache)

    _, history = vit_student(None, "s3d", [], tmp_path, budget, np.random.default_rng(0))
    assert calls == [None] and history == [{"steps": 7, "from": "scratch", TEACHER_KEY: "s3d"}]
    assert torch.load(cache, weights_only=True)["history"] == history


def test_vit_student_distils_anew_over_a_cached_student_without_ats_in_its_distillation(tmp_path, monkeypatch):
    from dataclasses import replace

    from export import train_adaptive
    from export.train_adaptive import SEED, STUDENT, TEACHER_KEY, AdaptiveBudget, vit_student

    calls = []
    monkeypatch.setattr(train_adaptive, "distill_vit", lambda *a, **k: calls.append(k.get("steps")) or k["student"])
    monkeypatch.setattr(train_adaptive, "create_vit",
                        lambda variant: VideoViT(dim=16, depth=2, heads=2, frame_size=32, ats_blocks=(1,)))
    budget = replace(AdaptiveBudget(), vit_variant="vit_mini_112", vit_steps=7, vit_more_steps=0, ats_distill_share=0.5,
                     vit_ats_steps=0)
    torch.save({"state": {}, "history": [{"steps": 7, "from": "scratch", TEACHER_KEY: "s3d"}]},
               tmp_path / STUDENT.format(variant="vit_mini_112", seed=SEED))
    _, history = vit_student(None, "s3d", [], tmp_path, budget, np.random.default_rng(0))
    assert calls == [None]
    assert history == [{"steps": 7, "from": "scratch", TEACHER_KEY: "s3d", "ats_distill_share": 0.5}]


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_distillation_encodes_its_share_of_clips_with_ats(monkeypatch, share):
    from dataclasses import replace
    from types import SimpleNamespace

    from export import train_adaptive
    from export.train_adaptive import AdaptiveBudget, distill_vit

    monkeypatch.setattr(train_adaptive, "_event_clips", lambda ds: np.arange(4))
    monkeypatch.setattr(train_adaptive, "_clip_batch", lambda ds, flat: _clips(len(flat), seed=9, size=32))
    student = VideoViT(dim=16, depth=2, heads=2, frame_size=32, feature_dim=8, ats_blocks=(1,))
    budgets = []
    forward = student.forward

    def recording(clips, budget=None, **kw):
        budgets.append(None if budget is None else budget.tolist())
        return forward(clips, budget, **kw)

    monkeypatch.setattr(student, "forward", recording)
    budget = replace(AdaptiveBudget(), vit_steps=2, vit_clips_per_step=4, ats_distill_share=share,
                     ats_tune_low=0.3, ats_tune_high=0.3)
    distill_vit(lambda clips: torch.randn(len(clips), 8), [SimpleNamespace(total_clips=10)], budget,
                np.random.default_rng(0), student=student)
    assert budgets == ([None, None] if share == 0 else [[pytest.approx(0.3)] * 4] * 2)


def _still_and_blinking(change: int) -> torch.Tensor:
    still = torch.full((1, 8, 16, 16, 3), 90, dtype=torch.uint8)
    blinking = still.clone()
    blinking[:, 1::2] += change  # every other frame `change` grey levels brighter
    return torch.cat([still, blinking])


def test_clip_motion_is_the_mean_grey_change_between_frames():
    from export.models.pixels import clip_motion

    torch.testing.assert_close(clip_motion(_still_and_blinking(12)), torch.tensor([0.0, 12.0]))


def test_motion_budget_moves_budget_from_still_clips_to_moving_ones():
    from export.models.vit import MotionBudget

    motion = MotionBudget(low=2.0, high=10.0, still_power=2.0, moving_power=0.5)
    budget = torch.tensor([0.25, 0.25])
    torch.testing.assert_close(motion(_still_and_blinking(12), budget), torch.tensor([0.0625, 0.5]))
    # halfway between the levels: halfway between the powers
    torch.testing.assert_close(motion(_still_and_blinking(6), budget), torch.tensor([0.0625, 0.25 ** 1.25]))
    # a budget of 1 stays the plain ViT's for every clip
    torch.testing.assert_close(motion(_still_and_blinking(12), torch.ones(2)), torch.ones(2))
    with pytest.raises(ValueError, match="above"):
        MotionBudget(low=3.0, high=3.0, still_power=2.0, moving_power=0.5)
    with pytest.raises(ValueError, match="positive"):
        MotionBudget(low=2.0, high=10.0, still_power=0.0, moving_power=0.5)


def test_the_vit_tunes_each_clip_at_the_budget_vit_ats_serves_it():
    from export.models.vit import MotionBudget
    from export.train_adaptive import clip_budgets

    clips, drawn = _still_and_blinking(12), np.array([0.25, 0.25])
    motion = MotionBudget(low=2.0, high=10.0, still_power=2.0, moving_power=0.5)
    torch.testing.assert_close(clip_budgets(clips, drawn, motion), torch.tensor([0.0625, 0.5]))
    torch.testing.assert_close(clip_budgets(clips, drawn, None), torch.tensor([0.25, 0.25]))
    # a clip drawn at full compute stays the plain ViT's
    torch.testing.assert_close(clip_budgets(clips, np.array([1.0, 1.0]), motion), torch.ones(2))


def test_delta_spread_measures_how_far_the_frames_reach_below_the_largest_delta():
    from export.train_adaptive import delta_spread

    z = torch.zeros(2, 4, 3)
    z[0, :, 0] = 2.0  # every frame equal: no spread (one bin at any B)
    z[1, :, 0] = torch.tensor([1.0, 2.0, 4.0, 3.0])  # down to a quarter of Δ_max
    z.requires_grad_()
    spread = delta_spread(z)
    torch.testing.assert_close(spread.detach(), torch.tensor([0.0, 0.75]))
    spread[1].backward()
    assert float(z.grad[1, 0, 0]) < 0 < float(z.grad[1, 2, 0])  # raising the smallest Δ narrows it, the largest widens


def test_spread_target_maps_still_clips_to_one_bin_and_moving_ones_up_to_the_cap():
    from export.train_adaptive import SPREAD_MAX, spread_target

    target = spread_target(torch.tensor([1.0, 4.0, 5.0, 6.0, 9.0]), 4.0, 6.0)
    torch.testing.assert_close(target, torch.tensor([0.0, 0.0, SPREAD_MAX / 2, SPREAD_MAX, SPREAD_MAX]))


def test_event_spread_is_the_spread_of_an_evenly_changing_clip_that_keeps_every_frame():
    from export.adaptive.sgs import bin_weights
    from export.train_adaptive import delta_spread, event_spread

    z = (torch.arange(8, dtype=torch.float64) + 0.5).view(1, 8, 1)  # Δ_t = d + t m with d = m / 2
    assert float(delta_spread(z)) == pytest.approx(event_spread(8))
    assert (bin_weights(z, 8)[0] > 0).sum(dim=0).tolist() == [1] * 8


def test_calibrate_motion_sets_d_to_half_the_median_step():
    from export import train
    from export.models import s3d_zoom_sgs
    from export.train_adaptive import calibrate_similarity

    torch.manual_seed(0)
    model = s3d_zoom_sgs.create(train.SERVED_ENCODER, frame_size=64, window_size=64, bins="time_means",
                                similarity="motion")
    clips = torch.randint(0, 255, (4, 8, 64, 64, 3), dtype=torch.uint8)
    median = calibrate_similarity(model, clips)
    net = model.sgs.similarity
    with torch.no_grad():
        steps = net.steps(model.eval().before_sgs(model.prepare(clips)))
    assert median == pytest.approx(float(steps.median()))
    assert float(torch.nn.functional.softplus(net.offset)) == pytest.approx(median / 2, rel=1e-5)


def test_before_sgs_parameters_are_the_layers_the_similarity_net_reads():
    from export import train
    from export.models import s3d_zoom_sgs
    from export.train_adaptive import before_sgs_parameters

    torch.manual_seed(0)
    zoom = s3d_zoom_sgs.create(train.SERVED_ENCODER, frame_size=64, window_size=64, bins="time_means",
                               similarity="motion")
    clips = torch.randint(0, 255, (2, 8, 64, 64, 3), dtype=torch.uint8)
    found = {id(p) for p in before_sgs_parameters(zoom, clips)}
    stems = {id(p) for module in (zoom.full.stem, zoom.window_stream.stem) for p in module.parameters()}
    assert found == stems
    assert zoom.training  # left as it was

    deeper = create_s3d_sgs("s3d_sgs_stage2_112", frame_size=64)
    found = {id(p) for p in before_sgs_parameters(deeper, clips)}
    assert found == {id(p) for module in (deeper.stem, deeper.stage2) for p in module.parameters()}


def test_event_clips_weigh_more_in_the_sgs_distillation_only_when_asked():
    from torch.nn import functional as F

    from export.synth import PHASES
    from export.train_adaptive import distillation_loss

    target = torch.randn(6, 4)
    features = target.clone()
    features[0] += 1.0  # an idle clip off by 1 in every dimension; every event clip exact
    phases = np.array([PHASES.index(p) for p in ("before", "take_off", "flight", "flight", "entry", "after")])
    scale = target.var(dim=0).mean()
    assert torch.allclose(distillation_loss(features, target, phases), F.mse_loss(features, target) / scale)
    # the idle clip's error is 1 of weight 1 among weights 1 + 4 x 4 + 1
    assert torch.allclose(distillation_loss(features, target, phases, 4.0), 1.0 / 18 / scale)
    features[2] += 2.0  # a flight clip off by 2: its squared error 4, weighted 4
    assert torch.allclose(distillation_loss(features, target, phases, 4.0), (1.0 + 16.0) / 18 / scale)


def test_a_vit_is_re_exported_only_under_the_budget_it_was_trained_with():
    from dataclasses import asdict, replace

    from export.train_adaptive import AdaptiveBudget, vit_training_changes

    budget = replace(AdaptiveBudget(), vit_spread_steps=0)
    trained = asdict(budget)
    # an export-time field may change; a provenance from before a field existed reads ADDED_FIELDS
    assert vit_training_changes(trained, replace(budget, ats_still_power=2.0, sgs_steps=1)) == []
    before_the_third_run = {k: v for k, v in trained.items() if k != "vit_ats_steps"}  # built with none (0)
    assert vit_training_changes(before_the_third_run, budget) == ["vit_ats_steps"]
    assert vit_training_changes(trained, replace(budget, vit_lr=3e-4, vit_tune_steps=7)) == ["vit_lr", "vit_tune_steps"]
    # tuned at vit_ats's motion budgets, the weights were trained by the motion fields too
    tuned = replace(budget, vit_spread_steps=60)
    assert vit_training_changes(asdict(tuned), replace(tuned, ats_still_power=2.0)) == ["ats_still_power"]
    assert vit_training_changes(trained, tuned) == ["vit_spread_steps"]
