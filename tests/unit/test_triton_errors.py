"""`server/triton.py` turns tritonclient errors into the gateway's errors."""

from __future__ import annotations

import grpc
from tritonclient.utils import InferenceServerException

from server.triton import _translate


def test_triton_down_is_unavailable_and_says_so():
    exc = InferenceServerException(
        "failed to connect to all addresses; last error: Connection refused",
        status="StatusCode.UNAVAILABLE",
    )
    error = _translate(exc, "inference on clip_encoder_s3d")
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "Triton is not ready" in str(error) and "restarting" in str(error)
    assert "inference on clip_encoder_s3d: failed to connect" in str(error)


def test_a_model_still_loading_is_unavailable():
    exc = InferenceServerException("Request for unknown model: 'tqn_decoder' is not found")
    assert _translate(exc, "inference on tqn_decoder").code == grpc.StatusCode.UNAVAILABLE


def test_other_failures_stay_internal():
    exc = InferenceServerException("onnxruntime: bad shape", status="StatusCode.INTERNAL")
    error = _translate(exc, "inference on tqn_decoder")
    assert error.code == grpc.StatusCode.INTERNAL
    assert "Triton is not ready" not in str(error)
