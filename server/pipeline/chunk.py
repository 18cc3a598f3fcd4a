"""Sample decoded frames at the clip encoder's frame rate and cut them into dense, contiguous,
non-overlapping clips.

The encoder learnt motion at one frame rate (`clip_fps`, 15 for `s3d`): a 30 fps video cut into
clips of consecutive frames shows it half the motion per clip, and its answers collapse (see the
README). `TimeGrid` picks, for every
tick of a grid at `clip_fps` anchored at the first frame, the frame showing at that tick (a
frame repeats when the video is slower than the grid).

A clip holds `clip_frames` consecutive frames. The final partial clip is padded by repeating its
last real frame, so a video shorter than one clip becomes exactly one clip. A clip's span is
[start of its first frame, end of its last real frame], where a frame's end is its timestamp plus
its duration: spans come from timestamps, never from index / fps (variable frame rate exists).

Real files carry broken timestamps: none at all (raw `.h264`), none on some frames (B-frames of
packed DivX/Xvid AVIs), repeated, out of order, or jumping days ahead and back. `FrameTimes`
repairs the decoder's per-frame starts and durations (NaN where unknown) before anything reads
them, frame by frame in display order, so every frame starts after the previous one and lasts a
positive time:
- a missing or absurd (beyond 1e8 s) start becomes the previous frame's end; a duration that is
  missing, not positive or longer than `max_gap_s` becomes the last good one (else an estimate
  from the chunk's timestamps, else 1/30 s);
- stamps out of order among a few neighbours are the frames' in sorted order (decoders output
  display order: a muxer swapped them), as decord's index assigns them;
- a start not after the previous one (repeated, out of order) becomes the previous frame's end;
  a jump back by more than `max_gap_s` means the clock was reset (streams spliced together): the
  times after it are shifted to continue from the previous frame;
- a start more than `max_gap_s` after the previous frame's end is a gap. If a frame among the next
  few returns to the old times, the jump was a few bad timestamps: they count as missing.
  Otherwise the gap stays, with its real times.
A clock that jumps back more than `max_backward_jumps` times, in more than one frame in a hundred,
cannot be trusted: `InvalidInput` says so.

Gaps are discontinuities, not frozen stretches: `TimeGrid` puts no ticks inside a gap longer than
`max_gap_s` (the frame before it lasts its own, bounded, duration) and re-anchors its grid at the
first frame after it. Clip spans keep the real times, so a clip that straddles a gap spans it. A
3000 s gap between two 1 s recordings thus costs the clips of 2 s of video, not 3000 s of one
repeated frame, and one frame never yields more than `2 max_gap_s x fps` samples. Repeating the
frame across the gap and encoding the repeated clip once would also bound the encoder calls, but
would still answer with thousands of clips of nothing and make every later stage understand
repeated clips.
"""

from __future__ import annotations

import numpy as np

from server.errors import InvalidInput

# Starts beyond this many seconds (about 3 years) are garbage, e.g. decord's -3.7e17 for "none".
ABSURD_S = 1e8
# Frames after a forward jump searched for a return to the old times (the jump was a glitch).
LOOKAHEAD = 8
# The duration of a frame when neither it, the frames before it nor its chunk say better.
DEFAULT_FRAME_S = 1 / 30


def _check_frames(frames: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [n, height, width, 3], got {frames.shape}")
    if starts.shape != (len(frames),) or ends.shape != (len(frames),):
        raise ValueError(
            f"need one start and one end per frame: {len(frames)} frames, "
            f"{starts.shape} starts, {ends.shape} ends"
        )


def _unswapped(starts: np.ndarray) -> np.ndarray:
    """Decoders output frames in display order, so stamps out of that order (a muxer's swapped
    pairs, packed B-frames) belong to the frames in sorted order, as decord assigns its index's:
    sorted, where that moves no stamp by more than `LOOKAHEAD` frames (a farther one is a jump)."""
    with np.errstate(invalid="ignore"):
        if not (np.diff(starts) < 0).any():  # NaN compares False
            return starts
    known = np.flatnonzero(np.abs(starts) < ABSURD_S)
    order = np.argsort(starts[known], kind="stable")
    if np.abs(order - np.arange(len(order))).max(initial=0) > LOOKAHEAD:
        return starts
    starts = starts.copy()
    starts[known] = starts[known][order]
    return starts


class FrameTimes:
    """Repairs decoder timestamps into increasing frame times; one per video, fed chunk by chunk
    in display order. See the module docstring for the rules."""

    def __init__(
        self,
        *,
        max_gap_s: float = 5.0,
        frame_duration: float | None = None,
        max_backward_jumps: int = 8,
    ) -> None:
        if not max_gap_s > 0:
            raise ValueError(f"max_gap_s must be > 0, got {max_gap_s}")
        if frame_duration is not None and not 0 < frame_duration <= max_gap_s:
            raise ValueError(f"frame_duration must be in (0, max_gap_s], got {frame_duration}")
        self.max_gap_s = max_gap_s
        self.frame_duration = frame_duration  # the last good duration seen (or the container's)
        self.max_backward_jumps = max_backward_jumps
        self.start: float | None = None  # of the last frame, repaired
        self.end: float | None = None  # of the last frame, repaired
        self.offset = 0.0  # added to raw times after a clock reset
        self.frames = 0
        self.repaired = 0  # frames whose start was changed
        self.backward_jumps = 0

    def repair(self, starts: np.ndarray, durations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of these frames, repaired: finite, increasing starts, ends > starts."""
        starts = np.asarray(starts, np.float64) + self.offset
        durations = np.asarray(durations, np.float64)
        if starts.shape != durations.shape or starts.ndim != 1:
            raise ValueError(f"need one duration per start: {starts.shape} vs {durations.shape}")
        if len(starts) == 0:
            return starts, starts.copy()
        starts = _unswapped(starts)
        durations = self._durations_from_steps(starts, durations)
        if not self._sane(starts, durations):
            return self._repair(starts, durations)
        self.frame_duration = float(durations[-1])
        self.start, self.end = float(starts[-1]), float(starts[-1] + durations[-1])
        self.frames += len(starts)
        return starts, starts + durations

    def _durations_from_steps(self, starts: np.ndarray, durations: np.ndarray) -> np.ndarray:
        """Missing durations (many containers store none) from the step to the next start where
        that step is plausible; the last frame's from the frame before it."""
        with np.errstate(invalid="ignore"):
            missing = ~((durations > 0) & (durations <= self.max_gap_s))
            if not missing.any():
                return durations
            steps = np.diff(starts)
            fill = missing[:-1] & (steps > 0) & (steps <= self.max_gap_s)
            durations = durations.copy()
            durations[:-1][fill] = steps[fill]
            if missing[-1] and len(durations) > 1 and fill[-1]:
                durations[-1] = durations[-2]
        return durations

    def _sane(self, starts: np.ndarray, durations: np.ndarray) -> bool:
        """The common case, checked at numpy speed: nothing to repair."""
        with np.errstate(invalid="ignore"):
            ok = (
                (np.abs(starts) < ABSURD_S).all()  # False for NaN
                and (durations > 0).all()
                and (durations <= self.max_gap_s).all()
                and (np.diff(starts) > 0).all()
                and (starts[1:] - (starts + durations)[:-1] <= self.max_gap_s).all()
            )
        if ok and self.start is not None:
            ok = self.start < starts[0] <= self.end + self.max_gap_s
        return bool(ok)

    def _estimate(self, starts: np.ndarray, valid: np.ndarray) -> float | None:
        """A frame duration from these timestamps: the mean step from the first valid start to the
        first frame stamped with the last one, if plausible (single steps are useless when stamps
        repeat)."""
        index = np.flatnonzero(valid)
        if len(index) < 2:
            return None
        first, last = index[0], index[np.argmax(starts[index] == starts[index[-1]])]
        if last == first:
            return None
        step = (starts[last] - starts[first]) / (last - first)
        return float(step) if 0 < step <= self.max_gap_s else None

    def _repair(self, starts: np.ndarray, durations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(starts)
        with np.errstate(invalid="ignore"):
            valid = np.abs(starts) < ABSURD_S
            good = (durations > 0) & (durations <= self.max_gap_s)
        estimate = self._estimate(starts, valid)
        raw = starts.tolist()
        spread = self._spread(raw, valid)
        # Stamps that repeat come from a clock slower than the frames: durations from the
        # container's rate then overstate the frames' (a run split by the chunk's end has no
        # spread yet), so none may exceed this chunk's mean step.
        cap = estimate if estimate and any(spread) else np.inf
        out = np.empty(n, np.float64)
        ends = np.empty(n, np.float64)
        for i in range(n):
            if good[i]:
                self.frame_duration = float(durations[i])
            duration = spread[i] or min(self.frame_duration or estimate or DEFAULT_FRAME_S, cap)
            start = raw[i]
            if self.start is None:
                if not valid[i]:
                    start = 0.0
                    self.repaired += 1
            elif not valid[i]:
                start = self.end
                self.repaired += 1
            elif start <= self.start:
                if self.start - start > self.max_gap_s:
                    self._clock_reset(i)
                    self.offset += self.end - start
                    raw[i:] = (starts[i:] + (self.end - start)).tolist()
                else:
                    self.repaired += 1
                    if estimate and not spread[i]:  # stamped, but by a slower clock
                        duration = min(duration, estimate)
                start = self.end
            elif start > self.end + self.max_gap_s and self._returns(raw, valid, i):
                start = self.end  # a glitch: the next frames are back on the old times
                self.repaired += 1
            out[i] = start
            ends[i] = start + duration
            self.start, self.end = start, start + duration
        self.frames += n
        return out, ends

    def _spread(self, raw: list[float], valid: np.ndarray) -> list[float]:
        """Per frame, for runs of frames sharing one timestamp: the step that spreads them evenly
        up to the next, greater timestamp in these frames (0 elsewhere)."""
        spread = [0.0] * len(raw)
        i = 0
        while i < len(raw):
            j = i + 1
            while j < len(raw) and valid[i] and valid[j] and raw[j] == raw[i]:
                j += 1
            if j - i > 1 and j < len(raw) and valid[j] and 0 < raw[j] - raw[i] <= self.max_gap_s:
                spread[i:j] = [(raw[j] - raw[i]) / (j - i)] * (j - i)
            i = j
        return spread

    def _returns(self, raw: list[float], valid: np.ndarray, i: int) -> bool:
        """Whether a frame among the LOOKAHEAD after frame i is back near the times before it."""
        for j in range(i + 1, min(i + 1 + LOOKAHEAD, len(raw))):
            if valid[j] and self.start < raw[j] <= self.end + self.max_gap_s:
                return True
        return False

    def _clock_reset(self, i: int) -> None:
        self.backward_jumps += 1
        self.repaired += 1
        seen = self.frames + i + 1
        if self.backward_jumps > self.max_backward_jumps and self.backward_jumps * 100 > seen:
            raise InvalidInput(
                f"the video's timestamps cannot be repaired: they jump back by more than "
                f"{self.max_gap_s:g} s {self.backward_jumps} times in its first {seen} frames"
            )


class TimeGrid:
    """Incremental frame sampler at `fps`: push frames in display order (times repaired by
    `FrameTimes`), get back which to keep.

    Tick k is at `origin + k / fps` (origin: the first frame's start, and again the first start
    after each discontinuity: a gap of more than `max_gap_s` since the previous frame's end); a
    frame [start, end) takes every tick before its end not taken yet, so a tick in a shorter gap
    between frames goes to the next one.
    """

    # Ticks within this many ticks of a frame's end belong to the next frame: decoders report
    # float32 times (off by ~3e-5 ticks at 20 s), far finer than any frame (0.06 ticks at 240 fps).
    _TOLERANCE = 1e-3

    def __init__(self, fps: float, *, max_gap_s: float = 5.0) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not max_gap_s > 0:
            raise ValueError(f"max_gap_s must be > 0, got {max_gap_s}")
        self.fps = fps
        self.max_gap_s = max_gap_s
        self.origin: float | None = None
        self.ticks = 0  # ticks taken since the origin
        self.last_end: float | None = None

    def pick(self, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices into these frames, repeated or skipped; the tick time of each)."""
        indices, times, _ = self.sample(starts, ends)
        return indices, times

    def sample(
        self, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices into these frames, repeated or skipped; start and end of each sample).

        A sample lasts one tick (clips tile time), but never past the last frame before a
        discontinuity or the last of these frames.
        """
        starts = np.asarray(starts, np.float64)
        ends = np.asarray(ends, np.float64)
        if len(starts) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.float64)
        if not (np.isfinite(starts).all() and np.isfinite(ends).all()):
            raise ValueError("frame times must be finite: repair them with FrameTimes first")
        # A frame is never held longer than max_gap_s, whatever its end says.
        ends = np.minimum(ends, starts + self.max_gap_s)
        last_end = np.inf if self.last_end is None else self.last_end
        previous_ends = np.concatenate([[last_end], ends[:-1]])
        gaps = np.flatnonzero(starts - previous_ends > self.max_gap_s)
        self.last_end = float(ends[-1])
        cuts = [0, *gaps[gaps > 0], len(starts)]
        parts = [self._run(starts, ends, lo, hi, lo in gaps) for lo, hi in zip(cuts, cuts[1:])]
        indices, times, sample_ends = (np.concatenate(arrays) for arrays in zip(*parts))
        return indices, times, sample_ends

    def _run(
        self, starts: np.ndarray, ends: np.ndarray, lo: int, hi: int, after_gap: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples of frames lo..hi, with no discontinuity between them."""
        if self.origin is None or after_gap:
            self.origin = float(starts[lo])
            self.ticks = 0
        ends = ends[lo:hi]
        # Ticks before each frame's end, never fewer than those already taken.
        before_end = np.ceil((ends - self.origin) * self.fps - self._TOLERANCE).astype(np.int64)
        before_end = np.maximum.accumulate(np.maximum(before_end, self.ticks))
        counts = np.diff(before_end, prepend=self.ticks)
        indices = lo + np.repeat(np.arange(hi - lo), counts)
        times = self.origin + np.arange(self.ticks, before_end[-1]) / self.fps
        self.ticks = int(before_end[-1])
        return indices, times, np.minimum(times + 1 / self.fps, ends.max())


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
