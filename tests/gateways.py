"""Gateways a test starts over a model repository of its own."""

from __future__ import annotations

from pathlib import Path

from server.launcher import free_port
from server.settings import Settings


def own_triton_settings(repository: Path, **triton) -> Settings:
    """Settings for a gateway that launches its own Triton over `repository` (`triton`: more of
    the Triton settings), every port a free one."""
    return Settings().model_copy(update={
        "grpc_port": 0,
        "metrics_port": free_port(),
        "triton": Settings().triton.model_copy(update={
            "url": None, "model_repository": repository, "grpc_port": 0, "http_port": 0, "metrics_port": 0,
            **triton}),
    })
