"""The models inside the real Triton: batching, parity with ONNX Runtime, per-request errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from server import triton as contract
from server.triton import TritonClient
from tests.vocabulary import query_names

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(triton):
    client = TritonClient(triton.grpc_url, timeout_s=60)
    yield client
    await client.close()


def clips(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 112, 112, 3), dtype=np.uint8)


async def test_encoder_batches_across_requests_without_mixing_them(client):
    batch = clips(12)
    whole = await client.encode_clips(batch)
    parts = await asyncio.gather(*(client.encode_clips(batch[i:i + 3]) for i in range(0, 12, 3)))

    assert whole.shape == (12, contract.FEATURE_DIM) and whole.dtype == np.float32
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-4, atol=1e-5)


async def test_triton_matches_onnx_runtime(client, model_repository):
    queries = query_names(model_repository)
    ort = pytest.importorskip("onnxruntime")
    batch = clips(3, seed=1)
    session = ort.InferenceSession(
        str(model_repository / "clip_encoder_s3d" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    (expected,) = session.run([contract.FEATURES], {contract.CLIPS: batch})
    np.testing.assert_allclose(await client.encode_clips(batch), expected, rtol=1e-4, atol=1e-5)

    features = np.random.default_rng(2).standard_normal((5, contract.FEATURE_DIM)).astype(np.float32)
    decoder = ort.InferenceSession(
        str(model_repository / contract.QUERY_DECODER_MODEL / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    names = [contract.logits_name(q) for q in queries] + [contract.ATTENTION]
    outputs = decoder.run(names, {contract.FEATURES: features[None], contract.MASK: np.ones((1, 5), bool)})
    out = await client.run_query_decoder(features)
    logits, attention = out.logits, out.attention
    for q, want in zip(queries, outputs):
        np.testing.assert_allclose(logits[q], want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(attention, outputs[-1][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-4)


async def test_decoder_answers_a_bad_request_with_its_own_error(triton, client, model_repository):
    raw = grpcclient.InferenceServerClient(triton.grpc_url)
    features = np.zeros((1, 4, contract.FEATURE_DIM), np.float32)
    inputs = [
        grpcclient.InferInput(contract.FEATURES, list(features.shape), "FP32"),
        grpcclient.InferInput(contract.MASK, [1, 3], "BOOL"),  # wrong length
    ]
    inputs[0].set_data_from_numpy(features)
    inputs[1].set_data_from_numpy(np.ones((1, 3), bool))
    try:
        with pytest.raises(InferenceServerException, match="mask shape"):
            await raw.infer(contract.QUERY_DECODER_MODEL, inputs)
    finally:
        await raw.close()
    attention = (await client.run_query_decoder(features[0] + 1.0)).attention
    assert attention.shape == (len(query_names(model_repository)), 4)


async def test_unknown_encoder_lists_what_exists(client):
    from server.errors import InvalidInput

    with pytest.raises(InvalidInput, match="available: .*s3d"):
        await client.encode_clips(clips(1), encoder="missing")
