import json

import decord
import numpy as np
import pytest

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
    assert a == b
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
