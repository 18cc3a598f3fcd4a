"""The interceptor on a real grpc.aio server, with small handlers that fail on purpose."""

from __future__ import annotations

import grpc
import pytest

from server.api.interceptor import GatewayInterceptor
from server.errors import NotFound
from server.logs import current_request
from server.metrics import Metrics

SERVICE = "vqs.v1.Probe"


async def unary_ok(request: bytes, context) -> bytes:
    return current_request.get().request_id.encode()


async def unary_vqs_error(request: bytes, context) -> bytes:
    raise NotFound("no such video: probe.mp4")


async def unary_crash(request: bytes, context) -> bytes:
    raise RuntimeError("secret internals")


async def stream_crash(request: bytes, context):
    yield b"first"
    raise NotFound("gone midway")


def _handlers():
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Ok": grpc.unary_unary_rpc_method_handler(unary_ok),
            "Missing": grpc.unary_unary_rpc_method_handler(unary_vqs_error),
            "Crash": grpc.unary_unary_rpc_method_handler(unary_crash),
            "Stream": grpc.unary_stream_rpc_method_handler(stream_crash),
        },
    )


@pytest.fixture
async def probe():
    metrics = Metrics()
    server = grpc.aio.server(interceptors=[GatewayInterceptor(metrics)])
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, metrics
    await server.stop(0)


async def test_request_id_is_set_and_returned(probe):
    channel, _ = probe
    call = channel.unary_unary(f"/{SERVICE}/Ok")(b"", metadata=(("x-request-id", "abc123"),))
    assert await call == b"abc123"
    assert dict(await call.trailing_metadata())["x-request-id"] == "abc123"
    fresh = await channel.unary_unary(f"/{SERVICE}/Ok")(b"")
    assert len(fresh) == 16


async def test_vqs_errors_keep_their_code_and_message(probe):
    channel, metrics = probe
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await channel.unary_unary(f"/{SERVICE}/Missing")(b"")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "no such video: probe.mp4"
    assert metrics.errors.labels(code="NOT_FOUND")._value.get() == 1


async def test_unknown_errors_are_internal_with_a_request_id_and_no_details(probe):
    channel, metrics = probe
    call = channel.unary_unary(f"/{SERVICE}/Crash")(b"", metadata=(("x-request-id", "r-9"),))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "r-9" in error.value.details()
    assert "secret" not in error.value.details() and "Traceback" not in error.value.details()
    assert metrics.inflight._value.get() == 0


async def test_streaming_rpcs_are_mapped_too(probe):
    channel, _ = probe
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for item in channel.unary_stream(f"/{SERVICE}/Stream")(b""):
            received.append(item)
    assert received == [b"first"]
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
