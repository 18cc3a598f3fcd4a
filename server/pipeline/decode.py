"""Video decoding in worker processes: decord first, PyAV as the fallback, bounded memory.

One `VideoDecoder` per gateway owns a pool of `settings.workers` processes. A request streams
`ClipBatch`es: workers decode frames already resized to `frame_size`, in chunks of
`chunk_frames`, and send them over a pipe as raw uint8; the parent cuts them into clips.

Flow control and memory: each worker may have at most `ahead_bytes` of chunks sent but not yet
consumed, so a request holds a few chunks per worker whatever the video's length.

Speed: a video is split at keyframes into near-equal segments of at most `segment_frames` frames
(a short one into one segment per worker); while the request's first worker decodes one segment,
idle workers decode the next ones (measured on 2 cores: 1.8x the frame rate of one process,
against 1.25x for decord's `num_threads=2`). Segments are consumed in order, so the frame stream
is the same as a sequential decode.

Decoders: decord for inputs up to `decord_max_bytes`, PyAV above (decord's demuxer reads ahead
without bound: a worker's RSS grew to the file's size, 2.2 GB for a 10-minute 720p file; PyAV
stays at ~80 MB). PyAV is also the fallback when decord cannot open an input or stops early.

Safety: a worker the parent waits on for `stall_timeout_s` without a message is killed and
replaced, and the request fails with `Timeout`. A worker that crashes is replaced and the request
fails with `UnsupportedMedia`. Workers are recycled after `recycle_after` videos or when their RSS
passes `recycle_rss_mb` (decord leaks). Closing the stream (or cancelling its consumer) tells its
workers to stop at their next check (every few frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from server.errors import TooLarge, Timeout, UnsupportedMedia, VqsError
from server.pipeline import _decode_worker as worker_impl
from server.pipeline.chunk import ClipAssembler, TimeGrid
from server.settings import DecodeSettings

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Bytes of decoded frames each worker may send ahead of the consumer (at least 2 chunks).
_AHEAD_BYTES = 24 * 2**20
# How long a released worker may take to acknowledge before it is killed.
_RELEASE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    width: int
    height: int
    frames: int  # decoded so far
    duration_s: float  # end of the last decoded frame so far
    codec: str = ""
    decoder: str = ""  # "decord" or "pyav"


@dataclass(frozen=True)
class ClipBatch:
    clips: np.ndarray  # uint8 [n, clip_frames, frame_size, frame_size, 3] (RGB)
    spans_s: np.ndarray  # float64 [n, 2] start/end seconds of each clip
    info: VideoInfo


class _WorkerDied(Exception):
    pass


class _Worker:
    """One decode process, its pipe, and a thread that forwards its messages to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.loop = loop
        self.name = name
        self.inbox: asyncio.Queue[tuple[tuple, bytes | None]] = asyncio.Queue()
        self.jobs = 0
        self.rss_mb = 0.0
        self.on_end: Any = None  # callback(worker, message) run on the loop for "end" messages
        # A plain subprocess (not multiprocessing's spawn), so the parent's __main__ is never
        # re-imported and the worker imports only what it needs.
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", worker_impl.__name__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                header = self.conn.recv()
                payload = self.conn.recv_bytes() if header[0] == "frames" else None
            except (EOFError, OSError):
                self._deliver(("dead",), None)
                return
            self._deliver(header, payload)

    def _deliver(self, header: tuple, payload: bytes | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._on_message, header, payload)
        except RuntimeError:  # loop closed
            pass

    def _on_message(self, header: tuple, payload: bytes | None) -> None:
        if header[0] == "end" and self.on_end is not None:
            self.on_end(self, header)
        self.inbox.put_nowait((header, payload))

    def send(self, msg: tuple) -> None:
        with self._send_lock:
            self.conn.send(msg)

    async def recv(self, timeout: float) -> tuple[tuple, bytes | None]:
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            raise Timeout(f"video decoder produced nothing for {timeout:g} s") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.conn.close()


class VideoDecoder:
    """Owns the decode worker processes; one per gateway."""

    def __init__(
        self,
        settings: DecodeSettings,
        *,
        max_frame_pixels: int | None = None,
        max_duration_s: float | None = None,
        recycle_after: int = 50,
        recycle_rss_mb: float = 220.0,
        segment_frames: int = 240,
        ahead_bytes: int = _AHEAD_BYTES,
        decord_max_bytes: int = 96 * 2**20,
    ) -> None:
        self.settings = settings
        self.max_frame_pixels = max_frame_pixels
        self.max_duration_s = max_duration_s
        self.recycle_after = recycle_after
        self.recycle_rss_mb = recycle_rss_mb
        # Target length of the segments a long video is split into (snapped to keyframes);
        # 0 decodes every video sequentially in one worker.
        self.segment_frames = segment_frames if settings.workers > 1 else 0
        self.ahead_bytes = ahead_bytes
        # decord's memory grows with the input's size; larger inputs are decoded with PyAV.
        self.decord_max_bytes = decord_max_bytes
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: set[_Worker] = set()
        self._tasks: set[asyncio.Task] = set()
        self._tmpdir: pathlib.Path | None = None
        self._serial = 0
        self._closed = False

    # -- pool ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._idle is not None:
            return
        self._idle = asyncio.Queue()
        self._tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="vqs-decode-"))
        await asyncio.gather(*(self._spawn() for _ in range(self.settings.workers)))
        logger.info("decode pool ready: %d workers", self.settings.workers)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for w in list(self._all):
            with contextlib.suppress(Exception):
                w.send(("exit",))
        for w in list(self._all):
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(w.proc.wait, 3)
            w.kill()
        self._all.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._idle = None

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._all]

    async def _spawn(self) -> None:
        self._serial += 1
        loop = asyncio.get_running_loop()
        w = await asyncio.to_thread(_Worker, loop, f"vqs-decode-{self._serial}")
        self._all.add(w)
        try:
            header, _ = await w.recv(max(self.settings.stall_timeout_s, 60.0))
            if header[0] != "ready":
                raise _WorkerDied(f"decode worker failed to start: {header}")
        except BaseException:
            self._all.discard(w)
            w.kill()
            raise
        if self._closed or self._idle is None:
            w.kill()
            return
        self._idle.put_nowait(w)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _replace(self, w: _Worker) -> None:
        """Kill `w` and start a new worker in its place (in the background)."""
        self._all.discard(w)
        w.kill()
        if not self._closed:
            self._background(self._spawn_logged())

    async def _spawn_logged(self) -> None:
        try:
            await self._spawn()
        except Exception:
            logger.exception("could not start a decode worker")

    def _usable(self, w: _Worker) -> bool:
        """False (and the worker replaced) if it died while idle."""
        if w.proc.poll() is None and w.inbox.empty():
            return True
        self._replace(w)
        return False

    async def _acquire(self) -> _Worker:
        if self._idle is None:
            raise RuntimeError("VideoDecoder.start() was not called")
        while True:
            w = await self._idle.get()
            if self._usable(w):
                return w

    def _try_acquire(self) -> _Worker | None:
        while self._idle is not None and not self._idle.empty():
            w = self._idle.get_nowait()
            if self._usable(w):
                return w
        return None

    async def _release(self, w: _Worker) -> None:
        """Stop whatever `w` does for a request, then return it to the pool (or recycle it)."""
        w.on_end = None
        try:
            w.send(("release",))
            while True:
                header, _ = await w.recv(_RELEASE_TIMEOUT_S)
                if header[0] == "released":
                    w.rss_mb = header[1]
                    break
                if header[0] == "dead":
                    raise _WorkerDied()
        except (VqsError, _WorkerDied, OSError):
            self._replace(w)
            return
        w.inbox = asyncio.Queue()
        if w.jobs >= self.recycle_after or w.rss_mb > self.recycle_rss_mb:
            logger.info("recycling %s after %d videos (rss %.0f MB)", w.name, w.jobs, w.rss_mb)
            with contextlib.suppress(OSError):
                w.send(("exit",))
            self._replace(w)
        elif self._idle is not None and not self._closed:
            self._idle.put_nowait(w)
        else:
            w.kill()

    # -- requests -----------------------------------------------------------------------------

    async def stream(
        self,
        source: bytes | pathlib.Path,
        *,
        frame_size: int,
        clip_frames: int,
        clips_per_batch: int,
        sample_fps: float | None = None,
    ) -> AsyncIterator[ClipBatch]:
        """Decode `source` and yield batches of clips in time order, of frames sampled at
        `sample_fps` (the encoder's frame rate; see `chunk.TimeGrid`) or of every frame (None).

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
        run = _Run(self, path, frame_size, clip_frames, clips_per_batch, sample_fps)
        try:
            async for batch in run.batches():
                yield batch
        finally:
            await asyncio.shield(run.finish())
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _write_temp(self, data: bytes | bytearray | memoryview) -> pathlib.Path:
        if self._tmpdir is None:
            raise RuntimeError("VideoDecoder.start() was not called")
        fd, name = tempfile.mkstemp(dir=self._tmpdir, suffix=".video")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return pathlib.Path(name)


@dataclass
class _Segment:
    index: int
    bounds: dict  # planned by the worker: frame indices (decord) or keyframe-snapped pts (PyAV)
    worker: _Worker | None = None


class _Run:
    """One request: dispatches segments to workers and reassembles frames in order."""

    def __init__(
        self,
        dec: VideoDecoder,
        path: pathlib.Path,
        frame_size: int,
        clip_frames: int,
        per_batch: int,
        sample_fps: float | None,
    ) -> None:
        self.dec = dec
        self.path = path
        self.frame_size = frame_size
        self.clip_frames = clip_frames
        self.per_batch = per_batch
        self.grid = TimeGrid(sample_fps) if sample_fps else None
        self.timeout = dec.settings.stall_timeout_s
        self.workers: list[_Worker] = []
        self.pending: deque[_Segment] = deque()
        self.assigned: deque[_Segment] = deque()
        self.meta: dict[str, Any] = {}
        self.frames = 0
        self.duration_s = 0.0
        self.last_start = -float("inf")
        self.failed = False
        chunk_bytes = dec.settings.chunk_frames * frame_size * frame_size * 3
        self.credits = max(2, dec.ahead_bytes // chunk_bytes)

    def _job(self, seg: _Segment | None) -> tuple:
        s = self.dec.settings
        return (
            "job",
            {
                "path": str(self.path),
                "frame_size": self.frame_size,
                "chunk_frames": s.chunk_frames,
                "threads": s.decoder_threads,
                "max_frame_pixels": self.dec.max_frame_pixels,
                "max_duration_s": self.dec.max_duration_s,
                "segment_frames": min(self.dec.segment_frames, (self.credits - 1) * s.chunk_frames),
                "workers": s.workers,
                "sample_fps": self.grid.fps if self.grid is not None else None,
                "decord_max_bytes": self.dec.decord_max_bytes,
                "segment": None if seg is None else (seg.index, seg.bounds),
            },
        )

    def _assign(self, seg: _Segment, w: _Worker) -> None:
        seg.worker = w
        self.assigned.append(seg)
        w.send(self._job(seg))

    def _on_end(self, w: _Worker, header: tuple) -> None:
        # A worker finished a segment: give it the next one right away (its end message is still
        # queued behind the segment's last chunks for the consumer).
        if self.pending and not self.failed:
            self._assign(self.pending.popleft(), w)

    def _take_workers(self) -> None:
        while self.pending and len(self.workers) < self.dec.settings.workers:
            w = self.dec._try_acquire()
            if w is None:
                return
            self._add_worker(w)
            self._assign(self.pending.popleft(), w)

    def _add_worker(self, w: _Worker) -> None:
        self.workers.append(w)
        w.jobs += 1  # videos this worker has worked on
        w.on_end = self._on_end
        w.send(("credit", self.credits))

    async def _next(self, w: _Worker) -> tuple[tuple, bytes | None]:
        try:
            header, payload = await w.recv(self.timeout)
        except Timeout:
            self.failed = True
            self.workers.remove(w)
            self.dec._replace(w)
            raise
        if header[0] == "dead":
            self.failed = True
            self.workers.remove(w)
            self.dec._replace(w)
            code = w.proc.returncode
            raise UnsupportedMedia(f"the video decoder crashed on this input (exit code {code})")
        if header[0] == "error":
            self.failed = True
            _, kind, message = header
            if kind == "too_large":
                raise TooLarge(message)
            if kind == "unsupported":
                raise UnsupportedMedia(message)
            raise VqsError(f"video decoder failed: {message}")
        return header, payload

    async def batches(self) -> AsyncIterator[ClipBatch]:
        first = await self.dec._acquire()
        self._add_worker(first)
        first.send(self._job(None))
        header, _ = await self._next(first)
        if header[0] != "info":
            raise VqsError(f"unexpected decoder message {header[0]!r}")
        self.meta = header[1]
        plan = [_Segment(i, bounds) for i, bounds in enumerate(self.meta["segments"])]
        plan[0].worker = first
        self.assigned.append(plan[0])
        self.pending.extend(plan[1:])

        assembler = ClipAssembler(self.clip_frames)
        s = self.frame_size
        shape = (self.per_batch, self.clip_frames, s, s, 3)
        batch, spans = np.empty(shape, np.uint8), np.empty((self.per_batch, 2), np.float64)
        filled = 0

        while self.assigned:
            self._take_workers()
            seg = self.assigned[0]
            w = seg.worker
            header, payload = await self._next(w)
            kind = header[0]
            if kind == "end":
                if header[1] == seg.index:
                    self.assigned.popleft()
                if header[2] and header[2] != self.meta.get("decoder"):
                    self.meta["decoder"] = header[2]
                continue
            if kind != "frames":
                raise VqsError(f"unexpected decoder message {kind!r}")
            w.send(("credit", 1))
            _, _, n, starts, ends = header
            frames = np.frombuffer(payload, np.uint8).reshape(n, s, s, 3)
            starts = np.asarray(starts, np.float64)
            ends = np.asarray(ends, np.float64)
            keep = starts > self.last_start  # drop frames repeated across segment boundaries
            if not keep.all():
                frames, starts, ends = frames[keep], starts[keep], ends[keep]
            if len(starts) == 0:
                continue
            self.last_start = float(starts[-1])
            self.frames += len(starts)
            self.duration_s = max(self.duration_s, float(ends.max()))
            if self.grid is not None:
                picked, ticks = self.grid.pick(starts, ends)
                frames = frames[picked]
                # A sample lasts one tick (clips tile time), but never past the last frame.
                starts, ends = ticks, np.minimum(ticks + 1 / self.grid.fps, ends.max())
            clips, clip_spans = assembler.push(frames, starts, ends)
            i = 0
            while i < len(clips):
                take = min(len(clips) - i, self.per_batch - filled)
                batch[filled : filled + take] = clips[i : i + take]
                spans[filled : filled + take] = clip_spans[i : i + take]
                filled += take
                i += take
                if filled == self.per_batch:
                    yield ClipBatch(batch, spans, self._info())
                    batch, spans = np.empty(shape, np.uint8), np.empty((self.per_batch, 2), np.float64)
                    filled = 0

        if self.frames == 0:
            reason = self.meta.get("note") or "the decoders returned no frames"
            raise UnsupportedMedia(f"no decodable video frames in the input ({reason})")
        clips, clip_spans = assembler.flush()
        if len(clips):
            batch[filled] = clips[0]
            spans[filled] = clip_spans[0]
            filled += 1
        if filled:
            yield ClipBatch(batch[:filled], spans[:filled], self._info())

    def _info(self) -> VideoInfo:
        return VideoInfo(
            fps=float(self.meta.get("fps") or 0.0),
            width=int(self.meta.get("width") or 0),
            height=int(self.meta.get("height") or 0),
            frames=self.frames,
            duration_s=self.duration_s,
            codec=str(self.meta.get("codec") or ""),
            decoder=str(self.meta.get("decoder") or ""),
        )

    async def finish(self) -> None:
        self.failed = True
        workers, self.workers = self.workers, []
        await asyncio.gather(*(self.dec._release(w) for w in workers), return_exceptions=True)
