"""SGS on the two-stream s3d_zoom encoder (one node after both stems), and the one loader of the
served clip encoder (untrained weights, small inputs)."""

import json

import pytest
import torch

from export import train
from export.models import s3d_zoom, s3d_zoom_sgs
from export.models.s3d import S3D
from export.models.s3d_sgs import BIN_OUTPUTS, S3DSGS, s3d_macs
from export.models.s3d_zoom import S3DZoom, zoom_macs
from export.models.s3d_zoom_sgs import S3DZoomSGS
from tests.unit.test_adaptive_models import _clips, _counted_macs, _FixedSimilarity

VARIANT = train.SERVED_ENCODER
SMALL = dict(frame_size=64, window_size=64)  # both stems on an 8 x 8 grid: fast, and the grids still match


def _zoom() -> S3DZoom:
    torch.manual_seed(0)
    return s3d_zoom.create(VARIANT, **SMALL).eval()


def _zoom_sgs(zoom: S3DZoom, bins: str = "time_means") -> S3DZoomSGS:
    model = s3d_zoom_sgs.create(VARIANT, **SMALL, bins=bins, similarity_centred=bins == "time_means")
    missing, unexpected = model.load_state_dict(zoom.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("sgs.") for k in missing)
    with torch.no_grad():  # a similarity net that tells frames apart, as after training
        model.sgs.similarity.conv1.bias.zero_()
        model.sgs.similarity.conv2.bias.zero_()
    return model.eval()


def test_a_bin_per_frame_as_time_ordered_means_is_the_zoom_encoder():
    # As test_time_ordered_means_with_a_bin_per_frame_are_the_s3d: one frame per bin in scrambled
    # time order; the time order puts them back, in both streams at once.
    zoom = _zoom()
    clips = _clips(3, seed=6, size=64)
    got = {}
    for bins in BIN_OUTPUTS:
        model = _zoom_sgs(zoom, bins)
        model.sgs.similarity = _FixedSimilarity([5.0, 16.0, 1.0, 9.0, 13.0, 3.0, 11.0, 7.0])
        with torch.no_grad():
            got[bins], kept = model(clips, torch.tensor(8))
        assert kept.tolist() == [8, 8, 8]
    with torch.no_grad():
        expected = zoom(clips)
    torch.testing.assert_close(got["time_means"], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got["sums"], expected, atol=1e-5, rtol=1e-4)


def test_one_sgs_node_samples_both_streams_with_one_mask():
    model = _zoom_sgs(_zoom())
    assert isinstance(model.sgs.similarity.conv1, torch.nn.Conv1d)
    assert model.sgs.similarity.conv1.in_channels == model.full.stem[0].out_channels + model.window_stream.stem[0].out_channels
    assert model.full.sgs is None and model.window_stream.sgs is None  # the streams have no sampler of their own
    seen = []
    for stream in (model.full, model.window_stream):
        original = stream.after_sgs_compact
        stream.after_sgs_compact = lambda x, mask, original=original: seen.append(mask) or original(x, mask)
    with torch.no_grad():
        _, kept = model(_clips(3, seed=2, size=64), torch.tensor([8, 3, 1]))
    assert len(seen) == 2 and seen[0] is seen[1] and seen[0].sum(dim=1).tolist() == kept.tolist()


def test_one_bin_works_and_still_pools():
    model = _zoom_sgs(_zoom())
    with torch.no_grad():
        features, kept = model(_clips(2, size=64), torch.tensor(1))
    assert kept.tolist() == [1, 1] and features.shape == (2, 256) and torch.isfinite(features).all()


def test_clip_features_do_not_depend_on_the_batch_and_compact_is_the_padded_computation():
    model = _zoom_sgs(_zoom())
    clips, budgets = _clips(4, seed=4, size=64), torch.tensor([8, 3, 8, 5])
    with torch.no_grad():
        batched, kept = model(clips, budgets)
        assert len(set(kept.tolist())) > 1
        for i in range(4):
            alone, alone_kept = model(clips[i : i + 1], budgets[i : i + 1])
            assert int(alone_kept) == int(kept[i])
            torch.testing.assert_close(alone[0], batched[i], atol=1e-6, rtol=1e-5)
        model.compact = False
        padded, padded_kept = model(clips, budgets)
    assert torch.equal(kept, padded_kept)
    torch.testing.assert_close(batched, padded, atol=1e-6, rtol=1e-5)


def test_macs_count_both_trunks_on_the_kept_bins():
    zoom = _zoom()
    model = _zoom_sgs(zoom)
    clip = _clips(1, seed=5, size=64)
    with torch.no_grad():
        _, kept = model(clip, torch.tensor(8))
    assert model.macs(int(kept)) == _counted_macs(model, clip, torch.tensor(8))
    table = [model.macs(b) for b in range(1, 9)]
    assert table == sorted(table) and len(set(table)) == 8
    # With every bin kept, SGS only adds its similarity net and sum to the zoom encoder.
    plain = zoom_macs(zoom)
    assert plain < table[-1] < 1.02 * plain
    # Both trunks shrink: the saving at B' = 1 is more than the full stream's trunk alone could give.
    full = S3D(channels=(24, 32, 64, 128), frame_size=64)
    full_trunk = s3d_macs(full) - _counted_macs(full.stem, torch.zeros(1, 3, 8, 64, 64))
    assert plain - table[0] > full_trunk * 7 / 8


def test_refuses_placements_without_one_node_for_both_streams_and_unequal_grids():
    with pytest.raises(ValueError, match="sgs_after"):
        s3d_zoom_sgs.create(VARIANT, sgs_after="stage2")
    with pytest.raises(ValueError, match="grids"):
        s3d_zoom_sgs.create("s3d_zoom_32x56_112", window_size=48)
    with pytest.raises(ValueError, match="variant"):
        s3d_zoom_sgs.create("s3d_zoom_nope")


def test_from_config_builds_the_served_encoders_sgs_version():
    options = {"sgs_after": "stem", "similarity_centred": True, "bins": "time_means"}
    assert type(s3d_zoom_sgs.from_config({**train.ENCODER_CONFIG, **options})) is S3DSGS
    zoom_sgs = s3d_zoom_sgs.from_config(json.loads(json.dumps({**train.served_encoder_config(), **options})))
    assert type(zoom_sgs) is S3DZoomSGS and zoom_sgs.bins == "time_means"
    assert zoom_sgs.window_size == s3d_zoom.VARIANTS[VARIANT]["window_size"]


@pytest.mark.parametrize("config", ["plain", "zoom"])
def test_the_served_encoder_loader_round_trips_both_configs(tmp_path, config):
    torch.manual_seed(1)
    if config == "plain":
        encoder, saved = train.build_encoder(), train.ENCODER_CONFIG
    else:
        encoder, saved = train.build_served_encoder(), train.served_encoder_config()
    with torch.no_grad():  # moved running statistics, so a model left in train mode or not loaded differs
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
    model_dir = tmp_path / "clip_encoder_s3d"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.json").write_text(json.dumps({"config": saved, "clip_fps": 15.0}))  # lists, as JSON has
    torch.save(encoder.state_dict(), model_dir / "1" / "model.pt")
    loaded, meta = train.load_served_encoder(model_dir)
    assert type(loaded) is type(encoder) and not loaded.training and meta["clip_fps"] == 15.0
    clips = _clips(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clips), encoder.eval()(clips), atol=0, rtol=0)
