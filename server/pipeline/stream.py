"""One video analysed while it arrives (`AnalyzeStream`): the same decode -> clips -> encoder ->
query decoder -> assemble as `Analyzer.analyze`, fed from a pipe, answering per window of clips.

Four coroutines share one stream's state (`_Stream`), on the gateway's event loop:
- intake: the client's byte chunks into the decoder's pipe (`stream_input.PipeFeed`), or for an MP4
  with its index at the end into a bounded spill file decoded when the upload ends; it ends the
  stream with DEADLINE_EXCEEDED when the client sends nothing for `limits.stream_idle_s`;
- decode: `VideoDecoder.stream(live=True)` (PyAV in a pool worker reading the pipe) yields clips
  one at a time; each waits in a queue of at most `limits.stream_pending_clips` for the encoder.
  In `realtime` mode the worker reads the pipe as fast as the feed fills it and does not decode
  what is more than `limits.stream_max_lag_s` behind the feed (up to the next keyframe: the
  clips it would have made come marked dropped, in their place), and a clip arriving pushes out
  the waiting clips that end more than that before it or beyond the queue's length; both count
  as dropped in the events. In `archive` mode a clip
  waits, so the decoder stops reading, the pipe fills, intake stops reading the RPC and gRPC's
  flow control stops the sender;
- encode: up to `limits.encode_inflight` encoder requests at once, each of the clips waiting then
  (at most `limits.clips_per_batch`), so an encoder that falls behind gets larger batches;
- windows: window k holds clips [k * hop, k * hop + window); once all of them are encoded (or
  dropped), the query decoder answers about them (`Analyzer.answer`, as Analyze does for a whole
  video) and the event goes out; windows go out in order. At the end the clips no window covered
  yet make one last, shorter window, and the final event answers about every clip of the stream
  (the same clips and answers as Analyze on the same bytes). When the action parser is served,
  it parses every decoded frame as the stream goes (`segments.FrameRun`, in windows as for
  Analyze), and the final event carries the whole stream's `segments` and `boundaries_s`; a
  stream whose decoder skipped frames (realtime, behind the feed) has holes and gets none.

Times are the stream's own (frame timestamps repaired by `chunk.FrameTimes`, from its first frame),
never arrival times. A failure of one window (an encoder or decoder request) is reported in that
window's event; `MAX_FAILED_WINDOWS` failed windows in a row end the stream with that error.
Cancelling the consumer (the client cancels, its deadline passes) cancels everything: the decode
worker is released, no further Triton request is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import pathlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

import numpy as np

from server.errors import InvalidInput, Overloaded, Timeout, UnsupportedMedia, VqsError
from server.pipeline import assemble, segments
from server.pipeline.analyze import Analyzer
from server.pipeline.assemble import AnalysisResult
from server.pipeline.decode import VideoInfo
from server.pipeline.stream_input import Layout, Mp4Layout, PipeFeed, SpillFile, REMUX_HINT
from server.settings import LimitsSettings
from server.triton import QUERY_DECODER_MODEL, EncoderSpec

logger = logging.getLogger(__name__)

Mode = Literal["realtime", "archive"]

# Frames per message from the decode worker for a live stream: a window's last frame is not held
# back waiting for a fuller chunk.
LIVE_CHUNK_FRAMES = 2
# ... and for a stream that is not live: a window's clips do not wait for a whole video's chunk
# (decode.chunk_frames).
STREAM_CHUNK_FRAMES = 64
# Windows in a row whose analysis failed before the stream is ended with the last error.
MAX_FAILED_WINDOWS = 3
# A progress event at most this often (seconds of wall time).
PROGRESS_EVERY_S = 1.0
# Events queued for the client beyond which the stream waits for it to read them.
EVENT_QUEUE = 16
# How far the end of a resumed window may be from the token's (seconds): farther, it is not the
# same feed.
RESUME_TOLERANCE_S = 0.05


@dataclass(frozen=True)
class StreamLimits:
    """The stream settings, read in one place from `LimitsSettings`."""

    idle_s: float
    max_chunk_bytes: int
    max_bytes_per_s: int
    window_clips: int
    max_window_clips: int
    pending_clips: int
    max_spill_bytes: int
    encode_inflight: int
    clips_per_batch: int
    max_lag_s: float

    @classmethod
    def from_settings(cls, limits: LimitsSettings) -> StreamLimits:
        return cls(
            idle_s=limits.stream_idle_s,
            max_chunk_bytes=limits.stream_max_chunk_bytes,
            max_bytes_per_s=limits.stream_max_bytes_per_s,
            window_clips=limits.stream_window_clips,
            max_window_clips=limits.stream_max_window_clips,
            pending_clips=limits.stream_pending_clips,
            max_spill_bytes=limits.max_upload_bytes,
            encode_inflight=limits.encode_inflight,
            clips_per_batch=limits.clips_per_batch,
            max_lag_s=limits.stream_max_lag_s,
        )


@dataclass(frozen=True)
class ResumeToken:
    """Where a stream's last event ended: its last clip's index and that clip's end (seconds)."""

    last_clip: int
    end_s: float

    def encode(self) -> str:
        return f"v1:{self.last_clip}:{self.end_s:.6f}"

    @classmethod
    def parse(cls, text: str) -> ResumeToken:
        parts = text.split(":")
        try:
            if len(parts) != 3 or parts[0] != "v1":
                raise ValueError(text)
            token = cls(int(parts[1]), float(parts[2]))
        except ValueError:
            raise InvalidInput(
                f"resume_token {text[:100]!r} is not one of this server's tokens (send back an "
                "event's resume_token as it is)"
            ) from None
        if token.last_clip < 0 or not math.isfinite(token.end_s):
            raise InvalidInput(f"resume_token {text[:100]!r} is out of range")
        return token


@dataclass(frozen=True)
class StreamOptions:
    encoder: str
    window_clips: int
    hop_clips: int
    mode: Mode = "realtime"
    window_attention: bool = True
    producer_start_unix_s: float | None = None
    resume: ResumeToken | None = None
    budget: float = 1.0  # share of the encoder's full compute, (0, 1] (checked by its spec)

    def __post_init__(self) -> None:
        if self.window_clips < 1 or self.hop_clips < 1:
            raise ValueError("window_clips and hop_clips must be >= 1")
        if self.mode not in ("realtime", "archive"):
            raise ValueError(f"mode must be realtime or archive, got {self.mode!r}")


class EventKind(Enum):
    PROGRESS = "progress"
    WINDOW = "window"
    FINAL = "final"


@dataclass(frozen=True)
class StreamEvent:
    kind: EventKind
    start_s: float = 0.0
    end_s: float = 0.0
    window: int = -1
    first_clip: int = -1
    last_clip: int = -1
    result: AnalysisResult | None = None
    model_version: str = ""
    resume_token: str = ""
    dropped_clips: int = 0
    dropped_clips_total: int = 0
    lag_s: float = 0.0
    producer_time_unix_s: float | None = None
    error: str = ""
    note: str = ""
    received_bytes: int = 0
    clips_decoded: int = 0
    clips_analysed: int = 0


class StreamObserver(Protocol):
    def stream_window(self, lag_s: float, dropped_clips: int) -> None: ...
    def stream_stalled(self) -> None: ...


class ClipState(Enum):
    WAITING = 0
    ENCODING = 1
    DONE = 2
    DROPPED = 3
    FAILED = 4


_RESOLVED = (ClipState.DONE, ClipState.DROPPED, ClipState.FAILED)
_END = object()


class StreamAnalyzer:
    """Runs `AnalyzeStream`s; one per gateway, sharing the `Analyzer`'s Triton and decoder."""

    def __init__(
        self,
        analyzer: Analyzer,
        limits: StreamLimits,
        *,
        workdir: pathlib.Path,
        observer: StreamObserver | None = None,
    ) -> None:
        self.analyzer = analyzer
        self.limits = limits
        self.workdir = pathlib.Path(workdir)
        self.observer = observer

    async def run(self, options: StreamOptions, chunks: AsyncIterator[bytes]) -> AsyncIterator[StreamEvent]:
        """The stream's events, ending with the final one. Closing this iterator (or cancelling
        its consumer) stops the stream's decoding and Triton requests."""
        spec = await self.analyzer.encoder(options.encoder)
        spec.check_budget(options.budget)
        version = await self._model_version(spec)
        frames = await segments.frame_run_for(self.analyzer.triton, spec, segments=True, embeddings=False)
        stream = _Stream(self, options, spec, version, frames)
        async for event in stream.events(chunks):
            yield event

    async def _model_version(self, spec: EncoderSpec) -> str:
        try:
            index = await self.analyzer.triton.model_index()
        except VqsError:
            return ""
        wanted = (spec.model, QUERY_DECODER_MODEL)
        versions = {m.get("name"): m.get("version", "") for m in index if m.get("state") == "READY"}
        return ",".join(f"{name}:{versions[name]}" for name in wanted if name in versions)


@dataclass
class _Source:
    path: pathlib.Path
    live: bool


@dataclass
class _Progress:
    received_bytes: int = 0
    first_byte_unix_s: float | None = None
    dropped: int = 0
    analysed: int = 0


class _Stream:
    def __init__(self, owner: StreamAnalyzer, options: StreamOptions, spec: EncoderSpec, version: str,
                 frames: segments.FrameRun):
        self.owner = owner
        self.frames: segments.FrameRun | None = frames if frames.active else None  # the final event's segments
        self.limits = owner.limits
        self.options = options
        self.spec = spec
        self.version = version
        self.events_out: asyncio.Queue = asyncio.Queue(EVENT_QUEUE)
        self.source: asyncio.Future[_Source] = asyncio.get_running_loop().create_future()
        self.changed = asyncio.Condition()
        self.progress = _Progress()
        self.spans: list[np.ndarray] = []  # per clip: [start_s, end_s]
        self.states: list[ClipState] = []
        self.errors: dict[int, VqsError] = {}  # why a clip failed in the encoder
        self.features: dict[int, np.ndarray] = {}
        self.kept: dict[int, np.ndarray] = {}  # per clip, what an adaptive encoder kept
        self.gmacs: dict[int, float] = {}  # per clip, what encoding it cost (when the model says)
        self.domain_distance: dict[int, float] = {}  # per clip, when the encoder outputs it
        self.waiting: deque[tuple[int, np.ndarray]] = deque()
        self.decoded_all = False
        self.failure: BaseException | None = None  # of the decoder or the gateway: ends the stream
        self.failed_windows = 0  # in a row
        self.info: VideoInfo | None = None
        self.pipe: PipeFeed | None = None
        self.spill: SpillFile | None = None

    # -- the consumer's side

    async def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[StreamEvent]:
        tasks = [
            asyncio.create_task(self._guard(self._intake(chunks)), name="stream-intake"),
            asyncio.create_task(self._guard(self._analysis()), name="stream-analysis"),
            asyncio.create_task(self._progress_ticks(), name="stream-progress"),
        ]
        try:
            yield self._progress_event()  # at once: the stream is admitted (a client may hold its video until then)
            while True:
                item = await self.events_out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            if self.pipe is not None:
                # End of file for the decode worker, so it sees the release (a worker waiting for
                # bytes on the pipe checks for nothing else).
                self.pipe.abort()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.frames is not None:
                await self.frames.cancel()
            for holder in (self.pipe, self.spill):
                if holder is not None:
                    holder.remove()

    async def _guard(self, work) -> None:
        """Run `work`; hand its failure to the consumer, which ends the stream with it."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self.events_out.put(exc)

    async def _emit(self, event: StreamEvent) -> None:
        await self.events_out.put(event)

    # -- intake: client -> pipe (or spill file)

    async def _intake(self, chunks: AsyncIterator[bytes]) -> None:
        limits = self.limits
        layout = Mp4Layout()
        head: list[bytes] = []  # bytes held until the layout is known (a few hundred at most)
        started = time.monotonic()
        sink: PipeFeed | SpillFile | None = None
        while True:
            try:
                async with asyncio.timeout(limits.idle_s):
                    chunk = await anext(chunks, None)
            except TimeoutError:
                if self.owner.observer is not None:
                    self.owner.observer.stream_stalled()
                raise Timeout(
                    f"the stream sent nothing for {limits.idle_s:g} s (limits.stream_idle_s)"
                ) from None
            if chunk is None:
                break
            if len(chunk) > limits.max_chunk_bytes:
                raise InvalidInput(
                    f"a chunk of {len(chunk)} bytes is above the limit of {limits.max_chunk_bytes} "
                    "bytes (limits.stream_max_chunk_bytes); send smaller chunks"
                )
            if not chunk:
                continue
            p = self.progress
            if p.first_byte_unix_s is None:
                p.first_byte_unix_s = time.time()
            p.received_bytes += len(chunk)
            # The bytes-per-second cap: read no faster (the sender is slowed, not refused).
            ahead = p.received_bytes / limits.max_bytes_per_s - (time.monotonic() - started) - 1.0
            if ahead > 0:
                await asyncio.sleep(ahead)
            if sink is None:
                head.append(chunk)
                if layout.feed(chunk) is Layout.UNDECIDED:
                    continue
                sink = await self._open_sink(layout.layout)
                for piece in head:
                    await sink.write(piece)
                head.clear()
            else:
                await sink.write(chunk)
        if self.progress.received_bytes == 0:
            raise UnsupportedMedia("the stream ended before any video bytes were sent")
        if sink is None:
            sink = await self._open_sink(layout.finish())
            for piece in head:
                await sink.write(piece)
        sink.close()
        if isinstance(sink, SpillFile):
            self.source.set_result(_Source(sink.path, live=False))

    async def _open_sink(self, layout: Layout) -> PipeFeed | SpillFile:
        workdir = self.owner.workdir
        if layout is Layout.INDEX_AT_END:
            self.spill = SpillFile(workdir, self.limits.max_spill_bytes)
            note = (
                "this MP4 has its index (moov) at the end: it is held on disk (up to "
                f"{self.limits.max_spill_bytes} bytes, limits.max_upload_bytes) and analysed when "
                f"the upload ends; {REMUX_HINT} to have it analysed while it arrives"
            )
            await self._emit(self._progress_event(note))
            return self.spill
        self.pipe = PipeFeed(workdir)
        self.source.set_result(_Source(self.pipe.path, live=True))
        return self.pipe

    # -- analysis: decode -> encode -> windows

    async def _analysis(self) -> None:
        source = await self.source
        tasks = [
            asyncio.create_task(self._decode(source), name="stream-decode"),
            asyncio.create_task(self._encode(), name="stream-encode"),
        ]
        try:
            await self._windows()
            for task in tasks:  # they are done: surface a failure the windows did not wait for
                await task
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _wait_for(self, predicate) -> None:
        async with self.changed:
            await self.changed.wait_for(predicate)

    async def _decode(self, source: _Source) -> None:
        spec, limits = self.spec, self.limits
        try:
            batches = self.owner.analyzer.video_decoder.stream(
                source.path,
                frame_size=spec.frame_size,
                clip_frames=spec.clip_frames,
                sample_fps=spec.clip_fps,
                clips_per_batch=1 if source.live else limits.clips_per_batch,
                live=source.live,
                chunk_frames=LIVE_CHUNK_FRAMES if source.live else STREAM_CHUNK_FRAMES,
                max_lag_s=limits.max_lag_s if source.live and self.options.mode == "realtime" else None,
            )
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    self.info = batch.info
                    skipped = np.zeros(len(batch.clips), bool) if batch.dropped is None else batch.dropped
                    await self._parse(batch.clips, batch.spans_s, holes=bool(np.any(skipped)))
                    for clip, span, dropped in zip(batch.clips, batch.spans_s, skipped):
                        await self._add_clip(clip, span, dropped=bool(dropped))
        except Exception as exc:
            self.failure = exc  # the windows stop at once: no final result from part of a stream
            raise
        finally:
            self.decoded_all = True
            await self._notify()

    async def _parse(self, clips: np.ndarray, spans_s, *, holes: bool) -> None:
        """The action parser's share of a decoded batch; frames skipped by the decoder leave holes
        a parse cannot span, so the stream then gets no segments."""
        if self.frames is None:
            return
        if holes:
            await self.frames.cancel()
            self.frames = None
            return
        await self.frames.add(clips, np.asarray(spans_s, np.float64))

    async def _add_clip(self, clip: np.ndarray, span: np.ndarray, *, dropped: bool = False) -> None:
        """`dropped`: the decoder skipped (some of) its frames to keep up with the feed."""
        if self.options.mode == "archive":
            await self._wait_for(lambda: len(self.waiting) < self.limits.pending_clips)
        index = len(self.spans)
        self.spans.append(np.asarray(span, np.float64))
        if dropped:
            self.states.append(ClipState.DROPPED)
            self.progress.dropped += 1
            await self._notify()
            return
        self.states.append(ClipState.WAITING)
        self.waiting.append((index, clip))
        # Realtime only (archive waited above): drop the oldest clips waiting beyond the queue's
        # length or ending more than max_lag_s before this one (the encoder is behind).
        stale_before = float(span[1]) - self.limits.max_lag_s
        while len(self.waiting) > self.limits.pending_clips or (
            self.options.mode == "realtime" and self.spans[self.waiting[0][0]][1] < stale_before
        ):
            dropped, _ = self.waiting.popleft()
            self.states[dropped] = ClipState.DROPPED
            self.progress.dropped += 1
        await self._notify()

    async def _encode(self) -> None:
        inflight: set[asyncio.Task] = set()
        try:
            while True:
                while self.waiting and len(inflight) < self.limits.encode_inflight:
                    take = min(len(self.waiting), self.limits.clips_per_batch)
                    batch = [self.waiting.popleft() for _ in range(take)]
                    inflight.add(asyncio.create_task(self._encode_batch(batch, inflight)))
                if self.failure is not None or (self.decoded_all and not self.waiting and not inflight):
                    break
                await self._wait_for(
                    lambda: (self.waiting and len(inflight) < self.limits.encode_inflight)
                    or (self.decoded_all and not self.waiting and not inflight)
                    or self.failure is not None
                )
        finally:
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    async def _encode_batch(self, batch: list[tuple[int, np.ndarray]], inflight: set[asyncio.Task]) -> None:
        indices = [i for i, _ in batch]
        for i in indices:
            self.states[i] = ClipState.ENCODING
        clips = np.stack([clip for _, clip in batch])  # n, T, H, W, 3
        try:
            encoded = await self.owner.analyzer.triton.encode(
                clips, encoder=self.spec.encoder, budget=self.options.budget)
        except VqsError as exc:  # this batch's windows say so; the stream goes on
            for i in indices:
                self.states[i] = ClipState.FAILED
                self.errors[i] = exc
        except asyncio.CancelledError:
            inflight.discard(asyncio.current_task())
            raise
        except Exception as exc:  # a fault of the gateway: the stream ends with it
            self.failure = exc
        else:
            for row, i in enumerate(indices):
                self.features[i] = encoded.features[row]
                if encoded.kept is not None:
                    self.kept[i] = encoded.kept[row]
                if encoded.gmacs is not None:
                    self.gmacs[i] = float(encoded.gmacs[row])
                if encoded.domain_distance is not None:
                    self.domain_distance[i] = float(encoded.domain_distance[row])
                self.states[i] = ClipState.DONE
            self.progress.analysed += len(indices)
        inflight.discard(asyncio.current_task())
        await self._notify()

    def _resolved(self, first: int, stop: int) -> bool:
        return all(s in _RESOLVED for s in self.states[first:stop])

    async def _windows(self) -> None:
        window, hop = self.options.window_clips, self.options.hop_clips
        k = covered = 0
        while True:
            first, stop = k * hop, k * hop + window
            await self._wait_for(
                lambda: self.failure is not None
                or (len(self.spans) >= stop and self._resolved(first, stop))
                or (self.decoded_all and self._resolved(first, len(self.spans)))
            )
            if self.failure is not None:
                raise self.failure
            if len(self.spans) < stop:  # the stream ended inside this window
                stop = len(self.spans)
                if first >= stop or covered >= stop:
                    break
            await self._window(k, first, stop)
            covered = stop
            k += 1
        await self._final()

    async def _window(self, k: int, first: int, stop: int) -> None:
        spans = np.stack(self.spans[first:stop])
        end_s = float(spans[-1, 1])
        token = ResumeToken(stop - 1, end_s)
        resume = self.options.resume
        if resume is not None and token.last_clip <= resume.last_clip:
            if token.last_clip == resume.last_clip and abs(end_s - resume.end_s) > RESUME_TOLERANCE_S:
                raise InvalidInput(
                    f"resume_token does not fit this stream: its clip {resume.last_clip} ends at "
                    f"{end_s:.3f} s here, at {resume.end_s:.3f} s in the token (send the same feed "
                    "again from its start)"
                )
            return  # delivered before the connection broke
        states = self.states[first:stop]
        done = [i for i in range(first, stop) if states[i - first] is ClipState.DONE]
        dropped = states.count(ClipState.DROPPED)
        failed = [self.errors[i] for i in range(first, stop) if states[i - first] is ClipState.FAILED]
        problem: VqsError | None = failed[0] if failed else None
        result = None
        if done:
            try:
                result = await self._answer(done, window=True)
            except VqsError as exc:
                problem = exc
        error = ""
        if problem is not None:
            where = f"{len(failed)} of {stop - first} clips failed in the encoder" if failed else "the query decoder failed"
            error = f"{where}: {problem.code.name}: {problem}"
        elif not done:
            error = (
                f"all {dropped} clips of this window were dropped: the analysis is behind the "
                "feed (realtime mode); use archive mode to analyse every clip"
            )
        self.failed_windows = self.failed_windows + 1 if problem is not None and result is None else 0
        if self.failed_windows >= MAX_FAILED_WINDOWS:
            raise type(problem)(f"the stream's last {MAX_FAILED_WINDOWS} windows failed: {problem}")
        lag = self._lag(end_s)
        if self.owner.observer is not None:
            self.owner.observer.stream_window(lag, dropped)
        await self._emit(self._event(
            EventKind.WINDOW, spans, window=k, first_clip=first, result=result, token=token,
            dropped=dropped, error=error, lag=lag,
        ))

    async def _final(self) -> None:
        done = [i for i, s in enumerate(self.states) if s is ClipState.DONE]
        if not self.spans:
            raise UnsupportedMedia("no clips could be cut from the stream")
        if not done:
            if self.errors:
                raise next(iter(self.errors.values()))
            raise Overloaded("every clip of the stream was dropped: the analysis could not keep up "
                             "with the feed (realtime mode); send it in archive mode")
        spans = np.stack(self.spans)
        result = await self._answer(done, window=False)
        if self.frames is not None:
            result = dataclasses.replace(result, frames=await self.frames.finish())
        observer = self.owner.observer
        if result.compute is not None and observer is not None and hasattr(observer, "compute"):
            observer.compute(result.compute)
        token = ResumeToken(len(self.spans) - 1, float(spans[-1, 1]))
        await self._emit(self._event(
            EventKind.FINAL, spans, window=-1, first_clip=0, result=result, token=token,
            dropped=self.progress.dropped, error="", lag=self._lag(float(spans[-1, 1])),
        ))
        await self.events_out.put(_END)

    async def _answer(self, indices: list[int], *, window: bool) -> AnalysisResult:
        features = np.stack([self.features[i] for i in indices])  # N, D
        spans = np.stack([self.spans[i] for i in indices])  # N, 2
        kept = np.stack([self.kept[i] for i in indices]) if all(i in self.kept for i in indices) else None
        gmacs = np.array([self.gmacs[i] for i in indices]) if all(i in self.gmacs for i in indices) else None
        distance = (np.array([self.domain_distance[i] for i in indices])
                    if all(i in self.domain_distance for i in indices) else None)
        compute = assemble.compute(self.spec, self.options.budget, kept, gmacs)
        result = await self.owner.analyzer.answer(self.spec, features, spans, self.info, {}, compute=compute,
                                                  domain_distance=distance)
        if window and not self.options.window_attention:
            result = dataclasses.replace(result, attention=[])
        return result

    def _lag(self, end_s: float) -> float:
        start = self.options.producer_start_unix_s or self.progress.first_byte_unix_s
        if start is None:
            return 0.0
        return max(0.0, time.time() - (start + end_s))

    def _event(
        self, kind: EventKind, spans: np.ndarray, *, window: int, first_clip: int,
        result: AnalysisResult | None, token: ResumeToken, dropped: int, error: str, lag: float,
    ) -> StreamEvent:
        producer = self.options.producer_start_unix_s
        end_s = float(spans[-1, 1])
        return StreamEvent(
            kind=kind,
            start_s=float(spans[0, 0]),
            end_s=end_s,
            window=window,
            first_clip=first_clip,
            last_clip=token.last_clip,
            result=result,
            model_version=self.version,
            resume_token=token.encode(),
            dropped_clips=dropped,
            dropped_clips_total=self.progress.dropped,
            lag_s=lag,
            producer_time_unix_s=None if producer is None else producer + end_s,
            error=error,
            received_bytes=self.progress.received_bytes,
            clips_decoded=len(self.spans),
            clips_analysed=self.progress.analysed,
        )

    # -- progress

    def _progress_event(self, note: str = "") -> StreamEvent:
        end_s = float(self.spans[-1][1]) if self.spans else 0.0
        return StreamEvent(
            kind=EventKind.PROGRESS,
            start_s=0.0,
            end_s=end_s,
            model_version=self.version,
            dropped_clips_total=self.progress.dropped,
            lag_s=self._lag(end_s) if self.spans else 0.0,
            note=note,
            received_bytes=self.progress.received_bytes,
            clips_decoded=len(self.spans),
            clips_analysed=self.progress.analysed,
        )

    async def _progress_ticks(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            with contextlib.suppress(asyncio.QueueFull):  # a client behind on events skips these
                self.events_out.put_nowait(self._progress_event())

