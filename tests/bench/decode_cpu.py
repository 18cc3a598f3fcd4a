"""CPU-seconds of the gateway's video decoding alone (`VideoDecoder`: parent + worker processes) on
the benchmark's synthetic videos, for one set of `DecodeSettings`: compares decode choices in
isolation, without Triton or the models.

    python -m tests.bench.decode_cpu DIR [--videos 200] [--in-flight 4] [--settings '{"backend": "decord"}']

DIR holds the videos (made there with the benchmark's seed on first use). Prints the wall time,
the parent's CPU-s and the workers' (after their start), and the load average. Run it as a whole
process under a timer that counts children (`/usr/bin/time`) to include the workers' start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from server.pipeline.decode import VideoDecoder
from server.settings import DecodeSettings

SEED = 2025  # tests/bench/conftest.py's synthetic_videos


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _decode_all(paths: list[Path], settings: DecodeSettings, in_flight: int) -> None:
    decoder = VideoDecoder(settings)
    await decoder.start()
    started_workers = {pid: _cpu_s(pid) for pid in decoder.worker_pids()}
    gate = asyncio.Semaphore(in_flight)
    clips = 0

    async def one(path: Path) -> None:
        nonlocal clips
        async with gate:
            async for batch in decoder.stream(path, frame_size=112, clip_frames=8, clips_per_batch=16, sample_fps=15.0):
                clips += len(batch.clips)

    wall, parent = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(p) for p in paths))
    wall, parent = time.perf_counter() - wall, time.process_time() - parent
    workers = sum(_cpu_s(pid) - started_workers.get(pid, 0.0) for pid in decoder.worker_pids())
    await decoder.close()
    print(f"{len(paths)} videos, {clips} clips: wall {wall:.2f} s, parent {parent:.2f} CPU-s, "
          f"workers {workers:.2f} CPU-s (load average {os.getloadavg()[0]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--settings", default="{}", help="DecodeSettings fields as JSON")
    args = parser.parse_args()
    from export.synth import write_dataset

    if not (args.dir / "labels.jsonl").exists():
        write_dataset(args.dir, count=args.videos, seed=SEED)
    paths = sorted(p for p in args.dir.iterdir() if p.suffix in (".mp4", ".avi"))[: args.videos]
    asyncio.run(_decode_all(paths, DecodeSettings(**json.loads(args.settings)), args.in_flight))


if __name__ == "__main__":
    main()
