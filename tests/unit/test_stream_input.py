"""The stream's way in: MP4 layout detection from box headers, the pipe, the spill file's limit,
the resume token, and the client's MPEG-TS pacing (pure parts; real files made with ffmpeg)."""

from __future__ import annotations

import asyncio
import io
import os
import struct

import pytest

from clients.stream import Prefixed, SendLog, is_mpegts, paced_ts, read_head, video_pes_time
from server.errors import InvalidInput, TooLarge
from server.pipeline.stream import ResumeToken
from server.pipeline.stream_input import Layout, Mp4Layout, PipeFeed, SpillFile
from tests.media import ffmpeg


def box(kind: bytes, body: bytes = b"", *, large: bool = False) -> bytes:
    if large:
        return struct.pack(">I4sQ", 1, kind, 16 + len(body)) + body
    return struct.pack(">I4s", 8 + len(body), kind) + body


def layout_of(data: bytes, step: int) -> Layout:
    layout = Mp4Layout()
    for i in range(0, len(data), step):
        if layout.feed(data[i:i + step]) is not Layout.UNDECIDED:
            break
    return layout.finish()


@pytest.mark.parametrize("step", [1, 3, 8, 4096])
def test_mp4_layout_from_box_headers_in_any_chunking(step):
    ftyp = box(b"ftyp", b"isom" + b"\0" * 12)
    assert layout_of(ftyp + box(b"free", b"x" * 100) + box(b"mdat", b"m" * 500) + box(b"moov"), step) is Layout.INDEX_AT_END
    assert layout_of(ftyp + box(b"moov", b"v" * 300) + box(b"mdat", b"m" * 500), step) is Layout.STREAMABLE
    assert layout_of(ftyp + box(b"free", b"", large=True) + box(b"mdat", b"m" * 50), step) is Layout.INDEX_AT_END
    assert layout_of(ftyp + box(b"moov") + box(b"moof") + box(b"mdat"), step) is Layout.STREAMABLE
    assert layout_of(b"\x47" + b"\0" * 400, step) is Layout.STREAMABLE  # MPEG-TS: not MP4
    assert layout_of(b"\0\0\0\1\x67" + b"\0" * 40, step) is Layout.STREAMABLE  # Annex B H.264


def test_mp4_layout_of_real_files(tmp_path):
    src = ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=1", "-c:v", "libx264"]
    plain, fragmented, faststart = tmp_path / "plain.mp4", tmp_path / "frag.mp4", tmp_path / "fast.mp4"
    ffmpeg(*src, str(plain))
    ffmpeg(*src, "-movflags", "frag_keyframe+empty_moov", str(fragmented))
    ffmpeg(*src, "-movflags", "+faststart", str(faststart))
    assert layout_of(plain.read_bytes(), 7) is Layout.INDEX_AT_END
    assert layout_of(fragmented.read_bytes(), 7) is Layout.STREAMABLE
    assert layout_of(faststart.read_bytes(), 7) is Layout.STREAMABLE


def read_pipe(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def test_pipe_feed_waits_for_a_slow_reader_and_ends_with_eof(tmp_path):
    feed = PipeFeed(tmp_path)
    data = os.urandom(1 << 20)  # far more than the pipe holds
    reading = asyncio.create_task(asyncio.to_thread(read_pipe, feed.path))
    await feed.write(data)
    feed.close()
    assert await asyncio.wait_for(reading, 30) == data and feed.written == len(data)
    feed.remove()
    assert not feed.directory.exists()


async def test_pipe_feed_keeps_a_short_stream_for_a_reader_that_opens_late(tmp_path):
    """A stream shorter than the pipe's buffer, sent and closed before its decoder opens the pipe,
    still reaches it whole (the writer waits for the reader before writing)."""
    feed = PipeFeed(tmp_path)
    writing = asyncio.create_task(feed.write(b"short stream"))
    await asyncio.sleep(0.2)
    assert not writing.done()  # no reader yet
    reading = asyncio.create_task(asyncio.to_thread(read_pipe, feed.path))
    await asyncio.wait_for(writing, 10)
    feed.close()
    assert await asyncio.wait_for(reading, 10) == b"short stream"


async def test_an_aborted_pipe_feed_wakes_a_waiting_reader_and_refuses_later_ones(tmp_path):
    feed = PipeFeed(tmp_path)
    waiting = asyncio.create_task(asyncio.to_thread(read_pipe, feed.path))
    await asyncio.sleep(0.2)  # the reader is blocked opening the pipe
    feed.abort()
    assert await asyncio.wait_for(waiting, 10) == b""
    with pytest.raises(FileNotFoundError):
        read_pipe(feed.path)
    feed.remove()


async def test_spill_file_refuses_past_its_limit_naming_the_remedy(tmp_path):
    spill = SpillFile(tmp_path, max_bytes=100)
    await spill.write(b"x" * 60)
    with pytest.raises(TooLarge, match="frag_keyframe\\+empty_moov"):
        await spill.write(b"x" * 60)
    spill.remove()
    assert not spill.path.exists()


def test_resume_token_round_trip_and_refusals():
    token = ResumeToken(41, 22.4)
    assert ResumeToken.parse(token.encode()) == token
    for bad in ("", "v2:1:2", "v1:x:2", "v1:-1:2", "v1:3:nan", "v1:3"):
        with pytest.raises(InvalidInput):
            ResumeToken.parse(bad)


def test_ts_pacing_releases_each_frame_when_due(tmp_path):
    ts = tmp_path / "clip.ts"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=2", "-c:v", "libx264",
           "-bf", "0", "-f", "mpegts", str(ts))
    data = ts.read_bytes()
    assert is_mpegts(data[:400]) and not is_mpegts(b"\0" * 400)
    stamps = [t for i in range(0, len(data), 188) if (t := video_pes_time(data[i:i + 188])) is not None]
    assert len(stamps) == 20 and all(abs(b - a - 0.1) < 1e-3 for a, b in zip(stamps, stamps[1:]))

    now = [0.0]  # a fake clock: sleeping advances it
    log = SendLog()
    chunks = list(paced_ts(io.BytesIO(data), chunk_bytes=1 << 20, log=log,
                           clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)))
    assert b"".join(chunks) == data
    assert now[0] == pytest.approx(1.9, abs=1e-6)  # the last frame is due 1.9 s after the first
    assert [round(m, 3) for m, _ in log.frames] == [round(0.1 * i, 3) for i in range(20)]


class Trickle:
    """A pipe that hands out at most 100 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int) -> bytes:
        block, self.data = self.data[:min(size, 100)], self.data[min(size, 100):]
        return block


def test_ts_pacing_from_a_pipe_that_trickles(tmp_path):
    ts = tmp_path / "clip.ts"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=1", "-c:v", "libx264",
           "-bf", "0", "-f", "mpegts", str(ts))
    data = ts.read_bytes()
    source = Trickle(data)
    head = read_head(source, 2 * 188)
    assert head == data[:376] and is_mpegts(head)
    log = SendLog()
    chunks = list(paced_ts(Prefixed(head, source), chunk_bytes=1 << 20, log=log, sleep=lambda s: None))
    assert b"".join(chunks) == data and len(log.frames) == 10
