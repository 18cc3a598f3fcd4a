"""Training data: a synthetic dataset decoded once (with decord, as the server does) into a
uint8 frame cache on disk, addressed by clip."""

from __future__ import annotations

import json
import multiprocessing
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import av  # noqa: F401  (before decord: see below)
import decord
import numpy as np

from export import vocab
from export.synth import PHASES

# decord bundles its own FFmpeg libraries; whichever FFmpeg a process loads first serves both
# packages, and decord's lacks options PyAV's encoders need (libvpx-vp9). Loading PyAV first
# keeps both working.

CLIP_FRAMES = 8
FRAME_SIZE = 112


def _decode(path: str) -> np.ndarray:
    reader = decord.VideoReader(path, ctx=decord.cpu(0), width=FRAME_SIZE, height=FRAME_SIZE, num_threads=1)
    chunks, start = [], 0
    while start < len(reader):  # sequential bounded reads
        stop = min(start + 64, len(reader))
        chunks.append(reader.get_batch(list(range(start, stop))).asnumpy())
        start = stop
    return np.concatenate(chunks)


@dataclass
class ClipDataset:
    """All clips of a dataset folder: `frames` is a (F, H, W, 3) memmap, clips index into it."""

    records: list[dict]
    frames: np.ndarray
    frame_offset: np.ndarray  # per video, first frame in `frames`
    num_frames: np.ndarray  # per video
    clip_offset: np.ndarray  # per video, first clip in the flat clip index
    num_clips: np.ndarray  # per video
    targets: dict[str, np.ndarray]  # per head, per video target index
    # Optional, per frame of `frames`: which frame of the same video to show in its place (the
    # frame-shuffled control); None shows the video as decoded.
    frame_order: np.ndarray | None = None

    def __getstate__(self) -> dict:
        # Another process reopens the frame cache instead of receiving a copy of it (GBs).
        if isinstance(self.frames, np.memmap):
            return {**self.__dict__, "frames": (self.frames.filename, self.frames.shape)}
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["frames"], tuple):
            filename, shape = state["frames"]
            state = {**state, "frames": np.memmap(filename, np.uint8, "r", shape=shape)}
        self.__dict__.update(state)

    @property
    def total_clips(self) -> int:
        return int(self.num_clips.sum())

    def frame_index(self, video: int, first: int, count: int) -> np.ndarray:
        """Where in `frames` the frames of clips [first, first+count) of a video are, (count * 8,);
        the last clip of a video is padded with its final frame, as the server does."""
        n = int(self.num_frames[video])
        idx = np.arange(first * CLIP_FRAMES, (first + count) * CLIP_FRAMES).clip(max=n - 1)
        if self.frame_order is not None:
            idx = self.frame_order[self.frame_offset[video] + idx]
        return self.frame_offset[video] + idx

    def clips(self, video: int, first: int, count: int) -> np.ndarray:
        """Clips [first, first+count) of a video as uint8 (count, 8, H, W, 3)."""
        frames = self.frames[self.frame_index(video, first, count)]
        return frames.reshape(count, CLIP_FRAMES, *frames.shape[1:])

    def video_of_clip(self, flat: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.clip_offset, flat, side="right") - 1

    def clip_phases(self, video: int) -> np.ndarray:
        """Per clip of a video, its frames' majority phase (an index into `synth.PHASES`); -1 for
        every clip of a video without phases (null videos)."""
        n = int(self.num_clips[video])
        phases = self.records[video].get("phases")
        if not phases:
            return np.full(n, -1)
        padded = np.full(n * CLIP_FRAMES, -1)
        padded[: len(phases)] = phases
        return np.asarray([np.bincount(row[row >= 0], minlength=len(PHASES)).argmax() if (row >= 0).any() else -1
                           for row in padded.reshape(n, CLIP_FRAMES)])


# A video whose flight is off vocab.CLASSES' table (synth's `free_flight_share`) has no class target.
NO_TARGET = -100  # torch's cross-entropy ignore_index


def _target(heads: dict[str, tuple[str, ...]], query: str, record: dict) -> int:
    if query == vocab.GLOBAL_QUERY and record.get("flight_table", True) is False:
        return NO_TARGET
    return heads[query].index(record[query])


def load(folder: Path, cache: Path | None = None, workers: int = 2) -> ClipDataset:
    """Decode every video of a `vqs synth` folder into a frame cache (reused when present)."""
    folder = Path(folder)
    records = [json.loads(line) for line in (folder / "labels.jsonl").read_text().splitlines()]
    cache = Path(cache or folder / "frames.u8")
    lengths_path = cache.with_suffix(".lengths.npy")
    if not (cache.exists() and lengths_path.exists()):
        lengths = []
        with open(cache, "wb") as out, multiprocessing.get_context("spawn").Pool(workers) as pool:
            paths = [str(folder / r["file"]) for r in records]
            for i, frames in enumerate(pool.imap(_decode, paths, chunksize=8), 1):
                out.write(frames.tobytes())
                lengths.append(len(frames))
                if i % 200 == 0 or i == len(paths):
                    print(f"decode {folder.name}: {i}/{len(paths)} videos", file=sys.stderr, flush=True)
        np.save(lengths_path, np.asarray(lengths, np.int64))
    num_frames = np.load(lengths_path)
    total = int(num_frames.sum())
    frames = np.memmap(cache, np.uint8, "r", shape=(total, FRAME_SIZE, FRAME_SIZE, 3))
    num_clips = -(-num_frames // CLIP_FRAMES)
    heads = vocab.head_attributes()
    targets = {q: np.asarray([_target(heads, q, r) for r in records]) for q in heads}
    return ClipDataset(
        records=records,
        frames=frames,
        frame_offset=np.concatenate([[0], np.cumsum(num_frames)[:-1]]),
        num_frames=num_frames,
        clip_offset=np.concatenate([[0], np.cumsum(num_clips)[:-1]]),
        num_clips=num_clips,
        targets=targets,
    )


def shuffle_frames(ds: ClipDataset, seed: int) -> ClipDataset:
    """The same videos with each video's frames in a fixed random order (seeded per video): every
    frame is still there, no motion is. A model that answers from this only uses static cues."""
    order = np.empty(int(ds.num_frames.sum()), np.int64)
    for v, (offset, n) in enumerate(zip(ds.frame_offset, ds.num_frames)):
        order[offset : offset + n] = np.random.default_rng([seed, v]).permutation(int(n))
    return replace(ds, frame_order=order)
