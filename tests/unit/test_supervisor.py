"""`TritonSupervisor` with a fake client and a fake process: health follows readiness, a launched
Triton that exits is started again, a Triton given by URL is only followed."""

from __future__ import annotations

import asyncio

import pytest

from server import supervisor
from server.settings import TritonSettings
from server.supervisor import TritonSupervisor


class FakeClient:
    def __init__(self, states):
        self.states = list(states)
        self.forgotten = 0

    async def is_ready(self) -> bool:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def forget_models(self) -> None:
        self.forgotten += 1


class FakeProcess:
    def __init__(self):
        self.exit_code = None
        self.pid = 1234
        self.starts = 0

    def terminate(self):
        return self.exit_code

    def start(self):
        self.starts += 1
        self.exit_code = None

    async def wait_ready_async(self, client, timeout_s=None):
        return None


async def run_watch(sup: TritonSupervisor, polls: int) -> None:
    task = asyncio.create_task(sup.watch())
    for _ in range(polls):
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(supervisor, "HEALTH_POLL_S", 0.01)


async def test_health_follows_a_triton_given_by_url():
    health = []

    async def set_health(serving, reason):
        health.append(serving)

    client = FakeClient([True, False, False, True])
    sup = TritonSupervisor(TritonSettings(), client, None, set_health=set_health)
    await run_watch(sup, 10)
    assert health == [False, True]
    assert client.forgotten == 1  # back from a restart: the model configs are read afresh


async def test_a_launched_triton_that_exited_is_started_again():
    health, restarts = [], []

    async def set_health(serving, reason):
        health.append((serving, reason))

    process = FakeProcess()
    client = FakeClient([True, False, True])
    sup = TritonSupervisor(TritonSettings(restart_backoff_s=0.01), client, process,
                           set_health=set_health, on_restart=lambda: restarts.append(1))
    process.exit_code = -9
    await run_watch(sup, 10)
    assert process.starts >= 1 and restarts
    assert any(not serving and "exited with code -9" in reason for serving, reason in health)
    assert health[-1] == (True, "")
