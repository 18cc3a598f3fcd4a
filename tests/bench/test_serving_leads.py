"""Two serving choices, each measured before/after in one run (interleaved rounds, best kept,
every round printed):

  - how clips reach Triton: in a registered system shared-memory region (one copy into the
    region, a few hundred bytes on the wire; `server.triton.TritonClient`'s default) or inside the
    gRPC request (`shared_memory_bytes=0`). Counted: this process's CPU per request of
    `limits.clips_per_batch` clips (the gateway's side) and Triton's (server + the encoder's
    python-backend stub); the features must be identical;
  - ONNX Runtime's thread settings for the encoder: the python-backend stub against ONNX Runtime
    in this process on the same batches, and in process, intra-op threads 1 or 2 and idle threads
    spinning or not.
Nothing is asserted about speed (these are leads, not goals); the answers must be equal.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest

from server.settings import Settings
from tests.bench.harness import RUNS, cpu_roles

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BATCHES = int(os.environ.get("VQS_BENCH_LEAD_BATCHES", "64"))
CLIPS_PER_BATCH = Settings().limits.clips_per_batch
IN_FLIGHT = Settings().limits.encode_inflight
ENCODER = "clip_encoder_s3d"


def _batches(frame_size: int, clip_frames: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (CLIPS_PER_BATCH, clip_frames, frame_size, frame_size, 3), np.uint8)
    return [np.roll(base, i, axis=0) for i in range(BATCHES)]


async def _run_all(encode, batches: list[np.ndarray]) -> list[np.ndarray]:
    """`IN_FLIGHT` requests at a time, as the gateway sends one video's batches."""
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def one(batch):
        async with limit:
            return await encode(batch)

    return await asyncio.gather(*(one(b) for b in batches))


def test_clips_by_shared_memory_vs_inside_the_request(triton, trained_models: Path):
    from server.triton import TritonClient
    from tests.bench.in_process import InProcess

    local = InProcess(trained_models)
    batches = _batches(local.frame_size, local.clip_frames)

    async def main():
        in_message = TritonClient(triton.grpc_url, shared_memory_bytes=0)
        by_shm = TritonClient(triton.grpc_url)
        variants = {
            "clips inside the gRPC request (shared_memory_bytes=0)": in_message.encode_clips,
            "clips in system shared memory (TritonClient's default)": by_shm.encode_clips,
        }
        best: dict[str, tuple[float, dict, list]] = {}
        walls: dict[str, list[float]] = {k: [] for k in variants}
        try:
            for _ in range(RUNS):
                for name, encode in variants.items():
                    await _run_all(encode, batches[:8])  # warm-up
                    before = {"bench": time.process_time(), **cpu_roles(triton=triton.pid)}
                    started = time.perf_counter()
                    features = await _run_all(encode, batches)
                    wall = time.perf_counter() - started
                    after = {"bench": time.process_time(), **cpu_roles(triton=triton.pid)}
                    walls[name].append(wall)
                    if name not in best or wall < best[name][0]:
                        best[name] = (wall, {k: after[k] - before.get(k, 0.0) for k in after}, features)
        finally:
            await by_shm.close()
            await in_message.close()
        return best, walls

    best, walls = asyncio.run(main())
    # The same batches in process, for the stub's own cost.
    started = time.process_time()
    expected = [local.encoder.run(["features"], {"clips": b})[0] for b in batches]
    in_process_cpu = time.process_time() - started

    n = len(batches)
    print(f"\n{n} requests of {CLIPS_PER_BATCH} clips to the encoder, {IN_FLIGHT} in flight "
          f"(best of {RUNS} interleaved rounds; load average {os.getloadavg()[0]:.1f})")
    stub = f"stub {ENCODER}"
    for name, (wall, cpu, _) in best.items():
        triton_ms = 1000 * (cpu.get("triton", 0.0)) / n
        print(f"  {name:<58} wall {wall:.2f} s ({', '.join(f'{w:.2f}' for w in walls[name])}); "
              f"CPU ms per request: this process {1000 * cpu['bench'] / n:.1f}, tritonserver {triton_ms:.1f}, "
              f"encoder stub {1000 * cpu.get(stub, 0.0) / n:.1f}")
    print(f"  ONNX Runtime in process on the same batches: {1000 * in_process_cpu / n:.1f} CPU ms per request")
    for name, (_, _, features) in best.items():
        np.testing.assert_allclose(np.concatenate(features), np.concatenate(expected), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_onnx_runtime_threads_and_spinning(trained_models: Path):
    import onnxruntime as ort

    from tests.bench.in_process import InProcess

    local = InProcess(trained_models)
    batches = _batches(local.frame_size, local.clip_frames)
    path = str(trained_models / ENCODER / "1" / "model.onnx")

    def session(threads: int, spinning: str):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    variants = {
        "intra_op 2, no spinning (the config today)": session(2, "0"),
        "intra_op 1, no spinning": session(1, "0"),
        "intra_op 2, spinning (ONNX Runtime's default)": session(2, "1"),
    }
    best: dict[str, tuple[float, float]] = {}
    walls: dict[str, list[float]] = {k: [] for k in variants}
    outputs = {}
    for _ in range(RUNS):
        for name, s in variants.items():
            s.run(["features"], {"clips": batches[0]})
            time.sleep(0.2)  # idle threads of the variant before stop spinning
            cpu = time.process_time()
            started = time.perf_counter()
            outputs[name] = [s.run(["features"], {"clips": b})[0] for b in batches]
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu
            walls[name].append(wall)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    n = len(batches)
    print(f"\nthe encoder in process, {n} batches of {CLIPS_PER_BATCH} clips one after another "
          f"(best of {RUNS} interleaved rounds; load average {os.getloadavg()[0]:.1f})")
    for name, (wall, cpu) in best.items():
        print(f"  {name:<48} wall {wall:.2f} s ({', '.join(f'{w:.2f}' for w in walls[name])}), "
              f"CPU {cpu:.2f} s ({1000 * cpu / n:.1f} ms per batch)")
    first = next(iter(outputs.values()))
    for name, out in outputs.items():
        np.testing.assert_allclose(np.concatenate(out), np.concatenate(first), rtol=1e-4, atol=1e-5, err_msg=name)


LEAD_VIDEOS = 40  # of the synthetic videos, for the end-to-end lead


def test_encoder_intra_op_threads_end_to_end(
    triton, trained_models: Path, synthetic_videos: list[Path], allowed_root: Path, tmp_path_factory,
):
    """The same gateway and videos against the session's Triton (the encoder's config today) and a
    second Triton whose repository copy differs only in the encoder's `intra_op_threads` (1)."""
    import re
    import shutil

    from server.launcher import TritonProcess
    from server.settings import Settings
    from tests.bench.conftest import gateway_subprocess
    from tests.bench.harness import Pipeline, analyze_all, answers_of, differences, measure, table

    work = tmp_path_factory.mktemp("intra_op_1")
    repository = work / "model_repository"
    shutil.copytree(trained_models, repository, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    config = repository / ENCODER / "config.pbtxt"
    text, n = re.subn(r'(key: "intra_op_threads" value: \{ string_value: ")\d+(")', r"\g<1>1\g<2>", config.read_text())
    assert n == 1, "the encoder's config has no intra_op_threads parameter to vary"
    config.write_text(text)
    variant = TritonProcess(Settings().triton.model_copy(update={"model_repository": repository}),
                            log_path=work / "tritonserver.log")
    variant.start()
    uris = [str(p.relative_to(allowed_root)) for p in synthetic_videos[:LEAD_VIDEOS]]
    try:
        variant.wait_ready()
        with gateway_subprocess(triton.grpc_url, trained_models, allowed_root, work / "a.log") as (a, a_address), \
                gateway_subprocess(variant.grpc_url, repository, allowed_root, work / "b.log") as (b, b_address):
            pipelines = [
                today := Pipeline(
                    f"encoder intra_op_threads 2 (today), {len(uris)} videos, {IN_FLIGHT} in flight",
                    lambda: analyze_all(a_address, uris, IN_FLIGHT),
                    lambda: cpu_roles(gateway=a.pid, triton=triton.pid),
                    warm_up=lambda: analyze_all(a_address, uris[:8], IN_FLIGHT),
                ),
                one := Pipeline(
                    f"encoder intra_op_threads 1, {len(uris)} videos, {IN_FLIGHT} in flight",
                    lambda: analyze_all(b_address, uris, IN_FLIGHT),
                    lambda: cpu_roles(gateway=b.pid, triton=variant.pid),
                    warm_up=lambda: analyze_all(b_address, uris[:8], IN_FLIGHT),
                ),
            ]
            measure(pipelines)
    finally:
        variant.stop()
    video_s = sum(r.video.duration_s for r in today.result)
    print(f"\nthe gateway end to end with the encoder's ONNX Runtime at 2 or 1 intra-op threads "
          f"(best of {RUNS} interleaved rounds; load average {os.getloadavg()[0]:.1f})")
    print("\n".join(table(pipelines, video_s, {"today": today})))
    for x, y in zip(today.result, one.result):
        flipped, worst = differences(answers_of(x), answers_of(y))
        assert not flipped and worst <= 1e-4
