"""Per-frame models on the frames the clip encoder already gets: the action parser's segments and
boundaries, and the frame embedder's embeddings (issue 11).

The decoder samples frames at the encoder's rate (15 fps) and cuts them into clips at 112 px; the
per-frame models take the same frames, 4x4-averaged to 28 px (`pool_frames`). They run in windows
of `window_frames` frames with `context_frames` more on each side (the model's receptive radius,
a parameter of its Triton config), keeping each window's centre: a window's centre equals what the
whole video would give, while requests, model memory (the embedder's attention is quadratic in
its input) and what the gateway holds stay bounded for an hour-long video. Only the outputs
accumulate: m + 1 floats per frame for the parser, 128 for the embedder.

Decoding the parser's outputs (`decode_segments`) is one pure function: the graph already
suppresses non-maxima of its per-frame boundary score, so a boundary is a frame whose score
passes the config's `boundary_threshold` (at most `max_boundaries`, the highest), and each run
between boundaries is a segment whose pattern is the arg-max of its mean pattern response.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from server.errors import InferenceFailed, InternalError, InvalidInput
from server.triton import (
    EMBEDDER_MODEL, EMBEDDINGS, FRAME_FEATURES, PARSER_MODEL, EncoderSpec, FrameModelSpec, TritonClient,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FrameResults", "FrameRun", "FrameWindows", "Segment", "Window", "decode_segments", "frame_run_for",
    "frame_times", "pool_frames",
]

EMBEDDING_DTYPE = np.float16  # what travels: 128 values per frame, cosine similarities to ~1e-3


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float
    pattern: int
    confidence: float


@dataclass(frozen=True)
class FrameResults:
    segments: list[Segment]  # empty: the parser did not run
    boundaries_s: list[float]
    embeddings: np.ndarray | None  # [frames, dim] EMBEDDING_DTYPE; None: not asked for
    times_s: np.ndarray  # float64 [frames], start of each sampled frame
    fps: float
    features: np.ndarray | None = None  # [frames, dim] context-free, when the embedder has them


def pool_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, S, S, 3] -> [n, size, size, 3]: the mean of each (S/size)^2 block, rounded (as
    the models' training data was made)."""
    n, height, width, channels = frames.shape
    if height != width or height % size:
        raise ValueError(f"frames of {height}x{width} px do not pool to {size} px")
    k = height // size
    if k == 1:
        return frames
    # A block row, then a block column, at a time: numpy's sum over both block axes at once took
    # 15-20x longer (5-10 ms a streamed clip under load, on the gateway's event loop).
    rows = frames.reshape(n, size, k, width, channels)
    acc = rows[:, :, 0].astype(np.uint16)
    for i in range(1, k):
        acc += rows[:, :, i]
    cols = acc.reshape(n, size, size, k, channels)
    blocks = cols[:, :, :, 0].copy()
    for j in range(1, k):
        blocks += cols[:, :, :, j]
    blocks += k * k // 2
    blocks //= k * k
    return blocks.astype(np.uint8)


def frame_times(spans_s: np.ndarray, clip_frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(starts [n, clip_frames], real [n, clip_frames]) of the frames of clips with these spans.

    Sampled frames sit on a 1/fps grid, so frame i of a clip starts i/fps after the clip; the
    clip's span ends with its last real frame (the final clip is padded by repeating it), so
    ceil(span * fps) of its frames are real. A clip that straddles a decode gap (> 5 s without
    frames, see chunk.py) gets its later frames' times early by the gap.
    """
    spans_s = np.asarray(spans_s, np.float64).reshape(-1, 2)
    offsets = np.arange(clip_frames) / fps
    starts = spans_s[:, :1] + offsets  # n, clip_frames
    # 1e-3 of a frame: the grid's own tolerance for float32 timestamps (chunk.TimeGrid).
    real_count = np.clip(np.ceil((spans_s[:, 1] - spans_s[:, 0]) * fps - 1e-3), 1, clip_frames)
    return starts, np.arange(clip_frames) < real_count[:, None]


@dataclass(frozen=True)
class Window:
    frames: np.ndarray  # uint8 [n, S, S, 3]: context + centre + context
    keep: slice  # the centre, within `frames`


class FrameWindows:
    """Push frames in order; take out windows of up to `window_frames` centre frames with up to
    `context_frames` of their neighbours on each side (fewer at the ends of the video). Holds at
    most window + 2 context frames plus one push."""

    def __init__(self, window_frames: int, context_frames: int) -> None:
        if window_frames < 1 or context_frames < 0:
            raise ValueError("window_frames must be >= 1 and context_frames >= 0")
        self.window = window_frames
        self.context = context_frames
        self._buffer: np.ndarray | None = None  # frames from index self._first on
        self._first = 0  # video index of the buffer's first frame
        self._next = 0  # video index of the next centre frame to hand out
        self._total = 0

    def push(self, frames: np.ndarray) -> list[Window]:
        if len(frames):
            self._buffer = frames.copy() if self._buffer is None else np.concatenate([self._buffer, frames])
            self._total += len(frames)
        out = []
        while self._total - self._next >= self.window + self.context:
            out.append(self._take(self._next + self.window))
        return out

    def flush(self) -> list[Window]:
        """The last window(s): centres up to the last frame, right context cut short."""
        out = []
        while self._next < self._total:
            out.append(self._take(min(self._next + self.window, self._total)))
        return out

    def _take(self, centre_end: int) -> Window:
        lo = max(0, self._next - self.context)
        hi = min(self._total, centre_end + self.context)
        frames = self._buffer[lo - self._first:hi - self._first]
        window = Window(frames, slice(self._next - lo, centre_end - lo))
        self._next = centre_end
        drop = max(0, self._next - self.context) - self._first
        self._buffer = self._buffer[drop:]
        self._first += drop
        return window


def decode_segments(
    boundary_scores: np.ndarray, responses: np.ndarray, times_s: np.ndarray, end_s: float, *,
    threshold: float, max_boundaries: int = 0,
) -> tuple[list[Segment], list[float]]:
    """The parser's per-frame outputs of one video -> (segments, boundary times).

    boundary_scores [T] (non-maxima already suppressed by the graph), responses [T, m],
    times_s [T] the frames' starts, end_s the end of the last frame. A boundary is a frame t > 0
    whose score passes `threshold`; with more than `max_boundaries` (0: no limit) the highest
    are kept (ties: the earlier frame). Segments are the runs between boundaries.
    """
    scores = np.asarray(boundary_scores, np.float64).reshape(-1)
    responses = np.asarray(responses, np.float64)
    times_s = np.asarray(times_s, np.float64)
    if responses.ndim != 2 or not len(scores) == len(responses) == len(times_s):
        raise ValueError(
            f"boundary scores {list(scores.shape)}, responses {list(responses.shape)} and times "
            f"{list(times_s.shape)} must be [T], [T, m], [T]")
    if len(scores) == 0:
        return [], []
    frames = np.flatnonzero(scores > threshold)
    frames = frames[frames > 0]  # a boundary starts a segment after another
    if max_boundaries and len(frames) > max_boundaries:
        order = sorted(frames, key=lambda t: (-scores[t], t))  # highest first, then earlier
        frames = np.sort(np.asarray(order[:max_boundaries], np.int64))
    edges = [0, *frames.tolist(), len(scores)]
    ends_s = np.append(times_s[1:], end_s)
    segments = []
    for start, end in zip(edges[:-1], edges[1:]):
        mean = responses[start:end].mean(axis=0)
        pattern = int(np.argmax(mean))
        segments.append(Segment(float(times_s[start]), float(ends_s[end - 1]), pattern, float(mean[pattern])))
    return segments, [float(times_s[t]) for t in frames]


class _ModelRun:
    """One per-frame model over one video: windows go to Triton as they fill (at most `inflight`
    outstanding); the centres of their outputs are kept, in order."""

    def __init__(self, triton: TritonClient, spec: FrameModelSpec, window_frames: int, inflight: int):
        self.triton = triton
        self.spec = spec
        self.windows = FrameWindows(window_frames, spec.context_frames)
        self.inflight = inflight
        self.pending: deque[asyncio.Task] = deque()
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in spec.outputs}

    async def push(self, frames: np.ndarray) -> None:
        for window in self.windows.push(frames):
            await self._send(window)

    async def finish(self) -> dict[str, np.ndarray]:
        for window in self.windows.flush():
            await self._send(window)
        while self.pending:
            await self._collect()
        return {name: np.concatenate(parts) for name, parts in self.parts.items()}

    async def _send(self, window: Window) -> None:
        self.pending.append(asyncio.create_task(self._run(window)))
        while len(self.pending) > self.inflight:
            await self._collect()

    async def _run(self, window: Window) -> dict[str, np.ndarray]:
        frames = window.frames
        if len(frames) < self.spec.min_frames:  # a video shorter than the model takes: repeat its last frame
            frames = np.concatenate([frames, np.repeat(frames[-1:], self.spec.min_frames - len(frames), axis=0)])
        outputs = await self.triton.run_frame_model(self.spec, frames)
        return {name: value[window.keep] for name, value in outputs.items()}

    async def _collect(self) -> None:
        for name, value in (await self.pending.popleft()).items():
            self.parts[name].append(value)

    async def cancel(self) -> None:
        for task in self.pending:
            task.cancel()
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        self.pending.clear()


class FrameRun:
    """The per-frame models for one video, fed the clip batches the decoder yields.

    `parser` / `embedder`: the specs of the models to run (None: not this time). Frames must be
    sampled at the models' rate (`fps` in their configs, which the caller checks against the
    encoder's clip_fps).
    """

    def __init__(
        self, triton: TritonClient, *, parser: FrameModelSpec | None, embedder: FrameModelSpec | None,
        clip_frames: int, fps: float, window_frames: int = 256, inflight: int = 2,
    ) -> None:
        self.parser, self.embedder = parser, embedder
        self.clip_frames, self.fps = clip_frames, fps
        self.runs = [_ModelRun(triton, spec, window_frames, inflight) for spec in (parser, embedder) if spec]
        self.times: list[np.ndarray] = []
        self.end_s = 0.0

    @property
    def active(self) -> bool:
        """Whether any model runs (else nothing needs to be fed or awaited)."""
        return bool(self.runs)

    async def add(self, clips: np.ndarray, spans_s: np.ndarray) -> None:
        """One batch of clips (uint8 [n, T, H, W, 3]) and their spans [n, 2]."""
        if not self.runs or len(clips) == 0:
            return
        starts, real = frame_times(spans_s, self.clip_frames, self.fps)
        frames = clips[real]  # padding out: [frames, H, W, 3]
        self.times.append(starts[real])
        self.end_s = float(np.asarray(spans_s)[-1, 1])
        for run in self.runs:
            size = run.spec.frame_size
            try:
                small = pool_frames(frames, size)
            except ValueError as exc:
                raise InternalError(f"{run.spec.model} cannot take these frames: {exc}") from None
            await run.push(small)

    async def finish(self) -> FrameResults | None:
        if not self.runs:
            return None
        if not self.times:  # no frames: the caller reports the video as undecodable
            return FrameResults(segments=[], boundaries_s=[], embeddings=None, times_s=np.zeros(0), fps=self.fps)
        outputs = [await run.finish() for run in self.runs]
        by_model = dict(zip((spec.model for spec in (self.parser, self.embedder) if spec), outputs))
        times = np.concatenate(self.times) if self.times else np.zeros(0)
        for model, values in by_model.items():
            for name, value in values.items():
                if len(value) != len(times):
                    raise InferenceFailed(f"{model} returned {name} for {len(value)} of {len(times)} frames")
        segments, boundaries = [], []
        if self.parser is not None and len(times):
            out = by_model[self.parser.model]
            segments, boundaries = decode_segments(
                out["boundary_scores"], out["responses"], times, self.end_s,
                threshold=self.parser.boundary_threshold, max_boundaries=self.parser.max_boundaries)
        embeddings = features = None
        if self.embedder is not None:
            out = by_model[self.embedder.model]
            embeddings = out[EMBEDDINGS].astype(EMBEDDING_DTYPE)
            if FRAME_FEATURES in out:
                features = out[FRAME_FEATURES].astype(EMBEDDING_DTYPE)
        return FrameResults(segments=segments, boundaries_s=boundaries, embeddings=embeddings,
                            times_s=times, fps=self.fps, features=features)

    async def cancel(self) -> None:
        for run in self.runs:
            await run.cancel()


def _unfit(model: FrameModelSpec, encoder: EncoderSpec) -> str | None:
    """Why `model` cannot take `encoder`'s frames (None: it can)."""
    if encoder.clip_fps is None or abs(encoder.clip_fps - model.fps) > 1e-6:
        return (f"{model.model} takes frames at {model.fps:g} fps but encoder {encoder.encoder} samples "
                f"them at {encoder.clip_fps or 'the video rate'}")
    if encoder.frame_size % model.frame_size:
        return (f"{model.model} takes {model.frame_size} px frames, which {encoder.encoder}'s "
                f"{encoder.frame_size} px frames do not pool to")
    return None


async def frame_run_for(
    triton: TritonClient, encoder: EncoderSpec, *, segments: bool, embeddings: bool,
) -> FrameRun:
    """The per-frame models one request runs on `encoder`'s frames. Segments come by default, so
    without a parser that can take these frames there are none (logged); embeddings are asked for,
    so without an embedder that can, `InvalidInput` says why."""
    parser = await triton.frame_model(PARSER_MODEL) if segments else None
    if parser is not None and (why := _unfit(parser, encoder)):
        logger.warning("no segments: %s", why)
        parser = None
    embedder = None
    if embeddings:
        embedder = await triton.frame_model(EMBEDDER_MODEL)
        if embedder is None:
            raise InvalidInput(f"embeddings were asked for but this server does not serve {EMBEDDER_MODEL}")
        if why := _unfit(embedder, encoder):
            raise InvalidInput(f"no embeddings with this encoder: {why}")
    return FrameRun(triton, parser=parser, embedder=embedder, clip_frames=encoder.clip_frames,
                    fps=encoder.clip_fps or 0.0)
