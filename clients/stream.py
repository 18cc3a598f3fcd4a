"""`vqs stream PATH|-`: send a video (a file, or stdin as it is written) to `AnalyzeStream` and show
the answers per window while it is analysed, then for the whole stream.

`--realtime` sends an MPEG-TS at the pace of its own timestamps (each frame when it is due, as a
live source would); without it the bytes go as fast as the gateway takes them (gRPC's flow
control slows the sender when the server is behind). A pipe from a live encoder is already paced:
`ffmpeg -re -i IN -c:v libx264 -f mpegts - | vqs stream -` (what the pipe holds is sent at once,
not held back to fill a chunk).

With `--resume-token` (a client reconnecting after a break), the video is held back until the
gateway admits the stream (its first event), and a refusal because the gateway is busy (its slot
may still be held by the broken stream, which the server is closing) is retried a few times with
backoff, sending the same bytes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from clients import render
from clients.analyze import (
    EXIT_USAGE,
    answered_by_gateway,
    check_budget,
    error_message,
    exit_code_for,
)
from clients.channel import (
    DEFAULT_SERVER,
    ChannelConfig,
    ServerOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TokenOption,
    config_from_options,
    open_channel,
)
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc

# A resumed stream refused because the gateway is busy is tried again this many times, after
# BUSY_BACKOFF_S, then twice that, and so on.
BUSY_RETRIES = 4
BUSY_BACKOFF_S = 0.25
DEFAULT_CHUNK_KB = 64
TS_PACKET = 188
TS_SYNC = 0x47
PTS_HZ = 90_000
KINDS = {pb.StreamEvent.PROGRESS: "progress", pb.StreamEvent.WINDOW: "window", pb.StreamEvent.FINAL: "final"}
MODES = {"realtime": pb.STREAM_MODE_REALTIME, "archive": pb.STREAM_MODE_ARCHIVE}

stdout = Console()
stderr = Console(stderr=True)


# -- pacing an MPEG-TS by its timestamps


def _timestamp(b: bytes) -> int:
    """A 33-bit PES timestamp from its 5 bytes."""
    return ((b[0] >> 1) & 7) << 30 | b[1] << 22 | (b[2] >> 1) << 15 | b[3] << 7 | b[4] >> 1


def video_pes_time(packet: bytes) -> float | None:
    """Seconds of the decode time (else presentation time) of the video PES starting in this TS
    packet, or None if none starts here."""
    if len(packet) != TS_PACKET or packet[0] != TS_SYNC or not packet[1] & 0x40:
        return None
    control = (packet[3] >> 4) & 3
    if not control & 1:
        return None
    start = 4 + (1 + packet[4] if control & 2 else 0)
    pes = packet[start:]
    if len(pes) < 14 or pes[:3] != b"\0\0\1" or not 0xE0 <= pes[3] <= 0xEF:
        return None
    flags = pes[7]
    if flags & 0x40 and len(pes) >= 19:  # PTS and DTS: pace by the decode order
        return _timestamp(pes[14:19]) / PTS_HZ
    if flags & 0x80:
        return _timestamp(pes[9:14]) / PTS_HZ
    return None


def is_mpegts(head: bytes) -> bool:
    return len(head) >= 2 * TS_PACKET and head[0] == TS_SYNC and head[TS_PACKET] == TS_SYNC


@dataclass
class SendLog:
    """When each frame's bytes were handed to gRPC: (media seconds from the first frame, wall time).
    Written by the sending thread, read after (lists append atomically)."""

    frames: list[tuple[float, float]] = field(default_factory=list)

    def sent_at(self, media_s: float) -> float | None:
        """Wall time the last frame starting before `media_s` was sent (None if unknown)."""
        best = None
        for start, wall in self.frames:
            if start < media_s - 1e-6:
                best = wall
            else:
                break
        return best


def paced_ts(
    source: BinaryIO, *, chunk_bytes: int, log: SendLog | None = None,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> Iterator[bytes]:
    """The MPEG-TS from `source` in chunks, each frame's bytes released when the frame is due
    (its decode time after the first frame's, from the wall time the first was sent)."""
    pending = bytearray()
    first: float | None = None
    started = 0.0
    frame: float | None = None  # the media time of the frame being collected
    while True:
        block = source.read(TS_PACKET * 64)
        if not block:
            break
        pending_in = bytearray(block)
        while len(pending_in) % TS_PACKET:  # a pipe may give a partial packet
            more = source.read(TS_PACKET - len(pending_in) % TS_PACKET)
            if not more:
                break
            pending_in += more
        for i in range(0, len(pending_in), TS_PACKET):
            packet = bytes(pending_in[i:i + TS_PACKET])
            at = video_pes_time(packet)
            if at is not None:
                if pending:
                    yield bytes(pending)
                    pending.clear()
                    if log is not None and frame is not None:
                        log.frames.append((frame, time.time()))
                if first is None:
                    first, started = at, clock()
                frame = at - first
                wait = started + frame - clock()
                if wait > 0:
                    sleep(wait)
            pending += packet
            if len(pending) >= chunk_bytes:
                yield bytes(pending)
                pending.clear()
    if pending:
        yield bytes(pending)
        if log is not None and frame is not None:
            log.frames.append((frame, time.time()))


def read_head(source: BinaryIO, size: int) -> bytes:
    """The first `size` bytes (fewer at the end), however a pipe delivers them."""
    head = b""
    while len(head) < size:
        block = source.read(size - len(head))
        if not block:
            break
        head += block
    return head


class Prefixed:
    """`source` with `head`, already read from it, in front again."""

    def __init__(self, head: bytes, source: BinaryIO) -> None:
        self.head, self.source = head, source

    def read(self, size: int) -> bytes:
        if self.head:
            block, self.head = self.head[:size], self.head[size:]
            return block
        return self.source.read(size)

    def read1(self, size: int) -> bytes:
        if self.head:
            return self.read(size)
        read1 = getattr(self.source, "read1", self.source.read)
        return read1(size)


def read_chunks(source: BinaryIO, chunk_bytes: int) -> Iterator[bytes]:
    """Chunks of at most `chunk_bytes`, each what the source has ready (a live pipe's bytes are
    not held back until a chunk fills)."""
    read = getattr(source, "read1", source.read)
    while True:
        block = read(chunk_bytes)
        if not block:
            return
        yield block


# -- the call


class Admission:
    """Holds a call's video back until the gateway admits the stream (its first event), so a call
    refused at once has taken nothing from the source and can be made again."""

    def __init__(self) -> None:
        self._decided = threading.Event()
        self.admitted = False

    def admit(self) -> None:
        self.admitted = True
        self._decided.set()

    def refuse(self) -> None:
        self._decided.set()

    def wait(self) -> bool:
        self._decided.wait()
        return self.admitted


def requests(
    options: pb.StreamOptions, chunks: Iterable[bytes], admission: Admission | None = None
) -> Iterator[pb.StreamRequest]:
    yield pb.StreamRequest(options=options)
    if admission is not None and not admission.wait():
        return
    for chunk in chunks:
        yield pb.StreamRequest(chunk=chunk)


def busy(exc: grpc.RpcError) -> bool:
    """The gateway refused the stream because every stream slot is taken (it says "busy")."""
    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in (exc.details() or "")


def event_to_dict(event: pb.StreamEvent) -> dict[str, Any]:
    """One `vqs stream --json` line: the event's kind, span and stream fields, and for windows and
    the final event the answers and attention as `vqs analyze --json` has them."""
    out: dict[str, Any] = {
        "kind": KINDS.get(event.kind, "unknown"),
        "start_s": round(event.start_s, 6),
        "end_s": round(event.end_s, 6),
    }
    if event.kind == pb.StreamEvent.WINDOW:
        out["window"] = event.window
    if event.kind != pb.StreamEvent.PROGRESS:
        out |= {"first_clip": event.first_clip, "last_clip": event.last_clip,
                "resume_token": event.resume_token}
    out |= {
        "model_version": event.model_version,
        "dropped_clips": event.dropped_clips,
        "dropped_clips_total": event.dropped_clips_total,
        "lag_s": round(event.lag_s, 3),
        "received_bytes": event.received_bytes,
        "clips_decoded": event.clips_decoded,
        "clips_analysed": event.clips_analysed,
    }
    if event.producer_time_unix_s:
        out["producer_time_unix_s"] = event.producer_time_unix_s
    if event.error:
        out["error"] = event.error
    if event.note:
        out["note"] = event.note
    if event.HasField("result"):
        out |= render.response_to_dict(event.result)
    return out


def window_table(event: dict[str, Any]) -> Table:
    title = f"window {event.get('window', '')} [{event['start_s']:.2f}-{event['end_s']:.2f} s]"
    if event.get("dropped_clips"):
        title += f", {event['dropped_clips']} clips dropped"
    table = render.answers_table(event) if event.get("answers") else Table()
    table.title = f"{title}, lag {event['lag_s']:.2f} s"
    return table


def window_line(event: dict[str, Any]) -> str:
    answers = ", ".join(f"{a['query']}={a['attribute']} ({a['probability']:.2f})" for a in event.get("answers", []))
    head = f"window {event['window']} [{event['start_s']:.2f}-{event['end_s']:.2f} s]"
    return f"{head} {answers or event.get('error', '')}"


def stream(
    path: Annotated[str, typer.Argument(help="Video file to send, or - for stdin.")],
    server: ServerOption = DEFAULT_SERVER,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per event (JSONL).")] = False,
    realtime: Annotated[bool, typer.Option(
        "--realtime", help="Send an MPEG-TS at the pace of its timestamps (as a live source).")] = False,
    mode: Annotated[str, typer.Option(
        help="realtime: the server drops the oldest clips when behind; archive: every clip, "
             "the sender waits.")] = "realtime",
    window_clips: Annotated[int, typer.Option(min=0, help="Clips per window; 0 = the server's default.")] = 0,
    hop_clips: Annotated[int, typer.Option(min=0, help="Clips between window starts; 0 = window.")] = 0,
    encoder: Annotated[str, typer.Option(help="Clip encoder; empty = the server's default.")] = "",
    budget: Annotated[float | None, typer.Option(
        callback=check_budget,
        help="Share of an adaptive encoder's full compute to spend, in (0, 1] (default 1 = full).")] = None,
    resume_token: Annotated[str, typer.Option(
        help="The last resume_token of a broken stream of this feed (sent again from its start).")] = "",
    chunk_kb: Annotated[int, typer.Option(min=1, max=1024, help="Bytes per message, in KiB.")] = DEFAULT_CHUNK_KB,
    timeout: Annotated[float | None, typer.Option(min=0.1, help="Deadline for the whole stream, seconds.")] = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    token: TokenOption = None,
) -> None:
    """Stream a video to the gateway; print the answers per window as they come, then the whole."""
    if mode not in MODES:
        raise typer.BadParameter("use realtime or archive", param_hint="--mode")
    config = config_from_options(server, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
    if path == "-":
        source: BinaryIO = sys.stdin.buffer
    else:
        file = Path(path)
        if not file.is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint="PATH")
        source = file.open("rb")
    chunk_bytes = chunk_kb * 1024
    head = read_head(source, 2 * TS_PACKET)
    source = Prefixed(head, source)
    if realtime and not is_mpegts(head):
        stderr.print(
            "--realtime paces an MPEG-TS by its timestamps, and this input is not one: remux it "
            "(ffmpeg -i IN -c copy -f mpegts OUT.ts), or pipe a live encoder into `vqs stream -` "
            "(ffmpeg -re -i IN -f mpegts -)", highlight=False,
        )
        raise typer.Exit(EXIT_USAGE)
    chunks = paced_ts(source, chunk_bytes=chunk_bytes) if realtime else read_chunks(source, chunk_bytes)
    options = pb.StreamOptions(
        encoder=encoder, window_clips=window_clips, hop_clips=hop_clips, mode=MODES[mode],
        resume_token=resume_token, budget=budget or 0.0,
    )
    code = run(config, options, chunks, timeout=timeout, as_json=as_json)
    raise typer.Exit(code)


def open_stream(
    config: ChannelConfig, options: pb.StreamOptions, chunks: Iterable[bytes], *, timeout: float | None,
    admission: Admission | None = None,
) -> tuple[grpc.Channel, Any]:
    channel = open_channel(config)
    call = pb_grpc.VideoAnalyticsStub(channel).AnalyzeStream(
        requests(options, chunks, admission), timeout=timeout)
    return channel, call


def stream_events(
    config: ChannelConfig, options: pb.StreamOptions, chunks: Iterable[bytes], *, timeout: float | None,
) -> Iterator[pb.StreamEvent]:
    """The stream's events. A resumed stream (options.resume_token) that the gateway refuses as
    busy is made again, up to BUSY_RETRIES times with backoff; each attempt has `timeout`."""
    source = iter(chunks)  # shared by the attempts: a refused one took nothing from it
    retries = BUSY_RETRIES if options.resume_token else 0
    for attempt in range(retries + 1):
        admission = Admission() if retries else None
        channel, call = open_stream(config, options, source, timeout=timeout, admission=admission)
        try:
            for event in call:
                if admission is not None:
                    admission.admit()
                yield event
            return
        except grpc.RpcError as exc:
            if admission is None or admission.admitted or not busy(exc) or attempt == retries:
                raise
            wait = BUSY_BACKOFF_S * 2**attempt
            stderr.print(f"gateway busy (the broken stream may still be closing); retrying in {wait:g} s",
                         highlight=False)
            time.sleep(wait)
        finally:
            if admission is not None:
                admission.refuse()  # a request thread still waiting lets go
            call.cancel()
            channel.close()


def run(
    config: ChannelConfig, options: pb.StreamOptions, chunks: Iterable[bytes], *,
    timeout: float | None, as_json: bool,
) -> int:
    """Send the stream and print its events; the exit code (as `vqs analyze`'s)."""
    events = stream_events(config, options, chunks, timeout=timeout)
    live = None
    final: dict[str, Any] | None = None
    try:
        if not as_json and stdout.is_terminal:
            live = Live(Table(title="waiting for the first window"), console=stdout, refresh_per_second=4)
            live.start()
        for event in events:
            data = event_to_dict(event)
            if as_json:
                sys.stdout.write(json.dumps(data) + "\n")
                sys.stdout.flush()
            if data.get("note"):
                stderr.print(data["note"], highlight=False, soft_wrap=True)
            if data.get("error"):
                stderr.print(f"[yellow]window {data.get('window')}[/yellow] {data['error']}",
                             highlight=False, soft_wrap=True)
            if data["kind"] == "window" and not as_json:
                if live is not None:
                    live.update(window_table(data))
                else:
                    stdout.print(window_line(data), highlight=False, soft_wrap=True)
            if data["kind"] == "final":
                final = data
    except grpc.RpcError as exc:
        if live is not None:
            live.stop()
        code = exc.code()
        stderr.print(f"[red]error[/red] {error_message(code, exc.details())}", highlight=False, soft_wrap=True)
        answered = answered_by_gateway(exc)
        if code == grpc.StatusCode.UNAVAILABLE and not answered:
            stderr.print(f"is the gateway running at {config.server}? (`vqs serve`, --server, VQS_SERVER)")
        return exit_code_for(code, answered=answered)
    except KeyboardInterrupt:
        return 130
    finally:
        if live is not None and live.is_started:
            live.stop()
        events.close()  # cancels the call
    if final is not None and not as_json:
        stdout.print(render.summary_line(final), highlight=False, soft_wrap=True)
        stdout.print(render.answers_table(final))
        stdout.print(render.attention_table(final))
    return 0



