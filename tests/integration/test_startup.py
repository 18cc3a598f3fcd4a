"""Start-up errors say which setting to change, instead of a traceback."""

from __future__ import annotations

import socket

import pytest

from server.main import StartupError

pytestmark = pytest.mark.integration


async def test_a_metrics_port_in_use_names_the_setting(start_gateway):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(StartupError, match="VQS_METRICS_PORT"):
            await start_gateway(metrics_port=busy.getsockname()[1])


async def test_a_grpc_port_taken_by_another_gateway_names_the_setting(start_gateway, gateway):
    # gRPC would share a port between two servers (SO_REUSEPORT): a second gateway must refuse.
    with pytest.raises(StartupError, match="VQS_GRPC_PORT"):
        await start_gateway(grpc_port=gateway.port)
