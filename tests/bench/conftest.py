"""The gateway the benchmarks measure: the real one (`server.main.run`) in its own process, so its
CPU and memory are not mixed with the benchmark process's (which runs the references)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from server.launcher import free_port

REPO = Path(__file__).resolve().parents[2]
VIDEOS = int(os.environ.get("VQS_BENCH_VIDEOS", "200"))  # synthetic videos (fewer: a quick dry run)
SMALL_SECONDS = float(os.environ.get("VQS_BENCH_SMALL_SECONDS", "60"))  # the 320x240 video's length


@contextlib.contextmanager
def gateway_subprocess(triton_url: str, repository: Path, allowed_root: Path, log: Path):
    """(process, address) of a real gateway in its own process using the Triton at `triton_url`."""
    port = free_port()
    env = dict(
        os.environ,
        VQS_GRPC_PORT=str(port),
        VQS_METRICS_PORT=str(free_port()),
        VQS_TRITON__URL=triton_url,
        VQS_TRITON__MODEL_REPOSITORY=str(repository),
        VQS_SECURITY__ALLOWED_ROOT=str(allowed_root),
        # The 10-minute video is a ~2 GB file: allow it by uri (the upload limit applies to uris).
        VQS_LIMITS__MAX_UPLOAD_BYTES=str(8 * 2**30),
        VQS_LOG_LEVEL="WARNING",
    )
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from server.main import run; run()"],
            env=env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        time.sleep(1.0)  # let the decode pool finish starting
        yield proc, address
    except grpc.FutureTimeoutError:
        pytest.fail(f"gateway did not start; log:\n{log.read_text(errors='replace')[-4000:]}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def gateway_process(triton, allowed_root: Path, tmp_path_factory):
    """(process, address) of a fresh gateway using the session's Triton.

    Fresh per test, so one test's peak memory (e.g. a 200 MB upload) does not show in another's.
    """
    log = tmp_path_factory.mktemp("bench_logs") / "gateway.log"
    with gateway_subprocess(triton.grpc_url, triton.model_repository, allowed_root, log) as started:
        yield started


@pytest.fixture(scope="session")
def synthetic_videos(allowed_root: Path) -> list[Path]:
    """`VIDEOS` synthetic 112x112 15 fps videos (2-20 s, H.264 and MPEG-4 Part 2 mixed as in the
    training data) under the allowed root."""
    from export.synth import write_dataset

    out = allowed_root / "synthetic"
    started = time.perf_counter()
    write_dataset(out, count=VIDEOS, seed=2025)
    paths = sorted(p for p in out.iterdir() if p.suffix in (".mp4", ".avi"))
    print(f"\nrendered {len(paths)} synthetic videos in {time.perf_counter() - started:.0f} s")
    return paths


@pytest.fixture(scope="session")
def small_video(allowed_root: Path) -> Path:
    """A `SMALL_SECONDS` 320x240 30 fps H.264 video under the allowed root."""
    from export.synth import render_video

    path = allowed_root / f"bench_320x240_{SMALL_SECONDS:g}s.mp4"
    render_video(path, seed=2026, seconds=SMALL_SECONDS, width=320, height=240, fps=30)
    return path
