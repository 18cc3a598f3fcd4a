"""Per-frame embeddings fetched from the gateway, and what `vqs align` and `vqs search` compute
with them: cosine similarities, dynamic time warping, nearest frames (numpy, no server code)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import typer
from rich.console import Console

from clients import analyze, timeline
from clients.channel import ChannelConfig
from server.proto import video_analytics_pb2 as pb

DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}
# DTW's tables are frames(A) x frames(B); above this many frames per video both are strided.
MAX_DTW_FRAMES = 3000

stderr = Console(stderr=True)


def tensor_array(packed: dict[str, Any] | pb.Tensor) -> np.ndarray:
    """The array of a packed tensor (`pb.Tensor` or its JSON form {"dtype", "shape", "data"});
    `ValueError` when the dtype is unknown or the bytes do not fill the shape."""
    if isinstance(packed, pb.Tensor):
        dtype, shape, data = packed.dtype, list(packed.shape), packed.data
    else:
        import base64

        dtype, shape, data = packed["dtype"], packed["shape"], base64.b64decode(packed["data"])
    if dtype not in DTYPES:
        raise ValueError(f"unknown tensor dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    values = np.frombuffer(data, DTYPES[dtype])
    if values.size != math.prod(shape):
        raise ValueError(f"{len(data)} bytes of {dtype} do not fill the shape {shape}")
    return values.reshape(shape)


@dataclass(frozen=True)
class VideoFrames:
    """One video as the gateway saw it: embeddings [frames, dim] (float32, unit rows), the start
    time of each frame, the parser's segments (JSON form; empty when it is not served) and the
    embedder's context-free features (None when it has none)."""

    name: str
    embeddings: np.ndarray
    times_s: np.ndarray
    segments: list[dict[str, Any]]
    boundaries_s: list[float]
    duration_s: float
    features: np.ndarray | None = None

    def frame_at(self, t: float) -> int:
        """The frame showing at time t (the last one starting at or before it)."""
        return int(np.clip(np.searchsorted(self.times_s, t, side="right") - 1, 0, len(self.times_s) - 1))


def from_response(name: str, resp: pb.AnalyzeResponse) -> VideoFrames:
    if not resp.HasField("embeddings"):
        raise ValueError(f"{name}: the gateway returned no embeddings")
    values = tensor_array(resp.embeddings.values).astype(np.float32)
    times = np.asarray(resp.embeddings.times_s, np.float64)
    if values.ndim != 2 or len(values) != len(times) or len(values) == 0:
        raise ValueError(f"{name}: embeddings of shape {list(values.shape)} for {len(times)} frame times")
    features = None
    if resp.embeddings.HasField("features"):
        features = tensor_array(resp.embeddings.features).astype(np.float32)
        if features.shape[0] != len(times):
            raise ValueError(f"{name}: features of shape {list(features.shape)} for {len(times)} frame times")
    parts = timeline.frames_dict(resp)
    return VideoFrames(name=name, embeddings=values, times_s=times, segments=parts["segments"],
                       boundaries_s=parts["boundaries_s"], duration_s=resp.video.duration_s, features=features)


def read_video(path: Path, max_upload_mb: float) -> bytes:
    analyze.check_upload_size(path.stat().st_size, max_upload_mb)
    return path.read_bytes()


def fetch(config: ChannelConfig, name: str, data: bytes, *, segments: bool, timeout: float | None,
          max_upload_mb: float) -> VideoFrames:
    """Analyze the video `data` with embeddings (and segments); a gRPC failure exits as
    `vqs analyze` does."""
    try:
        resp = analyze.call_analyze(config, data, encoder="", timeout=timeout,
                                    max_upload_mb=max_upload_mb, embeddings=True, omit_segments=not segments)
    except grpc.RpcError as exc:
        code = exc.code()
        stderr.print(f"[red]error[/red] {name}: {analyze.error_message(code, exc.details())}",
                     highlight=False, soft_wrap=True)
        answered = analyze.answered_by_gateway(exc)
        if code == grpc.StatusCode.UNAVAILABLE and not answered:
            stderr.print(analyze.unreachable_hint(config), highlight=False)
        raise typer.Exit(analyze.exit_code_for(code, answered=answered)) from None
    try:
        return from_response(name, resp)
    except ValueError as exc:
        stderr.print(f"[red]error[/red] {exc}", highlight=False)
        raise typer.Exit(analyze.EXIT_ERROR) from None


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of a [n, d] with every row of b [m, d] -> [n, m]."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def dtw(cost: np.ndarray) -> list[tuple[int, int]]:
    """The monotone path (i, j) from (0, 0) to (n-1, m-1) with the least total cost, each step
    advancing i, j or both (classic dynamic time warping), computed one anti-diagonal at a time."""
    n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError("dtw needs two non-empty sequences")
    total = np.full((n + 1, m + 1), np.inf, np.float64)
    total[0, 0] = 0.0
    step = np.zeros((n + 1, m + 1), np.uint8)  # 0 diagonal, 1 from above (i-1), 2 from the left (j-1)
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        options = np.stack([total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]])
        best = np.argmin(options, axis=0)
        total[i, j] = cost[i - 1, j - 1] + options[best, np.arange(len(i))]
        step[i, j] = best
    path = []
    i, j = n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        move = step[i, j]
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    return path[::-1]


def stride_for(*lengths: int) -> int:
    return max(1, math.ceil(max(lengths) / MAX_DTW_FRAMES))


def nearest_frames(query: np.ndarray, frames: np.ndarray, top: int, min_gap: int) -> list[tuple[int, float]]:
    """The `top` frames most similar to `query` [d] among frames [n, d], no two within
    `min_gap` frames of each other (the best of each neighbourhood), best first."""
    scores = similarity(query[None], frames)[0]
    kept: list[tuple[int, float]] = []
    for index in np.argsort(-scores, kind="stable"):
        if all(abs(int(index) - k) >= min_gap for k, _ in kept):
            kept.append((int(index), float(scores[index])))
            if len(kept) == top:
                break
    return kept
