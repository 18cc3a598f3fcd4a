"""Settings are parsed from `VQS_*` environment variables (nested groups with `__`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("VQS_"):
            monkeypatch.delenv(name)


def test_defaults_without_environment():
    s = Settings()
    assert (s.host, s.grpc_port, s.metrics_port, s.default_encoder) == ("127.0.0.1", 50051, 9090, "s3d")
    assert s.triton.url is None and s.security.allowed_root is None
    assert s.limits.max_upload_bytes == 256 * 1024 * 1024


def test_top_level_and_nested_values_from_vqs_variables(monkeypatch, tmp_path):
    env = {
        "VQS_HOST": "0.0.0.0",
        "VQS_GRPC_PORT": "6000",
        "VQS_METRICS_PORT": "0",
        "VQS_DEFAULT_ENCODER": "other",
        "VQS_LOG_LEVEL": "debug",
        "VQS_TRITON__URL": "triton.internal:8001",
        "VQS_TRITON__REQUEST_TIMEOUT_S": "12.5",
        "VQS_TRITON__RESTART_BACKOFF_S": "0.5",
        "VQS_LIMITS__MAX_UPLOAD_BYTES": "1024",
        "VQS_LIMITS__MAX_CONCURRENT_REQUESTS": "3",
        "VQS_LIMITS__ENCODE_INFLIGHT": "2",
        "VQS_SECURITY__ALLOWED_ROOT": str(tmp_path),
        "VQS_DECODE__WORKERS": "3",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.host, s.grpc_port, s.metrics_port, s.default_encoder) == ("0.0.0.0", 6000, 0, "other")
    assert s.log_level == "debug"
    assert s.triton.url == "triton.internal:8001"
    assert s.triton.request_timeout_s == 12.5 and s.triton.restart_backoff_s == 0.5
    assert s.limits.max_upload_bytes == 1024
    assert s.limits.max_concurrent_requests == 3 and s.limits.encode_inflight == 2
    assert s.security.allowed_root == Path(tmp_path)
    assert s.decode.workers == 3
    # A variable of one group leaves the group's other fields at their defaults.
    assert s.limits.request_deadline_s == Settings.model_fields["limits"].default.request_deadline_s


@pytest.mark.parametrize("name, value", [
    ("VQS_GRPC_PORT", "not-a-port"),
    ("VQS_LIMITS__MAX_CONCURRENT_REQUESTS", "0"),
    ("VQS_TRITON__HUNG_RESTART_S", "-1"),
])
def test_invalid_values_are_refused_naming_the_field(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    field = name.removeprefix("VQS_").split("__")[-1].lower()
    assert field in str(error.value)


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(ValidationError):
        s.grpc_port = 1
    with pytest.raises(ValidationError):
        s.limits.max_upload_bytes = 1
