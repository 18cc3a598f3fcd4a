"""The training harness's pieces that decide what a model learns from."""

import numpy as np
import pytest
import torch

from export import data, train, vocab
from export.data import ClipDataset
from export.models.baselines import AveragePooling, ShortTerm


def _tiny_dataset(frames_per_video=(20, 9, 33), seed=0) -> ClipDataset:
    rng = np.random.default_rng(seed)
    num_frames = np.asarray(frames_per_video)
    num_clips = -(-num_frames // 8)
    records = [dict(zip(vocab.QUERIES, c), **{"class": vocab.class_name(dict(zip(vocab.QUERIES, c)))})
               for c in (vocab.CLASSES[i] for i in rng.integers(0, len(vocab.CLASSES), len(num_frames)))]
    heads = vocab.head_attributes()
    return ClipDataset(
        records=records,
        frames=rng.integers(0, 256, (int(num_frames.sum()), 112, 112, 3), dtype=np.uint8),
        frame_offset=np.concatenate([[0], np.cumsum(num_frames)[:-1]]),
        num_frames=num_frames,
        clip_offset=np.concatenate([[0], np.cumsum(num_clips)[:-1]]),
        num_clips=num_clips,
        targets={q: np.asarray([heads[q].index(r[q]) for r in records]) for q in heads},
    )


def test_last_clip_is_padded_with_the_final_frame():
    ds = _tiny_dataset()
    clips = ds.clips(1, 0, 2)  # 9 frames: one full clip, one with a single real frame
    last = ds.frames[ds.frame_offset[1] + 8]
    assert clips.shape == (2, 8, 112, 112, 3)
    assert all(np.array_equal(frame, last) for frame in clips[1])


def test_average_pooling_ignores_padded_clips():
    torch.manual_seed(0)
    head = AveragePooling(head_sizes=train.HEAD_SIZES).eval()
    feats = torch.randn(1, 4, 256)
    padded = torch.cat([feats, 100 * torch.randn(1, 3, 256)], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    for a, b in zip(head(feats, torch.ones(1, 4, dtype=torch.bool)), head(padded, mask)):
        torch.testing.assert_close(a, b)


def test_short_term_averages_clip_probabilities_over_valid_clips():
    torch.manual_seed(0)
    head = ShortTerm(head_sizes=train.HEAD_SIZES).eval()
    feats = torch.randn(1, 5, 256)
    mask = torch.tensor([[True, True, True, False, False]])
    per_clip = head.heads(feats[0, :3])
    for got, logits in zip(head(feats, mask), per_clip):
        torch.testing.assert_close(got.exp()[0], logits.softmax(-1).mean(0), atol=1e-6, rtol=1e-5)


def test_feature_bank_recomputes_and_writes_back_only_online_clips():
    ds = _tiny_dataset()
    encoder, tqn = train.build_encoder(), train.build_tqn()
    bank = train.build_bank(encoder, ds)
    before = bank.clone()
    budget = train.Budget(bank_steps=1, bank_videos_per_step=3, n_online=1)
    train.train_with_bank("test", encoder, tqn, ds, bank, budget, np.random.default_rng(0))
    changed = (bank != before).any(dim=1)
    # One online clip per video was recomputed in train mode and written back; the rest stayed.
    assert int(changed.sum()) == len(ds.records)
    per_video = [int(changed[o : o + n].sum()) for o, n in zip(ds.clip_offset, ds.num_clips)]
    assert per_video == [1, 1, 1]


def test_every_model_gets_the_same_clip_gradients_after_the_warm_up():
    budget = train.Budget()
    bank = budget.bank_steps * budget.bank_videos_per_step * budget.n_online
    assert budget.clip_gradients == bank
    assert abs(budget.short_term_steps * budget.clips_per_step - bank) < budget.clips_per_step


def test_baselines_have_the_tqn_key_value_mlp():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    memory = count(train.build_tqn().input_proj)
    assert count(train.build_average_pooling().heads.project) == memory
    assert count(train.build_short_term().heads.project) == memory


def test_single_frame_encoder_cannot_see_frame_order():
    torch.manual_seed(0)
    encoder = train.build_encoder(temporal_kernel_size=1).eval()
    clips = torch.randint(0, 256, (2, 8, 112, 112, 3), dtype=torch.uint8)
    shuffled = clips[:, torch.randperm(8)]
    with torch.inference_mode():
        torch.testing.assert_close(encoder(clips), encoder(shuffled), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(train.build_encoder().eval()(clips), train.build_encoder().eval()(shuffled))


def test_frame_shuffle_keeps_each_videos_frames_and_moves_them():
    from export.data import shuffle_frames

    ds = _tiny_dataset()
    shuffled = shuffle_frames(ds, seed=1)
    for v, n in enumerate(ds.num_frames):
        order = shuffled.frame_order[ds.frame_offset[v] : ds.frame_offset[v] + n]
        assert sorted(order.tolist()) == list(range(n)) and order.tolist() != list(range(n))
    # All clips of a video show the same frames as before, in another order.
    n = int(ds.num_frames[2])
    a = ds.clips(2, 0, int(ds.num_clips[2])).reshape(-1, 112, 112, 3)[:n]
    b = shuffled.clips(2, 0, int(ds.num_clips[2])).reshape(-1, 112, 112, 3)[:n]
    assert not np.array_equal(a, b)
    assert {x.tobytes() for x in a} == {x.tobytes() for x in b}


def test_a_split_from_another_generator_version_is_rebuilt_not_reused(tmp_path, monkeypatch):
    import json

    from export import build, synth

    monkeypatch.setitem(build.SPLITS, "tiny", ("tiny", 2, 5, 2.2, 3.0))
    folder = build.make_split(tmp_path, "tiny")
    first = build.fingerprint(folder)
    assert json.loads((folder / "split.json").read_text())["generator_version"] == synth.GENERATOR_VERSION
    assert build.make_split(tmp_path, "tiny") == folder and not (folder / "stale").exists()  # reused as is
    spec = json.loads((folder / "split.json").read_text())
    (folder / "split.json").write_text(json.dumps({**spec, "generator_version": spec["generator_version"] - 1}))
    (folder / "stale").write_text("left over from the old generator")
    build.make_split(tmp_path, "tiny")
    assert not (folder / "stale").exists()
    assert json.loads((folder / "split.json").read_text()) == spec
    assert build.fingerprint(folder) == first  # same seed and version: the same labels again


def test_an_extra_held_out_split_has_its_own_seed_and_stays_out_of_the_build(tmp_path, monkeypatch):
    from export import build

    seeds = [row[2] for row in build.SPLITS.values()]
    assert all(row[2] not in seeds for row in build.EXTRA_SPLITS.values())  # independent draws
    assert not set(build.EXTRA_SPLITS) & set(build.SPLITS)  # `make_splits` (every build) never makes it
    monkeypatch.setitem(build.EXTRA_SPLITS, "tiny_extra", ("tiny_extra", 2, 6, 2.2, 3.0))
    folder = build.make_split(tmp_path, "tiny_extra")
    assert folder == tmp_path / "tiny_extra" and len((folder / "labels.jsonl").read_text().splitlines()) == 2


def _one_routine_dataset():
    """A one-video dataset of a rendered-length routine with its real labels and phases."""
    from export import synth

    routine = synth.sample_routine(np.random.default_rng([3, 0]), 3, 4.0)
    record = synth.labels_for(routine, 15)
    ds = _tiny_dataset(frames_per_video=(record["num_frames"],))
    ds.records = [record]
    ds.targets = {q: np.asarray([i]) for q, i in vocab.label_indices(record).items()}
    return ds, record


def test_per_clip_targets_name_only_what_each_clip_shows():
    ds, record = _one_routine_dataset()
    shown = train.clip_targets(ds, 0)
    phases = np.asarray(record["phases"] + [-1] * (8 * int(ds.num_clips[0]) - record["num_frames"])).reshape(-1, 8)
    null = {q: len(a) - 1 for q, a in train.HEADS.items()}
    in_flight = (phases == 2).sum(1) >= train.EVENT_MIN_FRAMES
    in_take_off = (phases == 1).sum(1) >= train.EVENT_MIN_FRAMES
    assert in_flight.any() and in_take_off.any() and not (in_flight | in_take_off).all()
    for q in ("somersaults", "twists", "flight_pose"):
        assert (shown[q] == np.where(in_flight, ds.targets[q][0], null[q])).all()
    assert (shown["take_off"] == np.where(in_take_off, ds.targets["take_off"][0], null["take_off"])).all()
    assert (shown["class"] == ds.targets["class"][0]).all()


def test_temperature_keeps_the_answer_and_softens_the_probabilities():
    torch.manual_seed(0)
    decoder = train.build_tqn().eval()
    feats, mask = torch.randn(2, 6, 256), torch.ones(2, 6, dtype=torch.bool)
    with torch.inference_mode():
        before = decoder(feats, mask)
        decoder.temperature.fill_(2.0)
        after = decoder(feats, mask)
    for a, b in zip(before[: len(train.HEADS)], after):
        torch.testing.assert_close(b, a / 2)


def test_in_domain_score_is_high_on_training_like_clips_and_low_elsewhere():
    torch.manual_seed(0)
    decoder = train.build_tqn().eval()
    basis = torch.randn(64, 256) / 8
    fit = torch.randn(4000, 64) @ basis + 3.0  # "training" features: a shifted 64-d subspace
    decoder.set_domain(fit)
    like = torch.randn(1, 20, 64) @ basis + 3.0
    unlike = like + torch.randn(256)  # the same, moved off the subspace by about its own scale
    mask = torch.ones(1, 20, dtype=torch.bool)
    with torch.inference_mode():
        score_like = float(decoder(like, mask)[-1])
        score_unlike = float(decoder(unlike, mask)[-1])
        padded = torch.cat([like, 1e3 * torch.ones(1, 5, 256)], 1)
        score_padded = float(decoder(padded, torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], 1))[-1])
    assert -1.5 < score_like < -0.5  # about one standard deviation per dimension
    assert score_unlike < 3 * score_like
    assert score_padded == pytest.approx(score_like, rel=1e-5)  # padded clips do not count


def test_temperature_fit_recovers_the_scale_and_lowers_calibration_error():
    from export import build

    rng = np.random.default_rng(0)
    true = rng.standard_normal((4000, 5)) * 2
    targets = np.asarray([rng.choice(5, p=np.exp(t) / np.exp(t).sum()) for t in true])
    overconfident = true * 3
    t = build.fit_temperature(overconfident, targets)
    assert t == pytest.approx(3.0, rel=0.1)
    assert build.expected_calibration_error(overconfident / t, targets) < build.expected_calibration_error(
        overconfident, targets) / 2


def test_rate_targets_are_the_counts_on_flight_clips_only():
    ds, record = _one_routine_dataset()
    shown, rates = train.clip_rates(ds, 0)
    null = train.HEAD_SIZES["somersaults"] - 1
    assert (shown == (train.clip_targets(ds, 0)["somersaults"] != null)).all() and shown.any() and not shown.all()
    assert (rates == [float(record["somersaults"]), float(record["twists"])]).all()
    # The loss reaches the encoder only through flight clips.
    head = torch.nn.Linear(256, 2)
    flat = torch.zeros(len(shown), 256, requires_grad=True)
    train.rate_loss(head, flat, ds, [0]).backward()
    assert (flat.grad.abs().sum(1) > 0).tolist() == shown.tolist()


def test_a_flight_off_the_class_table_trains_every_head_but_the_class(tmp_path):
    record = {**dict(zip(vocab.QUERIES, ("forward", "2", "0.5", "pike"))), "class": "forward/2/0.5/pike",
              "flight_table": False}
    assert record["class"] not in vocab.CLASS_NAMES
    heads = vocab.head_attributes()
    assert data._target(heads, "class", record) == data.NO_TARGET
    assert data._target(heads, "twists", record) == heads["twists"].index("0.5")
    torch.manual_seed(0)
    logits = tuple(torch.randn(3, n, requires_grad=True) for n in train.HEAD_SIZES.values())
    targets = {q: torch.tensor([0, 1, 0]) for q in train.HEADS}
    full = train.query_loss(logits, targets)
    targets["class"] = torch.tensor([data.NO_TARGET, 1, data.NO_TARGET])
    part = train.query_loss(logits, targets)
    class_loss = torch.nn.functional.cross_entropy(logits[-1][1:2], torch.tensor([1]))
    rest = full - torch.nn.functional.cross_entropy(logits[-1], torch.tensor([0, 1, 0]))
    assert part.item() == pytest.approx((rest + class_loss).item(), rel=1e-6)
    targets["class"] = torch.full((3,), data.NO_TARGET)
    none = train.query_loss(logits, targets)  # a batch without any class target: no NaN
    assert torch.isfinite(none) and none.item() == pytest.approx(rest.item(), rel=1e-6)
    none.backward()
    assert logits[-1].grad is None or not logits[-1].grad.any()
    assert logits[1].grad.abs().sum() > 0


@pytest.mark.parametrize("options", [dict(stem_patch=4, stem_pool=2), dict(stem_difference=True)])
def test_stem_variants_keep_the_grid_and_the_feature(options):
    torch.manual_seed(0)
    encoder = train.build_encoder(**options).eval()
    clips = torch.randint(0, 256, (2, 8, 112, 112, 3), dtype=torch.uint8)
    x = (clips.permute(0, 4, 1, 2, 3).float() - encoder.mean) / encoder.std
    if encoder.stem_difference:
        x = torch.cat([x, torch.cat([torch.zeros_like(x[:, :, :1]), x.diff(dim=2)], 2)], 1)
    with torch.inference_mode():
        assert encoder.stem(x).shape == (2, 24, 8, 14, 14)
        assert encoder(clips).shape == (2, 256)
    with pytest.raises(ValueError):
        train.build_encoder(temporal_kernel_size=1, stem_difference=True)
    with pytest.raises(ValueError):
        train.build_encoder(stem_pool=3)


def test_the_twist_oracle_recovers_every_count_from_one_clip_of_colours():
    from export import diagnose_counts

    flight_frames = 21.0
    for count in vocab.ATTRIBUTES["twists"]:
        for phase in (0.3, 2.0, 4.4):
            angle = phase + 2 * np.pi * float(count) / flight_frames * np.arange(8)
            colour = (1 + np.cos(angle)) / 2 + np.random.default_rng(0).normal(0, 0.03, 8)
            assert diagnose_counts._fit_rate(colour, lambda a: (1 + np.cos(a)) / 2, flight_frames) == count


def test_torso_crops_put_the_torso_in_the_middle_magnified():
    from export import count_specialist

    clips = np.zeros((1, 8, 112, 112, 3), np.uint8)
    torso = np.zeros((1, 8, 2), np.float32)
    for j in range(8):  # a 4x4 mark moving along the frame, near the edge at first
        x, y = 4 + 12 * j, 100 - 11 * j
        clips[0, j, y - 2:y + 2, x - 2:x + 2] = 255
        torso[0, j] = (x, y)
    crops = count_specialist.torso_crops(clips, torso)
    assert crops.shape == clips.shape
    for j in range(8):
        assert crops[0, j, 52:60, 52:60].min() == 255  # 4 px x 112/32 = 14 px, centred
        assert crops[0, j, :30].max() == 0 and crops[0, j, 82:].max() == 0
    clips[:] = 0  # per clip: one window at the mean position, the mark moving inside it
    for j in range(8):
        clips[0, j, 58:62, 38 + 2 * j:42 + 2 * j] = 255
        torso[0, j] = (40 + 2 * j, 60)
    crops = count_specialist.torso_crops(clips, torso, per_clip=True)
    columns = [np.flatnonzero(crops[0, j].max((0, 2)) > 128).mean() for j in range(8)]
    np.testing.assert_allclose(np.diff(columns), 2 * 112 / 32, atol=1)


def test_specialist_clips_lie_in_flight_and_carry_their_routines_counts():
    from export import count_specialist, synth

    routines = [count_specialist.free_routine(seed) for seed in range(3)]
    bank = count_specialist.flight_clips(routines, per_routine=1)
    assert bank["clips"].shape == (3, 8, 112, 112, 3) and bank["torso"].shape == (3, 8, 2)
    for k, routine in enumerate(routines):
        for q in count_specialist.COUNTS:
            assert vocab.ATTRIBUTES[q][bank[q][k]] == routine.labels[q]
    scene = synth._Scene(routines[0], 112, 112, 15)
    phases = synth.labels_for(routines[0], 15)["phases"]
    first = next(c for c in range(len(phases) // 8) if set(phases[c * 8:(c + 1) * 8]) == {2})
    rendered = np.stack([scene.frame(i) for i in range(first * 8, first * 8 + 8)]).astype(int)
    assert np.abs(bank["clips"][0].astype(int) - rendered).mean() < 6  # the H.264 round trip, nothing else
    at, _ = scene.figure_pixels(first * 8 / 15)
    np.testing.assert_allclose(bank["torso"][0, 0], (np.asarray(at["hip"]) + at["neck"]) / 2)


def test_a_specialist_trains_both_count_heads_and_scores_them():
    from export import count_specialist

    rng = np.random.default_rng(0)
    bank = {"clips": rng.integers(0, 256, (6, 8, 112, 112, 3), dtype=np.uint8),
            "somersaults": rng.integers(0, 5, 6), "twists": rng.integers(0, 5, 6),
            "torso": rng.uniform(10, 100, (6, 8, 2)).astype(np.float32)}  # px, read by localising encoders
    encoder, heads = count_specialist.train_specialist(bank, steps=2, batch=3, log_every=1)
    assert [h.out_features for h in heads] == [len(vocab.ATTRIBUTES[q]) for q in count_specialist.COUNTS]
    scores = count_specialist.score(encoder, heads, bank)
    assert set(scores) == set(count_specialist.COUNTS) and all(0 <= v <= 1 for v in scores.values())
    with pytest.raises(ValueError):
        count_specialist.train_specialist(bank, stem="nope", steps=1)


def test_grid_routines_differ_only_in_the_counts():
    from export import diagnose_counts

    routines = diagnose_counts.grid_routines(per_flight=1)
    assert len(routines) == 12 * 25
    by_base: dict[int, list] = {}
    for r in routines:
        by_base.setdefault(r.seed, []).append(r)
    assert len(by_base) == 12
    for group in by_base.values():
        assert {(r.labels["somersaults"], r.labels["twists"]) for r in group} == {
            (s, t) for s in vocab.ATTRIBUTES["somersaults"] for t in vocab.ATTRIBUTES["twists"]}
        first = group[0]
        for r in group:
            unlabelled = {"labels": None, "flight_table": None}
            assert {**r.__dict__, **unlabelled} == {**first.__dict__, **unlabelled}
            assert {q: v for q, v in r.labels.items() if q not in ("somersaults", "twists")} == {
                q: v for q, v in first.labels.items() if q not in ("somersaults", "twists")}
    assert {group[0].labels["flight_pose"] for group in by_base.values()} == set(vocab.ATTRIBUTES["flight_pose"])


def test_figure_zoom_cuts_its_window_where_its_localiser_points_and_learns_the_torso_cell():
    from export import count_specialist

    torch.manual_seed(0)
    zoom = count_specialist.FigureZoom()
    frames = torch.zeros(2, 112, 112, 3, dtype=torch.uint8)
    frames[0, 98:102, 18:22] = 255  # a mark at (20, 100), then at (90, 30)
    frames[1, 28:32, 88:92] = 255
    windows = zoom.window(frames, torch.tensor([[19.5, 99.5], [89.5, 29.5]]))
    assert windows.shape == (2, 112, 112, 3)
    assert windows[:, 50:62, 50:62].min() > 200 and windows[:, :30].max() == 0  # x 3.5, centred
    logits, centres = zoom.locate(frames)
    assert logits.shape == (2, 14 * 14) and ((centres >= 0) & (centres < 112)).all()
    target = torch.zeros(2, 14 * 14)
    target[0, 12 * 14 + 2], target[1, 3 * 14 + 11] = 100, 100  # the cells holding each mark
    assert zoom.localiser_loss(target, torch.tensor([[20.0, 100.0], [90.0, 30.0]])) < 1e-3
    assert zoom.localiser_loss(target, torch.tensor([[90.0, 30.0], [20.0, 100.0]])) > 50
    rng = np.random.default_rng(0)
    bank = {"clips": rng.integers(0, 256, (6, 8, 112, 112, 3), dtype=np.uint8), "torso": rng.uniform(0, 112, (6, 8, 2)),
            "somersaults": rng.integers(0, 5, 6), "twists": rng.integers(0, 5, 6)}
    encoder, heads = count_specialist.train_specialist(bank, encoder="figure-zoom", steps=2, batch=3)
    assert isinstance(encoder, count_specialist.FigureZoom)
    assert encoder(torch.from_numpy(bank["clips"][:2])).shape == (2, encoder.feature_dim)
    assert 0 <= count_specialist.localiser_error(encoder, bank) < 160
