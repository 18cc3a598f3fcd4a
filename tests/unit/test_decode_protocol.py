"""The decode protocol's messages and the two backends on their own, without worker processes."""

from __future__ import annotations

import contextlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from server.pipeline import decode_protocol as msg
from server.pipeline.decode_backends import (
    DecodeFailure,
    DecordBackend,
    Probe,
    PyAVBackend,
    StoppedEarly,
    check_limits,
    choose_backend,
)
from test_decode import media  # noqa: F401 (a fixture)

SIZE = 32


def _job(**kw) -> msg.DecodeJob:
    base = dict(path="x", frame_size=SIZE, chunk_frames=16, threads=1, workers=2, segment_frames=240, sample_fps=None)
    return msg.DecodeJob(**{**base, **kw})


def _probe(**kw) -> Probe:
    base = dict(width=112, height=112, codec="h264", fps=15.0, duration_s=4.0, frames=60, size_bytes=1000)
    return Probe(**{**base, **kw})


@pytest.mark.parametrize(
    "message",
    [
        _job(limits=msg.Limits(max_duration_s=10.0), segment=1, plan=msg.Plan("pyav", (msg.Segment(0), msg.Segment(1, start_pts=9)))),
        msg.Credit(3),
        msg.Release(),
        msg.Exit(),
        msg.Ready(123),
        msg.Arena(3 * 2**20),
        msg.Opened(msg.VideoInfo(15.0, 112, 112, 0, 0.0, "h264", "decord"), msg.Plan("decord", (msg.Segment(0),)), "why"),
        msg.SegmentDone(2, "decord+pyav"),
        msg.Failed("too_large", "too long"),
        msg.Released(88.5),
    ],
    ids=lambda m: type(m).__name__,
)
def test_messages_cross_a_process_boundary_unchanged(message):
    assert pickle.loads(pickle.dumps(message)) == message


def test_one_segment_takes_the_idle_workers_threads_only_for_big_frames():
    from server.pipeline._decode_worker import one_segment_threads
    from server.pipeline.decode import VideoDecoder
    from server.settings import DecodeSettings

    job = VideoDecoder(DecodeSettings(threads_min_pixels=640 * 360))._job(Path("x"), SIZE, None)
    assert job.threads_min_pixels == 640 * 360
    job = _job(threads=1, workers=2, threads_min_pixels=job.threads_min_pixels)
    assert one_segment_threads(_probe(width=112, height=112), job) == 1
    assert one_segment_threads(_probe(width=1280, height=720), job) == 2
    assert one_segment_threads(_probe(width=112, height=112), _job(threads=1, workers=2)) == 2


def test_frames_message_carries_nan_for_missing_times():
    m = msg.Frames(0, np.array([0.0, math.nan]), np.array([math.nan, 0.1]))
    back = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(back.starts, m.starts)
    np.testing.assert_array_equal(back.durations, m.durations)


def test_an_arena_passed_over_the_pipe_is_the_same_memory_on_both_sides():
    import os
    import socket
    from multiprocessing.connection import Connection

    a, b = socket.socketpair()
    worker, parent = Connection(a.detach()), Connection(b.detach())
    fd = os.memfd_create("test-arena")
    os.ftruncate(fd, 4096)
    theirs = msg.map_arena(fd, 4096)
    worker.send(msg.Arena(4096))
    msg.send_fd(worker, fd)
    os.close(fd)
    worker.send(msg.Frames(0, np.zeros(1), np.zeros(1), offset=8, nbytes=4))
    assert parent.recv() == msg.Arena(4096)
    received = msg.recv_fd(parent)
    ours = msg.map_arena(received, 4096)
    os.close(received)
    frames = parent.recv()  # the next message is read intact after the descriptor
    theirs[8:12] = [1, 2, 3, 4]
    assert ours[frames.offset : frames.offset + frames.nbytes].tolist() == [1, 2, 3, 4]
    worker.close()
    parent.close()


def test_backend_choice():
    assert choose_backend(_probe(), 0, _job()) == ("pyav", "")  # decode.backend's default
    job = _job(limits=msg.Limits(decord_max_bytes=10_000, decord_max_frames=1000), preferred_backend="decord")
    assert choose_backend(_probe(), 0, job) == ("decord", "")
    assert choose_backend(_probe(), 1, job)[0] == "pyav"  # rotated
    skipping = _job(sample_fps=15.0, preferred_backend="decord")
    assert choose_backend(_probe(fps=30.0), 0, skipping)[0] == "pyav"  # skips frames
    assert choose_backend(_probe(size_bytes=20_000), 0, job)[0] == "pyav"
    assert choose_backend(_probe(frames=None), 0, job)[0] == "pyav"
    assert choose_backend(_probe(frames=2**31), 0, job)[0] == "pyav"


def test_limits_are_checked_on_what_the_header_claims():
    check_limits(_probe(), msg.Limits(max_frame_pixels=112 * 112, max_duration_s=4.0))
    with pytest.raises(DecodeFailure, match="max_frame_pixels") as err:
        check_limits(_probe(), msg.Limits(max_frame_pixels=100))
    assert err.value.kind == "too_large"
    with pytest.raises(DecodeFailure, match="claims a duration of 4.0 s"):
        check_limits(_probe(), msg.Limits(max_duration_s=3.0))
    with pytest.raises(DecodeFailure, match="claims a duration of 6.0 s"):  # from frames / fps
        check_limits(_probe(duration_s=None, frames=90), msg.Limits(max_duration_s=3.0))


def _all(backend, segment=msg.Segment(0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frames = list(backend.frames(segment))
    if not frames:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros(0), np.zeros(0)
    pictures, starts, durations = zip(*frames)
    return np.stack(pictures), np.array(starts), np.array(durations)


@contextlib.contextmanager
def _opened(path: Path, *backends):
    for backend in backends:
        backend.open(str(path))
    try:
        yield backends
    finally:
        for backend in backends:
            backend.close()


def test_pyav_and_decord_give_the_same_frames_and_times(media):  # noqa: F811
    with _opened(media["h264"], PyAVBackend(SIZE, 1), DecordBackend(SIZE, 1)) as (pyav, decord):
        assert pyav.probe == Probe(112, 112, "h264", 15.0, 4.0, 60, media["h264"].stat().st_size)
        a_frames, a_starts, a_durations = _all(pyav)
        b_frames, b_starts, b_durations = _all(decord)
    assert a_frames.shape == b_frames.shape == (60, SIZE, SIZE, 3)
    np.testing.assert_allclose(a_starts, np.arange(60) / 15, atol=1e-4)
    np.testing.assert_allclose(b_starts, a_starts, atol=1e-4)
    np.testing.assert_allclose(a_durations, 1 / 15, atol=1e-4)
    np.testing.assert_allclose(b_durations, a_durations, atol=1e-4)
    assert np.abs(a_frames.astype(int) - b_frames).mean() < 3  # resize filters differ slightly


def test_pyav_keeps_the_frame_it_peeked_at(media):  # noqa: F811
    pyav = PyAVBackend(SIZE, 1)
    pyav.open(str(media["h264"]))
    try:
        assert pyav.peek_quarter_turns(msg.Segment(0)) == 0
        peeked = _all(pyav)
        again = _all(pyav)  # reopened from the start
    finally:
        pyav.close()
    assert len(peeked[0]) == len(again[0]) == 60
    np.testing.assert_array_equal(peeked[0], again[0])


def test_pyav_segments_meet_exactly(media):  # noqa: F811
    with _opened(media["long"], PyAVBackend(SIZE, 1), PyAVBackend(SIZE, 1)) as (whole, parts):
        segments = parts.split(100, workers=2)  # cut every 6.7 s; keyframes every 16.7 s
        assert len(segments) > 2
        expected = _all(whole)[1]
        got = np.concatenate([_all(parts, s)[1] for s in segments])
    np.testing.assert_array_equal(got, expected)


def test_decord_stopping_short_says_so(media):  # noqa: F811
    decord = DecordBackend(SIZE, 1)
    decord.open(str(media["h264"]))
    decord.times = np.concatenate([decord.times, decord.times[-1:] + 1])  # promises one frame more
    with pytest.raises(StoppedEarly, match="60 of 61"):
        _all(decord)
    decord.close()


def test_decord_refuses_what_it_cannot_open(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    with pytest.raises(DecodeFailure) as err:
        DecordBackend(SIZE, 1).open(str(junk))
    assert err.value.kind == "unsupported" and str(tmp_path) not in err.value.message
