"""`vqs serve`: Triton (launched here unless `triton.url` is set), the video decoder and the gRPC
gateway, wired together.

`run()` is the blocking entry point (stops on SIGINT/SIGTERM, leaving no tritonserver behind);
`serve()` is the same as a coroutine; `Gateway` is what both start, usable directly by tests.
Triton's supervision (health, restarts) is `server.supervisor`.
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
from pydantic import ValidationError

from server import logs
from server.api import auth
from server.api.interceptor import GatewayInterceptor
from server.api.servicer import VideoAnalyticsServicer
from server.errors import InternalError
from server.launcher import TritonLaunchError, TritonProcess
from server.metrics import Metrics
from server.pipeline.analyze import Analyzer
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from server.settings import SecuritySettings, Settings
from server.supervisor import TritonSupervisor
from server.triton import TritonClient

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VideoAnalytics"].full_name
# gRPC's own message limit sits above the upload limit, so an upload just over the limit gets our
# precise RESOURCE_EXHAUSTED; far larger messages are refused by gRPC (also RESOURCE_EXHAUSTED).
MESSAGE_HEADROOM_BYTES = 1 << 20
_MAX_GRPC_MESSAGE = 2**31 - 1


class StartupError(RuntimeError):
    """The gateway cannot start as configured (a port in use, a TLS file that does not load); the
    message names the setting."""


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
        self.supervisor: TritonSupervisor | None = None
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
        # Settings copied with changes (tests) skip validation: check what start-up relies on.
        problem = s.capacity_problem()
        if problem is not None:
            raise StartupError(problem)
        # Security first: a gateway that would run unprotected must not launch anything.
        try:
            auth.check_exposure(s.host, s.security)
            credentials = auth.server_credentials(s.security)
            token = auth.load_token(s.security)
        except auth.SecurityConfigError as exc:
            raise StartupError(str(exc)) from None
        if s.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {s.host}:{s.metrics_port} ({exc.strerror}); "
                    "free the port or set VQS_METRICS_PORT (0 = no metrics endpoint)"
                ) from None

        url = s.triton.url
        if url is None:
            self.triton_process = TritonProcess(s.triton, log_path=self._triton_log)
            self.triton_process.start()  # in this (main) thread: the child dies with it
            url = self.triton_process.grpc_url
        self.triton = TritonClient(
            url, timeout_s=s.triton.request_timeout_s,
            shared_memory_bytes=s.triton.shared_memory_mb * 2**20,
        )
        self.supervisor = TritonSupervisor(
            s.triton, self.triton, self.triton_process,
            set_health=self._set_health, on_restart=self.metrics.triton_restarts.inc,
        )

        self.decoder = self._decoder_factory(s)
        await self.decoder.start()
        analyzer = Analyzer(self.triton, self.decoder, s.limits, observer=self.metrics)

        message_limit = min(s.limits.max_upload_bytes + MESSAGE_HEADROOM_BYTES, _MAX_GRPC_MESSAGE)
        self.server = grpc.aio.server(
            interceptors=[GatewayInterceptor(self.metrics, token=token)],
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                # Without this a second gateway on the same port starts and silently shares it.
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_VideoAnalyticsServicer_to_server(
            VideoAnalyticsServicer(s, analyzer, unavailable=lambda: self._unavailable),
            self.server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        await self._set_health(False, "Triton is starting")
        address = f"{s.host}:{s.grpc_port}"
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's only word for it: "Failed to bind"
            raise StartupError(
                f"cannot listen for gRPC on {s.host}:{s.grpc_port} (in use, or not an address of this "
                "host); free the port or set VQS_GRPC_PORT (0 = any free port)"
            ) from None
        await self.server.start()
        logger.info(
            "gateway listening on %s (%s, %s; health NOT_SERVING until Triton is ready)", self.address,
            _describe_tls(s.security), "bearer token required" if token else "no token",
        )

        await self.supervisor.wait_ready()
        try:
            models = await analyzer.models()
        except InternalError as exc:  # the query decoder's config has no vocabulary
            raise StartupError(f"Triton at {url} serves unusable models: {exc}") from None
        await self._set_health(True)
        self._monitor = asyncio.create_task(self.supervisor.watch())
        logger.info(
            "serving on %s: Triton %s, encoders %s, queries %s, metrics %s",
            self.address, url, sorted(models.encoders), [q.query for q in models.queries],
            f"http://{s.host}:{self.metrics_port}/metrics" if self.metrics_port else "off",
        )

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


def _describe_tls(security: SecuritySettings) -> str:
    if security.tls_cert is None:
        return "plaintext"
    if security.tls_client_ca is None:
        return "TLS"
    return "mutual TLS" if security.tls_require_client_cert else "TLS, client certificates optional"


def _settings_error(exc: ValidationError) -> str:
    """One line naming each refused setting (values are hidden: one may be the token)."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "invalid settings: " + "; ".join(parts)


def run(settings: Settings | None = None) -> None:
    """The `vqs serve` entry point."""
    if settings is None:
        try:
            settings = Settings()
        except ValidationError as exc:
            logs.configure("INFO")
            logger.error("%s", _settings_error(exc))
            raise SystemExit(1) from None
    logs.configure(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    except (TritonLaunchError, StartupError) as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from None
