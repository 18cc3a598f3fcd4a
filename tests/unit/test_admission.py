"""Admission: unary requests and streams each have their own limit; beyond it, refused at once."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from server.api.admission import Admission, Slots
from server.errors import Overloaded
from server.settings import LimitsSettings


def admission(requests: int = 1, streams: int = 1) -> Admission:
    return Admission(LimitsSettings(max_concurrent_requests=requests, max_concurrent_streams=streams))


async def test_one_more_than_the_limit_is_refused_naming_the_setting():
    gate = admission(requests=2, streams=1)
    async with gate.unary(), gate.unary():
        with pytest.raises(Overloaded) as error:
            async with gate.unary():
                pytest.fail("admitted beyond the limit")
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_concurrent_requests" in str(error.value) and "busy" in str(error.value)
        assert gate.requests.used == 2
    async with gate.stream():
        with pytest.raises(Overloaded, match="1 streams already running .*limits.max_concurrent_streams"):
            async with gate.stream():
                pytest.fail("admitted beyond the limit")
    assert gate.requests.used == 0 and gate.streams.used == 0


async def test_requests_and_streams_do_not_take_each_others_slots():
    gate = admission(requests=1, streams=1)
    async with gate.unary():
        async with gate.stream():  # a full unary pool leaves the stream pool alone
            assert (gate.requests.used, gate.streams.used) == (1, 1)
            with pytest.raises(Overloaded, match="max_concurrent_requests"):
                async with gate.unary():
                    pass
            with pytest.raises(Overloaded, match="max_concurrent_streams"):
                async with gate.stream():
                    pass


async def test_a_refusal_does_not_wait_for_a_slot():
    """Refused while the holder still runs: nothing queues behind it."""
    gate = admission(requests=1)
    release = asyncio.Event()

    async def hold():
        async with gate.unary():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    refused = asyncio.create_task(gate.unary().__aenter__())
    await asyncio.sleep(0)
    assert refused.done() and isinstance(refused.exception(), Overloaded)
    assert not holder.done()
    release.set()
    await holder
    async with gate.unary():  # free again
        pass


async def test_slots_come_back_after_errors_and_cancellation():
    gate = admission(requests=1, streams=1)
    with pytest.raises(RuntimeError):
        async with gate.unary():
            raise RuntimeError("the request failed")
    assert gate.requests.used == 0

    started = asyncio.Event()

    async def stream_forever():
        async with gate.stream():
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(stream_forever())
    await started.wait()
    assert gate.streams.used == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.streams.used == 0


def test_limits_are_validated():
    with pytest.raises(ValueError, match="at least 0"):
        Slots(-1, what="requests", setting="limits.max_concurrent_requests")
    with pytest.raises(ValueError):
        LimitsSettings(max_concurrent_streams=-1)
    with pytest.raises(ValueError):
        LimitsSettings(max_concurrent_requests=0)


async def test_zero_streams_turns_streaming_off():
    gate = Admission(LimitsSettings(max_concurrent_streams=0))
    with pytest.raises(Overloaded, match="turned off.*max_concurrent_streams = 0"):
        async with gate.stream():
            pass
    async with gate.unary():
        assert gate.requests.used == 1


def test_streams_must_leave_a_decode_worker_for_analyze(monkeypatch):
    """Each stream holds a decode worker while it lasts: admitting as many streams as there are
    workers would leave an admitted call waiting for one instead of being refused."""
    from pydantic import ValidationError

    from server.settings import Settings

    for name in ("VQS_DECODE__WORKERS", "VQS_LIMITS__MAX_CONCURRENT_STREAMS"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    assert defaults.limits.max_concurrent_streams < defaults.decode.workers
    monkeypatch.setenv("VQS_DECODE__WORKERS", "3")
    monkeypatch.setenv("VQS_LIMITS__MAX_CONCURRENT_STREAMS", "3")
    with pytest.raises(ValidationError) as error:
        Settings()
    assert "limits.max_concurrent_streams (3) must be below decode.workers (3)" in str(error.value)
    monkeypatch.setenv("VQS_DECODE__WORKERS", "4")
    assert Settings().limits.max_concurrent_streams == 3


async def test_the_gateway_refuses_limits_its_decode_pool_cannot_honour():
    from server.main import Gateway, StartupError
    from server.settings import Settings

    base = Settings()
    settings = base.model_copy(update={  # copies skip validation; start-up checks again
        "grpc_port": 0, "metrics_port": 0,
        "limits": base.limits.model_copy(update={"max_concurrent_streams": base.decode.workers}),
    })
    gateway = Gateway(settings)
    with pytest.raises(StartupError, match="must be below decode.workers"):
        await gateway.start()
    assert gateway.triton_process is None and gateway.decoder is None
