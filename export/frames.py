"""Per-frame training and evaluation data for the action parser and the frame embedder.

Each video is rendered by `export.synth`, encoded to H.264 and decoded again (so the models see
compression as served videos have it), then area-downsampled from the served 112 px: cached at
56 px, handed to the models at 28 px. The models pool 112 -> 28 (4x4 means) inside their graphs,
so the two paths agree to rounding. 28 px is what this machine can train in minutes; the
diver (about 10 px tall), its shape, rotation, entry and splash stay visible.

A video can be rendered over several backgrounds: the same routine (diver, timing, labels) with
a different scene seed, so background texture, pan, clutter and spinner differ. The embedder's
two training views come from different backgrounds, which breaks the background "clocks" (pan,
clutter and spinner move linearly in time) that would otherwise solve its loss.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av  # noqa: F401  (before decord, see export/data.py)
import cv2
import decord
import numpy as np

from export import synth, vocab

SERVED_SIZE = 112
CACHE_SIZE = 56
MODEL_SIZE = 28
FPS = 15.0
SPLIT_SEEDS = {"train": 1101, "val": 1202, "test": 1303}  # distinct seed streams per split
TRAIN_VIDEOS, VAL_VIDEOS, TEST_VIDEOS = 320, 100, 100  # the split sizes every run uses


@dataclass
class Video:
    backgrounds: list[np.ndarray]  # per background, (N, S, S, 3) uint8, S = 56 (cache) or 28 (model)
    phases: np.ndarray  # (N,) 0..4, see synth.PHASES
    boundaries: np.ndarray  # first frame of take-off, flight, entry, after
    label: int  # global class index
    seed: int

    @property
    def frames(self) -> np.ndarray:
        return self.backgrounds[0]

    def __len__(self) -> int:
        return len(self.phases)


def served_to_model_size(frames: np.ndarray) -> np.ndarray:
    """Served 112 px frames -> 28 px the way the gateway makes them: each 4x4 block's rounded mean."""
    n = len(frames)
    blocks = frames.reshape(n, MODEL_SIZE, 4, MODEL_SIZE, 4, 3).astype(np.uint16).sum(axis=(2, 4))
    return ((blocks + 8) // 16).astype(np.uint8)


def load_null_videos(folder: Path) -> list[Video]:
    """The videos without a routine (idle, walk-off, background only, cut before take-off) of a
    `vqs synth` split folder whose frames `export.data.load` has cached (frames.u8), at model size.
    They have no boundaries: every boundary a parser finds there is a false one."""
    import json

    folder = Path(folder)
    records = [json.loads(line) for line in (folder / "labels.jsonl").read_text().splitlines()]
    lengths = np.load(folder / "frames.lengths.npy")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    frames = np.memmap(folder / "frames.u8", np.uint8, "r", shape=(int(offsets[-1]), SERVED_SIZE, SERVED_SIZE, 3))
    return [Video(backgrounds=[served_to_model_size(np.asarray(frames[offsets[i]:offsets[i + 1]]))],
                  phases=np.zeros(int(lengths[i]), int), boundaries=np.zeros(0, int), label=-1, seed=int(r["seed"]))
            for i, r in enumerate(records) if r.get("kind", "routine") != "routine"]


def video_seed(split: str, index: int) -> int:
    return int(np.random.SeedSequence([SPLIT_SEEDS[split], index]).generate_state(1)[0])


def _decoded(routine: synth.Routine, tmp: Path) -> np.ndarray:
    path = tmp / f"{routine.seed}.mp4"
    synth.encode(synth.render_frames(routine, SERVED_SIZE, SERVED_SIZE, FPS), path, SERVED_SIZE,
                 SERVED_SIZE, FPS, "h264")
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    path.unlink()
    return downsample(frames)


def downsample(frames: np.ndarray) -> np.ndarray:
    """Served 112 px frames -> 56 px cache (2x2 means)."""
    return np.stack([cv2.resize(f, (CACHE_SIZE, CACHE_SIZE), interpolation=cv2.INTER_AREA)
                     for f in frames])


def to_model_size(frames: np.ndarray) -> np.ndarray:
    """56 px cache -> 28 px model input (2x2 means, rounded)."""
    n, h, w, c = frames.shape
    blocks = frames.reshape(n, h // 2, 2, w // 2, 2, c).astype(np.uint16).sum(axis=(2, 4))
    return ((blocks + 2) // 4).astype(np.uint8)


def render(seed: int, backgrounds: int = 1) -> Video:
    rng = np.random.default_rng([seed, 0])  # as synth.render_video, so files and arrays agree
    routine = synth.sample_routine(rng, seed, None)
    labels = synth.labels_for(routine, FPS)
    with tempfile.TemporaryDirectory() as tmp:
        views = [_decoded(dataclasses.replace(routine, seed=seed + 7919 * b) if b else routine,
                          Path(tmp)) for b in range(backgrounds)]
    n = min(len(labels["phases"]), *(len(v) for v in views))
    return Video(backgrounds=[v[:n] for v in views], phases=np.asarray(labels["phases"][:n]),
                 boundaries=np.asarray(labels["boundaries"]),
                 label=vocab.CLASS_NAMES.index(labels["class"]), seed=seed)


def _render_job(args: tuple[int, int]) -> Video:
    return render(*args)


_LOADED: dict[Path, list[Video]] = {}  # cached splits read in this process (callers only read them)


def load_split(split: str, count: int, *, backgrounds: int = 1, cache: Path | None = None,
               workers: int = 2) -> list[Video]:
    """`count` videos of a split at model size, cached at 56 px as one .npz per (split, count,
    backgrounds). A cached split is read once per process: `build_segments` trains seven models
    on the training split in one process, and reading its 1 GB took ~40 s each time."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    path = (Path(cache) / f"{split}_{count}_{backgrounds}.npz").resolve() if cache else None
    if path is not None and path in _LOADED and path.exists():
        return _LOADED[path]
    videos = _read(path) if path is not None and path.exists() else _render_split(split, count,
                                                                                 backgrounds, path, workers)
    for v in videos:
        v.backgrounds = [to_model_size(bg) for bg in v.backgrounds]
    if path is not None:
        _LOADED[path] = videos
    return videos


def _render_split(split: str, count: int, backgrounds: int, path: Path | None, workers: int) -> list[Video]:
    jobs = [(video_seed(split, i), backgrounds) for i in range(count)]
    videos = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for i, video in enumerate(pool.imap(_render_job, jobs, chunksize=4), 1):
            videos.append(video)
            if i % 50 == 0 or i == count:
                print(f"frames {split}: {i}/{count} videos", file=sys.stderr, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, videos)
    return videos


def _write(path: Path, videos: list[Video]) -> None:
    lengths = np.asarray([len(v) for v in videos])
    arrays = {f"bg{b}": np.concatenate([v.backgrounds[b] for v in videos])
              for b in range(len(videos[0].backgrounds))}
    np.savez(path, lengths=lengths, phases=np.concatenate([v.phases for v in videos]),
             boundaries=np.stack([v.boundaries for v in videos]),
             labels=np.asarray([v.label for v in videos]), seeds=np.asarray([v.seed for v in videos]),
             **arrays)


def _read(path: Path) -> list[Video]:
    data = np.load(path)
    starts = np.concatenate([[0], np.cumsum(data["lengths"])])
    bgs = [data[k] for k in sorted(k for k in data.files if k.startswith("bg"))]
    phases, boundaries, labels, seeds = (data[k] for k in ("phases", "boundaries", "labels", "seeds"))
    return [Video(backgrounds=[bg[s:e] for bg in bgs], phases=phases[s:e], boundaries=boundaries[i],
                  label=int(labels[i]), seed=int(seeds[i]))
            for i, (s, e) in enumerate(zip(starts[:-1], starts[1:]))]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Render and cache the per-frame splits.")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--backgrounds", type=int, default=2, help="backgrounds per train video")
    args = parser.parse_args()
    for split, count, bgs in (("val", args.val, 1), ("test", args.test, 1),
                              ("train", args.train, args.backgrounds)):
        load_split(split, count, backgrounds=bgs, cache=args.cache)
