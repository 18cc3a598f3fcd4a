"""The s3d_zoom clip encoder (issue 8): shapes, where its window lands, its localiser's target, and
torch against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.models import s3d_zoom
from export.models.s3d import S3D


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial batch-norm statistics, so parity is checked on more than identity norms."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("name", sorted(s3d_zoom.VARIANTS))
def test_every_registered_variant_maps_clips_to_features_heatmaps_and_clip_centres(name):
    torch.manual_seed(0)
    model = s3d_zoom.create(name).eval()
    clips = torch.randint(0, 256, (2, 8, 112, 112, 3), dtype=torch.uint8)
    features, logits, centres = model.forward_with_heatmap(clips)
    assert features.shape == (2, model.feature_dim) == (2, 256)
    assert logits.shape == (2, 8, 14 * 14) and centres.shape == (2, 2)
    assert ((centres >= 0) & (centres < 112)).all()
    torch.testing.assert_close(model(clips), features)
    with pytest.raises(ValueError):
        s3d_zoom.create("s3d_zoom_nope")
    with pytest.raises(ValueError):
        s3d_zoom.S3DZoom(window_size=50, window_stem_patch=4)


def test_the_full_stream_is_the_plain_s3d_split_at_its_stem():
    torch.manual_seed(0)
    plain = S3D().eval()
    clips = torch.randint(0, 256, (2, 8, 112, 112, 3), dtype=torch.uint8)
    stem = plain.stem(plain.prepare(clips))
    torch.testing.assert_close(plain.forward_head(plain.forward_trunk(stem)), plain(clips))


def test_the_window_is_the_frames_square_at_the_clips_centre():
    # Unmagnified (32 px sampled at 32) with a centre between pixels, every window pixel falls on
    # a source pixel: the window is exactly the frame's 32 x 32 square around the centre.
    model = s3d_zoom.S3DZoom(window_crop=32, window_size=32, window_stem_patch=4)
    x = torch.randn(2, 3, 8, 112, 112)
    centres = torch.tensor([[40.5, 70.5], [90.5, 20.5]])  # the square x 25-56, y 55-86; x 75-106, y 5-36
    windows = model.window(x, centres)
    assert windows.shape == (2, 3, 8, 32, 32)
    # (up to float rounding of the normalised grid; a neighbouring pixel differs by ~1)
    torch.testing.assert_close(windows[0], x[0, :, :, 55:87, 25:57], atol=1e-4, rtol=0)
    torch.testing.assert_close(windows[1], x[1, :, :, 5:37, 75:107], atol=1e-4, rtol=0)


def test_the_magnified_window_centres_the_mark_the_centre_points_at():
    model = s3d_zoom.create("s3d_zoom_32x56_112")
    x = torch.zeros(2, 3, 8, 112, 112)
    x[0, :, :, 98:102, 18:22] = 1  # a 4-px mark at (20, 100) in clip 0, at (90, 30) in clip 1
    x[1, :, :, 28:32, 88:92] = 1
    windows = model.window(x, torch.tensor([[19.5, 99.5], [89.5, 29.5]]))
    assert windows.shape == (2, 3, 8, 56, 56)
    assert windows[:, :, :, 26:30, 26:30].min() > 0.99  # the mark, x 1.75, in the middle
    assert windows[:, :, :, :20].abs().max() == 0 and windows[:, :, :, :, 36:].abs().max() == 0
    marked = (windows[0, 0, 0] > 0.5).nonzero().float()
    assert abs(marked[:, 0].mean() - 27.5) < 0.6 and abs(marked[:, 1].mean() - 27.5) < 0.6
    assert 6 <= len(marked) ** 0.5 <= 8  # 4 px x 56 / 32


def test_the_localiser_target_is_the_torso_cell_and_frames_without_a_figure_are_left_out():
    model = s3d_zoom.create("s3d_zoom_32x56_112")
    logits = torch.zeros(1, 2, 14 * 14)
    logits[0, 0, 12 * 14 + 2] = logits[0, 1, 3 * 14 + 11] = 100  # cells of (20, 100) and (90, 30)
    right = torch.tensor([[[20.0, 100.0], [90.0, 30.0]]])
    assert model.localiser_loss(logits, right) < 1e-3
    assert model.localiser_loss(logits, right.flip(1)) > 50
    assert model.localiser_loss(logits, torch.tensor([[[20.0, 100.0], [float("nan")] * 2]])) < 1e-3
    nothing = model.localiser_loss(logits.requires_grad_(), torch.full((1, 2, 2), float("nan")))
    assert nothing == 0 and nothing.requires_grad
    # the clip's centre is the mean over its frames of each frame's soft-argmax
    centres = (logits.softmax(-1) @ model.cells).mean(1)
    torch.testing.assert_close(centres, torch.tensor([[(19.5 + 91.5) / 2, (99.5 + 27.5) / 2]]))


def _edge_centres(batch: int, seed: int) -> torch.Tensor:
    """Window centres (batch, 2) px: the frame's corners and beyond (windows of repeated edges),
    whole and half pixels, and the rest at random fractions over and past the frame."""
    special = torch.tensor([[0.0, 0.0], [111.0, 111.0], [-20.0, 130.0], [130.0, -20.0], [15.9, 16.1],
                            [96.0, 95.99], [55.5, 55.5], [0.25, 111.75], [40.0, 71.0], [16.0, 96.0]])
    rng = torch.Generator().manual_seed(seed)
    centres = torch.cat([special, torch.rand(max(0, batch - len(special)), 2, generator=rng) * 150 - 19])
    return centres[torch.randperm(len(centres), generator=rng)[:batch]]


def _normalised_frames(batch: int, seed: int) -> torch.Tensor:
    """Random uint8 frames normalised as the encoder's `prepare` does (B, 3, T, 112, 112)."""
    clips = torch.randint(0, 256, (batch, 8, 112, 112, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    return S3D().prepare(clips)


@pytest.mark.parametrize("config", [*s3d_zoom.VARIANTS.values(),
                                    dict(window_crop=32, window_size=32, window_stem_patch=4),  # unmagnified
                                    dict(window_crop=20, window_size=64, window_stem_patch=8),
                                    dict(window_crop=112, window_size=56, window_stem_patch=4)])  # the whole frame
def test_the_window_is_grid_samples_at_the_edges_and_between_pixels(config):
    model = s3d_zoom.S3DZoom(**config)
    x, centres = _normalised_frames(20, 0), _edge_centres(20, 1)
    windows = model.window(x, centres)
    assert windows.shape == (20, 3, 8, model.window_size, model.window_size)
    # random pixels: neighbours differ by up to ~4.6 normalised units, so a window pixel placed a
    # float32 step (8e-6 px) off would show at ~4e-5; the positions are grid_sample's to the bit
    torch.testing.assert_close(windows, s3d_zoom.grid_sample_window(model, x, centres), atol=1e-5, rtol=0)
    assert model.band <= 112 and (config["window_crop"] < 112) == (model.band < 112)
    with pytest.raises(ValueError):
        model.window(x[..., :96, :96], centres)


def _trained_like(name: str) -> s3d_zoom.S3DZoom:
    """A variant whose batch norms hold non-trivial statistics and whose weights moved from their
    initialisation by a few training steps, in eval mode."""
    torch.manual_seed(0)
    model = s3d_zoom.create(name)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    clips = torch.randint(0, 256, (4, 8, 112, 112, 3), dtype=torch.uint8)
    for _ in range(2):
        features, logits, _ = model.forward_with_heatmap(clips)
        loss = features.square().mean() + model.localiser_loss(logits, torch.rand(4, 8, 2) * 112)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    _randomise_norms(model)
    return model.eval()


class _GridSampleZoom(s3d_zoom.S3DZoom):
    """The encoder as it cut its window before: with grid_sample (ONNX `GridSample`)."""

    def window(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return s3d_zoom.grid_sample_window(self, x, centres)


def test_the_encoder_gives_the_same_features_as_with_grid_sample_from_the_same_weights():
    name = "s3d_zoom_32x112_112"
    model = _trained_like(name)
    before = _GridSampleZoom(**s3d_zoom.VARIANTS[name]).eval()
    before.load_state_dict(model.state_dict())  # strict: the new cut adds no state to a save
    clips = torch.randint(0, 256, (5, 8, 112, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features, heatmaps, centres = model.forward_with_heatmap(clips)
        want, want_heatmaps, want_centres = before.forward_with_heatmap(clips)
        at_edges = model.forward_with_heatmap(clips, window_at=_edge_centres(5, 3))[0]
        want_at_edges = before.forward_with_heatmap(clips, window_at=_edge_centres(5, 3))[0]
    torch.testing.assert_close(heatmaps, want_heatmaps, atol=0, rtol=0)
    torch.testing.assert_close(centres, want_centres, atol=0, rtol=0)
    scale = want.abs().max()
    assert scale > 0.1 and (features - want).abs().max() <= 1e-5 * scale
    assert (at_edges - want_at_edges).abs().max() <= 1e-5 * want_at_edges.abs().max()


def test_s3d_zoom_exports_without_grid_sample_and_agrees_with_torch_at_several_batch_sizes(tmp_path):
    import onnx

    from export import onnx_export

    name = "s3d_zoom_32x112_112"
    model = _trained_like(name)
    path = onnx_export.export_encoder(model, dict(s3d_zoom.VARIANTS[name]), tmp_path, "clip_encoder_s3d_zoom",
                                      clip_fps=15)
    graph = onnx.load(str(path))
    assert "GridSample" not in {n.op_type for n in graph.graph.node}
    assert graph.opset_import[0].version == onnx_export.OPSET
    rng = np.random.default_rng(0)
    for batch in (1, 3, 8):
        clips = rng.integers(0, 256, (batch, 8, 112, 112, 3), dtype=np.uint8)
        assert onnx_export.max_diff(model, path, {"clips": clips})["features"] <= 1e-4, batch


class _Window(torch.nn.Module):
    def __init__(self, model: s3d_zoom.S3DZoom):
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return self.model.window(x, centres)


def test_the_exported_window_is_grid_samples_at_the_edges_at_several_batch_sizes(tmp_path):
    import onnxruntime as ort

    from export import onnx_export

    model = s3d_zoom.create("s3d_zoom_32x112_112")
    batch = torch.export.Dim("batch", min=1, max=1024)
    path = tmp_path / "window.onnx"
    onnx_export.save(torch.onnx.export(_Window(model), (_normalised_frames(2, 0), _edge_centres(2, 0)), dynamo=True,
                                       opset_version=onnx_export.OPSET, input_names=["x", "centres"],
                                       output_names=["windows"],
                                       dynamic_shapes={"x": {0: batch}, "centres": {0: batch}}, verbose=False),
                     path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5, 12):
        x, centres = _normalised_frames(n, n), _edge_centres(n, n)
        got = session.run(None, {"x": x.numpy(), "centres": centres.numpy()})[0]
        np.testing.assert_allclose(got, s3d_zoom.grid_sample_window(model, x, centres).numpy(), atol=1e-5, rtol=0)


def _records_dataset(kinds, split="short", free_flight_share=0.0):
    """A ClipDataset of real routines' records (as a split of `build.SPLITS[split]` would draw them)
    over blank frames: what `figure_track` and the training steps read, without rendering."""
    from export import build, data, synth, vocab

    _, _, _, lo, hi = build.SPLITS[split]
    records = []
    for seed, kind in zip(range(11, 11 + len(kinds)), kinds):
        routine = synth.sample_routine(np.random.default_rng([seed, 0]), seed, None, lo, hi, kind=kind,
                                       free_flight_share=free_flight_share)
        records.append({"file": f"video_{seed}.mp4", **synth.labels_for(routine, build.FPS)})
    num_frames = np.asarray([r["num_frames"] for r in records])
    num_clips = -(-num_frames // data.CLIP_FRAMES)
    heads = vocab.head_attributes()
    return data.ClipDataset(
        records=records, frames=np.zeros((int(num_frames.sum()), 112, 112, 3), np.uint8),
        frame_offset=np.concatenate([[0], np.cumsum(num_frames)[:-1]]), num_frames=num_frames,
        clip_offset=np.concatenate([[0], np.cumsum(num_clips)[:-1]]), num_clips=num_clips,
        targets={q: np.asarray([data._target(heads, q, r) for r in records]) for q in heads})


def test_the_figure_track_is_the_drawn_torsos_middle_and_nan_where_no_figure_is_drawn():
    from export import build, diagnose_counts, synth

    ds = _records_dataset(["routine", "background", "idle", "routine"], free_flight_share=0.5)
    track = diagnose_counts.figure_track(ds, "short", free_flight_share=0.5)
    assert track.shape == (int(ds.num_frames.sum()), 2)
    routine = diagnose_counts.rebuild_routine(ds.records[0], "short", 0.5)
    scene = synth._Scene(routine, 112, 112, build.FPS)
    at, _ = scene.figure_pixels(30 / build.FPS)
    np.testing.assert_allclose(track[30], (np.asarray(at["hip"]) + at["neck"]) / 2)
    entry_end = int(np.ceil(synth.phase_times(routine)[3] * build.FPS))
    first, n = ds.frame_offset[0], ds.num_frames[0]
    assert np.isfinite(track[first:first + entry_end - 1]).all() and np.isnan(track[first + entry_end:first + n]).all()
    background = slice(ds.frame_offset[1], ds.frame_offset[1] + ds.num_frames[1])
    assert np.isnan(track[background]).all()
    idle = slice(ds.frame_offset[2], ds.frame_offset[2] + ds.num_frames[2])
    assert np.isfinite(track[idle]).all()  # a null video with a figure: the target is still where it stands
    with pytest.raises(ValueError):  # another spec would draw other routines: refused, not guessed
        diagnose_counts.figure_track(ds, "short", free_flight_share=0.0)


def test_zoom_training_steps_teach_the_localiser_and_plain_ones_have_no_localiser_loss():
    from export import diagnose_counts, train

    ds = _records_dataset(["routine", "routine", "idle"])
    track = diagnose_counts.figure_track(ds, "short")
    torch.manual_seed(0)
    plain = train.build_encoder()
    features, loss = train.encode(plain, ds, [(0, 0, 2), (2, 1, 1)], None)
    assert features.shape == (3, 256) and loss == 0
    assert diagnose_counts.study_encoder({"zoom": True, "zoom_variant": "s3d_zoom_32x112_112"}).window_size == 112
    zoom = diagnose_counts.study_encoder({"zoom": True})
    assert zoom.window_size == 56
    features, loss = train.encode(zoom, ds, [(0, 0, 2), (2, 1, 1)], track)
    assert features.shape == (3, 256) and loss > 0
    before = [p.detach().clone() for p in zoom.localiser.parameters()]
    budget = train.Budget(warmup_steps=1, videos_per_step=2, bank_steps=1, bank_videos_per_step=2, n_online=1)
    train.warmup(zoom, [train.build_tqn()], train.build_short_term(), ds, budget, np.random.default_rng(0),
                 torso=track)
    assert all(not torch.equal(a, b) for a, b in zip(before, zoom.localiser.parameters()))
    train.train_with_bank("test", zoom, train.build_tqn(), ds, train.build_bank(zoom, ds), budget,
                          np.random.default_rng(0), torso=track)
    error = diagnose_counts.localiser_error(zoom, ds, track)
    assert error["clips"] >= 2 and 0 <= error["mean"] < 160


def test_a_zoom_specialist_trains_its_localiser_on_the_banks_torso_positions():
    from export import count_specialist

    rng = np.random.default_rng(0)
    bank = {"clips": rng.integers(0, 256, (6, 8, 112, 112, 3), dtype=np.uint8),
            "torso": rng.uniform(0, 112, (6, 8, 2)).astype(np.float32),
            "somersaults": rng.integers(0, 5, 6), "twists": rng.integers(0, 5, 6)}
    encoder, heads = count_specialist.train_specialist(bank, encoder="s3d-zoom", steps=2, batch=3)
    assert isinstance(encoder, s3d_zoom.S3DZoom)
    assert 0 <= count_specialist.localiser_error(encoder, bank) < 160
    assert set(count_specialist.score(encoder, heads, bank)) == set(count_specialist.COUNTS)
    with pytest.raises(ValueError):
        count_specialist.train_specialist(bank, encoder="s3d-zoom", stem="fine", steps=1)


def test_the_frozen_probe_fits_on_training_clips_and_scores_held_out_and_grid_clips():
    from export import count_specialist, train

    rng = np.random.default_rng(0)
    bank = lambda n: {"clips": rng.integers(0, 256, (n, 8, 112, 112, 3), dtype=np.uint8),  # noqa: E731
                      "somersaults": rng.integers(0, 5, n), "twists": rng.integers(0, 5, n)}
    banks = {"train": bank(8), "held_out_free": bank(3), "grid": bank(4)}
    torch.manual_seed(0)
    out = count_specialist.frozen_probe(train.build_encoder(), banks, fit_clips=6)
    assert out["fit_clips"] == 6 and set(out) == {"fit_clips", "held_out_free", "grid"}
    assert all(set(out[k]) == set(count_specialist.COUNTS) for k in ("held_out_free", "grid"))
    scores = [v for k in ("held_out_free", "grid") for v in out[k].values()]
    assert all(0 <= v <= 1 for v in scores)
    # scored against the probed bank's own labels: a bank that is the fit clips is fitted closely
    banks["grid"] = {k: v[:6] for k, v in banks["train"].items()}
    assert count_specialist.frozen_probe(train.build_encoder(), banks, fit_clips=8)["grid"]["twists"] > 0.8


def test_a_zoom_specialists_encoder_is_the_one_count_study_trains():
    # count_study --init-encoder loads a count_specialist save into study_encoder's encoder
    from export import count_specialist, diagnose_counts

    rng = np.random.default_rng(0)
    bank = {"clips": rng.integers(0, 256, (4, 8, 112, 112, 3), dtype=np.uint8),
            "torso": rng.uniform(0, 112, (4, 8, 2)).astype(np.float32),
            "somersaults": rng.integers(0, 5, 4), "twists": rng.integers(0, 5, 4)}
    specialist, _ = count_specialist.train_specialist(bank, encoder="s3d-zoom", zoom_variant="s3d_zoom_32x112_112",
                                                      steps=1, batch=2)
    study = diagnose_counts.study_encoder({"zoom": True, "zoom_variant": "s3d_zoom_32x112_112"})
    study.load_state_dict(specialist.state_dict())
    clips = torch.from_numpy(bank["clips"][:2])
    torch.testing.assert_close(study.eval()(clips), specialist.eval()(clips))


def test_the_count_loss_trains_the_encoder_and_its_heads_in_both_stages_without_moving_the_recipes_draws():
    # count_study --count-loss: the specialist's loss on its free-flight clips added to every step
    from export import count_study, diagnose_counts, train

    rng = np.random.default_rng(0)
    bank = {"clips": rng.integers(0, 256, (5, 8, 112, 112, 3), dtype=np.uint8),
            "torso": rng.uniform(0, 112, (5, 8, 2)).astype(np.float32),
            "somersaults": rng.integers(0, 5, 5), "twists": rng.integers(0, 5, 5)}
    with pytest.raises(ValueError):
        count_study.CountLoss(bank, 256, weight=0.0, seed=0)
    torch.manual_seed(0)
    zoom = diagnose_counts.study_encoder({"zoom": True})
    loss = count_study.CountLoss(bank, zoom.feature_dim, weight=2.0, seed=0, batch=3)
    half = count_study.CountLoss(bank, zoom.feature_dim, weight=1.0, seed=0, batch=3)
    half.load_state_dict(loss.state_dict())
    value = loss(zoom.eval())
    torch.testing.assert_close(value, 2 * half(zoom))  # same draw (same seed), the weight scales it
    value.backward()
    assert zoom.window_stream.stem[0].weight.grad.abs().sum() > 0  # the window reader learns the counts
    assert zoom.localiser[0].weight.grad.abs().sum() > 0  # and the localiser the bank's torso positions

    ds = _records_dataset(["routine", "routine", "idle"])
    track = diagnose_counts.figure_track(ds, "short")
    budget = train.Budget(warmup_steps=3, videos_per_step=2, bank_steps=1, bank_videos_per_step=2, n_online=1)
    steps, draws = [], []
    for extra in (None, count_study.CountLoss(bank, zoom.feature_dim, weight=1.0, seed=0, batch=2)):
        before = None if extra is None else [p.detach().clone() for p in extra.parameters()]
        order = np.random.default_rng(3)
        train.warmup(zoom, [train.build_tqn()], train.build_short_term(), ds, budget, order, torso=track,
                     extra=extra, after_step=steps.append)
        train.train_with_bank("test", zoom, train.build_tqn(), ds, train.build_bank(zoom, ds), budget, order,
                              torso=track, extra=extra)
        draws.append(order.integers(1 << 30))
        if extra is not None:
            assert all(not torch.equal(a, b) for a, b in zip(before, extra.parameters()))
    assert steps == [1, 2, 3, 1, 2, 3]
    assert draws[0] == draws[1]  # the recipe's videos and clips are drawn as without the count loss


def test_a_run_from_a_save_trains_the_feature_bank_stage_the_saving_run_trained(tmp_path):
    # count_study --from-save: the saved weights and random draws, so the stage goes on as in one run
    import argparse

    from export import count_study, train

    ds = _records_dataset(["routine", "routine", "idle"])
    budget = train.Budget(warmup_steps=2, videos_per_step=2, bank_steps=2, bank_videos_per_step=2, n_online=1)

    def bank_stage(encoder, tqn, rng):
        train.train_with_bank("test", encoder, tqn, ds, train.build_bank(encoder, ds), budget, rng)
        return {**encoder.state_dict(), **tqn.state_dict()}, rng.integers(1 << 30)

    rng = train.seed_everything(0)
    encoder, tqn = train.build_encoder(), train.build_tqn()
    train.warmup(encoder, [tqn], train.build_short_term(), ds, budget, rng)
    count_study.save(tmp_path / "warmup.pt", argparse.Namespace(name="test"), encoder, tqn, rng)
    one_run, one_run_draw = bank_stage(encoder, tqn, rng)

    train.seed_everything(1)  # whatever a new run draws before it restores
    encoder, tqn = train.build_encoder(), train.build_tqn()
    from_save, from_save_draw = bank_stage(encoder, tqn, count_study.restore(tmp_path / "warmup.pt", encoder, tqn))
    assert from_save_draw == one_run_draw
    for k in one_run:
        torch.testing.assert_close(from_save[k], one_run[k], rtol=0, atol=0)


def test_the_flight_bank_is_written_once_read_memory_mapped_and_rebuilt_for_another_spec(tmp_path, monkeypatch):
    from export import count_specialist

    folder = count_specialist.write_flight_bank(tmp_path / "flights", 3, workers=1)
    bank = count_specialist.read_flight_bank(folder)
    want = count_specialist.flight_clips([count_specialist.free_routine(s) for s in range(3)])
    assert isinstance(bank["clips"], np.memmap) and set(bank) == set(want)
    for name in want:
        assert np.array_equal(bank[name], want[name]), name
    written = (folder / "clips.npy").stat().st_mtime_ns
    assert count_specialist.write_flight_bank(folder, 3, workers=1) == folder
    assert (folder / "clips.npy").stat().st_mtime_ns == written  # reused, not rendered again
    count_specialist.write_flight_bank(folder, 4, workers=1)
    assert len(count_specialist.read_flight_bank(folder)["twists"]) > len(want["twists"])


def test_mirrored_and_reversed_clips_move_their_torso_along_and_undo_themselves():
    from export.count_specialist import mirror_and_reverse

    rng = np.random.default_rng(0)
    clips = rng.integers(0, 255, (4, 8, 16, 16, 3), dtype=np.uint8)
    torso = rng.random((4, 8, 2)).astype(np.float32) * 15
    mirror, reverse = np.array([1, 0, 1, 0], bool), np.array([1, 1, 0, 0], bool)
    out, moved = mirror_and_reverse(clips, torso, mirror, reverse)
    assert (out[3] == clips[3]).all() and (moved[3] == torso[3]).all()
    assert (out[1] == clips[1][::-1]).all() and (moved[1] == torso[1][::-1]).all()
    assert (out[2] == clips[2][:, :, ::-1]).all()
    assert np.allclose(moved[2, :, 0], 15 - torso[2, :, 0]) and (moved[2, :, 1] == torso[2, :, 1]).all()
    # a pixel marked at the torso stays under the moved torso
    marked = np.zeros((1, 8, 16, 16, 3), np.uint8)
    marked[0, 2, 5, 3] = 255
    out, moved = mirror_and_reverse(marked, np.tile([[3.0, 5.0]], (1, 8, 1)).astype(np.float32), np.ones(1, bool), np.ones(1, bool))
    assert out[0, 5, 5, 12].all() and tuple(moved[0, 5]) == (12.0, 5.0)
    again = mirror_and_reverse(*mirror_and_reverse(clips, torso, mirror, reverse), mirror, reverse)
    assert (again[0] == clips).all() and np.allclose(again[1], torso)


def test_a_forced_window_is_cut_where_asked_and_leaves_the_localiser_alone():
    torch.manual_seed(0)
    model = s3d_zoom.create("s3d_zoom_32x56_112").eval()
    clips = torch.zeros(2, 8, 112, 112, 3, dtype=torch.uint8)
    clips[:, :, 4:20, 4:20] = 255  # a bright square in the corner the forced window looks at
    with torch.no_grad():
        features, heatmaps, centres = model.forward_with_heatmap(clips)
        at_own, _, _ = model.forward_with_heatmap(clips, window_at=centres)
        elsewhere, heatmaps_elsewhere, centres_elsewhere = model.forward_with_heatmap(
            clips, window_at=torch.tensor([[12.0, 12.0], [12.0, 12.0]]))
    torch.testing.assert_close(at_own, features)
    assert (elsewhere - features).abs().max() > 100 * (at_own - features).abs().max() + 1e-3
    torch.testing.assert_close(heatmaps_elsewhere, heatmaps)
    torch.testing.assert_close(centres_elsewhere, centres)


def test_a_specialist_with_a_forced_window_trains_differently_only_while_forced():
    from export import count_specialist

    rng = np.random.default_rng(0)
    bank = {"clips": rng.integers(0, 256, (6, 8, 112, 112, 3), dtype=np.uint8),
            "torso": rng.uniform(0, 112, (6, 8, 2)).astype(np.float32),
            "somersaults": rng.integers(0, 5, 6), "twists": rng.integers(0, 5, 6)}

    def trained(forced: int) -> torch.Tensor:
        encoder, _ = count_specialist.train_specialist(bank, encoder="s3d-zoom", zoom_variant="s3d_zoom_32x56_112",
                                                       steps=2, batch=3, forced_window_steps=forced)
        return torch.cat([p.detach().flatten() for p in encoder.window_stream.parameters()])

    assert torch.equal(trained(0), trained(0))
    assert not torch.allclose(trained(1), trained(0))
