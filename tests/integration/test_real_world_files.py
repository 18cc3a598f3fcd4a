"""Real-world files with broken timestamps, through the real gateway and Triton.

Each file (made by tests/media.py) is first checked to really have its defect, then sent as an
upload: the answer has finite, increasing, non-overlapping clip spans and as many clips as its
real content holds (15 samples a second, 8 per clip), or it is INVALID_ARGUMENT saying why. Either
way the gateway answers a normal video right after.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.proto import video_analytics_pb2 as pb
from tests.media import Media, timestamps

pytestmark = pytest.mark.integration

CLIP_FPS, CLIP_FRAMES = 15, 8  # the s3d encoder's


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Media:
    return Media(tmp_path_factory.mktemp("media"))


def max_clips(seconds: float) -> int:
    """Clips of `seconds` of content, one clip of slack for where the grid starts."""
    return math.ceil(seconds * CLIP_FPS / CLIP_FRAMES) + 1


def spans_of(response: pb.AnalyzeResponse) -> np.ndarray:
    return np.array([(s.start_s, s.end_s) for s in response.attention[0].clip_spans])


def assert_sane(response: pb.AnalyzeResponse, content_s: float) -> np.ndarray:
    spans = spans_of(response)
    assert 1 <= response.video.clips <= max_clips(content_s), response.video
    assert len(spans) == response.video.clips
    assert np.isfinite(spans).all(), spans
    assert (spans[:, 1] > spans[:, 0]).all(), spans
    assert (np.diff(spans[:, 0]) > 0).all(), spans
    assert (spans[1:, 0] >= spans[:-1, 1] - 1e-6).all(), spans  # contiguous, not overlapping
    assert math.isfinite(response.video.duration_s) and response.video.duration_s > 0
    return spans


async def analyze(stub, path: Path) -> pb.AnalyzeResponse:
    return await stub.Analyze(pb.AnalyzeRequest(video=path.read_bytes()), timeout=120)


@pytest.fixture
async def still_serving(stub, videos):
    """After the test, the gateway still answers a normal video."""
    yield
    response = await analyze(stub, videos["short"])
    assert response.video.clips == 1


# name -> seconds of real content (every file is 50 frames at 25 fps)
REPAIRABLE = {
    # B-frames: decord reports no timestamp for 18 frames, then times out of step (was INTERNAL).
    "xvid_bframes.avi": 2.0,
    # Packed B-frames: decord reports no timestamp for any frame, PyAV swaps pairs of them.
    "xvid_packed.avi": 2.0,
    "repeated_pts.mkv": 2.0,
    "non_monotonic_pts.mkv": 2.0,
    "jumping_pts.mkv": 2.0,
    "annexb.h264": 2.0,  # 50 frames without any timestamp; its rate is a guess: 25 fps or less
}


def test_each_file_has_the_defect_it_is_named_after(media):
    assert timestamps(media["xvid_bframes.avi"]).decord_missing == 18
    packed = timestamps(media["xvid_packed.avi"])
    assert packed.decord_missing == 50 and packed.backwards >= 20
    assert timestamps(media["repeated_pts.mkv"]).repeated >= 30
    assert timestamps(media["non_monotonic_pts.mkv"]).backwards >= 20
    jumping = timestamps(media["jumping_pts.mkv"])
    assert jumping.largest_step_s > 900 and jumping.backwards == 1
    assert timestamps(media["random_pts.mkv"]).backwards >= 20
    assert timestamps(media["annexb.h264"]).missing == 50
    gap = timestamps(media["gap_3000s.ts"])
    assert len(gap.pts_s) == 50 and 2990 < gap.largest_step_s < 3000
    assert media["gap_3000s.ts"].stat().st_size < 200_000


@pytest.mark.parametrize("name", REPAIRABLE)
async def test_broken_timestamps_get_sane_clip_spans(stub, media, still_serving, name):
    content_s = REPAIRABLE[name]
    if name == "annexb.h264":
        content_s = 50 / 15  # no rate in the stream: at worst each frame lasts one sample
    response = await analyze(stub, media[name])
    assert response.video.frames == 50  # no frame lost to its stamps (segments, dedup)
    spans = assert_sane(response, content_s)
    assert spans[-1, 1] - spans[0, 0] <= content_s + 0.5, spans


async def test_timestamps_that_cannot_be_repaired_are_invalid_argument(stub, media, still_serving):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await analyze(stub, media["random_pts.mkv"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timestamps cannot be repaired" in error.value.details()


def _peak_rss_mb(pids: list[int]) -> dict[int, float]:
    peaks = {}
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks[pid] = int(line.split()[1]) / 1024
    return peaks


def _reset_peak_rss(pids: list[int]) -> None:
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS


async def test_a_3000_s_gap_costs_its_real_content_not_the_gap(stub, media, gateway, still_serving):
    """Before: 5,629 clips of one repeated frame and ~2 GB at peak. The gap is a discontinuity:
    clips of the 2 s recorded, spans keep the real times, one clip straddles the gap."""
    pids = [os.getpid(), *gateway.decoder.worker_pids()]  # this process runs the gateway
    try:
        _reset_peak_rss(pids)
        measured = True
    except OSError:
        measured = False
    before = _peak_rss_mb(pids)
    response = await analyze(stub, media["gap_3000s.ts"])
    after = _peak_rss_mb(pids)
    assert response.video.frames == 50
    spans = assert_sane(response, 2.0)
    assert spans[0, 0] < 2 and spans[-1, 1] > 3000  # real times on both sides of the gap
    assert ((spans[:, 0] < 2) & (spans[:, 1] > 3000)).sum() <= 1
    if measured:
        growth = {pid: after[pid] - before.get(pid, 0) for pid in after}
        print(f"peak RSS growth over the request (MB): {growth}; peaks: {after}")
        assert sum(growth.values()) < 300, growth
