"""The interceptor on a real grpc.aio server, with small handlers that fail on purpose."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from server.api.interceptor import GatewayInterceptor
from server.errors import InternalError, InvalidInput, NotFound, echo
from server.logs import current_request
from server.metrics import Metrics
from server.proto import video_analytics_pb2 as pb

SERVICE = "vqs.v1.Probe"


async def unary_ok(request: bytes, context) -> bytes:
    return current_request.get().request_id.encode()


async def unary_vqs_error(request: bytes, context) -> bytes:
    raise NotFound("no such video: probe.mp4")


async def unary_crash(request: bytes, context) -> bytes:
    raise RuntimeError("secret internals")


async def unary_internal(request: bytes, context) -> bytes:
    raise InternalError("clips must be uint8 [n, 8, 112, 112, 3], got float32 [2, 3]")


async def unary_echo(request: bytes, context) -> bytes:
    raise InvalidInput(f"invalid encoder name {echo('e' * 20_000)}")


async def unary_huge_message(request: bytes, context) -> bytes:
    raise NotFound("x" * 20_000)


async def unary_parsed(request: pb.AnalyzeRequest, context) -> bytes:
    return request.encoder.encode()


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
            "Internal": grpc.unary_unary_rpc_method_handler(unary_internal),
            "Echo": grpc.unary_unary_rpc_method_handler(unary_echo),
            "Huge": grpc.unary_unary_rpc_method_handler(unary_huge_message),
            "Parsed": grpc.unary_unary_rpc_method_handler(
                unary_parsed, request_deserializer=pb.AnalyzeRequest.FromString
            ),
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
    # The server counts the error as its call ends, after the client already has the status.
    counted = metrics.errors.labels(code="NOT_FOUND")._value
    for _ in range(100):
        if counted.get():
            break
        await asyncio.sleep(0.05)
    assert counted.get() == 1


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


async def test_internal_errors_the_server_names_carry_only_the_request_id(probe, caplog):
    channel, metrics = probe
    call = channel.unary_unary(f"/{SERVICE}/Internal")(b"", metadata=(("x-request-id", "r-7"),))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert error.value.details() == "internal error (request id r-7)"
    assert "uint8" in caplog.text  # the detail is in the log
    assert metrics.errors.labels(code="INTERNAL")._value.get() == 1


async def test_a_huge_echoed_value_stays_invalid_argument(probe):
    channel, _ = probe
    for method, code in (("Echo", grpc.StatusCode.INVALID_ARGUMENT), ("Huge", grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await channel.unary_unary(f"/{SERVICE}/{method}")(b"")
        assert error.value.code() == code, error.value.details()[:200]
        assert len(error.value.details()) < 2000


async def test_a_malformed_body_is_invalid_argument_with_a_request_id(probe):
    channel, metrics = probe
    parsed = channel.unary_unary(f"/{SERVICE}/Parsed")
    good = pb.AnalyzeRequest(encoder="s3d").SerializeToString()
    assert await parsed(good) == b"s3d"
    call = parsed(b"\xff\xff\xff\xff", metadata=(("x-request-id", "r-bad"),))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Parsed request" in error.value.details()
    assert dict(await call.trailing_metadata())["x-request-id"] == "r-bad"
    assert metrics.errors.labels(code="INVALID_ARGUMENT")._value.get() == 1


def test_echo_cuts_long_values():
    assert echo("s3d") == "'s3d'"
    long = echo("e" * 20_000)
    assert len(long) < 150 and "20000 characters" in long
