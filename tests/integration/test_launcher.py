"""The launcher surfaces a model's own load error."""

from __future__ import annotations

import shutil

import pytest

from server.launcher import TritonLaunchError, TritonProcess
from server.settings import REPO_ROOT, TritonSettings

pytestmark = pytest.mark.integration


def broken_repository(root, source):
    """Two models built from our real configs and runner: one with a corrupt ONNX file, one
    without any."""
    root.mkdir(parents=True)
    shutil.copy(source / "onnx_runner.py", root / "onnx_runner.py")
    for model in ("tqn_decoder", "clip_encoder_s3d"):
        (root / model / "1").mkdir(parents=True)
        shutil.copy(source / model / "config.pbtxt", root / model / "config.pbtxt")
        (root / model / "1" / "model.py").symlink_to("../../onnx_runner.py")
    (root / "tqn_decoder" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    return root


def test_load_failure_surfaces_the_models_message(tmp_path):
    repo = broken_repository(tmp_path / "repo", REPO_ROOT / "model_repository")
    process = TritonProcess(
        TritonSettings(model_repository=repo, startup_timeout_s=90), log_path=tmp_path / "triton.log"
    )
    process.start()
    with pytest.raises(TritonLaunchError) as error:
        process.wait_ready()
    message = str(error.value)
    assert "tqn_decoder" in message and "Protobuf parsing failed" in message
    assert "clip_encoder_s3d" in message and "no ONNX file" in message
    assert process.pid is None  # stopped


def test_missing_repository_is_a_clear_error(tmp_path):
    process = TritonProcess(TritonSettings(model_repository=tmp_path / "nowhere"))
    with pytest.raises(TritonLaunchError, match="does not exist"):
        process.start()
