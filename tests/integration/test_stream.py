"""`AnalyzeStream` through the real gateway, Triton and decode workers: containers that stream
(fragmented MP4, MPEG-TS, WebM, raw H.264) answer per window and, at the end, as `Analyze` does on
the same file; an MP4 with its index at the end is spilled and said so (or refused above the
upload limit); cancel frees the slot and stops the work; a silent sender is ended; realtime mode
drops clips under overload, archive mode analyses them all; a resumed stream repeats no window.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from server.settings import Settings
from tests.integration.test_operations import (
    WAIT_S,
    assert_request_released,
    decode_worker_pids,
    gateway_gauge,
    settled_counters,
    triton_counters,
    until,
)
from tests.media import ffmpeg

pytestmark = pytest.mark.integration

WINDOW = pb.StreamEvent.WINDOW
FINAL = pb.StreamEvent.FINAL
PROGRESS = pb.StreamEvent.PROGRESS
CHUNK = 16 * 1024
# Answers of the same clips through two decoders (PyAV while streaming, decord for some files
# uploaded whole) differ by their resizing; the top attribute and the probabilities stay close.
PROBABILITY_TOLERANCE = 0.05


@pytest.fixture(scope="session")
def stream_videos(tmp_path_factory, videos) -> dict[str, Path]:
    """The synthetic 4 s diver video in each container that streams, and as a plain MP4 (index
    at the end), all of the same H.264 frames."""
    out = tmp_path_factory.mktemp("stream")
    source = videos["normal"]
    paths = {
        "fragmented.mp4": ["-c", "copy", "-movflags", "frag_keyframe+empty_moov"],
        "stream.ts": ["-c", "copy", "-f", "mpegts"],
        "stream.webm": ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "1M"],
        "stream.h264": ["-c", "copy", "-bsf:v", "h264_mp4toannexb", "-f", "h264"],
        "index_at_end.mp4": ["-c", "copy"],
    }
    made = {}
    for name, args in paths.items():
        made[name] = out / name
        ffmpeg("-i", str(source), *args, str(made[name]))
    return made


def chunks_of(data: bytes, size: int = CHUNK):
    return [data[i:i + size] for i in range(0, len(data), size)]


async def requests(options: pb.StreamOptions, data: bytes, *, pause_s: float = 0.0, hold: asyncio.Event | None = None):
    yield pb.StreamRequest(options=options)
    for chunk in chunks_of(data):
        yield pb.StreamRequest(chunk=chunk)
        if pause_s:
            await asyncio.sleep(pause_s)
    if hold is not None:
        await hold.wait()


async def collect(stub, options: pb.StreamOptions, data: bytes, **kwargs) -> list[pb.StreamEvent]:
    call = stub.AnalyzeStream(requests(options, data, **kwargs), timeout=WAIT_S)
    return [event async for event in call]


def answers(response: pb.AnalyzeResponse) -> dict[str, tuple[str, dict[str, float]]]:
    return {a.query: (a.attribute, dict(a.distribution)) for a in response.answers}


def assert_same_answers(got: pb.AnalyzeResponse, want: pb.AnalyzeResponse, tolerance: float) -> None:
    g, w = answers(got), answers(want)
    assert g.keys() == w.keys()
    for query in w:
        assert g[query][0] == w[query][0], f"{query}: {g[query][0]} streamed, {w[query][0]} analysed"
        for attribute, p in w[query][1].items():
            assert g[query][1][attribute] == pytest.approx(p, abs=tolerance), (query, attribute)


def windows(events) -> list[pb.StreamEvent]:
    return [e for e in events if e.kind == WINDOW]


@pytest.mark.parametrize("name", ["fragmented.mp4", "stream.ts", "stream.webm", "stream.h264"])
async def test_streamed_containers_answer_per_window_and_as_analyze_at_the_end(
    stub, stream_videos, queries, name
):
    data = stream_videos[name].read_bytes()
    analyzed = await stub.Analyze(pb.AnalyzeRequest(video=data), timeout=WAIT_S)
    clips = analyzed.video.clips
    assert clips >= 6

    window, hop = 4, 2
    options = pb.StreamOptions(window_clips=window, hop_clips=hop, mode=pb.STREAM_MODE_ARCHIVE)
    events = await collect(stub, options, data)

    assert events[-1].kind == FINAL and sum(e.kind == FINAL for e in events) == 1
    final = events[-1]
    # The whole stream: the same clips (spans from the stream's timestamps) and answers.
    spans = [(s.start_s, s.end_s) for s in final.result.attention[0].clip_spans]
    want = [(s.start_s, s.end_s) for s in analyzed.attention[0].clip_spans]
    if name == "stream.h264":  # no timestamps in the bytes: both sides time frames by their durations
        assert len(spans) == len(want)
    else:
        np.testing.assert_allclose(spans, want, atol=1e-3)
    assert_same_answers(final.result, analyzed, PROBABILITY_TOLERANCE)
    assert final.result.video.clips == clips and final.last_clip == clips - 1

    # Windows of 4 clips every 2, in order, each answering every query over its own clips, the
    # last one ending with the stream.
    ws = windows(events)
    assert [w.window for w in ws] == list(range(len(ws)))
    assert [w.first_clip for w in ws] == [hop * k for k in range(len(ws))]
    assert all(w.last_clip - w.first_clip + 1 == window for w in ws[:-1])
    assert ws[-1].last_clip == clips - 1
    for w in ws:
        assert [a.query for a in w.result.answers] == queries
        assert len(w.result.attention[0].weights) == w.last_clip - w.first_clip + 1
        assert w.result.attention[0].clip_spans[0].start_s == pytest.approx(w.start_s)
        assert w.end_s == pytest.approx(spans[w.last_clip][1], abs=1e-3)
        assert w.model_version.startswith("clip_encoder_s3d:") and "tqn_decoder:" in w.model_version
        assert w.resume_token and not w.error and w.dropped_clips == 0
    # A window over all clips is the whole video: the same answers as Analyze.
    everything = await collect(stub, pb.StreamOptions(window_clips=64, mode=pb.STREAM_MODE_ARCHIVE), data)
    (whole,) = windows(everything)
    assert_same_answers(whole.result, analyzed, PROBABILITY_TOLERANCE)
    assert_same_answers(whole.result, everything[-1].result, 1e-5)


async def test_a_stream_shorter_than_the_pipe_buffer_is_answered_whole(stub, tmp_path):
    """Sent and half-closed before the decode worker opens its pipe: nothing is lost."""
    ts = tmp_path / "tiny.ts"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=15:duration=1.2", "-c:v", "libx264",
           "-f", "mpegts", str(ts))
    data = ts.read_bytes()
    assert len(data) < 64 * 1024
    events = await collect(stub, pb.StreamOptions(), data)
    analyzed = await stub.Analyze(pb.AnalyzeRequest(video=data), timeout=WAIT_S)
    assert events[-1].kind == FINAL and events[-1].clips_decoded == analyzed.video.clips == 3
    assert_same_answers(events[-1].result, analyzed, 1e-4)


async def test_mp4_with_the_index_at_the_end_is_spilled_and_said_so(stub, stream_videos):
    data = stream_videos["index_at_end.mp4"].read_bytes()
    events = await collect(stub, pb.StreamOptions(mode=pb.STREAM_MODE_ARCHIVE), data)
    notes = [e.note for e in events if e.kind == PROGRESS and e.note]
    assert notes and "index (moov) at the end" in notes[0] and "frag_keyframe+empty_moov" in notes[0]
    # Nothing could be answered before the last byte: every window comes after all bytes arrived.
    assert all(w.received_bytes == len(data) for w in windows(events))
    analyzed = await stub.Analyze(pb.AnalyzeRequest(video=data), timeout=WAIT_S)
    assert_same_answers(events[-1].result, analyzed, 1e-4)


LONG_TS_CLIPS = 113  # 60 s sampled at the encoder's 15 fps, 8 frames a clip, the last one padded


@pytest.fixture(scope="session")
def long_ts(tmp_path_factory) -> Path:
    """60 s of 320x240 30 fps MPEG-TS (ffmpeg's test pattern)."""
    path = tmp_path_factory.mktemp("long_ts") / "long.ts"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30:duration=60", "-c:v", "libx264",
           "-preset", "ultrafast", "-g", "30", "-bf", "0", "-f", "mpegts", str(path))
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def small_gateway(start_gateway):
    """One stream at a time, 1 s of silence ends a stream, uploads of at most 200 kB."""
    limits = Settings().limits.model_copy(update={
        "max_concurrent_streams": 1, "stream_idle_s": 1.0, "max_upload_bytes": 200_000,
    })
    gateway = await start_gateway(limits=limits)
    yield gateway
    await gateway.stop()


@contextlib.asynccontextmanager
async def stub_for(gateway):
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield pb_grpc.VideoAnalyticsStub(channel)


async def test_mp4_index_at_the_end_above_the_upload_limit_is_refused_with_the_remedy(
    small_gateway, long_video
):
    data = long_video.read_bytes()[:250_000]
    hold = asyncio.Event()  # then the client waits: the refusal is not raced by its own sending
    async with stub_for(small_gateway) as stub:
        call = stub.AnalyzeStream(requests(pb.StreamOptions(), data, hold=hold), timeout=WAIT_S)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in call:
                pass
        hold.set()
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "frag_keyframe+empty_moov" in error.value.details()
    assert "limits.max_upload_bytes" in error.value.details()


async def test_a_silent_sender_is_ended_with_deadline_exceeded(small_gateway, stream_videos):
    data = stream_videos["stream.ts"].read_bytes()
    hold = asyncio.Event()  # the client sends half the video, then nothing, without closing
    async with stub_for(small_gateway) as stub:
        call = stub.AnalyzeStream(requests(pb.StreamOptions(), data[: len(data) // 2], hold=hold), timeout=WAIT_S)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in call:
                pass
        hold.set()
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "limits.stream_idle_s" in error.value.details()
    # Its slot is free again: the next stream is admitted and answered.
    async with stub_for(small_gateway) as stub:
        events = await collect(stub, pb.StreamOptions(), data)
    assert events[-1].kind == FINAL


async def test_a_second_stream_beyond_the_limit_is_refused_at_once(small_gateway, stream_videos):
    data = stream_videos["stream.ts"].read_bytes()
    hold = asyncio.Event()
    async with stub_for(small_gateway) as stub:
        first = stub.AnalyzeStream(requests(pb.StreamOptions(), data[:CHUNK], hold=hold), timeout=WAIT_S)
        await until(lambda: gateway_gauge(small_gateway) == 1, "the first stream admitted", 10.0)
        # The second sends its options and waits: the refusal comes before it sends any video.
        second = stub.AnalyzeStream(requests(pb.StreamOptions(), b"", hold=hold), timeout=WAIT_S)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in second:
                pass
        hold.set()
        first.cancel()
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.max_concurrent_streams" in error.value.details()


async def test_cancel_mid_stream_frees_the_slot_and_stops_decoding_and_triton(
    small_gateway, triton, long_ts
):
    """A 60 s MPEG-TS sent whole; the client cancels at the first window."""
    data = long_ts.read_bytes()
    workers, before = decode_worker_pids(triton), await settled_counters(triton)
    async with stub_for(small_gateway) as stub:
        call = stub.AnalyzeStream(requests(pb.StreamOptions(mode=pb.STREAM_MODE_ARCHIVE), data),
                                  timeout=WAIT_S)
        async for event in call:
            if event.kind == WINDOW:
                break
        assert call.cancel()
        at_stop = {**triton_counters(triton), "before": before["nv_inference_count"]}
    await assert_request_released(small_gateway, triton, workers, at_stop, full_clips=LONG_TS_CLIPS)
    async with stub_for(small_gateway) as stub:  # the slot is free
        events = await collect(stub, pb.StreamOptions(), data[:200_000])
    assert events[-1].kind == FINAL


async def test_a_stream_past_its_deadline_stops_its_work_and_frees_its_slot(small_gateway, triton, long_ts):
    data = long_ts.read_bytes()
    workers, before = decode_worker_pids(triton), await settled_counters(triton)
    async with stub_for(small_gateway) as stub:
        # Sent in about 10 s: the deadline passes while its clips are decoded and encoded.
        pause = 10.0 / len(chunks_of(data))
        call = stub.AnalyzeStream(requests(pb.StreamOptions(mode=pb.STREAM_MODE_ARCHIVE), data, pause_s=pause),
                                  timeout=2.0)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in call:
                pass
        at_stop = {**triton_counters(triton), "before": before["nv_inference_count"]}
    assert deadline_exceeded(error.value)
    await assert_request_released(small_gateway, triton, workers, at_stop, full_clips=LONG_TS_CLIPS)


def deadline_exceeded(error: grpc.aio.AioRpcError) -> bool:
    """The deadline's status, as the asyncio client reports it: a request write of its own that
    races the deadline can replace that status with INTERNAL "Internal error from Core" about its
    failed SendMessageOperation (grpc/grpc#36066), whatever the server did."""
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return True
    return error.code() == grpc.StatusCode.INTERNAL and "SendMessageOperation" in (error.debug_error_string() or "")


async def broken_after_two_windows(stub, gateway, data: bytes, options: pb.StreamOptions):
    """The whole stream's windows, then the first two windows of a second run of it whose
    connection breaks there; returns once the server has let go of the broken stream."""
    # (The session's gateway admits one stream at a time, its default.)
    whole = windows(await collect(stub, options, data))
    assert len(whole) >= 3
    call = stub.AnalyzeStream(requests(options, data, pause_s=0.01), timeout=WAIT_S)
    first: list[pb.StreamEvent] = []
    async for event in call:
        if event.kind == WINDOW:
            first.append(event)
            if len(first) == 2:
                break
    call.cancel()
    await until(lambda: gateway_gauge(gateway) == 0, "the broken stream released", 10.0)
    return whole, first


async def test_resumed_stream_repeats_no_window_and_misses_none(stub, gateway, stream_videos):
    data = stream_videos["stream.ts"].read_bytes()
    options = pb.StreamOptions(window_clips=2, hop_clips=2, mode=pb.STREAM_MODE_ARCHIVE)
    # The connection breaks after the second window; the client reconnects once the server has let
    # go of it and sends the feed again with its token.
    whole, first = await broken_after_two_windows(stub, gateway, data, options)
    resumed_options = pb.StreamOptions()
    resumed_options.CopyFrom(options)
    resumed_options.resume_token = first[-1].resume_token
    rest = windows(await collect(stub, resumed_options, data))

    got = [(w.window, w.first_clip, w.last_clip) for w in first + rest]
    assert got == [(w.window, w.first_clip, w.last_clip) for w in whole]
    for a, b in zip(first + rest, whole):
        assert_same_answers(a.result, b.result, 1e-4)

    # A token from another feed is refused, not silently mixed in.
    other = pb.StreamOptions()
    other.CopyFrom(options)
    other.resume_token = f"v1:{first[-1].last_clip}:{first[-1].end_s + 7:.6f}"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await collect(stub, other, data)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def slow_gateway(start_gateway):
    """An encoder kept far behind the decoder: one request of one clip in flight (a Triton round
    trip per clip), and at most one clip waiting for it."""
    limits = Settings().limits.model_copy(update={
        "encode_inflight": 1, "clips_per_batch": 1, "stream_pending_clips": 1,
    })
    gateway = await start_gateway(limits=limits)
    yield gateway
    await gateway.stop()


def gateway_counter(gateway, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + " "))


async def test_realtime_drops_clips_and_says_so_archive_analyses_all_and_pushes_back(
    slow_gateway, long_ts
):
    data = long_ts.read_bytes()
    async with stub_for(slow_gateway) as stub:
        realtime = await collect(stub, pb.StreamOptions(window_clips=8, mode=pb.STREAM_MODE_REALTIME), data)
        archive = await collect(stub, pb.StreamOptions(window_clips=8, mode=pb.STREAM_MODE_ARCHIVE), data)

    final = realtime[-1]
    assert final.kind == FINAL and final.clips_decoded == LONG_TS_CLIPS
    # Realtime: the analysis could not keep up with a feed sent at full speed: clips were dropped,
    # each window says how many of its own, and the totals add up.
    assert final.dropped_clips_total > 0
    assert sum(w.dropped_clips for w in windows(realtime)) == final.dropped_clips_total
    assert final.clips_analysed + final.dropped_clips_total == final.clips_decoded
    assert final.result.video.clips == final.clips_analysed  # the final answer is over what was analysed
    assert gateway_counter(slow_gateway, "vqs_stream_dropped_clips_total") >= final.dropped_clips_total
    # (Not compared: the two runs' wall times. Where decoding, not the encoder, is the slow stage,
    # dropping clips saves little and noise decides which run ends first.)

    # Archive: every clip analysed, nothing dropped; the gateway read the feed only as fast as it
    # analysed it (when the first window went out, most of the bytes were still with the sender).
    last = archive[-1]
    assert last.dropped_clips_total == 0 and last.clips_analysed == last.clips_decoded == LONG_TS_CLIPS
    first_window = windows(archive)[0]
    assert first_window.received_bytes < 0.6 * len(data), (
        f"{first_window.received_bytes} of {len(data)} bytes read before the first window")


async def test_stream_metrics_count_lag_and_stalls(gateway, small_gateway):
    # Windows observed their lag; the silent sender of an earlier test counts as stalled.
    assert gateway_counter(gateway, "vqs_stream_lag_seconds_count") > 0
    assert gateway_counter(small_gateway, "vqs_stream_stalled_total") >= 1


async def test_vqs_stream_prints_jsonl_events_in_analyze_shapes(gateway, stream_videos, queries):
    import json

    from typer.testing import CliRunner

    from clients.cli import app

    data = stream_videos["stream.ts"].read_bytes()
    runner = CliRunner()
    # The CLI's blocking gRPC runs in a thread: this test's event loop serves the gateway.
    result = await asyncio.to_thread(
        runner.invoke, app,
        ["stream", "-", "--server", gateway.address, "--json", "--mode", "archive", "--window-clips", "4"],
        input=data,
    )
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[-1] == "final" and "window" in kinds
    analyze_keys = {"video", "answers", "attention", "timing_ms", "encoder", "request_id"}
    for event in events:
        if event["kind"] in ("window", "final"):
            assert analyze_keys <= event.keys()
            assert [a["query"] for a in event["answers"]] == queries
            assert event["end_s"] > event["start_s"] >= 0 and event["resume_token"]
    window_spans = [(e["start_s"], e["end_s"]) for e in events if e["kind"] == "window"]
    assert window_spans == sorted(window_spans)

    unreachable = await asyncio.to_thread(
        runner.invoke, app, ["stream", "-", "--server", "127.0.0.1:1", "--json"], input=data[:1000])
    assert unreachable.exit_code == 4
    bad = await asyncio.to_thread(
        runner.invoke, app, ["stream", "-", "--server", gateway.address, "--window-clips", "1000"],
        input=data[:1000])
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output
    # A budget the fixed-compute encoder cannot take: the server says so; outside (0, 1]: usage.
    partial = await asyncio.to_thread(
        runner.invoke, app, ["stream", "-", "--server", gateway.address, "--budget", "0.5"], input=data[:1000])
    assert partial.exit_code == 1 and "no adaptive module" in partial.output
    assert runner.invoke(app, ["stream", "-", "--budget", "2"], input=b"").exit_code == 2


STALL_S = 5.0  # how long the sender stops: well above limits.stream_max_lag_s and a GOP (1 s)
# The decoder's clock starts at the first packet it decodes, which opening the stream delays after
# the sender's first chunk (over a second on a loaded machine). So only video later than that
# startup, a GOP and the allowed lag is surely skipped: the stall's first STALL_S - SURELY_LATE_MARGIN_S.
SURELY_LATE_MARGIN_S = 2.5
# Nor is the group of pictures the split falls in: the burst reaches the demuxer at a finite rate,
# and a packet is late only once the demuxer has read video more than the allowed lag newer
# (`LiveReadahead`), so the decoder may take that group's first late packets before it knows.
GOP_S = 1.0


def ts_offset_at(data: bytes, seconds: float) -> int:
    """Byte offset of the first video frame of an MPEG-TS at or after `seconds` of media."""
    from clients.stream import TS_PACKET, video_pes_time

    first = None
    for offset in range(0, len(data) - TS_PACKET + 1, TS_PACKET):
        at = video_pes_time(data[offset:offset + TS_PACKET])
        if at is not None:
            first = at if first is None else first
            if at - first >= seconds:
                return offset
    raise ValueError(f"the stream is shorter than {seconds} s")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def roomy_gateway(start_gateway):
    """A queue for the encoder far longer than any test stream: a realtime stream drops clips only
    for their lag, never for the queue's length."""
    limits = Settings().limits.model_copy(update={"stream_pending_clips": 10_000})
    gateway = await start_gateway(limits=limits)
    yield gateway
    await gateway.stop()


async def stalled_feed(stub, options: pb.StreamOptions, data: bytes, split_s: float) -> list[pb.StreamEvent]:
    """Send the first `split_s` of the stream at real time (half a second at a time), stop for
    STALL_S, then send the rest at once (a sender catching up after a network stall)."""
    offsets = [ts_offset_at(data, t / 2) for t in range(1, int(2 * split_s) + 1)]
    loop = asyncio.get_running_loop()

    async def feed():
        yield pb.StreamRequest(options=options)
        started, sent = loop.time(), 0
        for i, offset in enumerate(offsets):
            for chunk in chunks_of(data[sent:offset]):
                yield pb.StreamRequest(chunk=chunk)
            sent = offset
            await asyncio.sleep(max(0.0, started + (i + 1) / 2 - loop.time()))
        await asyncio.sleep(STALL_S)
        for chunk in chunks_of(data[sent:]):
            yield pb.StreamRequest(chunk=chunk)

    return [event async for event in stub.AnalyzeStream(feed(), timeout=WAIT_S)]


def kept_spans(event: pb.StreamEvent) -> list[float]:
    """Start times of the clips an event's answers are about (those not dropped)."""
    return [round(s.start_s, 3) for s in event.result.attention[0].clip_spans]


async def test_realtime_skips_before_decoding_what_a_stall_left_behind_archive_analyses_all(
    roomy_gateway, long_ts
):
    """A sender that stops for 3 s and then sends the rest at once: in realtime mode the decoder
    skips the video the stall made late (whole groups of pictures, before decoding) and resumes at
    a keyframe; the clips it skipped are counted as dropped in their place, the others are those
    of archive mode with the same answers. Archive mode analyses every clip."""
    # (After the skip the rest comes faster than real time, so the encoder stage may drop clips
    # too; the stretch right after the stall is the decoder's: late by a second and more.)
    data = long_ts.read_bytes()
    split_s = 4.0
    async with stub_for(roomy_gateway) as stub:
        realtime = await stalled_feed(stub, pb.StreamOptions(mode=pb.STREAM_MODE_REALTIME), data, split_s)
        archive = await stalled_feed(stub, pb.StreamOptions(mode=pb.STREAM_MODE_ARCHIVE), data, split_s)

    last = archive[-1]
    assert last.kind == FINAL and last.dropped_clips_total == 0
    assert last.clips_analysed == last.clips_decoded == LONG_TS_CLIPS

    final = realtime[-1]
    assert final.kind == FINAL
    # Every clip has its place (skipped frames leave placeholders, the clip grid is archive's) ...
    assert final.clips_decoded == LONG_TS_CLIPS and final.last_clip == LONG_TS_CLIPS - 1
    # ... some were dropped, counted in the windows, the final event and the metrics ...
    assert final.dropped_clips_total > 0
    assert final.clips_analysed + final.dropped_clips_total == final.clips_decoded
    assert sum(w.dropped_clips for w in windows(realtime)) == final.dropped_clips_total
    assert gateway_counter(roomy_gateway, "vqs_stream_dropped_clips_total") >= final.dropped_clips_total
    # ... only where the stall left the stream behind: none before the split, and after the dropped
    # stretch the decoder is analysing again (it skipped ahead, it did not give up).
    everything = kept_spans(last)
    analysed = set(kept_spans(final))
    dropped = [s for s in everything if s not in analysed]
    assert len(dropped) == final.dropped_clips_total
    assert min(dropped) >= split_s - 8 / 15 - 1e-3
    late = [s for s in everything if split_s + GOP_S <= s < split_s + STALL_S - SURELY_LATE_MARGIN_S]
    assert late and set(late) <= set(dropped)
    assert any(s > max(late) for s in analysed)
    # The windows nothing was dropped from answer as archive's same windows do. (How many keep all
    # their clips depends on the machine's load: after the skip the encoder stage may drop too.)
    full = {w.window: w for w in windows(realtime) if w.dropped_clips == 0}
    assert full, "no realtime window kept all its clips"
    for w in windows(archive):
        if w.window in full:
            assert kept_spans(full[w.window]) == kept_spans(w)
            assert_same_answers(full[w.window].result, w.result, 1e-4)
    dropped_windows = [w for w in windows(realtime) if w.dropped_clips]
    assert all(w.error for w in dropped_windows if not w.HasField("result"))


def errors_counted(gateway, code: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10).read().decode()
    prefix = f'vqs_errors_total{{code="{code}"}} '
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(prefix))


async def test_vqs_stream_resumes_a_broken_stream_through_a_busy_gateway(stub, gateway, stream_videos):
    """The connection breaks after two windows; `vqs stream --resume-token` sends the feed again
    while the gateway's one stream slot is still taken: it is refused as busy, waits and retries,
    and the windows it gets continue the broken stream's with none repeated or missing."""
    import json

    from typer.testing import CliRunner

    from clients.cli import app

    data = stream_videos["stream.ts"].read_bytes()
    options = pb.StreamOptions(window_clips=2, hop_clips=2, mode=pb.STREAM_MODE_ARCHIVE)
    whole, first = await broken_after_two_windows(stub, gateway, data, options)

    # Another stream holds the only slot when the client comes back.
    hold = asyncio.Event()
    holder = stub.AnalyzeStream(requests(pb.StreamOptions(), b"", hold=hold), timeout=WAIT_S)
    await until(lambda: gateway_gauge(gateway) == 1, "the other stream admitted", 10.0)
    refused = errors_counted(gateway, "RESOURCE_EXHAUSTED")
    resumed = asyncio.create_task(asyncio.to_thread(
        CliRunner().invoke, app,
        ["stream", "-", "--server", gateway.address, "--json", "--mode", "archive",
         "--window-clips", "2", "--hop-clips", "2", "--resume-token", first[-1].resume_token],
        input=data,
    ))
    await until(lambda: errors_counted(gateway, "RESOURCE_EXHAUSTED") > refused,
                "the resumed stream refused as busy", 10.0)
    holder.cancel()
    hold.set()
    result = await resumed

    assert result.exit_code == 0, result.output
    assert "busy" in result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    rest = [e for e in events if e["kind"] == "window"]
    got = [(w.window, w.first_clip, w.last_clip) for w in first] + [
        (e["window"], e["first_clip"], e["last_clip"]) for e in rest]
    assert got == [(w.window, w.first_clip, w.last_clip) for w in whole]
    assert events[-1]["kind"] == "final"
