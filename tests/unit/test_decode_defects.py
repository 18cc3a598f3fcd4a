"""VideoDecoder on the real-world inputs that used to break it, each made here at test time:
streams without timestamps, containers with absurd headers, rotated phone videos, limits, and
internal failures of a worker."""

from __future__ import annotations

import logging
import re
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import pytest_asyncio

from export.synth import render_video
from server.errors import InternalError, TooLarge, UnsupportedMedia
from server.pipeline.decode import ClipBatch, VideoDecoder
from server.pipeline.decode_backends import PyAVBackend, reason
from server.settings import DecodeSettings
from test_decode import CLIP, SIZE, _collect, _remux, decoder, write_h264  # noqa: F401 (decoder: a fixture)


def _mpeg4_bframes_avi(path: Path, frames: int = 30) -> None:
    """MPEG-4 Part 2 with B-frames in AVI (FourCC XVID): decord reports no timestamps at all."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=15, options={"bf": "2", "qscale": "3"})
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        s.codec_context.codec_tag = "XVID"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 8 * i, np.uint8), format="rgb24")
            frame.pts = i
            for packet in s.encode(frame):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)


def _claim_frames(avi: bytes, frames: int) -> bytes:
    """The AVI with its main header and stream header claiming `frames` frames."""
    data = bytearray(avi)
    struct.pack_into("<I", data, data.find(b"avih") + 8 + 16, frames)  # dwTotalFrames
    struct.pack_into("<I", data, data.find(b"strh") + 8 + 32, frames)  # dwLength
    return bytes(data)


def _rotated(path: Path, degrees: int) -> None:
    """64x32 H.264 at 30 fps whose left half is white, displayed rotated `degrees`
    counterclockwise (as a phone records)."""
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :32] = 255
    write_h264(path, [image] * 30, list(range(30)), Fraction(1, 30), 30, rotation=degrees)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("defects")
    paths = {"mp4": out / "v.mp4", "avi": out / "v.avi"}
    render_video(paths["mp4"], seed=1, seconds=4.0)  # 60 frames at 15 fps
    render_video(paths["avi"], seed=2, seconds=3.0, codec="mpeg4")  # 45 frames
    paths["h264"] = out / "raw.h264"
    _remux(paths["mp4"], paths["h264"], "h264")
    paths["bframes"] = out / "bframes.avi"
    _mpeg4_bframes_avi(paths["bframes"])
    paths["absurd"] = out / "absurd.avi"
    paths["absurd"].write_bytes(_claim_frames(paths["avi"].read_bytes(), 2**31 - 1))
    for degrees in (90, -90, 180):
        paths[f"rot{degrees}"] = out / f"rot{degrees}.mp4"
        _rotated(paths[f"rot{degrees}"], degrees)
    return paths


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def decord_decoder():
    """A decoder that prefers decord (decode.backend), so its hand-overs to PyAV are exercised."""
    dec = VideoDecoder(DecodeSettings(workers=2, chunk_frames=16, stall_timeout_s=20, backend="decord"))
    await dec.start()
    yield dec
    await dec.close()


def _spans(batches: list[ClipBatch]) -> np.ndarray:
    return np.concatenate([b.spans_s for b in batches])


def test_the_inputs_have_their_defects(media):
    with av.open(str(media["h264"])) as c:
        assert c.streams.video[0].duration is None
        assert all(f.pts is None and f.dts is None for f in c.decode(video=0))
    with av.open(str(media["absurd"])) as c:
        assert c.streams.video[0].frames == 2**31 - 1


@pytest.mark.parametrize("sample_fps", [None, 15.0])
async def test_a_raw_h264_stream_decodes_though_its_frames_have_no_timestamps(decoder, media, sample_fps):
    batches = await _collect(decoder, media["h264"], sample_fps=sample_fps)
    spans = _spans(batches)
    assert batches[-1].info.frames == 60
    assert len(spans) == 60 // CLIP + 1
    assert np.isfinite(spans).all() and np.all(np.diff(spans[:, 0]) > 0)
    # The stream's frames last 1/15 s each (from the decoder), so its clips tile 4 s.
    assert spans[-1, 1] == pytest.approx(4.0, abs=0.01)


async def test_frames_decord_gives_no_timestamps_get_pyavs(decord_decoder, media):
    batches = await _collect(decord_decoder, media["bframes"], sample_fps=15.0)
    spans = _spans(batches)
    info = batches[-1].info
    assert info.decoder == "pyav" and info.frames == 30
    assert np.isfinite(spans).all() and np.all(np.diff(spans[:, 0]) > 0)
    assert spans[-1, 1] == pytest.approx(2.0, abs=0.1)


async def test_an_absurd_frame_count_in_the_header_is_too_large_before_decord_opens_it(media):
    dec = VideoDecoder(DecodeSettings(workers=1), max_duration_s=3600)
    await dec.start()
    try:
        (pid,) = dec.worker_pids()
        with pytest.raises(TooLarge, match="claims a duration"):
            await _collect(dec, media["absurd"])
        assert dec.worker_pids() == [pid]  # the worker did not crash
    finally:
        await dec.close()


async def test_an_absurd_frame_count_without_a_duration_limit_is_decoded_by_pyav(decord_decoder, media):
    batches = await _collect(decord_decoder, media["absurd"])
    assert batches[-1].info.decoder == "pyav"
    assert batches[-1].info.frames == 45


async def test_max_duration_is_enforced_while_decoding_a_stream_with_no_duration(media):
    dec = VideoDecoder(DecodeSettings(workers=1, chunk_frames=8), max_duration_s=2.0)
    await dec.start()
    try:
        with pytest.raises(TooLarge, match="limits.max_duration_s"):
            await _collect(dec, media["h264"])  # 4 s, and no header says so
    finally:
        await dec.close()


async def test_max_duration_is_enforced_at_the_probe(media):
    dec = VideoDecoder(DecodeSettings(workers=1), max_duration_s=2.0)
    await dec.start()
    try:
        with pytest.raises(TooLarge, match="claims a duration of 4.0 s"):
            await _collect(dec, media["mp4"])
    finally:
        await dec.close()


@pytest.mark.parametrize("sample_fps", [None, 15.0])  # 15: sampled at half the rate (PyAV skips)
@pytest.mark.parametrize("degrees", [90, -90, 180])
async def test_rotated_videos_are_decoded_upright(decoder, media, degrees, sample_fps):
    batches = await _collect(decoder, media[f"rot{degrees}"], sample_fps=sample_fps)
    info = batches[-1].info
    assert (info.width, info.height) == ((64, 32) if degrees == 180 else (32, 64))
    frame = batches[0].clips[0, 0, ..., 0].astype(float)  # SIZE x SIZE, resized
    half = SIZE // 2
    top, bottom = frame[:half].mean(), frame[half:].mean()
    left, right = frame[:, :half].mean(), frame[:, half:].mean()
    # The source's white left half, turned `degrees` counterclockwise.
    if degrees == 90:
        assert bottom > 200 and top < 50
    elif degrees == -90:
        assert top > 200 and bottom < 50
    else:
        assert right > 200 and left < 50


async def test_an_unexpected_worker_failure_is_internal_with_a_generic_message(media, caplog):
    # A chunk buffer too large to allocate: a fault of the server, not of the video.
    dec = VideoDecoder(DecodeSettings(workers=1, chunk_frames=10**9))
    await dec.start()
    try:
        with caplog.at_level(logging.ERROR, logger="server.pipeline.decode"):
            with pytest.raises(InternalError) as err:
                await _collect(dec, media["mp4"])
    finally:
        await dec.close()
    assert str(err.value) == "the video decoder failed on this input"
    assert "MemoryError" in caplog.text  # the detail is in the log


def test_decoder_messages_carry_no_build_path_or_log_timestamp(media):
    import decord

    path = str(media["h264"])
    with pytest.raises(Exception) as err:  # decord cannot count this stream's frames
        decord.VideoReader(path)
    raw = str(err.value)
    assert re.search(r"\[\d\d:\d\d:\d\d\]", raw) and ".cc:" in raw and path in raw  # what decord says
    text = reason(err.value, path)
    assert not re.search(r"\d\d:\d\d:\d\d", text)
    assert "video_reader.cc" not in text and "workspace" not in text and "raw.h264" not in text
    assert "broken metadata" in text


@pytest.mark.parametrize("backend", ["pyav", "decord"])
@pytest.mark.parametrize("name", ["non_monotonic_pts.mkv", "repeated_pts.mkv", "xvid_packed.avi", "jumping_pts.mkv"])
async def test_every_frame_reaches_the_time_repair_whatever_its_stamps(decoder, decord_decoder, tmp_path_factory, name, backend):
    # 50 frames stamped out of order, three to a stamp, (packed B-frames) with pts out of decode
    # order, or two stamped 1000 s ahead (so the container claims 1000 s): none is dropped as a
    # repeat (that is only for the frames a segment begins with) or lost between segments cut by
    # pts, and the repaired clips tile the 2 s of content.
    from media import Media

    path = Media(tmp_path_factory.mktemp("stamps"))[name]
    batches = await _collect(decoder if backend == "pyav" else decord_decoder, path, sample_fps=15.0)
    spans = _spans(batches)
    assert batches[-1].info.frames == 50
    assert np.isfinite(spans).all() and np.all(np.diff(spans[:, 0]) > 0)
    assert spans[-1, 1] - spans[0, 0] == pytest.approx(2.0, abs=0.2)


async def test_pyav_does_not_cut_by_pts_where_timestamps_do_not_grow_in_file_order(decoder, tmp_path):
    # 300 intra-only frames at 25 fps, frames 100-139 stamped 8 s late. Cut by pts at the keyframe
    # nearest the middle (6.76 s), the first segment stopped at frame 100 (stamped 12 s) and the
    # second started at frame 169: 69 frames lost. The index (read in full) shows it: one segment.
    from media import _with_pts

    path = tmp_path / "late_block.mkv"
    _with_pts(path, [40 * n + (8000 if 100 <= n < 140 else 0) for n in range(300)])
    pyav = PyAVBackend(SIZE, 1)
    pyav.open(str(path))
    try:
        assert len(pyav.split(240, 2)) == 1
    finally:
        pyav.close()
    batches = await _collect(decoder, path)
    assert batches[-1].info.decoder == "pyav" and batches[-1].info.frames == 300
