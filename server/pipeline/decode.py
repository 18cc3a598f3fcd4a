"""Video decoding in worker processes, with bounded memory: `VideoDecoder.stream` turns a video
into batches of clips.

One `VideoDecoder` per gateway owns a `WorkerPool` of `decode.workers` processes
(`decode_pool.py`). For a request, a `SegmentScheduler` asks one worker to open the video: it
probes the container, checks the limits, picks a backend (`decode_backends.choose_backend`) and
splits the video at keyframes into segments of at most `decode.segment_frames` frames; idle
workers decode the later segments while the first decodes its own, and their frames are consumed
in order, so the stream is that of a sequential decode. Workers send frames already resized to
`frame_size`, in chunks of `decode.chunk_frames`; each may send at most `decode.ahead_bytes`
ahead of the consumer, so a request holds a few chunks per worker whatever the video's length.

The parent then repairs the frames' timestamps (`chunk.FrameTimes`), samples them at the
encoder's frame rate (`chunk.TimeGrid`) and cuts clips (`chunk.ClipAssembler`).

Failures: a worker silent for `decode.stall_timeout_s` is killed and replaced and the request
fails with `Timeout`; a worker that crashes is replaced and the request fails with
`UnsupportedMedia`; an unexpected error inside a worker is logged and the request fails with
`InternalError`. Closing the stream (or cancelling its consumer) tells its workers to stop at
their next check (every few frames).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from server.errors import InternalError, TooLarge, UnsupportedMedia, VqsError
from server.pipeline import decode_protocol as msg
from server.pipeline.chunk import ClipAssembler, FrameTimes, TimeGrid
from server.pipeline.decode_pool import Died, WorkerPool, WorkerProcess
from server.pipeline.decode_protocol import VideoInfo
from server.settings import DecodeSettings
from server.triton import SharedFrames

__all__ = ["ClipBatch", "VideoDecoder", "VideoInfo"]

logger = logging.getLogger(__name__)

_FAILURES: dict[str, type[VqsError]] = {"too_large": TooLarge, "unsupported": UnsupportedMedia}
# Chunks a realtime live stream's worker may send ahead of the gateway (`DecodeJob.live_max_lag_s`).
LIVE_CREDITS = 4


@dataclass(frozen=True)
class ClipBatch:
    clips: np.ndarray  # uint8 [n, clip_frames, frame_size, frame_size, 3] (RGB)
    spans_s: np.ndarray  # float64 [n, 2] start/end seconds of each clip
    info: VideoInfo
    # bool [n]: clips with a frame not decoded (a realtime stream behind its feed, see
    # `DecodeJob.live_max_lag_s`): placeholders in their place in time, not to be analysed.
    dropped: np.ndarray | None = None


@dataclass(frozen=True)
class FrameChunk:
    frames: np.ndarray  # uint8 [n, size, size, 3]
    starts: np.ndarray  # float64 [n], NaN where the decoder had no time
    durations: np.ndarray  # float64 [n], NaN where unknown
    skipped: np.ndarray  # bool [n]: not decoded (zeros)


class VideoDecoder:
    """Owns the decode worker pool; one per gateway."""

    def __init__(
        self,
        settings: DecodeSettings,
        *,
        max_frame_pixels: int | None = None,
        max_duration_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.max_frame_pixels = max_frame_pixels
        self.max_duration_s = max_duration_s
        self.frames_memory = SharedFrames(settings.shared_memory_mb * 2**20)
        self.pool = WorkerPool(
            settings.workers,
            start_timeout_s=max(settings.stall_timeout_s, 60.0),
            release_timeout_s=settings.release_timeout_s,
            recycle_after=settings.recycle_after,
            recycle_rss_mb=settings.recycle_rss_mb,
            frames_memory=self.frames_memory,
        )
        self._tmpdir: pathlib.Path | None = None

    async def start(self) -> None:
        if self.pool.started:
            return
        self._tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="vqs-decode-"))
        await self.pool.start()
        logger.info("decode pool ready: %d workers", self.settings.workers)

    async def close(self) -> None:
        await self.pool.close()
        self.frames_memory.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def worker_pids(self) -> list[int]:
        return self.pool.pids()

    async def stream(
        self,
        source: bytes | pathlib.Path,
        *,
        frame_size: int,
        clip_frames: int,
        clips_per_batch: int,
        sample_fps: float | None = None,
        live: bool = False,
        chunk_frames: int | None = None,
        max_lag_s: float | None = None,
    ) -> AsyncIterator[ClipBatch]:
        """Decode `source` and yield batches of clips in time order, of frames sampled at
        `sample_fps` (the encoder's frame rate; see `chunk.TimeGrid`) or of every frame (None).

        `live`: `source` is a stream that can be read once (a named pipe), decoded by one worker
        with PyAV from start to end. `chunk_frames` overrides `decode.chunk_frames` for this
        request (a stream sends small chunks, so no frame waits for a chunk to fill).
        `max_lag_s` (live only): keep up with the feed, skipping what is further behind it; the
        clips with skipped frames come marked in `ClipBatch.dropped`.

        Close the iterator (`contextlib.aclosing`) or cancel its consumer to stop decoding early.
        """
        if frame_size < 1 or clip_frames < 1 or clips_per_batch < 1:
            raise ValueError("frame_size, clip_frames and clips_per_batch must be >= 1")
        tmp: pathlib.Path | None = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise UnsupportedMedia("empty input: no video bytes")
            tmp = await asyncio.to_thread(self._write_temp, source)
            path = tmp
        else:
            path = pathlib.Path(source)
        job = self._job(path, frame_size, sample_fps, live=live, chunk_frames=chunk_frames)
        if max_lag_s is not None:
            if not live:
                raise ValueError("max_lag_s is for live streams")
            job = dataclasses.replace(job, live_max_lag_s=max_lag_s)
        scheduler = SegmentScheduler(self.pool, job, self.settings)
        try:
            async for batch in self._clips(scheduler, clip_frames, clips_per_batch, sample_fps):
                yield batch
        finally:
            await asyncio.shield(scheduler.finish())
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _job(
        self, path: pathlib.Path, frame_size: int, sample_fps: float | None, *,
        live: bool = False, chunk_frames: int | None = None,
    ) -> msg.DecodeJob:
        s = self.settings
        chunk = s.chunk_frames if chunk_frames is None else chunk_frames
        if chunk < 1:
            raise ValueError("chunk_frames must be >= 1")
        self.frames_memory.prepare(max(chunk, s.chunk_frames) * frame_size * frame_size * 3)
        credits = max(2, s.ahead_bytes // (chunk * frame_size * frame_size * 3))
        return msg.DecodeJob(
            path=str(path),
            frame_size=frame_size,
            chunk_frames=chunk,
            threads=s.decoder_threads,
            workers=s.workers,
            # A segment fits in the worker's credits, so a worker ahead never waits mid-segment.
            segment_frames=0 if s.workers < 2 or live else min(s.segment_frames, (credits - 1) * chunk),
            sample_fps=sample_fps,
            live=live,
            preferred_backend=s.backend,
            threads_min_pixels=s.threads_min_pixels,
            limits=msg.Limits(
                max_frame_pixels=self.max_frame_pixels,
                max_duration_s=self.max_duration_s,
                decord_max_bytes=s.decord_max_bytes,
                decord_max_frames=s.decord_max_frames,
            ),
        )

    async def _clips(
        self, scheduler: SegmentScheduler, clip_frames: int, per_batch: int, sample_fps: float | None
    ) -> AsyncIterator[ClipBatch]:
        await scheduler.open()
        # No frame_duration from the container's rate: where frames lack durations, that rate is
        # often derived from the same broken timestamps FrameTimes estimates a better one from.
        times = FrameTimes(max_gap_s=self.settings.max_gap_s)
        grid = TimeGrid(sample_fps, max_gap_s=self.settings.max_gap_s) if sample_fps else None
        assembler = ClipAssembler(clip_frames)
        marks = _ClipMarks(clip_frames)  # in step with the assembler
        batches = _Batcher(per_batch, self.frames_memory)
        frames = 0

        def info() -> VideoInfo:
            return dataclasses.replace(
                scheduler.video, frames=frames, duration_s=times.end or 0.0, decoder=scheduler.decoder
            )

        async for chunk in scheduler.chunks():
            starts, ends = times.repair(chunk.starts, chunk.durations)
            frames += len(starts)
            if self.max_duration_s and times.end > self.max_duration_s:
                raise TooLarge(
                    f"the video is longer than the limit of {self.max_duration_s:g} s (limits.max_duration_s)"
                )
            if grid is None:
                clips = assembler.push(chunk.frames, starts, ends)
                for batch in batches.add(*clips, marks.push(chunk.skipped)):
                    yield ClipBatch(*batch[:2], info(), batch[2])
                continue
            picked, starts, ends = grid.sample(starts, ends)
            # A frame may be sampled many times (a still stretch): push a chunk's worth at a time.
            step = self.settings.chunk_frames
            for i in range(0, len(picked), step):
                part = slice(i, i + step)
                sampled = _take(chunk.frames, picked[part], self.frames_memory)
                clips = assembler.push(sampled, starts[part], ends[part])
                for batch in batches.add(*clips, marks.push(chunk.skipped[picked[part]])):
                    yield ClipBatch(*batch[:2], info(), batch[2])

        if frames == 0:
            reason = scheduler.note or "the decoders returned no frames"
            raise UnsupportedMedia(f"no decodable video frames in the input ({reason})")
        for batch in batches.add(*assembler.flush(), marks.flush()):
            yield ClipBatch(*batch[:2], info(), batch[2])
        last = batches.rest()
        if last is not None:
            yield ClipBatch(*last[:2], info(), last[2])

    def _write_temp(self, data: bytes | bytearray | memoryview) -> pathlib.Path:
        if self._tmpdir is None:
            raise RuntimeError("VideoDecoder.start() was not called")
        fd, name = tempfile.mkstemp(dir=self._tmpdir, suffix=".video")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return pathlib.Path(name)


class _ClipMarks:
    """Per clip, whether any of its frames was skipped: fed the frames' flags as a `ClipAssembler`
    is fed the frames, it cuts the same clips."""

    def __init__(self, clip_frames: int) -> None:
        self.clip_frames = clip_frames
        self.pending = np.zeros(0, bool)

    def push(self, skipped: np.ndarray) -> np.ndarray:
        flags = np.concatenate([self.pending, skipped])
        cut = len(flags) // self.clip_frames * self.clip_frames
        self.pending = flags[cut:]
        return flags[:cut].reshape(-1, self.clip_frames).any(axis=1)

    def flush(self) -> np.ndarray:
        last, self.pending = self.pending, self.pending[:0]
        return last.any(keepdims=True) if len(last) else np.zeros(0, bool)


def _take(frames: np.ndarray, picked: np.ndarray, memory: SharedFrames) -> np.ndarray:
    """frames[picked], as a view (no copy) where the picks are consecutive (the video's own rate),
    else in a `memory` slot when one is free."""
    if len(picked) and picked[-1] - picked[0] == len(picked) - 1 and (np.diff(picked) == 1).all():
        return frames[picked[0] : picked[-1] + 1]
    out = _shared(memory, (len(picked), *frames.shape[1:]), frames.dtype)
    return np.take(frames, picked, axis=0, out=out, mode="clip")  # "raise" would buffer the output


def _shared(memory: SharedFrames, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """An array of `shape` in a `memory` slot, or None."""
    slot = memory.take(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return None if slot is None else slot.view(dtype).reshape(shape)


class _Batcher:
    """Cuts batches of `size` rows of parallel arrays (clips, their spans, their flags). A batch
    inside one added part is a view of it; only a batch spanning parts is copied, as each full
    pass over the clips costs the gateway CPU (README, "Speed")."""

    def __init__(self, size: int, memory: SharedFrames) -> None:
        self.size = size
        self.memory = memory  # a batch spanning parts is joined there when a slot is free
        self.parts: list[tuple[np.ndarray, ...]] = []  # added, not handed out yet
        self.filled = 0

    def add(self, *arrays: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        if len(arrays[0]):
            self.parts.append(arrays)
            self.filled += len(arrays[0])
        full = []
        while self.filled >= self.size:
            full.append(self._take(self.size))
        return full

    def rest(self) -> tuple[np.ndarray, ...] | None:
        return self._take(self.filled) if self.filled else None

    def _take(self, n: int) -> tuple[np.ndarray, ...]:
        taken, rows = [], 0
        while rows < n:
            part = self.parts[0]
            k = min(n - rows, len(part[0]))
            taken.append(tuple(a[:k] for a in part))
            if k == len(part[0]):
                self.parts.pop(0)
            else:
                self.parts[0] = tuple(a[k:] for a in part)
            rows += k
        self.filled -= n
        if len(taken) == 1:
            return taken[0]
        clips, *rest = zip(*taken)
        out = _shared(self.memory, (n, *clips[0].shape[1:]), clips[0].dtype)
        return (np.concatenate(clips, out=out), *(np.concatenate(columns) for columns in rest))


@dataclass
class _Assigned:
    segment: int
    worker: WorkerProcess


class SegmentScheduler:
    """One request's decode: has one worker open the video, hands the plan's other segments to
    idle workers as they free up, and yields the frames of every segment in order."""

    def __init__(self, pool: WorkerPool, job: msg.DecodeJob, settings: DecodeSettings) -> None:
        self.pool = pool
        self.timeout = settings.stall_timeout_s
        self.max_workers = settings.workers
        chunk_bytes = job.chunk_frames * job.frame_size * job.frame_size * 3
        self.credits = max(2, settings.ahead_bytes // chunk_bytes)
        if job.live_max_lag_s is not None:
            # A stream keeping up with real time: its frames wait in the worker's readahead, which
            # sees how late they are, not in the gateway's inbox (decode.ahead_bytes is ~20 s of a
            # stream's 112 px frames).
            self.credits = min(self.credits, LIVE_CREDITS)
        self.job = dataclasses.replace(job, credits=self.credits)  # sizes each worker's frame arena
        self.workers: list[WorkerProcess] = []
        self.pending: deque[int] = deque()  # segments not given to a worker yet
        self.assigned: deque[_Assigned] = deque()  # in order; the first is being consumed
        self.plan: msg.Plan | None = None
        self.video = VideoInfo(fps=0.0, width=0, height=0, frames=0, duration_s=0.0)
        self.decoder = ""
        self.note = ""
        self.segment_end = -float("inf")  # latest start seen so far
        self.trimmed = 0  # the last segment whose repeated leading frames were dropped (0 has none)
        self.failed = False

    async def open(self) -> None:
        """Have a worker open the video and plan it; it then decodes the first segment."""
        first = await self.pool.acquire()
        # Split among the workers idle now (and with their threads if it stays one segment):
        # with every worker busy, splitting adds an open and a seek, threads add CPU.
        idle = min(self.pool.idle_count(), self.max_workers - 1)
        self.job = dataclasses.replace(self.job, workers=1 + idle)
        self._add_worker(first)
        first.send(self.job)
        opened, _ = await self._next(first)
        if not isinstance(opened, msg.Opened):
            raise InternalError(f"unexpected decoder message {type(opened).__name__}")
        self.plan, self.video, self.note = opened.plan, opened.video, opened.note
        self.decoder = opened.video.decoder
        self.assigned.append(_Assigned(0, first))
        self.pending.extend(range(1, len(self.plan.segments)))

    async def chunks(self) -> AsyncIterator[FrameChunk]:
        """The frames of every segment, in order (after `open`)."""
        size = self.job.frame_size

        while self.assigned or self.pending:
            self._take_workers()
            if not self.assigned:
                # Every segment handed out is done and no idle worker took the rest (a worker's
                # `SegmentDone` can arrive before `open` has planned them): one of ours goes on.
                self._assign(self.pending.popleft(), self.workers[0])
            current = self.assigned[0]
            m, payload = await self._next(current.worker)
            if isinstance(m, msg.SegmentDone):
                if m.segment == current.segment:
                    self.assigned.popleft()
                if m.decoder:
                    self.decoder = m.decoder
                continue
            if not isinstance(m, msg.Frames) or payload is None:
                raise InternalError(f"unexpected decoder message {type(m).__name__}")
            current.worker.send(msg.Credit(1))
            frames = payload.reshape(len(m.starts), size, size, 3)
            starts, durations = m.starts, m.durations
            skipped = np.zeros(len(starts), bool) if m.skipped is None else m.skipped
            if m.segment != self.trimmed:
                # A segment may begin with frames the previous one ended with (decord's seek or
                # PyAV's keyframe snapping): drop its leading frames up to the previous end.
                repeated = np.cumprod(starts <= self.segment_end).sum()  # NaN never repeats
                frames, starts, durations = frames[repeated:], starts[repeated:], durations[repeated:]
                skipped = skipped[repeated:]
                if len(starts):
                    self.trimmed = m.segment
            if np.isfinite(starts).any():
                self.segment_end = max(self.segment_end, float(np.nanmax(starts)))
            if len(starts) == 0:
                continue
            yield FrameChunk(frames, starts, durations, skipped)

    def _next_job(self, segment: int) -> msg.DecodeJob:
        return dataclasses.replace(self.job, segment=segment, plan=self.plan)

    def _assign(self, segment: int, w: WorkerProcess) -> None:
        self.assigned.append(_Assigned(segment, w))
        w.send(self._next_job(segment))

    def _on_segment_done(self, w: WorkerProcess) -> None:
        # A worker finished a segment: give it the next one right away (its `SegmentDone` is
        # still queued behind the segment's last chunks for the consumer).
        if self.pending and not self.failed:
            self._assign(self.pending.popleft(), w)

    def _take_workers(self) -> None:
        while self.pending and len(self.workers) < self.max_workers:
            w = self.pool.try_acquire()
            if w is None:
                return
            self._add_worker(w)
            self._assign(self.pending.popleft(), w)

    def _add_worker(self, w: WorkerProcess) -> None:
        self.workers.append(w)
        w.jobs += 1
        w.on_segment_done = self._on_segment_done
        w.send(msg.Credit(self.credits))

    async def _next(self, w: WorkerProcess) -> tuple[msg.FromWorker, bytes | None]:
        try:
            m, payload = await w.recv(self.timeout)
        except VqsError:  # Timeout: the worker is stuck
            self._drop(w)
            raise
        if isinstance(m, Died):
            self._drop(w)
            code = w.proc.returncode
            raise UnsupportedMedia(f"the video decoder crashed on this input (exit code {code})")
        if isinstance(m, msg.Failed):
            self.failed = True
            if m.kind in _FAILURES:
                raise _FAILURES[m.kind](m.message)
            logger.error("decode worker %s failed: %s", w.name, m.message)
            raise InternalError("the video decoder failed on this input")
        return m, payload

    def _drop(self, w: WorkerProcess) -> None:
        self.failed = True
        self.workers.remove(w)
        self.pool.replace(w)

    async def finish(self) -> None:
        self.failed = True
        workers, self.workers = self.workers, []
        await asyncio.gather(*(self.pool.release(w) for w in workers), return_exceptions=True)
