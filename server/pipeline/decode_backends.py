"""The decode backends of the worker process (after pytorchvideo's `EncodedVideo`): one class per
library behind one small interface, `open`, `split`, `frames` (with timestamps), `close`, and
`choose_backend`, the one place that picks which decodes a video.

Every video is first opened by `PyAVBackend`, which reads the container's header (no decoding
but its first frame, for the rotation): the limits are checked on what the header claims before
decord ever sees the file (decord sizes a table by the claimed frame count; an absurd claim aborts
its process). PyAV then either keeps decoding it or hands it to decord.

A frame comes with its start and duration in seconds: the frame's pts, else its dts (PyAV does
not expose FFmpeg's best-effort timestamp); NaN where the decoder has none. Times are never
made up here: the gateway repairs them (`chunk.py`).

Imports only numpy, av and decord (in the worker process).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from server.pipeline.decode_protocol import BackendName, DecodeJob, FailureKind, Limits, Segment

# Consecutive undecodable packets before PyAV gives up.
MAX_BAD_PACKETS = 32
# Shorter segments cost more in opening and seeking than splitting saves.
MIN_SEGMENT_FRAMES = 60
# Segments of one video at most, whatever length its header claims.
MAX_SEGMENTS = 1024
# Frame rates above this are not believed (nor used to split, skip frames or count frames).
MAX_FPS = 480
# Non-reference frames are skipped when the video has at least this many frames per sample
# (never two in a row, so a sample moves by one frame at most).
SKIP_FROM_RATIO = 1.9
# Frames decord decodes per call (uint8 frames of the clip size, so a batch is small).
DECORD_BATCH = 32
# decord reports a missing timestamp as INT64_MIN ticks; no real timestamp is this far out.
_ABSURD_S = 1e12

# RGB [size, size, 3] (None: a frame not decoded, see `LiveReadahead`), start s, duration s (NaN: unknown)
Frame = tuple[np.ndarray | None, float, float]


class DecodeFailure(Exception):
    """A reason to stop this video, for the parent (the message may reach the client unless
    the kind is "internal")."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class StoppedEarly(Exception):
    """decord stopped before the end it promised; PyAV can continue after its last frame."""


_DECORD_NOISE = [
    re.compile(r"\[\d{2}:\d{2}:\d{2}\]\s*"),  # its log timestamp
    re.compile(r"\S+\.(?:cc|cpp|h|c):\d+:\s*"),  # its source location
    re.compile(r"\s*Stack trace.*$", re.S),
]


def reason(exc: BaseException, path: str = "") -> str:
    """One line saying why a library failed, without its log timestamp, its build path or
    the server's file names."""
    text = str(exc)
    for pattern in _DECORD_NOISE:
        text = pattern.sub("", text)
    for name in filter(None, (path, os.path.basename(path))):
        text = text.replace(f"[{name}]", "").replace(f"'{name}'", "<input>").replace(name, "<input>")
    text = " ".join(text.split())
    if "Error:" in text:  # decord's "DECORDError: ..." wrapping
        text = text.split("Error:", 1)[1].strip()
    return f"{type(exc).__name__}: {text[:300]}"


@dataclass(frozen=True)
class Probe:
    """What the container's header claims (PyAV), before anything is trusted."""

    width: int
    height: int
    codec: str
    fps: float | None
    duration_s: float | None
    frames: int | None  # claimed frame count (header or duration x fps)
    size_bytes: int

    @property
    def claimed_s(self) -> float | None:
        if self.duration_s is not None:
            return self.duration_s
        if self.frames and self.fps:
            return self.frames / self.fps
        return None


def check_limits(probe: Probe, limits: Limits) -> None:
    w, h = probe.width, probe.height
    if limits.max_frame_pixels and w * h > limits.max_frame_pixels:
        raise DecodeFailure(
            "too_large",
            f"resolution {w}x{h} is above the limit of {limits.max_frame_pixels} pixels per frame "
            "(limits.max_frame_pixels)",
        )
    claimed = probe.claimed_s
    if limits.max_duration_s and claimed is not None and claimed > limits.max_duration_s:
        raise DecodeFailure(
            "too_large",
            f"the container claims a duration of {claimed:.1f} s, above the limit of "
            f"{limits.max_duration_s:g} s (limits.max_duration_s)",
        )


def skips_frames(fps: float | None, sample_fps: float | None) -> bool:
    """Whether to skip decoding non-reference frames: when the video is sampled at half its frame
    rate or less, a skipped frame's tick falls to its neighbour (at most one frame later)."""
    return bool(sample_fps and fps and fps >= SKIP_FROM_RATIO * sample_fps)


def choose_backend(probe: Probe, quarter_turns: int, job: DecodeJob) -> tuple[BackendName, str]:
    """The backend for this video, and why not decord (empty if decord or PyAV is preferred).
    PyAV costs less CPU per frame, streams with flat memory, skips frames, and resizes rotated
    frames correctly; decord indexes every frame before decoding."""
    if job.preferred_backend == "pyav":
        return "pyav", ""
    limits = job.limits
    if quarter_turns:
        return "pyav", "rotated video (decord resizes rotated frames wrongly)"
    if skips_frames(probe.fps, job.sample_fps):
        return "pyav", "sampled at half the frame rate or less (only PyAV skips frames)"
    if limits.decord_max_bytes and probe.size_bytes > limits.decord_max_bytes:
        return "pyav", "input above decode.decord_max_bytes (decord's memory grows with the file)"
    if probe.frames is None:
        return "pyav", "the container does not say how many frames it has"
    if limits.decord_max_frames and probe.frames > limits.decord_max_frames:
        return "pyav", f"the container claims {probe.frames} frames (above decode.decord_max_frames)"
    return "decord", ""


class Backend(Protocol):
    name: BackendName

    def open(self, path: str) -> None: ...

    def split(self, segment_frames: int, workers: int) -> list[Segment]: ...

    def frames(self, segment: Segment) -> Iterator[Frame]: ...

    def close(self) -> None: ...


# -- planning (shared by both backends) --------------------------------------------------------


def segment_length(frames: float, segment_frames: int, workers: int) -> int:
    """Frames per segment: at most `segment_frames` (unless that makes over `MAX_SEGMENTS`), and a
    short video is still shared by all workers."""
    length = min(segment_frames, max(MIN_SEGMENT_FRAMES, math.ceil(frames / max(1, workers))))
    return max(length, math.ceil(frames / MAX_SEGMENTS))


def keyframe_cuts(frames: int, keys: list[int], length: int) -> list[int]:
    """First frames of near-equal segments of about `length` frames, each at a keyframe (0 first)."""
    parts = round(frames / length)
    cuts = [0]
    for i in range(1, parts):
        ideal = frames * i / parts
        key = min(keys, key=lambda k: abs(k - ideal))
        if key - cuts[-1] >= MIN_SEGMENT_FRAMES and frames - key >= MIN_SEGMENT_FRAMES:
            cuts.append(key)
    return cuts


# -- PyAV --------------------------------------------------------------------------------------


class PyAVBackend:
    """Decodes with PyAV: memory stays flat whatever the input's size, a truncated or corrupt
    tail ends the video (its readable prefix is kept), segments cut at keyframes found while
    demuxing, and non-reference frames can be skipped. Also the probe: `open` reads the header."""

    name: BackendName = "pyav"

    def __init__(
        self, frame_size: int, threads: int, *, low_delay: bool = False, max_lag_s: float | None = None
    ) -> None:
        """`low_delay`: a live stream (slice threads). `max_lag_s`: a live stream that must keep up
        with its feed (`LiveReadahead`)."""
        import av.video.reformatter

        self.frame_size = frame_size
        self.threads = max(1, threads)
        # Frame threads hold threads - 1 frames back before the first comes out; slice threads
        # hold none (a live stream's latency).
        self.thread_type = "SLICE" if low_delay else "AUTO"
        self.max_lag_s = max_lag_s
        self._readahead: LiveReadahead | None = None
        self.path = ""
        self.container: Any = None
        self.stream: Any = None
        self.probe: Probe | None = None
        self._scaler = av.video.reformatter.VideoReformatter()  # one scaler for every frame
        self._pending: tuple[Segment, Iterator[Any]] | None = None  # a segment's peeked frames
        self._touched = False  # read from since opened
        self._skip_nonref = False
        self._time_base = Fraction(1)
        self._origin = 0

    def open(self, path: str) -> None:
        import av

        self.close()
        self.path = path
        try:
            self.container = av.open(path)
        except Exception as exc:
            raise DecodeFailure("unsupported", "cannot decode the input: pyav " + reason(exc, path)) from None
        if not self.container.streams.video:
            self.close()
            raise DecodeFailure("unsupported", "the input has no video stream")
        s = self.stream = self.container.streams.video[0]
        s.thread_type = self.thread_type
        s.thread_count = self.threads
        if self._skip_nonref:
            s.codec_context.skip_frame = "NONREF"
        self._time_base = s.time_base or Fraction(1)
        self._origin = s.start_time or 0
        rate = s.average_rate or s.guessed_rate or s.base_rate
        # A rate above MAX_FPS is the time base guessed as a rate (Matroska: 1000), not a rate.
        fps = float(rate) if rate and rate <= MAX_FPS else None
        duration = None
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif self.container.duration is not None:
            duration = self.container.duration / 1e6
        frames = s.frames or None
        if frames is None and duration and fps:
            frames = math.ceil(duration * fps)
        cc = s.codec_context
        self.probe = Probe(cc.width, cc.height, cc.name, fps, duration, frames, os.path.getsize(path))

    def set_threads(self, threads: int) -> None:
        """Decoding threads, from the next (re)opening if a frame was decoded already."""
        self.threads = max(1, threads)
        if self.stream is not None and not self._touched:
            self.stream.thread_count = self.threads

    def skip_nonref(self) -> None:
        """Skip decoding non-reference frames from now on."""
        self._skip_nonref = True
        self.stream.codec_context.skip_frame = "NONREF"

    def peek_quarter_turns(self, first: Segment) -> int:
        """Counterclockwise quarter turns that display the video upright, from its first frame's
        display matrix (0 without a frame). That frame is kept for decoding segment `first`."""
        frames = self._raw_between(first.start_pts, first.stop_pts)
        frame = next(frames, None)
        self._pending = (first, iter(()) if frame is None else _chain(frame, frames))
        return 0 if frame is None else round((frame.rotation or 0) / 90) % 4

    def keyframe_estimate(self) -> list[int] | None:
        """Frame numbers of the keyframes the container's index lists (None without an index)."""
        entries = self.stream.index_entries
        if not len(entries) or self.probe is None or not self.probe.fps:
            return None
        stamps = [e.timestamp for e in entries if e.is_keyframe]
        if not stamps:
            return None
        first = entries[0].timestamp
        return [round(float((t - first) * self._time_base) * self.probe.fps) for t in stamps]

    def split(self, segment_frames: int, workers: int) -> list[Segment]:
        """Cut points at the keyframes of the container's index, or without an index every
        `length / fps` seconds of the claimed duration. Each worker snaps a cut to the first
        keyframe at or after it, in the same way, so segments meet exactly; that holds only if
        timestamps grow in file order, so a video whose index says otherwise is one segment."""
        p = self.probe
        if not (segment_frames and workers > 1 and p and p.fps and p.duration_s):
            return [Segment(0)]
        keys = self._indexed_keyframes()
        if any(b.pos < a.pos for a, b in zip(keys, keys[1:])):  # the index is sorted by time
            return [Segment(0)]
        if keys:
            return self._split_at_keyframes([e.timestamp for e in keys], segment_frames, workers)
        step = segment_length(p.duration_s * p.fps, segment_frames, workers) / p.fps
        n = round(p.duration_s / step)
        if n < 2:
            return [Segment(0)]
        cuts = [self._origin + int(round(i * step / self._time_base)) for i in range(1, n)]
        starts, stops = [None, *cuts], [*cuts, None]
        return [
            Segment(i, start_s=i * step, stop_s=None if b is None else (i + 1) * step, start_pts=a, stop_pts=b)
            for i, (a, b) in enumerate(zip(starts, stops))
        ]

    def _indexed_keyframes(self) -> list[Any]:
        """The keyframe entries of the container's index, all of them: Matroska reads its index
        (cues) on the first seek, so one is done (and the file reopened before decoding)."""
        if len(self.stream.index_entries) and "matroska" in self.container.format.name:
            self.container.seek(self._origin, stream=self.stream, backward=True)
            self._touched = True
        return [e for e in self.stream.index_entries if e.is_keyframe]

    def _split_at_keyframes(self, stamps: list[int], segment_frames: int, workers: int) -> list[Segment]:
        fps, tb = self.probe.fps, self._time_base
        frame_of = {round(float((t - stamps[0]) * tb) * fps): t for t in stamps}
        frames = max(self.probe.frames or 0, *frame_of)
        cuts = [frame_of[k] for k in keyframe_cuts(frames, sorted(frame_of), segment_length(frames, segment_frames, workers))]
        if len(cuts) < 2:
            return [Segment(0)]
        seconds = [float((t - self._origin) * tb) for t in cuts]
        starts, stops = [None, *cuts[1:]], [*cuts[1:], None]
        return [
            Segment(i, start_s=0.0 if i == 0 else seconds[i], stop_s=None if b is None else seconds[i + 1],
                    start_pts=a, stop_pts=b)
            for i, (a, b) in enumerate(zip(starts, stops))
        ]

    def frames(self, segment: Segment) -> Iterator[Frame]:
        """The segment's frames, cut by its keyframe pts."""
        if self._pending is not None and self._pending[0] == segment:
            raw, self._pending = self._pending[1], None
        else:
            raw = self._raw_between(segment.start_pts, segment.stop_pts)
        return map(self._picture, raw)

    def frames_after(self, after_s: float | None, stop_s: float | None) -> Iterator[Frame]:
        """Frames starting after `after_s` (None: from the first) and before `stop_s`: where
        decord stopped early, PyAV continues."""
        return map(self._picture, self._raw_after(after_s, stop_s))

    def close(self) -> None:
        self._pending = None
        self._touched = False
        if self._readahead is not None:  # its thread may be reading: it closes the container
            self._readahead.stop(then=self.container.close)
            self._readahead = None
        elif self.container is not None:
            self.container.close()
        self.container = self.stream = None

    # -- internals

    def _packets(self) -> Iterator[Any]:
        """The stream's packets up to the end, or up to where a truncated or corrupt container
        stops being readable (so its readable prefix is kept)."""
        packets = self.container.demux(self.stream)
        self._touched = True
        if self.max_lag_s is not None:
            self._readahead = LiveReadahead(packets, self._time_base, self.max_lag_s)
            yield from self._readahead
            return
        while True:
            try:
                packet = next(packets)
            except Exception:  # StopIteration at the end, a demuxer error past a truncation
                return
            yield packet

    @staticmethod
    def _decoded(packets: Iterator[Any]) -> Iterator[Any]:
        """Frames of the packets; a few undecodable packets are skipped, too many in a row end it."""
        bad = 0
        for packet in packets:
            try:
                frames = packet.decode()
            except Exception:
                bad += 1
                if bad > MAX_BAD_PACKETS:
                    return
                continue
            bad = 0
            yield from frames

    def _seek(self, pts: int | None) -> None:
        """Seek to a keyframe at or before `pts` (the start if None); step back further if the
        demuxer overshoots."""
        self._pending = None
        if pts is None:
            if self._touched:  # back to the start: open again (a seek to 0 fails on raw streams)
                self.open(self.path)
            return
        c, s = self.container, self.stream
        self._touched = True
        back = 0
        for _ in range(4):
            target = max(0, pts - back)
            c.seek(target, stream=s, backward=True)
            packet = next(c.demux(s), None)
            if packet is None or packet.pts is None or packet.pts <= pts:
                c.seek(target, stream=s, backward=True)
                return
            back = max(2 * back, int(10 / s.time_base))
        c.seek(0, stream=s, backward=True)

    def _times(self, frame: Any) -> tuple[float, float]:
        # Integer ticks times the time base's numerator, divided by its denominator: the value of
        # the Fraction product, rounded once as float() of it is, without Fraction's per-frame cost.
        num, den = self._time_base.numerator, self._time_base.denominator
        stamp = frame.pts if frame.pts is not None else frame.dts
        start = (stamp - self._origin) * num / den if stamp is not None else math.nan
        duration = frame.duration * num / den if frame.duration else math.nan
        return start, duration

    def _picture(self, frame: Any) -> Frame:
        if isinstance(frame, Skipped):
            return (None, *self._times(frame))
        size = self.frame_size
        picture = self._scaler.reformat(frame, size, size, "rgb24", threads=1).to_ndarray()
        return (picture, *self._times(frame))

    def _raw_between(self, start_pts: int | None, stop_pts: int | None) -> Iterator[Any]:
        """Frames from the first keyframe at or after start_pts to the first keyframe at or after
        stop_pts (exclusive), by stream pts. A frame without a time goes with the one before."""
        self._pending = None
        self._seek(start_pts)
        low = None if start_pts is None else -1  # pts of the keyframe this segment starts at
        high = None  # pts of the keyframe the next segment starts at, once seen

        def segment_packets() -> Iterator[Any]:
            nonlocal low, high
            for packet in self._packets():
                if packet.pts is not None and packet.is_keyframe:
                    if low == -1 and packet.pts >= start_pts:
                        low = packet.pts
                    if stop_pts is not None and high is None and packet.pts >= stop_pts and low != -1:
                        high = packet.pts
                if low != -1:  # before this segment's first keyframe: skip without decoding
                    yield packet

        inside = start_pts is None
        for frame in self._decoded(segment_packets()):
            stamp = frame.pts if frame.pts is not None else frame.dts
            if stamp is not None:
                if low is not None and stamp < low:
                    inside = False
                    continue  # leading pictures belong to the previous segment
                if high is not None and stamp >= high:
                    return  # frames are output in pts order: the rest is the next segment's
                inside = True
            if inside:
                yield frame

    def _raw_after(self, after_s: float | None, stop_s: float | None) -> Iterator[Any]:
        """Frames with after_s < start < stop_s; a frame without a time goes with the one before."""
        self._pending = None
        try:
            self._seek(None if after_s is None or after_s <= 1.0 else
                       int((after_s - 1.0) / self._time_base) + self._origin)
        except Exception:
            self._seek(None)
        inside = after_s is None
        for frame in self._decoded(self._packets()):
            start, _ = self._times(frame)
            if not math.isnan(start):
                if after_s is not None and start <= after_s + 1e-6:
                    inside = False
                    continue
                if stop_s is not None and start >= stop_s - 1e-6:
                    return
                inside = True
            if inside:
                yield frame


@dataclass(frozen=True)
class Skipped:
    """A packet `LiveReadahead` did not decode, standing in for its frame: its times in stream
    ticks. It goes through the decoding steps as a frame would (`decode` gives itself)."""

    pts: int | None
    dts: int | None
    duration: int
    rotation = 0  # as a frame's (class attributes, not fields)
    is_keyframe = False

    def decode(self) -> tuple[Skipped]:
        return (self,)


class LiveReadahead:
    """The packets of a live stream that must keep up with real time (a realtime `AnalyzeStream`),
    demuxed in a thread ahead of the decoder, so the decoder knows how far behind the feed it is.

    A packet is late when it is more than `max_lag_s` of media behind the newest packet demuxed
    AND behind real time by as much: more wall time than media time has passed since the decoder
    took the first packet. (Not since the gateway's first byte: opening a live stream probes
    seconds of it, and with a long group of pictures that startup would skip all the rest.) A late
    packet is not decoded, nor is the rest of its group of pictures: decoding resumes at a keyframe
    that is not late (the first keyframe is always decoded); a keyframe behind real time where the
    skip could end waits up to `max_lag_s` for the demuxer to read newer video. A packet not
    decoded comes out as a `Skipped`, so clips keep their place in time. A keyframe arriving
    while the oldest packet waiting is late turns everything before it into `Skipped` at once.

    So a decoder slower than real time, or one that receives a burst after the sender stalled,
    skips ahead to live; a feed sent faster than real time (a file sent whole) is decoded whole
    and slowed down: the thread stops reading once 4 x `max_lag_s` (at least 2 s) of media, or
    `READAHEAD_PACKETS`, wait, which fills the pipe and holds the sender back. A feed slower than
    real time is never behind itself. Without timestamps (raw H.264) nothing is judged late.

    PyAV demuxes and decodes without the GIL; the thread only touches the demuxer, the caller
    only the decoder. `stop` lets the thread close the container once its read returns (the
    gateway ends the pipe when the stream ends).
    """

    READAHEAD_PACKETS = 1024

    def __init__(
        self, packets: Iterator[Any], time_base: Fraction, max_lag_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.time_base = float(time_base)
        self.max_lag_s = max_lag_s
        self.readahead_s = max(4 * max_lag_s, 2.0)
        self.clock = clock
        self.newest_s = -math.inf
        self.anchor: float | None = None  # wall time - media time of the first packet
        self._queue: deque[Any] = deque()
        self._ended = False
        self._stopped = False
        self._then: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._demux, args=(packets,), name="live-demux", daemon=True)
        self._thread.start()

    def _seconds(self, packet: Any) -> float | None:
        stamp = packet.pts if packet.pts is not None else packet.dts
        return None if stamp is None else stamp * self.time_base

    def _behind_real_time(self, at: float | None) -> bool:
        return at is not None and self.anchor is not None and self.clock() - self.anchor - at > self.max_lag_s

    def _late(self, at: float | None) -> bool:
        return self._behind_real_time(at) and self.newest_s - at > self.max_lag_s

    def _oldest_waiting(self) -> float | None:
        """Media time of the oldest packet waiting to be decoded (`Skipped` ones lead the queue)."""
        oldest = next((p for p in self._queue if not isinstance(p, Skipped)), None)
        return None if oldest is None else self._seconds(oldest)

    def _full(self) -> bool:
        if len(self._queue) >= self.READAHEAD_PACKETS:
            return True
        oldest = self._oldest_waiting()
        return oldest is not None and self.newest_s - oldest > self.readahead_s

    def _demux(self, packets: Iterator[Any]) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopped or not self._full())
                    if self._stopped:
                        break
                try:
                    packet = next(packets)
                except Exception:  # StopIteration at the end, a demuxer error past a truncation
                    break
                with self._cond:
                    self._put(packet)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._ended = True
                then = self._then if self._stopped else None
                self._cond.notify_all()
            if then is not None:
                then()

    def _put(self, packet: Any) -> None:
        at = self._seconds(packet)
        if at is not None:
            self.newest_s = max(self.newest_s, at)
            if packet.is_keyframe and self._late(self._oldest_waiting()):
                self._queue = deque(map(_skipped, self._queue))
        self._queue.append(packet)

    def __iter__(self) -> Iterator[Any]:
        skipping, decoded = False, False
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._ended)
                if not self._queue:
                    return
                packet = self._queue.popleft()
                at = self._seconds(packet)
                if at is not None and self.anchor is None:
                    self.anchor = self.clock() - at
                late = self._late(at)
                self._cond.notify_all()
                if (skipping and decoded and not late and not isinstance(packet, Skipped)
                        and packet.is_keyframe and self._behind_real_time(at)):
                    # Skipping costs nothing, so the skip reaches the demuxer's front: give it up to
                    # the allowed lag to show whether newer video (the rest of a burst) is there.
                    self._cond.wait_for(lambda: self._ended or self.newest_s - at > self.max_lag_s,
                                        timeout=self.max_lag_s)
                    late = self._late(at)
            if isinstance(packet, Skipped):
                skipping = True
            elif not decoded or packet.size == 0:  # the first frame; the flush at the end
                skipping, decoded = False, True
            elif skipping or late:
                skipping = not packet.is_keyframe or late
                if skipping:
                    packet = _skipped(packet)
            yield packet

    def stop(self, then: Callable[[], None]) -> None:
        """Stop demuxing; `then()` runs once the thread is out of the demuxer (now if it is)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            if not self._ended:
                self._then = then
                return
        then()


def _skipped(packet: Any) -> Any:
    if isinstance(packet, Skipped) or packet.size == 0:
        return packet
    return Skipped(packet.pts, packet.dts, packet.duration or 0)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# -- decord ------------------------------------------------------------------------------------


class DecordBackend:
    """Decodes with decord, resizing inside the decoder: faster than PyAV on small inputs, but
    its demuxer reads ahead without bound (memory grows with the file's size) and it decodes
    every frame."""

    name: BackendName = "decord"

    def __init__(self, frame_size: int, threads: int) -> None:
        self.frame_size = frame_size
        self.threads = max(1, threads)  # num_threads=0 breaks VP9
        self.reader: Any = None
        self.times = np.zeros((0, 2))

    def open(self, path: str) -> None:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        self.close()
        try:
            reader = decord.VideoReader(
                path, width=self.frame_size, height=self.frame_size, num_threads=self.threads
            )
            times = np.asarray(reader.get_frame_timestamp(list(range(len(reader)))), np.float64)
        except Exception as exc:  # decord raises RuntimeError or DECORDError
            raise DecodeFailure("unsupported", "decord " + reason(exc, path)) from None
        if len(times) == 0 or not np.all(np.abs(times) < _ABSURD_S):
            raise DecodeFailure("unsupported", "decord: frames without timestamps")
        self.reader, self.times = reader, times.reshape(-1, 2)

    def split(self, segment_frames: int, workers: int) -> list[Segment]:
        if not segment_frames or workers < 2:
            return [Segment(0)]
        try:
            keys = sorted(int(k) for k in self.reader.get_key_indices())
        except Exception:
            return [Segment(0)]
        frames = len(self.times)
        cuts = keyframe_cuts(frames, keys, segment_length(frames, segment_frames, workers))
        if len(cuts) < 2:
            return [Segment(0)]
        stops = [*cuts[1:], None]
        return [
            Segment(
                i,
                first_frame=first,
                stop_frame=stop,
                start_s=float(self.times[first, 0]),
                stop_s=None if stop is None else float(self.times[stop, 0]),
            )
            for i, (first, stop) in enumerate(zip(cuts, stops))
        ]

    def frames(self, segment: Segment) -> Iterator[Frame]:
        """Frames [first_frame, stop_frame); raises `StoppedEarly` if decord stops short or fails
        (the reader is then closed: its state is unknown)."""
        vr, first = self.reader, segment.first_frame
        if vr is None:
            raise StoppedEarly("decord is not open")
        stop = len(self.times) if segment.stop_frame is None else min(segment.stop_frame, len(self.times))
        index, batch_frames = first, DECORD_BATCH
        try:
            while index < stop:
                # By the batch (decord's per-call cost is large beside a small frame's); where a
                # batch fails, frame by frame up to the frame that fails.
                try:
                    batch = vr.get_batch(list(range(index, min(stop, index + batch_frames)))).asnumpy()
                except Exception:
                    if batch_frames == 1:
                        raise
                    batch_frames = 1
                    continue
                for frame in batch:
                    start, end = self.times[index]
                    index += 1
                    yield frame, float(start), float(end - start)
        except Exception as exc:
            self.close()
            raise StoppedEarly(f"decord stopped after {index} of {stop} frames: {reason(exc)}") from None
        if index < stop:
            raise StoppedEarly(f"decord stopped after {index} of {stop} frames")

    def close(self) -> None:
        self.reader = None
        self.times = np.zeros((0, 2))
