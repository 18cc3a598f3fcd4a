"""The decode worker process (see `decode.py` for the protocol's other side).

Imports only numpy, decord and av, so a worker costs little memory. Messages (pickled tuples):

parent -> worker: ("job", spec) | ("credit", n) | ("release",) | ("exit",)
worker -> parent: ("ready", pid) | ("info", meta) | ("frames", seg, n, starts, ends) + raw bytes
                  | ("end", seg, decoder) | ("error", kind, message) | ("released", rss_mb)

A job without a segment opens the video, checks limits, plans segments and sends "info", then
decodes segment 0. decord decodes inputs up to `decord_max_bytes`: its demuxer reads ahead without
bound, so its memory grows with the file (measured: RSS = file size + ~60 MB); larger inputs go to
PyAV, whose memory stays flat (~75 MB at 720p), with segments cut at keyframes found while
demuxing. Each chunk costs one credit; with no credit the worker waits. "release"
abandons the current job at the next check and drops open files.
"""

from __future__ import annotations

import contextlib
import math
import os
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

_CHECK_EVERY = 8  # frames between checks for a "release"
_MAX_BAD_PACKETS = 32  # consecutive undecodable packets before PyAV gives up
# Shorter segments cost more in opening and seeking (~10 frames' worth) than splitting saves.
_MIN_SEGMENT_FRAMES = 60
# Non-reference frames are skipped when the video has at least this many frames per sample
# (never two in a row, so a sample moves by one frame at most).
_SKIP_FROM_RATIO = 1.9


class _Released(Exception):
    pass


class _Exit(Exception):
    pass


class _Failed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _scrub(message: str, path: str) -> str:
    """Keep server paths (and temp file names) out of messages that reach clients."""
    for text in (path, os.path.basename(path)):
        if text:
            message = message.replace(text, "<input>")
    return message


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    # decord prefixes its messages with a timestamp and a source location.
    if "Error:" in text:
        text = text.split("Error:", 1)[1].strip()
    return f"{type(exc).__name__}: {text[:300]}"


class _Channel:
    """The worker's end of the pipe, with credit-based flow control."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.credits = 0
        self.jobs: list[dict] = []

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "credit":
            self.credits += msg[1]
        elif kind == "job":
            self.jobs.append(msg[1])
        elif kind == "release":
            raise _Released()
        elif kind == "exit":
            raise _Exit()

    def check(self) -> None:
        while self.conn.poll():
            self._handle(self.conn.recv())

    def wait(self) -> None:
        self._handle(self.conn.recv())

    def send_frames(self, seg: int, frames: np.ndarray, starts: list, ends: list) -> None:
        self.check()
        while self.credits <= 0:
            self.wait()
        self.credits -= 1
        self.conn.send(("frames", seg, len(starts), starts, ends))
        self.conn.send_bytes(memoryview(np.ascontiguousarray(frames)).cast("B"))


class _Chunker:
    """Collects frames into a fixed buffer and sends it when full."""

    def __init__(
        self, ch: _Channel, seg: int, size: int, chunk: int, max_duration_s: float | None
    ) -> None:
        self.ch, self.seg = ch, seg
        self.max_duration_s = max_duration_s
        self.buf = np.empty((chunk, size, size, 3), np.uint8)
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.sent = 0
        self.last_start: float | None = None

    def add(self, frame: np.ndarray, start: float, end: float) -> None:
        if self.max_duration_s and start > self.max_duration_s:
            raise _Failed("too_large", f"the video is longer than the limit of {self.max_duration_s:g} s "
                          "(limits.max_duration_s)")
        n = len(self.starts)
        self.buf[n] = frame
        self.starts.append(start)
        self.ends.append(end)
        self.last_start = start
        self.sent += 1
        if len(self.starts) == len(self.buf):
            self.flush()
        elif self.sent % _CHECK_EVERY == 0:
            self.ch.check()

    def flush(self) -> None:
        if self.starts:
            self.ch.send_frames(self.seg, self.buf[: len(self.starts)], self.starts, self.ends)
            self.starts, self.ends = [], []


class _Decoder:
    """State of one job's video: the open decord reader (reused across segments)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.reader: Any = None
        self.meta: dict[str, Any] = {}

    def close(self) -> None:
        self.key = None
        self.reader = None
        self.meta = {}

    def open(self, spec: dict) -> None:
        key = (spec["path"], spec["frame_size"], spec["threads"], spec.get("sample_fps"))
        if key == self.key:
            return
        self.close()
        import decord

        size = spec["frame_size"]
        reasons: list[str] = []
        meta = _probe(spec["path"], reasons)
        limit = spec.get("decord_max_bytes")
        if limit and meta.get("width") is not None and os.path.getsize(spec["path"]) > limit:
            # decord's demuxer reads ahead without bound: its memory grows with the file's size.
            meta["decoder"] = "pyav"
            self.meta, self.key = meta, key
            return
        if _skips_frames(meta, spec.get("sample_fps")):
            # Only PyAV can skip decoding frames (decord decodes every one).
            meta["decoder"], meta["skip_nonref"] = "pyav", True
            self.meta, self.key = meta, key
            return
        try:
            # num_threads=0 breaks VP9; the settings default is 1.
            reader = decord.VideoReader(
                spec["path"], width=size, height=size, num_threads=max(1, spec["threads"])
            )
            self.reader = reader
            meta["decoder"] = "decord"
            meta["reported_frames"] = len(reader)
            meta.setdefault("fps", float(reader.get_avg_fps()))
        except Exception as exc:  # decord raises RuntimeError or DECORDError
            reasons.insert(0, "decord " + _reason(exc))
            if meta.get("width") is None:
                raise _Failed("unsupported", "cannot decode the input: " + "; ".join(reasons)) from None
            meta["decoder"] = "pyav"
            meta["note"] = "; ".join(reasons)
        self.meta = meta
        self.key = key


def _skips_frames(meta: dict, sample_fps: float | None) -> bool:
    """Whether to skip decoding non-reference frames: when the video is sampled at half its frame
    rate or less, a skipped frame's tick falls to its neighbour (at most one frame later), and
    skipping saves a third of the decoding (B-frames are the costly ones: 9.3 -> 5.9 CPU-s for
    a 60 s 720p H.264 video, 28% of its frames skipped)."""
    fps = meta.get("fps")
    return bool(sample_fps and fps and fps >= _SKIP_FROM_RATIO * sample_fps)


def _probe(path: str, reasons: list[str]) -> dict[str, Any]:
    """Container facts from PyAV (no decoding). Never trusted for frame counts."""
    import av

    meta: dict[str, Any] = {"width": None}
    try:
        with av.open(path) as c:
            if not c.streams.video:
                reasons.append("pyav: the input has no video stream")
                return meta
            s = c.streams.video[0]
            cc = s.codec_context
            meta.update(width=cc.width, height=cc.height, codec=cc.name)
            if s.time_base is not None:
                meta["time_base"] = float(s.time_base)
                meta["origin_pts"] = int(s.start_time or 0)
            rate = s.average_rate or s.guessed_rate or s.base_rate
            if rate:
                meta["fps"] = float(rate)
            if s.duration is not None and s.time_base is not None:
                meta["duration_s"] = float(s.duration * s.time_base)
            elif c.duration is not None:
                meta["duration_s"] = c.duration / 1e6
    except Exception as exc:
        reasons.append("pyav " + _reason(exc))
    return meta


def _check_limits(meta: dict, spec: dict) -> None:
    w, h = meta.get("width") or 0, meta.get("height") or 0
    limit = spec.get("max_frame_pixels")
    if limit and w * h > limit:
        raise _Failed("too_large", f"resolution {w}x{h} is above the limit of {limit} pixels per frame "
                                    "(limits.max_frame_pixels)")
    limit_s = spec.get("max_duration_s")
    if limit_s and (meta.get("duration_s") or 0) > limit_s:
        raise _Failed(
            "too_large", f"duration {meta['duration_s']:.1f} s is above the limit of {limit_s:g} s "
            "(limits.max_duration_s)"
        )


def _segment(first=None, stop=None, start_s=0.0, stop_s=None, start_pts=None, stop_pts=None) -> dict:
    """Bounds of one segment: frame indices for decord, stream pts (keyframe-snapped) for PyAV."""
    return dict(first=first, stop=stop, start_s=start_s, stop_s=stop_s, start_pts=start_pts, stop_pts=stop_pts)


def _segment_length(frames: float, segment_frames: int, workers: int) -> int:
    """Frames per segment: at most `segment_frames`, and a short video is still shared by all
    workers (a 10 s video is one 300-frame segment otherwise, decoded on one core)."""
    return min(segment_frames, max(_MIN_SEGMENT_FRAMES, math.ceil(frames / max(1, workers))))


def _keyframe_cuts(frames: int, keys: list[int], length: int) -> list[int]:
    """First frames of near-equal segments of about `length` frames, each at a keyframe (0 first)."""
    parts = round(frames / length)
    cuts = [0]
    for i in range(1, parts):
        ideal = frames * i / parts
        key = min(keys, key=lambda k: abs(k - ideal))
        if key - cuts[-1] >= _MIN_SEGMENT_FRAMES and frames - key >= _MIN_SEGMENT_FRAMES:
            cuts.append(key)
    return cuts


def _plan(dec: _Decoder, segment_frames: int, workers: int) -> list[dict]:
    """Segments of about `segment_frames` frames (fewer for short videos), each at a keyframe."""
    if not segment_frames or workers < 2:
        return [_segment()]
    if dec.reader is not None:
        return _plan_decord(dec.reader, segment_frames, workers)
    return _plan_pyav(dec.meta, segment_frames, workers)


def _plan_decord(reader: Any, segment_frames: int, workers: int) -> list[dict]:
    try:
        keys = sorted(int(k) for k in reader.get_key_indices())
    except Exception:
        return [_segment()]
    frames = len(reader)
    bounds = _keyframe_cuts(frames, keys, _segment_length(frames, segment_frames, workers))
    if len(bounds) < 2:
        return [_segment()]
    times = reader.get_frame_timestamp(bounds)[:, 0].astype(float).tolist()
    segs = []
    for i, first in enumerate(bounds):
        last = i + 1 == len(bounds)
        segs.append(_segment(first, None if last else bounds[i + 1], times[i], None if last else times[i + 1]))
    return segs


def _plan_pyav(meta: dict, segment_frames: int, workers: int) -> list[dict]:
    """Cut points every `length / fps` seconds. Each worker snaps them to the first keyframe at or
    after the cut, in the same way, so segments meet exactly without an index."""
    fps, duration, tb = meta.get("fps"), meta.get("duration_s"), meta.get("time_base")
    if not (fps and duration and tb):
        return [_segment()]
    step = _segment_length(duration * fps, segment_frames, workers) / fps
    n = round(duration / step)
    if n < 2:
        return [_segment()]
    origin = meta.get("origin_pts", 0)
    cuts = [origin + int(round(i * step / tb)) for i in range(1, n)]
    starts = [None, *cuts]
    stops = [*cuts, None]
    return [
        _segment(start_s=i * step, stop_s=None if b is None else (i + 1) * step, start_pts=a, stop_pts=b)
        for i, (a, b) in enumerate(zip(starts, stops))
    ]


def _decode_decord(dec: _Decoder, out: _Chunker, first: int, stop: int | None) -> bool:
    """Decode frames [first, stop) with decord; False if it stopped early or failed."""
    vr = dec.reader
    if vr is None:
        return False
    expected = min(stop, len(vr)) if stop is not None else len(vr)
    index = first
    try:
        if first > 0:
            vr.seek_accurate(first)
        else:
            vr.seek(0)
        pending: list[np.ndarray] = []
        while stop is None or index < stop:
            try:
                frame = vr.next()
            except StopIteration:
                break
            pending.append(frame.asnumpy())
            index += 1
            if len(pending) == _CHECK_EVERY:
                _emit_decord(vr, out, pending, index)
        _emit_decord(vr, out, pending, index)
    except (_Released, _Exit, _Failed):
        raise
    except Exception as exc:
        dec.meta["note"] = "decord " + _reason(exc)
        dec.reader = None  # do not reuse a reader in an unknown state
        return False
    return index >= expected


def _emit_decord(vr: Any, out: _Chunker, pending: list[np.ndarray], index: int) -> None:
    if not pending:
        return
    ts = vr.get_frame_timestamp(list(range(index - len(pending), index)))  # n, 2
    for frame, (start, end) in zip(pending, ts.tolist()):
        out.add(frame, float(start), float(end))
    pending.clear()


@contextlib.contextmanager
def _open_pyav(spec: dict):
    """The input's first video stream, set up for threaded decoding: yields
    (container, stream, time base, start pts, default frame duration in seconds)."""
    import av

    try:
        container = av.open(spec["path"])
    except Exception as exc:
        raise _Failed("unsupported", "cannot decode the input: pyav " + _reason(exc)) from None
    with container:
        if not container.streams.video:
            raise _Failed("unsupported", "the input has no video stream")
        s = container.streams.video[0]
        s.thread_type = "AUTO"
        s.thread_count = max(1, spec["threads"])
        if spec.get("skip_nonref"):
            s.codec_context.skip_frame = "NONREF"
        rate = s.average_rate or s.guessed_rate
        yield container, s, s.time_base, s.start_time or 0, float(1 / rate) if rate else 1 / 30


def _readable_packets(container: Any, stream: Any):
    """The stream's packets up to the end, or up to where a truncated or corrupt container stops
    being readable (so its readable prefix is kept)."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except Exception:  # StopIteration at the end, a demuxer error past a truncation
            return
        yield packet


def _decoded(packets):
    """Frames of the packets; a few undecodable packets are skipped, too many in a row end it."""
    bad = 0
    for packet in packets:
        try:
            frames = packet.decode()
        except Exception:
            bad += 1
            if bad > _MAX_BAD_PACKETS:
                return
            continue
        bad = 0
        yield from frames


def _decode_pyav(spec: dict, out: _Chunker, after_s: float | None, stop_s: float | None) -> None:
    """Decode frames with after_s < start < stop_s with PyAV, tolerating a truncated tail."""
    size = spec["frame_size"]
    with _open_pyav(spec) as (container, s, tb, origin, default_dur):
        if after_s is not None and after_s > 1.0:
            try:
                container.seek(int((after_s - 1.0) / tb) + origin, stream=s, backward=True)
            except Exception:
                container.seek(0)
        for frame in _decoded(_readable_packets(container, s)):
            if frame.pts is None:
                continue
            start = float((frame.pts - origin) * tb)
            if after_s is not None and start <= after_s + 1e-6:
                continue
            if stop_s is not None and start >= stop_s - 1e-6:
                return
            dur = float(frame.duration * tb) if frame.duration else default_dur
            out.add(frame.to_ndarray(width=size, height=size, format="rgb24"), start, start + dur)


def _decode_pyav_segment(spec: dict, out: _Chunker, start_pts: int | None, stop_pts: int | None) -> None:
    """Frames from the first keyframe at or after start_pts to the first keyframe at or after
    stop_pts (exclusive), by stream pts. Tolerates a truncated tail (keeps the readable prefix)."""
    size = spec["frame_size"]
    with _open_pyav(spec) as (container, s, tb, origin, default_dur):
        if start_pts is not None:
            _seek_before(container, s, start_pts)
        low = None if start_pts is None else -1  # pts of the keyframe this segment starts at
        high = None  # pts of the keyframe the next segment starts at, once seen

        def segment_packets():
            nonlocal low, high
            for packet in _readable_packets(container, s):
                if packet.pts is not None and packet.is_keyframe:
                    if low == -1 and packet.pts >= start_pts:
                        low = packet.pts
                    if stop_pts is not None and high is None and packet.pts >= stop_pts and low != -1:
                        high = packet.pts
                if low != -1:  # before this segment's first keyframe: skip without decoding
                    yield packet

        for frame in _decoded(segment_packets()):
            if frame.pts is None or (low is not None and frame.pts < low):
                continue  # leading pictures belong to the previous segment
            if high is not None and frame.pts >= high:
                return  # frames are output in pts order: the rest is the next segment's
            start = float((frame.pts - origin) * tb)
            dur = float(frame.duration * tb) if frame.duration else default_dur
            out.add(frame.to_ndarray(width=size, height=size, format="rgb24"), start, start + dur)


def _seek_before(container: Any, stream: Any, pts: int) -> None:
    """Seek to a keyframe at or before `pts`; step back further if the demuxer overshoots."""
    back = 0
    for _ in range(4):
        target = max(0, pts - back)
        container.seek(target, stream=stream, backward=True)
        packet = next(container.demux(stream), None)
        if packet is None or packet.pts is None or packet.pts <= pts:
            container.seek(target, stream=stream, backward=True)
            return
        back = max(2 * back, int(10 / stream.time_base))
    container.seek(0, stream=stream, backward=True)


def _run_job(ch: _Channel, dec: _Decoder, spec: dict) -> None:
    if spec["segment"] is None:
        dec.open(spec)
        _check_limits(dec.meta, spec)
        plan = _plan(dec, spec["segment_frames"], spec["workers"])
        ch.conn.send(("info", dict(dec.meta, segments=plan)))
        index, seg = 0, plan[0]
        if len(plan) == 1 and spec["workers"] > spec["threads"]:
            # One segment (a short video, or one without keyframes to cut at): no other worker
            # can help, so this one decodes with the pool's share of threads (1.7x on 2 cores).
            spec = dict(spec, threads=spec["workers"])
            dec.open(spec)
    else:
        index, seg = spec["segment"]
        dec.open(spec)
    spec = dict(spec, skip_nonref=bool(dec.meta.get("skip_nonref")))
    out = _Chunker(ch, index, spec["frame_size"], spec["chunk_frames"], spec.get("max_duration_s"))
    if dec.meta.get("decoder") == "pyav":  # decord not used for this input
        _decode_pyav_segment(spec, out, seg["start_pts"], seg["stop_pts"])
    else:
        first = seg["first"] or 0
        if not _decode_decord(dec, out, first, seg["stop"]):
            # decord stopped early or failed: PyAV continues after the last frame it produced.
            after = out.last_start if out.last_start is not None else (seg["start_s"] - 1e-3 if first else None)
            _decode_pyav(spec, out, after, seg["stop_s"])
            if out.sent and dec.meta.get("decoder") == "decord":
                dec.meta["decoder"] = "decord+pyav"
    out.flush()
    ch.conn.send(("end", index, dec.meta.get("decoder", "")))


def main(conn: Connection) -> None:
    import av  # noqa: F401  (import before the first job so "ready" means ready)
    import decord  # noqa: F401

    av.logging.set_level(av.logging.PANIC)
    decord.logging.set_level(decord.logging.QUIET)
    ch = _Channel(conn)
    dec = _Decoder()
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                if not ch.jobs:
                    ch.wait()
                    continue
                spec = ch.jobs.pop(0)
                try:
                    _run_job(ch, dec, spec)
                except _Failed as exc:
                    conn.send(("error", exc.kind, _scrub(exc.message, spec["path"])))
                    _wait_for_release(ch)
                except (_Released, _Exit):
                    raise
                except Exception as exc:
                    conn.send(("error", "internal", _scrub(_reason(exc), spec["path"])))
                    _wait_for_release(ch)
            except _Released:
                ch.credits = 0
                ch.jobs.clear()
                dec.close()
                conn.send(("released", _rss_mb()))
    except (_Exit, EOFError, OSError, KeyboardInterrupt):
        return


def _wait_for_release(ch: _Channel) -> None:
    while True:
        ch.wait()  # raises _Released (or _Exit)


if __name__ == "__main__":
    import sys

    main(Connection(int(sys.argv[1])))
