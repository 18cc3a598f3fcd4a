"""The decode worker process: runs `DecodeJob`s from the gateway and sends their frames back in
chunks (messages: `decode_protocol.py`; backends: `decode_backends.py`).

Imports only numpy, av and decord, so a worker costs little memory.
"""

from __future__ import annotations

import math
import os
import traceback
from multiprocessing.connection import Connection

import numpy as np

from server.pipeline import decode_protocol as msg
from server.pipeline.decode_backends import (
    Backend,
    DecodeFailure,
    DecordBackend,
    Probe,
    PyAVBackend,
    StoppedEarly,
    check_limits,
    choose_backend,
    keyframe_cuts,
    reason,
    segment_length,
    skips_frames,
)

CHECK_EVERY = 8  # frames between checks for a `Release`


class _Released(Exception):
    pass


class _Exit(Exception):
    pass


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Channel:
    """The worker's end of the pipe, with credit-based flow control, and its frame arena."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.credits = 0
        self.jobs: list[msg.DecodeJob] = []
        self.arena: np.ndarray | None = None
        self.filled = 0  # chunks written since the last release: the next one's slot

    def _handle(self, m: msg.ToWorker) -> None:
        if isinstance(m, msg.Credit):
            self.credits += m.chunks
        elif isinstance(m, msg.DecodeJob):
            self.jobs.append(m)
        elif isinstance(m, msg.Release):
            raise _Released()
        elif isinstance(m, msg.Exit):
            raise _Exit()

    def check(self) -> None:
        while self.conn.poll():
            self._handle(self.conn.recv())

    def wait(self) -> None:
        self._handle(self.conn.recv())

    def send(self, m: msg.FromWorker) -> None:
        self.conn.send(m)

    def released(self) -> None:
        self.credits = 0
        self.filled = 0
        self.jobs.clear()

    def slot(self, job: msg.DecodeJob) -> tuple[np.ndarray, int]:
        """The arena's slot for the next chunk of `job`: (uint8 [chunk_frames, size, size, 3], its
        offset). One slot more than the credits: the chunks sent and not yet copied out by the
        parent hold at most `job.credits` of them, this one is filled meanwhile."""
        size = job.frame_size
        chunk_bytes = job.chunk_frames * size * size * 3
        slots = job.credits + 1
        self._ensure_arena(slots * chunk_bytes)
        offset = (self.filled % slots) * chunk_bytes
        self.filled += 1
        return self.arena[offset : offset + chunk_bytes].reshape(job.chunk_frames, size, size, 3), offset

    def _ensure_arena(self, nbytes: int) -> None:
        if self.arena is not None and len(self.arena) >= nbytes:
            return
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if nbytes > memory:  # a settings fault (decode.chunk_frames): fail here, not on a page fault
            raise MemoryError(f"a frame arena of {nbytes} bytes is larger than this machine's memory")
        fd = os.memfd_create("vqs-frames", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            self.arena = msg.map_arena(fd, nbytes)
            self.conn.send(msg.Arena(nbytes))
            msg.send_fd(self.conn, fd)
        finally:
            os.close(fd)

    def send_frames(
        self, segment: int, offset: int, frames: int, starts: list, durations: list, skipped: list[bool],
        frame_bytes: int,
    ) -> None:
        self.check()
        while self.credits <= 0:
            self.wait()
        self.credits -= 1
        mask = np.asarray(skipped, bool) if any(skipped) else None
        starts, durations = np.asarray(starts, np.float64), np.asarray(durations, np.float64)
        self.conn.send(msg.Frames(segment, starts, durations, offset=offset, nbytes=frames * frame_bytes, skipped=mask))


class Chunker:
    """Writes frames, turned upright, into a slot of the arena, and sends it when full."""

    def __init__(self, ch: Channel, job: msg.DecodeJob, segment: msg.Segment, quarter_turns: int) -> None:
        self.ch, self.job, self.segment = ch, job, segment.index
        self.quarter_turns = quarter_turns
        self.frame_bytes = job.frame_size * job.frame_size * 3
        self.buf: np.ndarray | None = None  # the slot being filled
        self.offset = 0
        self.starts: list[float] = []
        self.durations: list[float] = []
        self.skipped: list[bool] = []
        self.sent = 0
        self.last_start: float | None = None  # the last frame's start that was known

    def add(self, frame: np.ndarray | None, start: float, duration: float) -> None:
        """Add a frame; None: one not decoded (a realtime stream behind its feed), sent as zeros."""
        if self.buf is None:
            self.buf, self.offset = self.ch.slot(self.job)
        n = len(self.starts)
        if frame is None:
            self.buf[n] = 0
        else:
            self.buf[n] = np.rot90(frame, self.quarter_turns) if self.quarter_turns else frame
        self.starts.append(start)
        self.durations.append(duration)
        self.skipped.append(frame is None)
        if not math.isnan(start):
            self.last_start = start
        self.sent += 1
        if len(self.starts) == len(self.buf):
            self.flush()
        elif self.sent % CHECK_EVERY == 0:
            self.ch.check()

    def flush(self) -> None:
        if self.starts:
            self.ch.send_frames(self.segment, self.offset, len(self.starts), self.starts, self.durations,
                                self.skipped, self.frame_bytes)
            self.starts, self.durations, self.skipped = [], [], []
            self.buf = None


class Videos:
    """The backends a worker has open for the current request, reused across its segments."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.backend: Backend | None = None
        self.pyav: PyAVBackend | None = None  # PyAV continuing where decord stopped
        self.note = ""

    def close(self) -> None:
        for b in (self.backend, self.pyav):
            if b is not None:
                b.close()
        self.key = self.backend = self.pyav = None
        self.note = ""

    def keep(self, job: msg.DecodeJob, backend: Backend, plan: msg.Plan, note: str) -> None:
        self.close()
        self.key = (job.path, job.frame_size, plan)
        self.backend, self.note = backend, note

    def backend_for(self, job: msg.DecodeJob, plan: msg.Plan) -> Backend | None:
        """The plan's backend, open on the job's video (None if decord cannot open it)."""
        key = (job.path, job.frame_size, plan)
        if key == self.key:
            return self.backend
        self.close()
        self.key = key
        if plan.backend == "pyav":
            self.backend = _open_pyav(job, job.threads, plan.skip_nonref)
        else:
            try:
                self.backend = DecordBackend(job.frame_size, job.threads)
                self.backend.open(job.path)
            except DecodeFailure as exc:
                self.backend, self.note = None, exc.message
        return self.backend

    def pyav_for(self, job: msg.DecodeJob) -> PyAVBackend:
        if self.pyav is None:
            self.pyav = _open_pyav(job, job.threads, False)
        return self.pyav


def _open_pyav(job: msg.DecodeJob, threads: int, skip_nonref: bool) -> PyAVBackend:
    backend = PyAVBackend(job.frame_size, threads)
    backend.open(job.path)
    if skip_nonref:
        backend.skip_nonref()
    return backend


def open_video(job: msg.DecodeJob) -> tuple[Backend | None, msg.Opened]:
    """Probe the video (PyAV reads the header and its first frame), check the limits on what it
    claims, pick and open the backend, and plan the segments."""
    pyav = PyAVBackend(job.frame_size, job.threads, low_delay=job.live, max_lag_s=job.live_max_lag_s)
    pyav.open(job.path)
    try:
        return _open_video(job, pyav)
    except BaseException:
        pyav.close()
        raise


def _open_video(job: msg.DecodeJob, pyav: PyAVBackend) -> tuple[Backend | None, msg.Opened]:
    probe = pyav.probe
    check_limits(probe, job.limits)
    segments = [msg.Segment(0)] if job.live else pyav.split(job.segment_frames, job.workers)
    all_threads = one_segment_threads(probe, job)
    if len(segments) == 1 and not job.live:  # not a live stream: the other workers serve others
        pyav.set_threads(all_threads)
    turns = pyav.peek_quarter_turns(segments[0])
    name, note = ("pyav", "a live stream") if job.live else choose_backend(probe, turns, job)
    backend: Backend | None = pyav
    skip = name == "pyav" and skips_frames(probe.fps, job.sample_fps)
    if skip:
        pyav.skip_nonref()
    if name == "decord":
        decord = DecordBackend(job.frame_size, _decord_threads(pyav, job, all_threads))
        try:
            decord.open(job.path)
        except DecodeFailure as exc:
            # A container decord cannot read may claim a duration its frames do not follow:
            # decoded in one piece, none is lost between cuts by pts.
            name, note, segments = "pyav", exc.message, [msg.Segment(0)]
            pyav.set_threads(all_threads)
        else:
            pyav.close()
            backend, segments = decord, decord.split(job.segment_frames, job.workers)
            if len(segments) == 1 and decord.threads < all_threads:  # the index misled the guess
                decord.threads = all_threads
                decord.open(job.path)
    plan = msg.Plan(backend=name, segments=tuple(segments), quarter_turns=turns, skip_nonref=skip)
    upright = turns % 2 == 0
    video = msg.VideoInfo(
        fps=probe.fps or 0.0,
        width=probe.width if upright else probe.height,
        height=probe.height if upright else probe.width,
        frames=probe.frames or 0,
        duration_s=probe.duration_s or 0.0,
        codec=probe.codec,
        decoder=name,
    )
    return backend, msg.Opened(video, plan, note)


def one_segment_threads(probe: Probe, job: msg.DecodeJob) -> int:
    """Decoding threads for a video decoded in one segment: no other worker can help, so it takes
    the pool's share, if its frames are big enough to pay for handing them between threads
    (`DecodeJob.threads_min_pixels`); else the job's."""
    if probe.width * probe.height < job.threads_min_pixels:
        return job.threads
    return max(job.threads, job.workers)


def _decord_threads(pyav: PyAVBackend, job: msg.DecodeJob, one_segment: int) -> int:
    """decord's threads are fixed when it opens: `one_segment` if the video will likely be one
    segment (judged from the keyframes in the container's index), else the job's."""
    frames = pyav.probe.frames or 0
    keys = pyav.keyframe_estimate()
    if not job.segment_frames or job.workers < 2:
        parts = 1
    elif keys is None:
        parts = len(pyav.split(job.segment_frames, job.workers))
    else:
        parts = len(keyframe_cuts(frames, keys, segment_length(frames, job.segment_frames, job.workers)))
    return one_segment if parts == 1 else job.threads


def run_job(ch: Channel, videos: Videos, job: msg.DecodeJob) -> None:
    if job.segment is None:
        backend, opened = open_video(job)
        videos.keep(job, backend, opened.plan, opened.note)
        ch.send(opened)
        plan, index = opened.plan, 0
    else:
        plan, index = job.plan, job.segment
        backend = videos.backend_for(job, plan)
    segment = plan.segments[index]
    out = Chunker(ch, job, segment, plan.quarter_turns)
    decoder = plan.backend
    try:
        if backend is None:
            raise StoppedEarly(videos.note)
        for frame in backend.frames(segment):
            out.add(*frame)
    except StoppedEarly:
        if plan.backend != "decord":
            raise
        # decord stopped early or failed: PyAV continues after the last frame it produced.
        after = out.last_start
        if after is None and segment.first_frame:
            after = segment.start_s - 1e-3
        before = out.sent
        for frame in videos.pyav_for(job).frames_after(after, segment.stop_s):
            out.add(*frame)
        if out.sent > before:
            decoder = "decord+pyav" if before else "pyav"
    out.flush()
    ch.send(msg.SegmentDone(index, decoder))


def main(conn: Connection) -> None:
    import av

    # No log callback: PyAV's own takes the GIL for every error, from decoder threads too, which
    # deadlocks a container closed mid-decode (the closing thread holds the GIL). decord is
    # imported (and quietened) by its backend, only where a video is decoded with it.
    av.logging.set_level(None)
    ch = Channel(conn)
    videos = Videos()
    ch.send(msg.Ready(os.getpid()))
    try:
        while True:
            try:
                if not ch.jobs:
                    ch.wait()
                    continue
                job = ch.jobs.pop(0)
                try:
                    run_job(ch, videos, job)
                except DecodeFailure as exc:
                    ch.send(msg.Failed(exc.kind, _scrub(exc.message, job.path)))
                    _wait_for_release(ch)
                except (_Released, _Exit):
                    raise
                except Exception as exc:
                    where = "".join(traceback.format_tb(exc.__traceback__, limit=-3))
                    ch.send(msg.Failed("internal", f"{reason(exc, job.path)}\n{where}"))
                    _wait_for_release(ch)
            except _Released:
                ch.released()
                videos.close()
                ch.send(msg.Released(rss_mb()))
    except (_Exit, EOFError, OSError, KeyboardInterrupt):
        return


def _scrub(message: str, path: str) -> str:
    """Keep server paths (and temp file names) out of messages that reach clients."""
    for text in filter(None, (path, os.path.basename(path))):
        message = message.replace(text, "<input>")
    return message


def _wait_for_release(ch: Channel) -> None:
    while True:
        ch.wait()  # raises _Released (or _Exit)


if __name__ == "__main__":
    import sys

    main(Connection(int(sys.argv[1])))
