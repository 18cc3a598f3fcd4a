"""Two serving choices, each measured before/after in one run (interleaved rounds, best kept,
every round printed):

  - how clips reach Triton: in a registered system shared-memory region (one copy into the
    region, a few hundred bytes on the wire; `server.triton.TritonClient`'s default) or inside the
    gRPC request (`shared_memory_bytes=0`). Counted: this process's CPU per request of
    `limits.clips_per_batch` clips (the gateway's side) and Triton's (server + the encoder's
    python-backend stub); the features must be identical;
  - ONNX Runtime's thread settings for the encoder: the python-backend stub against ONNX Runtime
    in this process on the same batches, and in process, intra-op threads 1 or 2 and idle threads
    spinning or not;
  - the served encoder's threading end to end (intra-op threads, instances), one Triton each.
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
from tests.bench.in_process import InProcess

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
        "intra_op 2, no spinning (the in-process reference)": session(2, "0"),
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


LEAD_VIDEOS = int(os.environ.get("VQS_BENCH_LEAD_VIDEOS", "40"))  # of the synthetic videos
LEAD_ROUNDS = int(os.environ.get("VQS_BENCH_LEAD_ROUNDS", str(RUNS)))
# The encoder's threading on the serving side: (ONNX Runtime intra-op threads, Triton instances).
ENCODER_THREADING = {"intra_op 2, 1 instance": (2, 1), "intra_op 1, 1 instance": (1, 1),
                     "intra_op 1, 2 instances": (1, 2)}


def encoder_threading_copy(source: Path, work: Path, intra_op_threads: int, instances: int) -> Path:
    """A copy of the model repository `source` whose encoder differs only in its intra-op threads
    and instance count."""
    import re
    import shutil

    repository = work / "model_repository"
    shutil.copytree(source, repository, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    config = repository / ENCODER / "config.pbtxt"
    text, n = re.subn(r'(key: "intra_op_threads" value: \{ string_value: ")\d+(")',
                      rf"\g<1>{intra_op_threads}\g<2>", config.read_text())
    text, m = re.subn(r"(instance_group \[\s*\{\s*count: )\d+", rf"\g<1>{instances}", text)
    assert n == 1 and m == 1, "the encoder's config has no intra_op_threads or instance count to vary"
    config.write_text(text)
    return repository


def test_encoder_threading_end_to_end(
    trained_models: Path, synthetic_videos: list[Path], small_video: Path, allowed_root: Path,
    tmp_path_factory,
):
    """The same gateway code and videos against one Triton per encoder threading in
    `ENCODER_THREADING`, each on a repository copy that differs only there: `LEAD_VIDEOS` videos
    with `IN_FLIGHT` requests in flight, the 320x240 video alone, and the ffmpeg floor for it."""
    import contextlib

    from server.launcher import TritonProcess
    from tests.bench.conftest import gateway_subprocess
    from tests.bench.harness import (
        Pipeline, analyze_all, answers_of, differences, ffmpeg_floor, measure, paired_overheads, table,
    )

    uris = [str(p.relative_to(allowed_root)) for p in synthetic_videos[:LEAD_VIDEOS]]
    local = InProcess(trained_models)
    tritons = {}
    for name, (threads, instances) in ENCODER_THREADING.items():
        work = tmp_path_factory.mktemp(f"encoder_{threads}x{instances}")
        repository = encoder_threading_copy(trained_models, work, threads, instances)
        tritons[name] = (TritonProcess(Settings().triton.model_copy(update={"model_repository": repository}),
                                       log_path=work / "tritonserver.log"), repository, work)
    many, one = {}, {}
    try:
        for triton, _, _ in tritons.values():
            triton.start()
        for triton, _, _ in tritons.values():
            triton.wait_ready()
        with contextlib.ExitStack() as stack:
            for name, (triton, repository, work) in tritons.items():
                gateway, address = stack.enter_context(
                    gateway_subprocess(triton.grpc_url, repository, allowed_root, work / "gateway.log"))
                roles = lambda g=gateway, t=triton: cpu_roles(gateway=g.pid, triton=t.pid)  # noqa: E731
                many[name] = Pipeline(
                    f"{name}, {len(uris)} videos, {IN_FLIGHT} in flight",
                    lambda a=address: analyze_all(a, uris, IN_FLIGHT), roles,
                    warm_up=lambda a=address: analyze_all(a, uris[:8], IN_FLIGHT),
                )
                one[name] = Pipeline(f"{name}, 320x240", lambda a=address: analyze_all(a, [small_video.name], 1)[0],
                                     roles)
            floor = Pipeline("floor: ffmpeg -skip_frame noref -threads 2, to null",
                             lambda: ffmpeg_floor(small_video, fps=local.clip_fps, size=local.frame_size))
            measure([*many.values(), *one.values(), floor], rounds=LEAD_ROUNDS)
    finally:
        for triton, _, _ in tritons.values():
            triton.stop()

    first = next(iter(many))
    video_s = sum(r.video.duration_s for r in many[first].result)
    print(f"\nthe gateway end to end with the encoder's threading varied (best of {LEAD_ROUNDS} interleaved "
          f"rounds; load average {os.getloadavg()[0]:.1f})")
    print("\n".join(table(list(many.values()), video_s, {first: many[first]})))
    for name, p in many.items():
        print(f"  {name}: CPU-s by round {', '.join(f'{c:.2f}' for c in p.cpu_totals)}; paired against {first}: "
              + ", ".join(f"{100 * o:+.1f}%" for o in paired_overheads(p, many[first])))
        for role in sorted(r for r in p.cpu if max(c.get(r, 0.0) for c in p.cpu_rounds) >= 0.05):
            print(f"    {role}: " + ", ".join(f"{r.get(role, 0.0):.2f}" for r in p.cpu_rounds))
    print("\n".join(table([*one.values(), floor], one[first].result.video.duration_s, {"floor": floor})))
    for name in many:
        for x, y in [*zip(many[first].result, many[name].result), (one[first].result, one[name].result)]:
            flipped, worst = differences(answers_of(x), answers_of(y))
            assert not flipped and worst <= 1e-4, name
