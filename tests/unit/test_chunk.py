import numpy as np
import pytest

from server.errors import InvalidInput
from server.pipeline.chunk import (
    ClipAssembler,
    FrameTimes,
    TimeGrid,
    clip_spans,
    cut_clips,
    pad_clip,
)


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


# -- broken timestamps (FrameTimes) and gaps (TimeGrid) -------------------------------------------

NAN = float("nan")
# What decord reports for a frame without a timestamp: FFmpeg's INT64_MIN in a 1/25 s time base.
DECORD_NO_PTS = -3.689348732278538e17


def _repaired(starts, durations, chunk: int | None = None, **kwargs):
    times = FrameTimes(**kwargs)
    starts, durations = np.asarray(starts, float), np.asarray(durations, float)
    chunk = chunk or len(starts)
    parts = [
        times.repair(starts[i : i + chunk], durations[i : i + chunk])
        for i in range(0, len(starts), chunk)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), times


def _assert_sane(starts, ends):
    assert np.isfinite(starts).all() and np.isfinite(ends).all()
    assert (np.diff(starts) > 0).all()
    assert (ends > starts).all()


def test_sane_times_pass_unchanged():
    starts, ends = _times(20, fps=25)
    got_starts, got_ends, times = _repaired(starts, ends - starts, chunk=7)
    np.testing.assert_array_equal(got_starts, starts)
    np.testing.assert_allclose(got_ends, ends)
    assert times.repaired == 0 and times.end == pytest.approx(0.8)


def test_missing_durations_come_from_the_next_start():
    # Variable frame rate in a container that stores no durations.
    raw = np.array([0.0, 0.1, 0.2, 0.6, 1.0, 1.4])
    starts, ends, times = _repaired(raw, np.full(6, NAN))
    np.testing.assert_allclose(starts, raw)
    np.testing.assert_allclose(ends, [0.1, 0.2, 0.6, 1.0, 1.4, 1.8])
    assert times.repaired == 0


def test_missing_starts_continue_from_the_previous_frame():
    starts, ends, times = _repaired([0.0, NAN, NAN, 0.12, NAN], [0.04, NAN, 0.04, 0.04, NAN])
    np.testing.assert_allclose(starts, [0.0, 0.04, 0.08, 0.12, 0.16])
    np.testing.assert_allclose(ends, starts + 0.04)
    assert times.repaired == 3


def test_no_timestamps_at_all_use_the_durations_or_a_default():
    # A raw .h264 stream: no start anywhere; the decoder may still know the frame duration.
    starts, _, _ = _repaired([NAN] * 10, [0.04] * 10, chunk=4)
    np.testing.assert_allclose(starts, np.arange(10) * 0.04)
    starts, ends, _ = _repaired([NAN] * 10, [NAN] * 10, chunk=4)
    _assert_sane(starts, ends)
    np.testing.assert_allclose(np.diff(starts), 1 / 30)


def test_decords_no_timestamp_value_counts_as_missing():
    # A packed-B-frame Xvid AVI as decord reads it: the first frames carry INT64_MIN * time base.
    raw = np.r_[[DECORD_NO_PTS] * 18, 0.72 + np.arange(32) * 0.04]
    starts, ends, _ = _repaired(raw, np.full(50, 0.04))
    _assert_sane(starts, ends)
    np.testing.assert_allclose(starts, np.arange(50) * 0.04)


def test_repeated_timestamps_are_spread_over_the_frames():
    # A capture stamping every third frame's time on three frames, without durations.
    raw = (np.arange(48) // 3) * 0.12
    starts, ends, _ = _repaired(raw, np.full(48, NAN))
    _assert_sane(starts, ends)
    np.testing.assert_allclose(starts, np.arange(48) * 0.04, atol=1e-9)


def test_repeated_timestamps_win_over_a_container_rate_they_contradict():
    # The same file through PyAV: every frame gets 1 / the container's rate (its 16 stamps in
    # 1.92 s say 8.3 fps) as its duration, while 50 frames share those 16 stamps.
    raw = (np.arange(48) // 3) * 0.12
    starts, ends, _ = _repaired(raw, np.full(48, 0.12), chunk=16, frame_duration=0.12)
    _assert_sane(starts, ends)
    assert starts[-1] == pytest.approx(47 * 0.04, abs=0.13)


def test_out_of_order_timestamps_become_increasing():
    order = [n + 1 if n % 2 == 0 else n - 1 for n in range(50)]  # pairs swapped
    starts, ends, _ = _repaired(np.array(order) * 0.04, np.full(50, 0.04), chunk=16)
    _assert_sane(starts, ends)
    assert starts[-1] == pytest.approx(49 * 0.04, abs=0.05)


def test_stamps_swapped_within_a_chunk_go_to_the_frames_in_sorted_order():
    # Frames come out of a decoder in display order; PyAV reports their stamps as stored (decord
    # sorts its index): swapped pairs without durations must not stretch the video.
    order = [n + 1 if n % 2 == 0 else n - 1 for n in range(50)]
    starts, ends, times = _repaired(np.array(order) * 0.04, np.full(50, np.nan), chunk=50)
    np.testing.assert_allclose(starts, np.arange(50) * 0.04, atol=1e-9)
    assert times.end == pytest.approx(2.0)


def test_a_few_wildly_wrong_timestamps_are_treated_as_missing():
    raw = np.arange(50) * 0.04
    raw[20:22] = 1e6  # 11.5 days ahead, then back
    starts, ends, times = _repaired(raw, np.full(50, 0.04))
    _assert_sane(starts, ends)
    np.testing.assert_allclose(starts, np.arange(50) * 0.04, atol=1e-9)
    assert times.end == pytest.approx(2.0)


def test_a_clock_reset_continues_from_the_previous_frame():
    # Two 1 s recordings spliced together, both stamped from 0 (a jump back beyond the bound).
    raw = np.r_[np.arange(25), np.arange(25)] * 0.04
    starts, ends, times = _repaired(raw, np.full(50, 0.04), chunk=16, max_gap_s=0.5)
    _assert_sane(starts, ends)
    np.testing.assert_allclose(starts, np.arange(50) * 0.04, atol=1e-9)
    assert times.backward_jumps == 1


def test_a_long_gap_forward_keeps_its_real_times():
    raw = np.r_[np.arange(25) * 0.04, 3000 + np.arange(25) * 0.04]
    starts, ends, _ = _repaired(raw, np.full(50, 0.04), chunk=16)
    np.testing.assert_allclose(starts, raw)


def test_timestamps_that_keep_jumping_back_are_invalid_input():
    raw = np.random.default_rng(0).uniform(0, 3000, 200)
    with pytest.raises(InvalidInput, match="cannot be repaired: they jump back"):
        _repaired(raw, np.full(200, 0.04), chunk=64)


def test_a_duration_longer_than_the_gap_bound_is_not_trusted():
    starts, ends, _ = _repaired([0.0, 0.04, 0.08], [0.04, 3000.0, 0.04])
    np.testing.assert_allclose(ends, [0.04, 0.08, 0.12])


def test_repair_checks_its_arguments():
    with pytest.raises(ValueError):
        FrameTimes().repair(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError):
        FrameTimes(max_gap_s=0)


def test_a_long_gap_is_a_discontinuity_not_thousands_of_repeated_samples():
    # 1 s, a 3000 s gap, 1 s (at 25 fps): the grid samples 2 s of video, re-anchored after the gap.
    starts = np.r_[np.arange(25) * 0.04, 3000 + np.arange(25) * 0.04]
    grid = TimeGrid(15)
    picked, ticks, sample_ends = [], [], []
    for i in range(0, 50, 16):
        index, times, ends = grid.sample(starts[i : i + 16], starts[i : i + 16] + 0.04)
        picked += (index + i).tolist()
        ticks += times.tolist()
        sample_ends += ends.tolist()
    assert len(picked) == 30
    np.testing.assert_allclose(ticks, np.r_[np.arange(15) / 15, 3000 + np.arange(15) / 15])
    assert picked[14] == 23 and picked[15] == 25  # the gap takes no ticks
    assert max(sample_ends[:15]) <= 1.0 + 1e-9  # no sample spans into the gap
    assert (np.diff(ticks) > 0).all()


def test_a_long_gap_through_the_clip_assembler_gives_clips_of_real_content():
    times = FrameTimes()
    grid = TimeGrid(15)
    assembler = ClipAssembler(8)
    raw = np.r_[np.arange(25) * 0.04, 3000 + np.arange(25) * 0.04]
    frames = _frames(50)
    spans = []
    for i in range(0, 50, 16):
        starts, ends = times.repair(raw[i : i + 16], np.full(len(raw[i : i + 16]), 0.04))
        index, sample_starts, sample_ends = grid.sample(starts, ends)
        spans.append(assembler.push(frames[i : i + 16][index], sample_starts, sample_ends)[1])
    spans.append(assembler.flush()[1])
    spans = np.concatenate(spans)
    assert len(spans) == 4  # 30 samples
    assert (np.diff(spans[:, 0]) > 0).all() and (spans[:, 1] > spans[:, 0]).all()
    assert spans[1, 0] < 1.0 and spans[1, 1] > 3000  # the clip straddling the gap spans it
    assert spans[-1, 1] == pytest.approx(3001.0)


def test_garbage_but_finite_times_never_make_the_grid_allocate_wildly():
    # Unrepaired decord times of a packed-B-frame AVI: 18 frames at -3.7e17 s, then 0.72 s on.
    starts = np.r_[[DECORD_NO_PTS] * 18, 0.72 + np.arange(32) * 0.04]
    index, _ = TimeGrid(15).pick(starts, starts + 0.04)
    assert len(index) < 50


def test_one_frame_is_held_at_most_the_gap_bound():
    index, ticks = TimeGrid(15, max_gap_s=2.0).pick(np.array([0.0, 0.04]), np.array([0.04, 1e6]))
    assert len(index) == 31  # ticks 0 .. 2.0 s, the last before the held frame's end at 2.04 s
    assert ticks[-1] < 2.04


def test_the_grid_wants_repaired_times():
    with pytest.raises(ValueError, match="FrameTimes"):
        TimeGrid(15).pick(np.array([0.0, NAN]), np.array([0.04, NAN]))
