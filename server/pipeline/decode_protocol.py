"""What the gateway and its decode worker processes say to each other: one dataclass per message.

Both sides import this module (the worker imports nothing else of the server, so keep it to the
standard library and numpy). Messages are pickled over a socket pair. Frames do not travel through
the socket: each worker writes them into its frame arena, a shared memory file (memfd) it maps and
hands to the parent once (`Arena`, followed by the file's descriptor), divided into one slot per
credit; a `Frames` message says where they are (uint8 [n, size, size, 3], RGB). The socket would
cost both sides a kernel copy of every frame (README, "Speed").

parent -> worker: `DecodeJob`, `Credit`, `Release`, `Exit`
worker -> parent: `Ready`, `Arena` (+ a file descriptor), `Opened`, `Frames`, `SegmentDone`, `Failed`,
`Released`

A job without a segment index probes the video, checks the limits, picks a backend, plans the
segments and answers `Opened`, then decodes segment 0; a job with one decodes that segment of
the plan it carries. Each `Frames` costs the worker one credit; with none it waits. The arena
has `DecodeJob.credits` + 1 slots, so the slot it fills next never holds a chunk the parent has
not copied out yet (the parent returns a credit once it has). `Release` abandons the current job
at the worker's next check and closes its files.
"""

from __future__ import annotations

import mmap
import os
import socket
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal

import numpy as np

BackendName = Literal["decord", "pyav"]


def send_fd(conn: Connection, fd: int) -> None:
    """Pass a file descriptor over the connection's Unix socket (after the message naming it)."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        socket.send_fds(sock, [b"\0"], [fd])


def recv_fd(conn: Connection) -> int:
    """Receive the file descriptor `send_fd` passed."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if len(fds) != 1:
        raise EOFError("the decode worker's pipe closed before its arena's file descriptor")
    return fds[0]


def map_arena(fd: int, nbytes: int) -> np.ndarray:
    """The shared memory file `fd` as a uint8 array (the mapping outlives the descriptor)."""
    return np.frombuffer(mmap.mmap(fd, nbytes), np.uint8)


@dataclass(frozen=True)
class VideoInfo:
    """What the gateway knows about a video: the one metadata type of the pipeline."""

    fps: float
    width: int  # as displayed (after rotation)
    height: int
    frames: int  # decoded so far
    duration_s: float  # end of the last decoded frame so far
    codec: str = ""
    decoder: str = ""  # "decord", "pyav" or "decord+pyav"


@dataclass(frozen=True)
class Segment:
    """A stretch of the video one worker decodes. decord cuts by frame index; PyAV by stream pts,
    each worker snapping the cut to the first keyframe at or after it, so segments meet exactly."""

    index: int
    first_frame: int = 0
    stop_frame: int | None = None
    start_s: float = 0.0
    stop_s: float | None = None
    start_pts: int | None = None
    stop_pts: int | None = None


@dataclass(frozen=True)
class Plan:
    """How the first worker decided to decode a video; later segment jobs carry it along."""

    backend: BackendName
    segments: tuple[Segment, ...]
    quarter_turns: int = 0  # counterclockwise rotation to display the video upright
    skip_nonref: bool = False  # skip decoding non-reference frames (PyAV)


@dataclass(frozen=True)
class Limits:
    max_frame_pixels: int | None = None
    max_duration_s: float | None = None
    decord_max_bytes: int | None = None  # larger inputs go to PyAV (decord reads ahead unbounded)
    decord_max_frames: int | None = None  # so do headers claiming more frames (decord's table)


@dataclass(frozen=True)
class DecodeJob:
    path: str
    frame_size: int
    chunk_frames: int
    threads: int
    workers: int
    segment_frames: int  # 0: one segment
    sample_fps: float | None
    limits: Limits = field(default_factory=Limits)
    segment: int | None = None  # None: open the video and plan it first
    plan: Plan | None = None  # given with a segment index
    live: bool = False  # a stream read once (a pipe): PyAV, one segment, never reopened or seeked
    # A live stream that keeps up with its feed: packets more than this many seconds of media
    # behind the newest one received are not decoded (`decode_backends.LiveReadahead`).
    live_max_lag_s: float | None = None
    preferred_backend: BackendName = "pyav"  # decode.backend
    threads_min_pixels: int = 0  # decode.threads_min_pixels
    credits: int = 2  # the most chunks the parent lets this worker send ahead (its arena has one more slot)


@dataclass(frozen=True)
class Credit:
    chunks: int


@dataclass(frozen=True)
class Release:
    pass


@dataclass(frozen=True)
class Exit:
    pass


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Arena:
    """The worker's new frame arena, `nbytes` long; its file descriptor follows (`send_fd`)."""

    nbytes: int


@dataclass(frozen=True)
class Opened:
    video: VideoInfo  # frames and duration_s as claimed by the container (0 if unknown)
    plan: Plan
    note: str = ""  # why a backend was not used, for an error message if nothing decodes


@dataclass(frozen=True)
class Frames:
    """Frames in the worker's arena, `nbytes` from `offset`; per frame its start and duration in
    seconds, NaN where the decoder has none (the parent repairs times, see `chunk.py`)."""

    segment: int
    starts: np.ndarray  # float64 [n]
    durations: np.ndarray  # float64 [n]
    offset: int = 0
    nbytes: int = 0
    skipped: np.ndarray | None = None  # bool [n]: not decoded (zeros), see `DecodeJob.live_max_lag_s`


@dataclass(frozen=True)
class SegmentDone:
    segment: int
    decoder: str


FailureKind = Literal["too_large", "unsupported", "internal"]


@dataclass(frozen=True)
class Failed:
    kind: FailureKind
    message: str  # "internal": for the log only, never for the client


@dataclass(frozen=True)
class Released:
    rss_mb: float


ToWorker = DecodeJob | Credit | Release | Exit
FromWorker = Ready | Arena | Opened | Frames | SegmentDone | Failed | Released
