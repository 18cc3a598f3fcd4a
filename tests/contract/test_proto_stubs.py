"""The committed gRPC stubs are what `make proto` generates from the committed .proto."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from server.settings import REPO_ROOT

PROTO = "server/proto/video_analytics.proto"
GENERATED = ("video_analytics_pb2.py", "video_analytics_pb2.pyi", "video_analytics_pb2_grpc.py")


def test_committed_stubs_equal_freshly_generated_ones(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / "server" / "proto").mkdir(parents=True)
    shutil.copy(REPO_ROOT / PROTO, tmp_path / PROTO)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", PROTO],
        cwd=tmp_path, check=True, capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "server" / "proto" / name).read_text()
        committed = (REPO_ROOT / "server" / "proto" / name).read_text()
        assert committed == fresh, f"server/proto/{name} is stale: run `make proto`"
