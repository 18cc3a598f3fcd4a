import numpy as np
import pytest

from server.pipeline.chunk import ClipAssembler, TimeGrid, clip_spans, cut_clips, pad_clip


def _frames(n: int, size: int = 4) -> np.ndarray:
    # Frame i is filled with the value i, so clips can be checked by value.
    return np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, size, size, 3), np.uint8)


def _times(n: int, fps: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(n) / fps
    return starts, starts + 1 / fps


def test_dense_contiguous_non_overlapping():
    frames = _frames(24)
    clips, spans = cut_clips(frames, *_times(24), clip_frames=8)
    assert clips.shape == (3, 8, 4, 4, 3)
    np.testing.assert_array_equal(clips[:, :, 0, 0, 0], np.arange(24).reshape(3, 8))
    np.testing.assert_allclose(spans, [[0.0, 0.8], [0.8, 1.6], [1.6, 2.4]])


def test_final_partial_clip_repeats_last_frame_and_spans_real_frames():
    clips, spans = cut_clips(_frames(11), *_times(11), clip_frames=8)
    assert clips.shape[0] == 2
    np.testing.assert_array_equal(clips[1, :, 0, 0, 0], [8, 9, 10, 10, 10, 10, 10, 10])
    np.testing.assert_allclose(spans[1], [0.8, 1.1])


def test_video_shorter_than_one_clip_is_one_clip():
    clips, spans = cut_clips(_frames(3), *_times(3), clip_frames=8)
    assert clips.shape == (1, 8, 4, 4, 3)
    np.testing.assert_array_equal(clips[0, :, 0, 0, 0], [0, 1, 2, 2, 2, 2, 2, 2])
    np.testing.assert_allclose(spans, [[0.0, 0.3]])


def test_no_frames_no_clips():
    clips, spans = cut_clips(_frames(0), *_times(0), clip_frames=8)
    assert clips.shape[0] == 0 and spans.shape == (0, 2)


def test_spans_come_from_timestamps_not_index_over_fps():
    # Variable frame rate: the second half runs at 4x the frame interval.
    starts = np.array([0, 0.1, 0.2, 0.3, 0.7, 1.1, 1.5, 1.9])
    ends = starts + np.array([0.1, 0.1, 0.1, 0.4, 0.4, 0.4, 0.4, 0.4])
    spans = clip_spans(starts, ends, clip_frames=4)
    np.testing.assert_allclose(spans, [[0.0, 0.7], [0.7, 2.3]])


def test_incremental_pushes_match_one_cut():
    frames = _frames(37)
    starts, ends = _times(37)
    expected, expected_spans = cut_clips(frames, starts, ends, clip_frames=8)
    assembler = ClipAssembler(8)
    got, got_spans = [], []
    for lo, hi in [(0, 3), (3, 5), (5, 20), (20, 21), (21, 37)]:
        clips, spans = assembler.push(frames[lo:hi], starts[lo:hi], ends[lo:hi])
        got.append(clips)
        got_spans.append(spans)
        assert assembler.pending < 8
    clips, spans = assembler.flush()
    got.append(clips)
    got_spans.append(spans)
    np.testing.assert_array_equal(np.concatenate(got), expected)
    np.testing.assert_allclose(np.concatenate(got_spans), expected_spans)
    assert assembler.flush()[0].shape[0] == 0


def test_pad_clip_rejects_bad_lengths():
    with pytest.raises(ValueError):
        pad_clip(_frames(0), 8)
    with pytest.raises(ValueError):
        pad_clip(_frames(9), 8)


def test_mismatched_timestamps_are_rejected():
    with pytest.raises(ValueError):
        ClipAssembler(8).push(_frames(4), np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        ClipAssembler(0)


def _picked(fps_in: float, fps_out: float, n: int, chunk: int = 7, offset: float = 0.0):
    """Frames (indices) and tick times a TimeGrid picks, fed in chunks as the decoder does."""
    grid = TimeGrid(fps_out)
    starts = offset + np.arange(n) / fps_in
    ends = starts + 1 / fps_in
    picked, ticks = [], []
    for i in range(0, n, chunk):
        index, times = grid.pick(starts[i : i + chunk], ends[i : i + chunk])
        picked += (index + i).tolist()
        ticks += times.tolist()
    return picked, ticks


@pytest.mark.parametrize(
    ("fps_in", "expected"),
    [
        (15, list(range(8))),  # the encoder's own rate: every frame, once
        (30, [0, 2, 4, 6, 8, 10, 12, 14]),
        (60, [0, 4, 8, 12, 16, 20, 24, 28]),
        (25, [0, 1, 3, 5, 6, 8, 10, 11]),  # the frame showing at each 1/15 s tick
        (10, [0, 0, 1, 2, 2, 3, 4, 4]),  # slower than the grid: frames repeat
    ],
)
def test_time_grid_picks_the_frame_showing_at_each_tick(fps_in, expected):
    picked, ticks = _picked(fps_in, 15, n=int(fps_in * 8 / 15) + 1)
    assert picked[:8] == expected
    np.testing.assert_allclose(ticks[:8], np.arange(8) / 15)


def test_time_grid_is_anchored_at_the_first_frame_and_fills_gaps():
    # A stream starting at 5 s, with frames 3..5 missing: the ticks in the gap go to frame 6.
    grid = TimeGrid(15)
    starts = 5.0 + np.array([0, 1, 2, 6, 7]) / 15
    index, ticks = grid.pick(starts, starts + 1 / 15)
    assert index.tolist() == [0, 1, 2, 3, 3, 3, 3, 4]
    np.testing.assert_allclose(ticks, 5.0 + np.arange(8) / 15)


def test_time_grid_rejects_a_bad_rate():
    with pytest.raises(ValueError):
        TimeGrid(0)


def test_time_grid_keeps_every_frame_at_its_own_rate_despite_float32_times():
    # decord reports float32 seconds: 20 s in, a frame's end is off the tick by ~3e-5 ticks.
    starts = (np.arange(300) / 15).astype(np.float32)
    ends = ((np.arange(300) + 1) / 15).astype(np.float32)
    index, _ = TimeGrid(15).pick(starts, ends)
    assert index.tolist() == list(range(300))
