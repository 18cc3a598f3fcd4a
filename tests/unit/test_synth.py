import json

import cv2
import decord
import numpy as np
import pytest
import torch
from torch import nn

from export import synth, vocab


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.write_dataset(out, count=5, seed=3, max_seconds=6.0, workers=1)
    return out, [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]


def test_labels_follow_the_contract(dataset):
    _, records = dataset
    heads = vocab.head_attributes()
    for r in records:
        for q in vocab.QUERIES:
            assert r[q] in vocab.ATTRIBUTES[q]
        assert r["class"] in heads["class"]
        assert r["class"] == "/".join(r[q] for q in vocab.QUERIES)
        assert len(r["phases"]) == r["num_frames"]
        assert r["boundaries_s"] == sorted(r["boundaries_s"]) and len(r["boundaries_s"]) == 4
        # Every phase of the routine appears, in order, at the labelled frames.
        phases = np.asarray(r["phases"])
        assert (np.diff(phases) >= 0).all()
        for phase, frame in enumerate(r["boundaries"], start=1):
            if frame < r["num_frames"]:
                assert phases[frame] == phase and (frame == 0 or phases[frame - 1] < phase)


def test_files_decode_to_the_labelled_length(dataset):
    out, records = dataset
    codecs = {r["codec"] for r in records}
    assert codecs == {"h264", "mpeg4"}  # datasets mix codecs
    for r in records:
        reader = decord.VideoReader(str(out / r["file"]), num_threads=1)
        assert len(reader) == r["num_frames"]
        assert reader[0].shape == (r["height"], r["width"], 3)


def test_generation_is_deterministic(tmp_path):
    a = synth.render_video(tmp_path / "a.mp4", seed=9, seconds=3.0)
    b = synth.render_video(tmp_path / "b.mp4", seed=9, seconds=3.0)
    assert a == b and a["generator_version"] == synth.GENERATOR_VERSION
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_take_off_is_only_visible_in_its_own_frames():
    """Two videos that differ only in take-off must have identical flight and idle frames."""
    rng = np.random.default_rng(0)
    base = synth.sample_routine(rng, 21, 4.0)
    other_take_off = next(t for t in vocab.ATTRIBUTES["take_off"] if t != base.labels["take_off"])
    other = synth.Routine(**{**base.__dict__, "labels": {**base.labels, "take_off": other_take_off}})
    fps = 15
    fa = list(synth.render_frames(base, 112, 112, fps))
    fb = list(synth.render_frames(other, 112, 112, fps))
    t0, t1, _, _ = synth.phase_times(base)
    differing = [i for i, (x, y) in enumerate(zip(fa, fb)) if not np.array_equal(x, y)]
    assert differing, "take-off must change some frames"
    assert all(t0 <= i / fps < t1 for i in differing)


def test_somersaults_set_the_rotation_speed_inside_flight():
    rng = np.random.default_rng(1)
    base = synth.sample_routine(rng, 5, 4.0)
    t1, t2 = synth.phase_times(base)[1:3]
    t = (t1 + t2) / 2
    slow = synth.Routine(**{**base.__dict__, "labels": {**base.labels, "somersaults": "1"}})
    fast = synth.Routine(**{**base.__dict__, "labels": {**base.labels, "somersaults": "3"}})
    dt = 0.05
    speed = lambda r: (synth._body_state(r, t + dt)[2] - synth._body_state(r, t)[2]) / dt  # noqa: E731
    assert speed(fast) == pytest.approx(3 * speed(slow))


def test_null_videos_answer_null_and_show_no_routine():
    frames, records = {}, {}
    for kind in synth.NULL_KINDS:
        routine = synth.sample_routine(np.random.default_rng([4, 0]), 4, 3.0, kind=kind)
        frames[kind] = list(synth.render_frames(routine, 112, 112, 15))
        records[kind] = synth.labels_for(routine, 15)
    for kind, r in records.items():
        assert all(r[q] == vocab.NULL for q in vocab.QUERIES) and r["class"] == vocab.NULL, kind
        assert r["kind"] == kind and set(r["phases"]) == {0} and r["boundaries"] == [r["num_frames"]] * 4
    # The same draws as a routine: only the figure differs. The walker has left by the end; the
    # idle diver is still there; "background" never shows one.
    assert np.array_equal(frames["walk_off"][-1], frames["background"][-1])
    assert not np.array_equal(frames["idle"][-1], frames["background"][-1])
    assert not np.array_equal(frames["walk_off"][0], frames["background"][0])


def test_null_every_makes_every_kth_video_a_null_one_and_leaves_the_others(tmp_path):
    synth.write_dataset(tmp_path / "a", count=4, seed=8, max_seconds=3.0, workers=1, null_every=2)
    synth.write_dataset(tmp_path / "b", count=4, seed=8, max_seconds=3.0, workers=1)
    a, b = ([json.loads(line) for line in (tmp_path / d / "labels.jsonl").read_text().splitlines()] for d in "ab")
    assert [r["kind"] for r in a] == [synth.ROUTINE, synth.NULL_KINDS[0], synth.ROUTINE, synth.NULL_KINDS[1]]
    assert [r["kind"] for r in b] == [synth.ROUTINE] * 4
    assert a[0] == b[0] and a[2] == b[2]
    assert (tmp_path / "a" / a[0]["file"]).read_bytes() == (tmp_path / "b" / b[0]["file"]).read_bytes()
    with pytest.raises(ValueError):
        synth.write_dataset(tmp_path / "c", count=2, seed=8, null_every=1)


def test_free_flights_leave_the_table_videos_as_they_were_and_draw_the_rest_attribute_by_attribute(tmp_path):
    synth.write_dataset(tmp_path / "table", count=4, seed=8, max_seconds=3.0, workers=1)
    synth.write_dataset(tmp_path / "none", count=4, seed=8, max_seconds=3.0, workers=1, free_flight_share=0.0)
    # share 0 is the table alone, byte for byte (records and files)
    assert (tmp_path / "table" / "labels.jsonl").read_bytes() == (tmp_path / "none" / "labels.jsonl").read_bytes()
    assert (tmp_path / "table" / "video_00001.mp4").read_bytes() == (tmp_path / "none" / "video_00001.mp4").read_bytes()
    routines = [synth.sample_routine(np.random.default_rng([s, 0]), s, 3.0, free_flight_share=1.0) for s in range(200)]
    flights = {tuple(r.labels[q] for q in vocab.QUERIES[1:]) for r in routines}
    table = {c[1:] for c in vocab.CLASSES}
    assert len(flights - table) > 40  # off the table's 12 flights
    for r in routines:  # the take-off and the nuisances are the table routine's
        same = synth.sample_routine(np.random.default_rng([r.seed, 0]), r.seed, 3.0)
        assert r.labels["take_off"] == same.labels["take_off"] and r.rotation_phase == same.rotation_phase
        assert r.flight_table == (vocab.class_name(r.labels) in vocab.CLASS_NAMES)
        assert ("flight_table" in synth.labels_for(r, 15)) == (not r.flight_table)
    # pose and twists no longer fix each other the way the table does
    twists_of = {}
    for r in routines:
        twists_of.setdefault((r.labels["flight_pose"], r.labels["somersaults"]), set()).add(r.labels["twists"])
    assert all(len(t) > 1 for t in twists_of.values())
    with pytest.raises(ValueError):
        synth.sample_routine(np.random.default_rng(0), 1, 3.0, free_flight_share=1.5)


def test_figure_pixels_are_where_the_head_and_torso_are_drawn():
    """The oracle of export.diagnose_counts reads frames where figure_pixels says the figure is."""
    routine = synth.sample_routine(np.random.default_rng([4, 0]), 4, 4.0)
    scene = synth._Scene(routine, 112, 112, 15)
    t1, t2 = synth.phase_times(routine)[1:3]
    for i in range(int(np.ceil(t1 * 15)), int(t2 * 15)):
        frame = scene.frame(i).astype(int)
        at, facing = scene.figure_pixels(i / 15)
        x, y = at["head"]
        assert np.abs(frame[y, x] - synth.SKIN_COLOUR).max() <= 12  # sensor noise adds up to 8
        x, y = ((np.asarray(at["hip"]) + at["neck"]) / 2).round().astype(int)
        front = (1 + facing) / 2
        torso = np.asarray(synth.FRONT_COLOUR) * front + np.asarray(synth.BACK_COLOUR) * (1 - front)
        if (y - at["head"][1]) ** 2 + (x - at["head"][0]) ** 2 > 16:  # the head is drawn over the neck end
            assert np.abs(frame[y, x] - torso).max() <= 12


@pytest.mark.parametrize("codec", ["vp9", "mpeg4"])
def test_other_codecs_encode(tmp_path, codec):
    path = tmp_path / f"v{synth.CODECS[codec][0]}"
    labels = synth.render_video(path, seed=2, seconds=2.5, codec=codec)
    assert len(decord.VideoReader(str(path), num_threads=1)) == labels["num_frames"]


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError):
        synth.write_dataset(tmp_path, count=0, seed=1)
    with pytest.raises(ValueError):
        synth.render_video(tmp_path / "x.mp4", seed=1, seconds=3, codec="nope")


# ---------------------------------------------------------------- no single-frame shortcut
def _figure_crops(count: int, seed: int, *, phase_free: bool = True, size: int = 32):
    """One random flight or entry frame per routine, cropped around the figure (a strong probe:
    it never has to find the diver), plus the labels of every query."""
    rng = np.random.default_rng(seed)
    crops, labels = [], {q: [] for q in vocab.QUERIES}
    for i in range(count):
        routine = synth.sample_routine(np.random.default_rng([seed, i]), 1000 * seed + i, 4.0)
        if not phase_free:  # generator v1's leak: rotation and twist start from the same phase
            routine = synth.Routine(**{**routine.__dict__, "rotation_phase": 0.0, "twist_phase": 0.0})
        t1, _, t3 = synth.phase_times(routine)[1:]
        index = int(rng.uniform(t1, t3 - 0.05) * 15)
        scene = synth._Scene(routine, 112, 112, 15)
        *_, lift, travel = synth._body_state(routine, index / 15)
        x = int(scene.board_x + scene.travel * travel) + 32
        y = int(scene.board_y - scene.scale * (0.5 + lift)) + 32
        image = np.pad(scene.frame(index), ((32, 32), (32, 32), (0, 0)))[y - 32 : y + 32, x - 32 : x + 32]
        crops.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
        for q in vocab.QUERIES:
            labels[q].append(vocab.ATTRIBUTES[q].index(routine.labels[q]))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255  # B, C, H, W
    return x, {q: torch.tensor(v) for q, v in labels.items()}


def _single_frame_accuracy(phase_free: bool) -> dict[str, tuple[float, float]]:
    """Held-out accuracy and majority rate per query of a tiny CNN trained for a few seconds."""
    torch.manual_seed(0)
    queries = ("somersaults", "twists", "flight_pose")
    x_train, y_train = _figure_crops(900, 1, phase_free=phase_free)
    x_test, y_test = _figure_crops(250, 2, phase_free=phase_free)
    trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    heads = nn.ModuleList(nn.Linear(128, len(vocab.ATTRIBUTES[q])) for q in queries)
    opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], 3e-3)
    for _ in range(400):
        batch = torch.randint(0, len(x_train), (64,))
        features = trunk(x_train[batch])
        loss = sum(nn.functional.cross_entropy(h(features), y_train[q][batch]) for q, h in zip(queries, heads))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        features = trunk(x_test)
        return {q: (float((h(features).argmax(1) == y_test[q]).float().mean()),
                    float(np.bincount(y_test[q].numpy()).max() / len(y_test[q])))
                for q, h in zip(queries, heads)}


def test_no_count_can_be_read_from_a_single_frame():
    """A per-frame classifier stays near chance on somersaults and twists, while the same probe
    reads flight pose (a single-frame attribute) and catches v1's fixed-phase leak."""
    fair = _single_frame_accuracy(phase_free=True)
    for q in ("somersaults", "twists"):
        accuracy, chance = fair[q]
        assert accuracy <= chance + 0.1, (q, fair)
    accuracy, chance = fair["flight_pose"]
    assert accuracy >= chance + 0.2, fair  # the probe is able to learn what a frame does show
    leaky = _single_frame_accuracy(phase_free=False)
    assert max(leaky[q][0] - leaky[q][1] for q in ("somersaults", "twists")) >= 0.12, leaky
