"""The one place that maps errors to gRPC statuses, for unary and streaming RPCs alike.

Also: a request id per RPC (from `x-request-id` metadata or new) in a contextvar for logging and
returned as trailing metadata, and the request metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable

import grpc

from server.errors import VqsError
from server.logs import RequestContext, current_request, new_request_id
from server.metrics import Metrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
SERVICE_PREFIX = "/vqs.v1."


class _Call:
    """Bookkeeping of one RPC: request id, metrics, error mapping."""

    def __init__(self, metrics: Metrics, rpc: str, context: grpc.aio.ServicerContext):
        metadata = dict(context.invocation_metadata() or ())
        given = str(metadata.get(REQUEST_ID_HEADER, ""))[:64]
        self.ctx = RequestContext(request_id=given or new_request_id(), rpc=rpc)
        self.metrics = metrics
        self.context = context
        self.status = "OK"
        self.started = 0.0
        self._token = None

    def __enter__(self) -> _Call:
        self._token = current_request.set(self.ctx)
        self.started = time.perf_counter()
        self.metrics.inflight.inc()
        self.context.set_trailing_metadata(((REQUEST_ID_HEADER, self.ctx.request_id),))
        return self

    def __exit__(self, *exc) -> None:
        self.metrics.inflight.dec()
        encoder = self.ctx.labels.get("encoder", "")
        self.metrics.request_duration.labels(
            rpc=self.ctx.rpc, encoder=encoder, status=self.status
        ).observe(time.perf_counter() - self.started)
        if self.status != "OK":
            self.metrics.errors.labels(code=self.status).inc()
        current_request.reset(self._token)

    async def fail(self, exc: Exception | asyncio.CancelledError) -> None:
        """Record the outcome of an exception and abort the RPC with the right status."""
        if isinstance(exc, asyncio.CancelledError):
            self.status = "CANCELLED"
            return
        if isinstance(exc, grpc.aio.AbortError):
            code = self.context.code()
            self.status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            return
        if isinstance(exc, VqsError):
            self.status = exc.code.name
            logger.warning("%s failed: %s: %s", self.ctx.rpc, exc.code.name, exc)
            await self.context.abort(exc.code, str(exc))
        self.status = grpc.StatusCode.INTERNAL.name
        logger.error("%s failed unexpectedly", self.ctx.rpc, exc_info=exc)
        await self.context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {self.ctx.request_id})"
        )


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler  # health and reflection pass through untouched
        rpc = details.method.rsplit("/", 1)[-1]
        kwargs = dict(
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(rpc, handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(rpc, handler.stream_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(rpc, handler.unary_stream), **kwargs)
        return grpc.stream_stream_rpc_method_handler(self._stream(rpc, handler.stream_stream), **kwargs)

    def _unary(self, rpc: str, behavior: Callable):
        async def wrapped(request, context):
            with _Call(self.metrics, rpc, context) as call:
                try:
                    return await behavior(request, context)
                except (Exception, asyncio.CancelledError) as exc:
                    await call.fail(exc)
                    raise

        return wrapped

    def _stream(self, rpc: str, behavior: Callable):
        async def wrapped(request, context):
            with _Call(self.metrics, rpc, context) as call:
                try:
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    else:  # writes through context.write
                        await result
                except GeneratorExit:
                    call.status = "CANCELLED"
                    raise
                except (Exception, asyncio.CancelledError) as exc:
                    await call.fail(exc)
                    raise

        return wrapped
