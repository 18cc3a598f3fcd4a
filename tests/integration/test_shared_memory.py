"""Clip batches to the real Triton through system shared memory (`server.triton.ClipRegions`)."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from server.triton import TritonClient

pytestmark = pytest.mark.integration


def clips(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 112, 112, 3), dtype=np.uint8)


def _leftovers(client: TritonClient) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(client.clip_regions._prefix)]


async def _unregister(client: TritonClient, name: str) -> None:
    """As a restarting Triton would lose it. Triton may hold a region for a moment after it has
    answered the request that read it ("currently in use"): wait that out."""
    for _ in range(100):
        try:
            return await client._client.unregister_system_shared_memory(name)
        except InferenceServerException as exc:
            if "in use" not in str(exc):
                raise
            await asyncio.sleep(0.05)
    raise AssertionError(f"Triton kept region {name} in use for 5 s after answering")


async def _triton_regions(client: TritonClient) -> set[str]:
    status = await client._client.get_system_shared_memory_status(as_json=True)
    return set(status.get("regions", {}))  # name -> its key and size


async def test_clips_in_shared_memory_give_the_features_of_clips_inside_requests(triton):
    shared = TritonClient(triton.grpc_url)
    inline = TritonClient(triton.grpc_url, shared_memory_bytes=0)
    batches = [clips(16, seed) for seed in range(6)] + [clips(5, 9)]
    try:
        by_region = await asyncio.gather(*(shared.encode_clips(b) for b in batches))
        by_request = await asyncio.gather(*(inline.encode_clips(b) for b in batches))
        regions = {r.name for r in shared.clip_regions._all}
        assert regions and regions <= await _triton_regions(shared)  # the clips went that way
        assert shared.clip_regions.allocated_bytes <= shared.clip_regions.budget_bytes
        assert not inline.clip_regions._all
    finally:
        await shared.close()
        await inline.close()
    for a, b in zip(by_region, by_request):
        np.testing.assert_array_equal(a, b)
    observer = TritonClient(triton.grpc_url, shared_memory_bytes=0)
    try:
        assert not regions & await _triton_regions(observer)  # unregistered at close
    finally:
        await observer.close()
    assert _leftovers(shared) == []  # and unlinked


async def test_regions_are_bounded_by_the_budget_and_the_rest_go_inside_requests(triton):
    one_batch = clips(16).nbytes
    client = TritonClient(triton.grpc_url, shared_memory_bytes=2 * (one_batch // 2**20 + 1) * 2**20)
    try:
        features = await asyncio.gather(*(client.encode_clips(clips(16, s)) for s in range(8)))
        assert len(client.clip_regions._all) == 2
        alone = await client.encode_clips(clips(16, 7))
    finally:
        await client.close()
    np.testing.assert_array_equal(features[7], alone)


async def test_registrations_lost_by_triton_are_made_again(triton):
    # What a Triton restart does to the gateway's regions, without restarting the shared Triton.
    client = TritonClient(triton.grpc_url)
    try:
        before = await client.encode_clips(clips(16))
        names = {r.name for r in client.clip_regions._all}
        for name in names:
            await _unregister(client, name)
        after = await client.encode_clips(clips(16))  # refused by Triton, sent inside the request
        again = await client.encode_clips(clips(16))  # registered again
        assert names <= await _triton_regions(client) and client.clip_regions.enabled
    finally:
        await client.close()
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(before, again)


async def test_a_small_dev_shm_keeps_clips_inside_requests(triton, monkeypatch):
    # A container's 64 MB /dev/shm, 40 MB of it used (Triton's stubs): no region would leave half
    # of it free, so none is made (a full tmpfs would turn a write into SIGBUS).
    import server.triton as module

    class SmallShm:
        f_frsize, f_blocks, f_bavail = 4096, 64 * 2**20 // 4096, 24 * 2**20 // 4096

    monkeypatch.setattr(module.os, "statvfs", lambda path: SmallShm())
    client = TritonClient(triton.grpc_url)
    inline = TritonClient(triton.grpc_url, shared_memory_bytes=0)
    try:
        features = await client.encode_clips(clips(16))
        assert client.clip_regions._all == []
        np.testing.assert_array_equal(features, await inline.encode_clips(clips(16)))
    finally:
        await client.close()
        await inline.close()


async def test_clips_in_the_decoders_shared_frames_are_read_in_place(triton):
    # A batch lying in a `SharedFrames` slot (a view of a chunk, at an offset inside its region)
    # goes by the region's name: no clip region is made, and the features are those of the clips
    # inside the request. A registration Triton lost is made again.
    from server.triton import SharedFrames

    memory = SharedFrames(4 * clips(20).nbytes)
    memory.prepare(clips(20).nbytes)
    client = TritonClient(triton.grpc_url)
    inline = TritonClient(triton.grpc_url, shared_memory_bytes=0)
    try:
        chunks = []
        for seed in range(3):
            chunk = memory.take(clips(20).nbytes).reshape(clips(20).shape)
            chunk[:] = clips(20, seed)
            chunks.append(chunk)
        batches = [chunks[0][3:19], chunks[1][:16], chunks[2][15:]]
        assert [SharedFrames.holding(b)[1] % memory.slot_bytes for b in batches] == [
            3 * clips(1).nbytes, 0, 15 * clips(1).nbytes]
        in_place = await asyncio.gather(*(client.encode_clips(b) for b in batches))
        assert client.clip_regions._all == [] and memory.name in await _triton_regions(client)
        await _unregister(client, memory.name)
        after = await client.encode_clips(batches[0])  # refused by Triton, sent another way
        again = await client.encode_clips(batches[0])  # registered again
        assert memory.name in await _triton_regions(client)
        expected = [await inline.encode_clips(np.array(b)) for b in batches]
    finally:
        await client.close()
        await inline.close()
        memory.close()
    for a, b in zip(in_place + [after, again], expected + expected[:1] * 2):
        np.testing.assert_array_equal(a, b)
