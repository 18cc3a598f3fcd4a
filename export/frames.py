"""Per-frame training and evaluation data for the action parser and the frame embedder.

Each video is rendered by `export.synth`, encoded to H.264 and decoded again (so the models see
compression as served videos have it), then area-downsampled from the served 112 px to 56 px:
the models pool 112 -> 56 inside their graphs, so the two paths agree exactly.

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
MODEL_SIZE = 56
FPS = 15.0
SPLIT_SEEDS = {"train": 1101, "val": 1202, "test": 1303}  # distinct seed streams per split


@dataclass
class Video:
    backgrounds: list[np.ndarray]  # per background, (N, 56, 56, 3) uint8
    phases: np.ndarray  # (N,) 0..4, see synth.PHASES
    boundaries: np.ndarray  # first frame of take-off, flight, entry, after
    label: int  # global class index
    seed: int

    @property
    def frames(self) -> np.ndarray:
        return self.backgrounds[0]

    def __len__(self) -> int:
        return len(self.phases)


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
    """Served 112 px frames -> 56 px (a 2x2 mean, what the models' first layer does)."""
    return np.stack([cv2.resize(f, (MODEL_SIZE, MODEL_SIZE), interpolation=cv2.INTER_AREA)
                     for f in frames])


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


def load_split(split: str, count: int, *, backgrounds: int = 1, cache: Path | None = None,
               workers: int = 2) -> list[Video]:
    """`count` videos of a split, cached as one .npz per (split, count, backgrounds)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    path = Path(cache) / f"{split}_{count}_{backgrounds}.npz" if cache else None
    if path is not None and path.exists():
        return _read(path)
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
    return [Video(backgrounds=[bg[s:e] for bg in bgs], phases=data["phases"][s:e],
                  boundaries=data["boundaries"][i], label=int(data["labels"][i]),
                  seed=int(data["seeds"][i]))
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
