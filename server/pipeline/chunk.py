"""Sample decoded frames at the clip encoder's frame rate and cut them into dense, contiguous,
non-overlapping clips.

The encoder learnt motion at one frame rate (`clip_fps`, 15 for `s3d`): a 30 fps video cut into
clips of consecutive frames shows it half the motion per clip, and its answers collapse (measured
on 40 synthetic videos: somersaults 98% at 15 fps, 38% at 30 fps). `TimeGrid` picks, for every
tick of a grid at `clip_fps` anchored at the first frame, the frame showing at that tick (a
frame repeats when the video is slower than the grid).

A clip holds `clip_frames` consecutive frames. The final partial clip is padded by repeating its
last real frame, so a video shorter than one clip becomes exactly one clip. A clip's span is
[start of its first frame, end of its last real frame], where a frame's end is its timestamp plus
its duration: spans come from timestamps, never from index / fps (variable frame rate exists).
"""

from __future__ import annotations

import numpy as np


def _check_frames(frames: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [n, height, width, 3], got {frames.shape}")
    if starts.shape != (len(frames),) or ends.shape != (len(frames),):
        raise ValueError(
            f"need one start and one end per frame: {len(frames)} frames, "
            f"{starts.shape} starts, {ends.shape} ends"
        )


class TimeGrid:
    """Incremental frame sampler at `fps`: push frames in display order, get back which to keep.

    Tick k is at `origin + k / fps` (origin: the first frame's start); a frame [start, end) takes
    every tick before its end not taken yet, so a tick in a gap between frames goes to the next one.
    """

    # Ticks within this many ticks of a frame's end belong to the next frame: decoders report
    # float32 times (off by ~3e-5 ticks at 20 s), far finer than any frame (0.06 ticks at 240 fps).
    _TOLERANCE = 1e-3

    def __init__(self, fps: float) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.fps = fps
        self.origin: float | None = None
        self.ticks = 0  # ticks taken so far

    def pick(self, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices into these frames, repeated or skipped; the tick time of each)."""
        starts = np.asarray(starts, np.float64)
        ends = np.asarray(ends, np.float64)
        if len(starts) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        if self.origin is None:
            self.origin = float(starts[0])
        # Ticks before each frame's end, never fewer than those already taken.
        before_end = np.ceil((ends - self.origin) * self.fps - self._TOLERANCE).astype(np.int64)
        before_end = np.maximum.accumulate(np.maximum(before_end, self.ticks))
        counts = np.diff(before_end, prepend=self.ticks)
        indices = np.repeat(np.arange(len(starts)), counts)
        times = self.origin + np.arange(self.ticks, before_end[-1]) / self.fps
        self.ticks = int(before_end[-1])
        return indices, times


def pad_clip(frames: np.ndarray, clip_frames: int) -> np.ndarray:
    """Return `clip_frames` frames: `frames` followed by copies of its last frame."""
    if not 0 < len(frames) <= clip_frames:
        raise ValueError(f"need 1..{clip_frames} frames to pad, got {len(frames)}")
    missing = clip_frames - len(frames)
    if missing == 0:
        return frames
    return np.concatenate([frames, np.repeat(frames[-1:], missing, axis=0)])


def clip_spans(starts: np.ndarray, ends: np.ndarray, clip_frames: int) -> np.ndarray:
    """Spans [n_clips, 2] of the clips cut from frames with these start/end timestamps."""
    if clip_frames < 1:
        raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
    n = len(starts)
    if n == 0:
        return np.zeros((0, 2), np.float64)
    first = np.arange(0, n, clip_frames)
    last = np.minimum(first + clip_frames, n) - 1
    return np.stack([np.asarray(starts, np.float64)[first], np.asarray(ends, np.float64)[last]], 1)


def cut_clips(
    frames: np.ndarray, starts: np.ndarray, ends: np.ndarray, clip_frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """All clips of a whole frame sequence: (clips [n, T, H, W, 3], spans [n, 2])."""
    assembler = ClipAssembler(clip_frames)
    full, full_spans = assembler.push(frames, starts, ends)
    last, last_spans = assembler.flush()
    return np.concatenate([full, last]), np.concatenate([full_spans, last_spans])


class ClipAssembler:
    """Incremental `cut_clips`: push frames as they are decoded, take complete clips out.

    Holds at most one partial clip (fewer than `clip_frames` frames) between pushes.
    """

    def __init__(self, clip_frames: int) -> None:
        if clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
        self.clip_frames = clip_frames
        self._frames: np.ndarray | None = None  # n < T, H, W, 3
        self._starts = np.zeros(0, np.float64)
        self._ends = np.zeros(0, np.float64)

    @property
    def pending(self) -> int:
        return len(self._starts)

    def push(
        self, frames: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Add frames; return the clips they complete and their spans (possibly none)."""
        starts = np.asarray(starts, np.float64)
        ends = np.asarray(ends, np.float64)
        _check_frames(frames, starts, ends)
        if self._frames is not None and self.pending:
            if frames.shape[1:] != self._frames.shape[1:]:
                raise ValueError(f"frame shape changed: {self._frames.shape[1:]} -> {frames.shape[1:]}")
            frames = np.concatenate([self._frames, frames])
            starts = np.concatenate([self._starts, starts])
            ends = np.concatenate([self._ends, ends])
        t = self.clip_frames
        n_full = len(frames) // t
        cut = n_full * t
        clips = frames[:cut].reshape(n_full, t, *frames.shape[1:])  # n, T, H, W, 3
        spans = clip_spans(starts[:cut], ends[:cut], t)
        # Copy the remainder so the caller's buffer is not kept alive.
        self._frames = frames[cut:].copy() if cut < len(frames) else frames[:0].copy()
        self._starts = starts[cut:]
        self._ends = ends[cut:]
        return clips, spans

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """The padded final partial clip (one clip), or no clip if nothing is pending."""
        if self._frames is None or not self.pending:
            shape = (0, self.clip_frames) + (self._frames.shape[1:] if self._frames is not None else (0, 0, 3))
            return np.zeros(shape, np.uint8), np.zeros((0, 2), np.float64)
        clip = pad_clip(self._frames, self.clip_frames)[None]
        spans = clip_spans(self._starts, self._ends, self.clip_frames)
        self._frames = self._frames[:0]
        self._starts = self._starts[:0]
        self._ends = self._ends[:0]
        return clip, spans
