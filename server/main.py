"""`vqs serve`: Triton (launched here unless `triton.url` is set), the decoder and the gRPC gateway.

`run()` is the blocking entry point (stops on SIGINT/SIGTERM, leaving no tritonserver behind);
`serve()` is the same as a coroutine; `Gateway` is what both start, usable directly by tests.

The gateway supervises a Triton it launched: when the process exits (or stays not ready), it is
started again on the same ports with exponential backoff; health is NOT_SERVING meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import logs
from server.api.interceptor import GatewayInterceptor
from server.api.servicer import VideoAnalyticsServicer
from server.errors import BackendUnavailable
from server.launcher import TritonLaunchError, TritonProcess
from server.metrics import Metrics
from server.pipeline.analyze import Analyzer
from server.pipeline.assemble import load_queries
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from server.settings import Settings
from server.triton import TritonClient

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VideoAnalytics"].full_name
# gRPC's own message limit sits above the upload limit, so an upload just over the limit gets our
# precise RESOURCE_EXHAUSTED; far larger messages are refused by gRPC (also RESOURCE_EXHAUSTED).
MESSAGE_HEADROOM_BYTES = 1 << 20
_MAX_GRPC_MESSAGE = 2**31 - 1
HEALTH_POLL_S = 2.0


def restart_delay(attempt: int, first_s: float, max_s: float) -> float:
    """Seconds to wait before restart `attempt` (0 = the first) of a run: first_s doubled each
    attempt, at most max_s."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    return min(first_s * 2.0 ** min(attempt, 32), max_s)  # capped exponent: no float overflow


class StartupError(RuntimeError):
    """The gateway cannot start as configured (a port in use); the message names the setting."""


def _default_decoder(settings: Settings):
    from server.pipeline.decode import VideoDecoder

    return VideoDecoder(
        settings.decode,
        max_frame_pixels=settings.limits.max_frame_pixels,
        max_duration_s=settings.limits.max_duration_s,
    )


class Gateway:
    """Everything `serve` runs. `await start()`, then `await stop()` (always)."""

    def __init__(
        self,
        settings: Settings,
        *,
        decoder_factory: Callable[[Settings], object] = _default_decoder,
        triton_log: Path | None = None,
    ):
        self.settings = settings
        self._decoder_factory = decoder_factory
        self._triton_log = triton_log
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.triton_process: TritonProcess | None = None
        self.triton: TritonClient | None = None
        self.decoder = None
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self._monitor: asyncio.Task | None = None
        self._unavailable: str | None = "Triton is starting"  # why requests are refused now

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def _set_health(self, serving: bool, reason: str = "Triton is not ready") -> None:
        self._unavailable = None if serving else reason
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> None:
        s = self.settings
        if s.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {s.host}:{s.metrics_port} ({exc.strerror}); "
                    "free the port or set VQS_METRICS_PORT (0 = any free port)"
                ) from None

        url = s.triton.url
        if url is None:
            self.triton_process = TritonProcess(s.triton, log_path=self._triton_log)
            self.triton_process.start()  # in this (main) thread: the child dies with it
            url = self.triton_process.grpc_url
        self.triton = TritonClient(url, timeout_s=s.triton.request_timeout_s)

        queries = load_queries(s.triton.model_repository)
        self.decoder = self._decoder_factory(s)
        await self.decoder.start()
        analyzer = Analyzer(
            self.triton, self.decoder, queries, s.limits,
            encode_inflight=s.limits.encode_inflight, observer=self.metrics,
        )

        message_limit = min(s.limits.max_upload_bytes + MESSAGE_HEADROOM_BYTES, _MAX_GRPC_MESSAGE)
        self.server = grpc.aio.server(
            interceptors=[GatewayInterceptor(self.metrics)],
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                # Without this a second gateway on the same port starts and silently shares it.
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_VideoAnalyticsServicer_to_server(
            VideoAnalyticsServicer(
                s, analyzer, self.triton, queries, unavailable=lambda: self._unavailable
            ),
            self.server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        await self._set_health(False, "Triton is starting")
        try:
            self.port = self.server.add_insecure_port(f"{s.host}:{s.grpc_port}")
        except RuntimeError:  # grpc's only word for it: "Failed to bind"
            raise StartupError(
                f"cannot listen for gRPC on {s.host}:{s.grpc_port} (in use, or not an address of this "
                "host); free the port or set VQS_GRPC_PORT (0 = any free port)"
            ) from None
        await self.server.start()
        logger.info("gateway listening on %s (health NOT_SERVING until Triton is ready)", self.address)

        if self.triton_process is not None:
            await self.triton_process.wait_ready_async()
        await self.triton.wait_ready(s.triton.startup_timeout_s)
        await self._set_health(True)
        self._monitor = asyncio.create_task(self._watch_triton())
        logger.info(
            "serving on %s: Triton %s, encoders %s, metrics %s",
            self.address, url, sorted(await self.triton.encoders(refresh=True)),
            f"http://{s.host}:{self.metrics_port}/metrics" if self.metrics_port else "off",
        )

    async def _watch_triton(self) -> None:
        """Health follows Triton's readiness. A Triton launched here that exited, or stayed not
        ready for longer than `triton.hung_restart_s`, is started again (see `_restart_triton`)."""
        loop = asyncio.get_running_loop()
        serving, since = True, loop.time()
        attempt = 0  # restarts in the current run of failures
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            ready = await self.triton.is_ready()
            if ready != serving:
                logger.warning("Triton is %s", "ready again" if ready else "NOT ready")
                await self._set_health(ready)
                serving, since = ready, loop.time()
            if ready:
                if loop.time() - since > self.settings.triton.restart_backoff_max_s:
                    attempt = 0  # it stayed up: a later crash is a new run, not part of a loop
                continue
            process = self.triton_process  # None: Triton given by URL, not ours to restart
            if process is None:
                continue
            exited = process.exit_code is not None
            hung = not exited and loop.time() - since > self.settings.triton.hung_restart_s
            if hung:
                logger.warning("Triton (pid %s) has not been ready for %.0f s; restarting it",
                               process.pid, loop.time() - since)
            if exited or hung:
                attempt = await self._restart_triton(attempt)
                await self._set_health(True)
                serving, since = True, loop.time()

    async def _restart_triton(self, attempt: int) -> int:
        """Start our Triton again, on the same ports, until it is ready; returns the attempt count.

        Waits `restart_delay` (`triton.restart_backoff_s`, doubling up to `restart_backoff_max_s`)
        before each start, so a crash-looping Triton does not spin. A start that fails (e.g. a
        model that does not load) is logged with the model's error and retried.
        """
        process = self.triton_process
        start_failed = False
        while True:
            # Ends what is left of the last run (a hung server; a no-op when it exited).
            code = await asyncio.to_thread(process.terminate)
            t = self.settings.triton
            delay = restart_delay(attempt, t.restart_backoff_s, t.restart_backoff_max_s)
            attempt += 1
            cause = "its last start failed" if start_failed else f"tritonserver exited with code {code}"
            reason = f"Triton is restarting ({cause})"
            await self._set_health(False, reason)
            logger.warning("%s; starting it again in %g s (attempt %d)", reason, delay, attempt)
            await asyncio.sleep(delay)
            self.metrics.triton_restarts.inc()
            try:
                process.start()  # in the event loop's (main) thread: the child dies with it
                await process.wait_ready_async()
                await self.triton.wait_ready(self.settings.triton.startup_timeout_s)
            except (TritonLaunchError, BackendUnavailable, OSError) as exc:
                logger.error("Triton restart failed: %s", exc)
                start_failed = True
                continue
            logger.warning("Triton restarted (pid %s) after %d attempt(s)", process.pid, attempt)
            return attempt

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace_s)
            self.server = None
        if self.decoder is not None:
            with contextlib.suppress(Exception):
                await self.decoder.close()
            self.decoder = None
        if self.triton is not None:
            with contextlib.suppress(Exception):
                await self.triton.close()
            self.triton = None
        if self.triton_process is not None:
            await asyncio.to_thread(self.triton_process.stop)
        self.metrics.close()
        logger.info("gateway stopped")


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or, when not given, until SIGINT/SIGTERM)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(settings)
    starting = asyncio.create_task(gateway.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()  # raise start-up errors
            await stopping
        else:
            logger.info("stop requested during start-up")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        logger.info("shutting down")
    finally:
        for task in (starting, stopping):
            task.cancel()
        await gateway.stop()


def run(settings: Settings | None = None) -> None:
    """The `vqs serve` entry point."""
    settings = settings or Settings()
    logs.configure(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    except (TritonLaunchError, StartupError) as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from None
