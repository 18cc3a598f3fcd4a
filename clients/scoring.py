"""Scoring many videos against a gateway: the output file, one request with retries, the batch.

The parts `vqs score` and `vqs evaluate` run on (asyncio, `run_batch`) and the Ray runner
(`score_ray`, blocking `score_one_sync`) shares. Each JSONL line is written whole with one `write`
on an `O_APPEND` file, so a run killed at any point leaves only whole lines and `load_done` can
resume it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from clients import analyze, render
from clients.archive import Item, Listing
from clients.channel import ChannelConfig, open_aio_channel
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc

EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130
DESCRIBE_TIMEOUT_S = 15.0
RETRY_BACKOFF_S = 1.0

stderr = Console(stderr=True)


class GatewayUnreachable(Exception):
    pass


class GatewayRefused(GatewayUnreachable):
    """The gateway answered but refused our credentials (token, certificate): nothing can be
    scored. A kind of unreachable, so callers that only catch that still stop cleanly."""


REFUSING_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def describe_failed(exc: grpc.RpcError) -> GatewayUnreachable:
    """The error to stop a run with when the first call (DescribeModels) fails."""
    if exc.code() in REFUSING_CODES:
        return GatewayRefused(f"{exc.code().name}: {exc.details()}")
    return GatewayUnreachable(exc.details() or exc.code().name)


# --- the output file ------------------------------------------------------------------------

def load_done(out: Path) -> dict[str, bool]:
    """Ids already in OUT -> whether they have a result. A torn last line (no newline) is cut
    off so the file ends on a whole line; an unparsable line elsewhere is ignored (its id is
    scored again)."""
    if not out.exists():
        return {}
    data = out.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        stderr.print(f"[yellow]cutting a torn last line[/yellow] ({len(data) - whole} bytes) from {out}")
        with open(out, "r+b") as f:
            f.truncate(whole)
    done: dict[str, bool] = {}
    for line in data[:whole].splitlines():
        try:
            row = json.loads(line)
            done[row["id"]] = "result" in row
        except (ValueError, KeyError, TypeError):
            stderr.print(f"[yellow]ignoring an unreadable line[/yellow] in {out}: {line[:80]!r}")
    return done


class LineWriter:
    """Appends whole lines: one `os.write` per line on an O_APPEND descriptor (no buffer that a
    kill could leave half-flushed)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, separators=(",", ":")) + "\n").encode()
        written = os.write(self.fd, data)
        while written < len(data):  # only on a full disk or similar; never seen on a kill
            written += os.write(self.fd, data[written:])

    def close(self) -> None:
        os.close(self.fd)


# --- one request ----------------------------------------------------------------------------

@dataclass
class Tally:
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    video_s: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.ok + sum(self.failed.values())

    def add(self, row: dict[str, Any]) -> None:
        """Count one written JSONL row: a result (and its video's seconds) or an error's code."""
        if "result" in row:
            self.ok += 1
            self.video_s += row["result"]["video"]["duration_s"]
        else:
            self.failed[row["error"]["code"]] += 1


def uri_for(item: Item, uri_root: Path | None) -> str | None:
    """The path to send instead of the bytes, relative to the gateway's allowed root, when the
    file is under it."""
    if uri_root is None or item.path is None:
        return None
    try:
        return item.path.resolve().relative_to(uri_root).as_posix()
    except (ValueError, OSError):
        return None


def client_error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "where": "client"}


def local_read_error(exc: OSError) -> dict[str, Any]:
    if isinstance(exc, FileNotFoundError):
        return client_error("NOT_FOUND", f"no such file: {exc.filename or exc}")
    if isinstance(exc, PermissionError):
        return client_error("PERMISSION_DENIED", f"cannot read {exc.filename or exc}")
    return client_error("UNKNOWN", f"cannot read it: {exc}")


def retryable(exc: grpc.aio.AioRpcError) -> bool:
    """The gateway is busy (its concurrency limit) or its Triton is restarting."""
    code = exc.code()
    busy = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in (exc.details() or "")
    return busy or code == grpc.StatusCode.UNAVAILABLE


def prepare(
    item: Item, payload: bytes | OSError | None, uri: str | None, *, encoder: str, max_upload_bytes: int,
    budget: float = 0.0,
) -> tuple[dict[str, Any], pb.AnalyzeRequest | None]:
    """The output row so far and the request to send, or the finished row (request None) when
    the video cannot be sent."""
    row: dict[str, Any] = {"id": item.id, "source": item.source, "via": "uri" if uri else "bytes"}
    if uri:
        return row, pb.AnalyzeRequest(uri=uri, encoder=encoder, budget=budget)
    if isinstance(payload, OSError):
        return row | {"error": local_read_error(payload)}, None
    if len(payload) > max_upload_bytes:
        return row | {"error": client_error(
            "RESOURCE_EXHAUSTED",
            f"file is {len(payload)} bytes, above the server's upload limit of {max_upload_bytes}")}, None
    if not payload:
        return row | {"error": client_error("INVALID_ARGUMENT", "the file is empty")}, None
    return row, pb.AnalyzeRequest(video=payload, encoder=encoder, budget=budget)


def outcome(exc: grpc.RpcError, attempt: int, retries: int) -> dict[str, Any] | None:
    """The error for the row, or None to retry; raises GatewayUnreachable when no gateway answered."""
    answered = analyze.answered_by_gateway(exc)
    if exc.code() == grpc.StatusCode.UNAVAILABLE and not answered:
        raise GatewayUnreachable(exc.details() or "connection failed")
    if attempt < retries and retryable(exc):
        return None
    trailers = dict(exc.trailing_metadata() or ())
    error = {"code": exc.code().name, "message": exc.details() or ""}
    if analyze.REQUEST_ID_HEADER in trailers:
        error["request_id"] = trailers[analyze.REQUEST_ID_HEADER]
    return error


async def score_one(
    stub: pb_grpc.VideoAnalyticsStub, item: Item, payload: bytes | OSError | None, uri: str | None,
    *, encoder: str, timeout: float | None, max_upload_bytes: int, retries: int, budget: float = 0.0,
) -> dict[str, Any]:
    row, request = prepare(item, payload, uri, encoder=encoder, max_upload_bytes=max_upload_bytes, budget=budget)
    if request is None:
        return row
    for attempt in range(retries + 1):
        try:
            response = await stub.Analyze(request, timeout=timeout)
            return row | {"result": render.response_to_dict(response)}
        except grpc.aio.AioRpcError as exc:
            error = outcome(exc, attempt, retries)
            if error is not None:
                return row | {"error": error}
            await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def score_one_sync(
    stub: pb_grpc.VideoAnalyticsStub, item: Item, payload: bytes | OSError | None, uri: str | None,
    *, encoder: str, timeout: float | None, max_upload_bytes: int, retries: int, budget: float = 0.0,
) -> dict[str, Any]:
    """`score_one` on a blocking channel (for Ray actors)."""
    row, request = prepare(item, payload, uri, encoder=encoder, max_upload_bytes=max_upload_bytes, budget=budget)
    if request is None:
        return row
    for attempt in range(retries + 1):
        try:
            return row | {"result": render.response_to_dict(stub.Analyze(request, timeout=timeout))}
        except grpc.RpcError as exc:
            error = outcome(exc, attempt, retries)
            if error is not None:
                return row | {"error": error}
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


# --- the batch ------------------------------------------------------------------------------

def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rates]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    )


def rates(tally: Tally) -> str:
    took = max(time.monotonic() - tally.started, 1e-6)
    return f"{tally.done / took:.2f} videos/s, {tally.video_s / took:.1f} video-s/s"


async def run_batch(
    listing: Listing, todo: list[Item], writer: LineWriter, tally: Tally, *, server: str | ChannelConfig,
    workers: int, uri_root: Path | None, encoder: str, timeout: float | None, retries: int, budget: float = 0.0,
) -> None:
    """`server`: HOST:PORT of a plaintext gateway without a token, or how to reach any gateway."""
    config = server if isinstance(server, ChannelConfig) else ChannelConfig(server)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ahead = threading.Semaphore(2 * workers)
    stop = threading.Event()
    by_id = {item.id: item for item in todo}
    wanted_bytes = {i.id for i in todo if uri_for(i, uri_root) is None}

    def produce() -> None:
        """Reads the wanted items in listing order (one pass over an archive) into the queue."""
        try:
            reader = listing.read(wanted_bytes) if wanted_bytes else iter(())
            pending = [i for i in todo if i.id not in wanted_bytes]  # sent as paths: nothing to read
            for item in pending:
                while not ahead.acquire(timeout=0.2):
                    if stop.is_set():
                        return
                loop.call_soon_threadsafe(queue.put_nowait, (item, None))
            for item, payload in reader:
                while not ahead.acquire(timeout=0.2):
                    if stop.is_set():
                        return
                loop.call_soon_threadsafe(queue.put_nowait, (by_id.get(item.id, item), payload))
        except BaseException as exc:  # a broken archive: the workers stop and the run reports it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            for _ in range(workers):
                loop.call_soon_threadsafe(queue.put_nowait, None)

    async with open_aio_channel(config) as channel:
        try:
            models = await pb_grpc.VideoAnalyticsStub(channel).DescribeModels(
                pb.DescribeModelsRequest(), timeout=DESCRIBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise describe_failed(exc) from None
    max_upload = models.max_upload_bytes or (256 << 20)
    # Messages as large as the server accepts (plus headroom), so its limit, not gRPC's, applies.
    async with open_aio_channel(config, options=analyze.channel_options(max_upload / 2**20)) as channel:
        stub = pb_grpc.VideoAnalyticsStub(channel)
        tally.started = time.monotonic()
        with make_progress() as progress:
            task = progress.add_task("score", total=len(todo), rates=rates(tally))

            async def work() -> None:
                while True:
                    entry = await queue.get()
                    if entry is None:
                        return
                    if isinstance(entry, BaseException):
                        raise entry
                    ahead.release()
                    item, payload = entry
                    row = await score_one(
                        stub, item, payload, uri_for(item, uri_root), encoder=encoder, budget=budget, timeout=timeout,
                        max_upload_bytes=max_upload, retries=retries,
                    )
                    writer.write(row)
                    tally.add(row)
                    progress.update(task, advance=1, rates=rates(tally))

            producer = threading.Thread(target=produce, name="vqs-score-reader", daemon=True)
            producer.start()
            tasks = [asyncio.create_task(work()) for _ in range(workers)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            finally:
                stop.set()
