import numpy as np
import pytest

from server.pipeline.chunk import ClipAssembler, clip_spans, cut_clips, pad_clip


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
