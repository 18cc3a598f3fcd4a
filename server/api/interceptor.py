"""The one place that maps errors to gRPC statuses, for unary and streaming RPCs alike.

Also: the bearer token check (`server.api.auth`) on every RPC but health, before the handler runs
(for streaming requests, before any message is read; a refused unary request's bytes are not even
parsed); a request id per RPC (from `x-request-id` metadata or new) in a contextvar for logging and
returned as trailing metadata, and the request metrics.

An INTERNAL status carries only the request id; what went wrong is logged under that id. Other
statuses carry the error's message, cut to `MAX_DETAILS` characters. A request body that is not the
RPC's protobuf message is INVALID_ARGUMENT with a request id, like any other bad request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable

import grpc

from server.api.auth import BearerToken, Unauthenticated, is_exempt
from server.errors import InvalidInput, VqsError
from server.logs import RequestContext, current_request, new_request_id
from server.metrics import Metrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
SERVICE_PREFIX = "/vqs.v1."
MAX_DETAILS = 1000  # characters of an error message sent to the caller


class _Malformed:
    """Stands in for a request whose bytes did not parse: the RPC then answers INVALID_ARGUMENT
    with a request id (a deserializer that raises gets UNKNOWN from gRPC, without one)."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a parser raises
            return _Malformed(exc)

    return deserialize


def _parsed(request, rpc: str):
    if isinstance(request, _Malformed):
        raise InvalidInput(f"the request body is not a valid {rpc} request message")
    return request


async def _parsed_stream(requests, rpc: str):
    async for request in requests:
        yield _parsed(request, rpc)


def _details(message: str) -> str:
    if len(message) <= MAX_DETAILS:
        return message
    return message[:MAX_DETAILS] + f"... ({len(message)} characters)"


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
        if isinstance(exc, VqsError) and exc.code != grpc.StatusCode.INTERNAL:
            self.status = exc.code.name
            logger.warning("%s failed: %s: %s", self.ctx.rpc, exc.code.name, exc)
            await self.context.abort(exc.code, _details(str(exc)))
        self.status = grpc.StatusCode.INTERNAL.name
        if isinstance(exc, VqsError):  # a fault the server named: its message is the detail
            logger.error("%s failed: INTERNAL: %s", self.ctx.rpc, exc)
        else:
            logger.error("%s failed unexpectedly", self.ctx.rpc, exc_info=exc)
        await self.context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {self.ctx.request_id})"
        )


def _unread(data: bytes) -> None:
    return None


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, *, token: BearerToken | None = None):
        """`token`: every RPC but health must carry it (None: no token required)."""
        self.metrics = metrics
        self.token = token

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or is_exempt(details.method):
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        if self.token is not None:
            refusal = self.token.refusal(details.invocation_metadata)
            if refusal is not None:
                return self._refused(handler, rpc, refusal)
        if not details.method.startswith(SERVICE_PREFIX):
            return handler  # reflection passes through untouched
        kwargs = dict(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary:
            behavior = self._unary(rpc, handler.unary_unary, _parsed)
            return grpc.unary_unary_rpc_method_handler(behavior, **kwargs)
        if handler.stream_unary:
            behavior = self._unary(rpc, handler.stream_unary, _parsed_stream)
            return grpc.stream_unary_rpc_method_handler(behavior, **kwargs)
        if handler.unary_stream:
            behavior = self._stream(rpc, handler.unary_stream, _parsed)
            return grpc.unary_stream_rpc_method_handler(behavior, **kwargs)
        behavior = self._stream(rpc, handler.stream_stream, _parsed_stream)
        return grpc.stream_stream_rpc_method_handler(behavior, **kwargs)

    def _refused(self, handler: grpc.RpcMethodHandler, rpc: str, reason: str) -> grpc.RpcMethodHandler:
        """A handler of the same kind that answers UNAUTHENTICATED (counted and logged like any
        other error) without reading or parsing the caller's messages."""

        async def refuse(request, context):
            with _Call(self.metrics, rpc, context) as call:
                await call.fail(Unauthenticated(reason))

        kwargs = dict(request_deserializer=_unread, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)

    def _unary(self, rpc: str, behavior: Callable, parse: Callable):
        async def wrapped(request, context):
            with _Call(self.metrics, rpc, context) as call:
                try:
                    return await behavior(parse(request, rpc), context)
                except (Exception, asyncio.CancelledError) as exc:
                    await call.fail(exc)
                    raise

        return wrapped

    def _stream(self, rpc: str, behavior: Callable, parse: Callable):
        async def wrapped(request, context):
            with _Call(self.metrics, rpc, context) as call:
                try:
                    result = behavior(parse(request, rpc), context)
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
