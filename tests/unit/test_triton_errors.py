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


async def test_arrays_of_the_wrong_shape_are_the_servers_fault_not_the_callers():
    """The gateway builds these arrays itself: a wrong shape is INTERNAL, never INVALID_ARGUMENT."""
    import numpy as np
    import pytest

    from server.errors import InternalError
    from server.triton import EncoderSpec, TritonClient

    client = TritonClient("127.0.0.1:1")  # never reached: the checks come first

    async def spec(encoder):
        return EncoderSpec("s3d", "clip_encoder_s3d", 8, 112, 256, 64)

    client.encoder_spec = spec
    try:
        with pytest.raises(InternalError, match="clips must be uint8") as error:
            await client.encode_clips(np.zeros((2, 8, 64, 64, 3), np.uint8))
        assert error.value.code == grpc.StatusCode.INTERNAL
        with pytest.raises(InternalError, match="features must be"):
            await client.run_query_decoder(np.zeros((3, 7), np.float32))
    finally:
        await client.close()
