"""What an operator relies on, through the real gateway, decoder and Triton over loopback.

Deadlines, `limits.max_duration_s`, a cancelled request giving back everything it held, batching
across requests and per-request errors inside the encoder's dynamic batches (checked with
Triton's own counters), and `make test` failing, not skipping, without model artifacts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from server import triton as contract
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from server.settings import Settings
from tests.media import LONG_VIDEO_S

pytestmark = pytest.mark.integration

ENCODER = contract.ENCODER_PREFIX + "s3d"
REPO_ROOT = Path(__file__).resolve().parents[2]
# A safety limit for waits on the server, so a broken feature fails instead of hanging.
WAIT_S = 60.0
# After a cancel or a deadline, each decode worker of the request goes idle within ~1 s of its own
# work: it spends at most this much CPU after the stop. Counted in CPU-seconds, not wall time, so
# a machine loaded by other work does not fail it; a worker that never stops fails WAIT_S.
WORKER_CPU_AFTER_STOP_S = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- observing the servers from outside -------------------------------------------------------


def triton_counters(triton, model: str = ENCODER) -> dict[str, float]:
    """Triton's own per-model counters from its Prometheus endpoint: `nv_inference_count`
    (inferences: a request of 16 clips counts 16), `nv_inference_exec_count` (model executions),
    `nv_inference_request_success`, and `failure_<REASON>` for `nv_inference_request_failure`."""
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or f'model="{model}"' not in line:
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        if name == "nv_inference_request_failure":
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            name = f"failure_{reason}"
        counters[name] = float(value)
    return counters


async def settled_counters(triton, model: str = ENCODER) -> dict[str, float]:
    """Triton's counters once the requests already answered are counted: Triton updates them
    just after it sends a response, so a read right after the last answer can miss it."""
    counters = await asyncio.to_thread(triton_counters, triton, model)
    for _ in range(50):
        await asyncio.sleep(0.2)
        again = await asyncio.to_thread(triton_counters, triton, model)
        if again == counters:
            return counters
        counters = again
    raise AssertionError(f"Triton's counters for {model} kept changing")


def gateway_gauge(gateway, name: str = "vqs_inflight_requests") -> float:
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return float(next(l for l in text.splitlines() if l.startswith(name + " ")).split()[-1])


def _children() -> dict[int, int]:
    """pid -> parent pid of every process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def decode_worker_pids(triton) -> list[int]:
    """This process's children except the session's Triton: the gateways' decode workers (they
    are plain subprocesses of the gateway, which runs in this process)."""
    me = os.getpid()
    return [pid for pid, parent in _children().items() if parent == me and pid != triton.pid]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / CLK_TCK


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not await asyncio.to_thread(predicate):
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s:g} s: {what}") from None


async def cpu_until_idle(pids: list[int], window_s: float = 0.25) -> dict[int, float]:
    """Wait until the processes `pids` use (almost) no CPU over `window_s`; returns the CPU seconds
    each spent meanwhile. An exited process uses none: a worker may be recycled, and its
    replacement's start-up is not the request's work."""
    start = {pid: cpu_seconds([pid]) for pid in pids}
    loop = asyncio.get_running_loop()
    began = loop.time()
    while loop.time() - began < WAIT_S:
        before = cpu_seconds(pids)
        await asyncio.sleep(window_s)
        if cpu_seconds(pids) - before <= 0.02:  # two clock ticks: idle, not decoding
            return {pid: max(cpu_seconds([pid]) - start[pid], 0.0) for pid in pids}
    raise AssertionError(f"decode workers still busy after {WAIT_S:g} s")


@contextlib.asynccontextmanager
async def stub_for(gateway):
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield pb_grpc.VideoAnalyticsStub(channel)


def limits(**values):
    return Settings().limits.model_copy(update=values)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def one_slot_gateway(start_gateway):
    """One request at a time: a slot not given back shows as the next request being refused."""
    gateway = await start_gateway(limits=limits(max_concurrent_requests=1))
    yield gateway
    await gateway.stop()


async def admitted(gateway, video: Path) -> pb.AnalyzeResponse:
    """A request analysed by the gateway: its slot was free."""
    async with stub_for(gateway) as stub:
        return await stub.Analyze(pb.AnalyzeRequest(video=video.read_bytes()), timeout=WAIT_S)


async def encoding_started(triton, before: dict[str, float]) -> None:
    await until(lambda: triton_counters(triton)["nv_inference_count"] > before["nv_inference_count"],
                "the request's first clip batch was encoded")


async def assert_request_released(
    gateway, triton, workers: list[int], at_stop: dict[str, float], full_clips: int
):
    """After a request stopped (cancel or deadline) with clips still to encode: the decode
    `workers` it ran on go idle, its slot is free, and Triton runs nothing more for it."""
    spent = await cpu_until_idle(workers)
    assert max(spent.values()) <= WORKER_CPU_AFTER_STOP_S, (
        f"decode workers kept decoding after the request stopped: CPU-s by pid {spent}")
    # ... and they are handed back to the pool (a recycled one's replacement counts once started).
    pool = gateway.decoder.pool
    await until(lambda: pool.idle_count() == gateway.settings.decode.workers,
                "every decode worker back in the pool", 15.0)
    await until(lambda: gateway_gauge(gateway) == 0, "the gateway's in-flight gauge back at 0", 5.0)

    # The encoder calls the request had in flight when it stopped end (answered or cancelled in
    # Triton's queue) within a second; none is sent after that.
    await asyncio.sleep(1.0)
    settled = await settled_counters(triton)
    await asyncio.sleep(1.0)
    later = triton_counters(triton)
    clips = (f"encoder clips: {at_stop['before']:g} before the request, "
             f"{at_stop['nv_inference_count']:g} when it stopped, {settled['nv_inference_count']:g} "
             f"a second later, {later['nv_inference_count']:g} a second after that")
    for name in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success"):
        assert later[name] == settled[name], f"Triton kept running the stopped request ({clips})"
    inflight_clips = Settings().limits.encode_inflight * Settings().limits.clips_per_batch
    assert settled["nv_inference_count"] - at_stop["nv_inference_count"] <= inflight_clips, (
        f"more clips encoded after the stop than were in flight ({clips})")
    encoded = settled["nv_inference_count"] - at_stop["before"]
    assert encoded < full_clips, f"the whole video was encoded although the request stopped ({clips})"


LONG_VIDEO_CLIPS = int(LONG_VIDEO_S * 15 / 8)  # at the encoder's 15 fps, 8 frames a clip


# -- 1. deadlines -------------------------------------------------------------------------------


async def test_client_deadline_is_deadline_exceeded_and_frees_the_request(
    one_slot_gateway, triton, long_video, videos, queries
):
    workers, before = decode_worker_pids(triton), await settled_counters(triton)
    async with stub_for(one_slot_gateway) as stub:
        call = stub.Analyze(pb.AnalyzeRequest(video=long_video.read_bytes()), timeout=1.5)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    at_stop = {**triton_counters(triton), "before": before["nv_inference_count"]}

    await assert_request_released(one_slot_gateway, triton, workers, at_stop, LONG_VIDEO_CLIPS)
    response = await admitted(one_slot_gateway, videos["short"])
    assert len(response.answers) == len(queries)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def short_deadline_gateway(start_gateway):
    gateway = await start_gateway(limits=limits(request_deadline_s=1.0, max_concurrent_requests=1))
    yield gateway
    await gateway.stop()


async def test_server_deadline_is_deadline_exceeded(
    short_deadline_gateway, triton, long_video, videos, queries
):
    # The client sets no deadline: only `limits.request_deadline_s` (1 s here) can end the call.
    workers, before = decode_worker_pids(triton), await settled_counters(triton)
    async with stub_for(short_deadline_gateway) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Analyze(pb.AnalyzeRequest(video=long_video.read_bytes()))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in error.value.details()
    at_stop = {**triton_counters(triton), "before": before["nv_inference_count"]}

    await assert_request_released(short_deadline_gateway, triton, workers, at_stop, LONG_VIDEO_CLIPS)
    response = await admitted(short_deadline_gateway, videos["short"])  # well within 1 s
    assert len(response.answers) == len(queries)


# -- 2. limits.max_duration_s -----------------------------------------------------------------

MAX_DURATION_S = 3.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def duration_limited_gateway(start_gateway):
    # One clip per encoder call: every clip decoded before the limit is refused shows in Triton.
    gateway = await start_gateway(limits=limits(max_duration_s=MAX_DURATION_S, clips_per_batch=1))
    yield gateway
    await gateway.stop()


def shorten_mp4_header(data: bytes, seconds: float) -> bytes:
    """The same MP4 whose `mvhd`, `tkhd` and `mdhd` boxes (version 0) claim `seconds`; every
    frame is still there."""
    out = bytearray(data)

    def box(name: bytes) -> int:
        at = out.find(name)
        if at < 0 or out[at + 4] != 0:
            raise ValueError(f"no version-0 {name.decode()} box")
        return at

    mvhd, tkhd, mdhd = box(b"mvhd"), box(b"tkhd"), box(b"mdhd")
    movie_scale = struct.unpack_from(">I", out, mvhd + 16)[0]
    media_scale = struct.unpack_from(">I", out, mdhd + 16)[0]
    struct.pack_into(">I", out, mvhd + 20, round(seconds * movie_scale))
    struct.pack_into(">I", out, tkhd + 24, round(seconds * movie_scale))
    struct.pack_into(">I", out, mdhd + 20, round(seconds * media_scale))
    return bytes(out)


@pytest.fixture(scope="module")
def lying_video(tmp_path_factory) -> Path:
    """8 s of frames in an MP4 whose header says 1 s."""
    import av

    from export.synth import render_video

    folder = tmp_path_factory.mktemp("lying")
    honest = folder / "honest.mp4"
    render_video(honest, seed=41, seconds=8.0)
    lying = folder / "lying.mp4"
    lying.write_bytes(shorten_mp4_header(honest.read_bytes(), 1.0))
    with av.open(str(lying)) as container:  # the lie is what a container probe reads
        stream = container.streams.video[0]
        assert float(stream.duration * stream.time_base) == pytest.approx(1.0)
        assert container.duration / 1e6 == pytest.approx(1.0)
    return lying


async def test_a_video_over_max_duration_is_refused_at_the_probe(
    duration_limited_gateway, triton, long_video
):
    before = await settled_counters(triton)
    async with stub_for(duration_limited_gateway) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Analyze(pb.AnalyzeRequest(video=long_video.read_bytes()), timeout=WAIT_S)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.max_duration_s" in error.value.details()
    # Refused from the container's header: not one clip reached the encoder.
    assert (await settled_counters(triton))["nv_inference_count"] == before["nv_inference_count"]


async def test_a_header_understating_the_duration_is_caught_while_decoding(
    duration_limited_gateway, triton, lying_video
):
    before = await settled_counters(triton)
    async with stub_for(duration_limited_gateway) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Analyze(pb.AnalyzeRequest(video=lying_video.read_bytes()), timeout=WAIT_S)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.max_duration_s" in error.value.details()
    # Stopped at the limit, not after decoding (and encoding) all 8 s: at most the clips that
    # fit in MAX_DURATION_S at 15 fps reached the encoder.
    encoded = (await settled_counters(triton))["nv_inference_count"] - before["nv_inference_count"]
    assert encoded <= MAX_DURATION_S * 15 / 8 + 1


# -- 3. a client cancelling ---------------------------------------------------------------------


async def test_a_cancelled_request_frees_its_slot_decode_workers_and_triton_calls(
    one_slot_gateway, triton, long_video, videos, queries
):
    workers, before = decode_worker_pids(triton), await settled_counters(triton)
    async with stub_for(one_slot_gateway) as stub:
        call = stub.Analyze(pb.AnalyzeRequest(video=long_video.read_bytes()), timeout=WAIT_S)
        await encoding_started(triton, before)  # mid-request: decoding and encoding under way
        assert call.cancel()
        at_stop = {**triton_counters(triton), "before": before["nv_inference_count"]}
        with pytest.raises(asyncio.CancelledError):
            await call

    await assert_request_released(one_slot_gateway, triton, workers, at_stop, LONG_VIDEO_CLIPS)
    response = await admitted(one_slot_gateway, videos["short"])
    assert len(response.answers) == len(queries)


# -- 4. a bad request among others in the encoder's dynamic batches ------------------------------


def clips(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 112, 112, 3), dtype=np.uint8)


def encoder_request(client, array: np.ndarray, dtype: str = "UINT8"):
    tensor = grpcclient.InferInput(contract.CLIPS, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return client.infer(ENCODER, [tensor])


FULL_BATCH = contract.ENCODER_CONTRACT.max_batch_size  # 64 clips: a batch nothing can join


@contextlib.asynccontextmanager
async def encoder_kept_busy(triton):
    """Keeps the encoder executing full batches, one after the other, so requests that arrive
    meanwhile wait in the dynamic batcher's queue together, as they do under load. A full batch
    cannot take another request's clips: each runs alone, one request and one execution, and any
    batching the counters show happened between the other requests. Yields a dict whose
    "requests" says how many full batches were sent."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    full = clips(FULL_BATCH, seed=7)
    sent = {"requests": 0}
    first_sent, stop = asyncio.Event(), asyncio.Event()

    async def keep_busy():
        while not stop.is_set():
            call = asyncio.ensure_future(encoder_request(client, full))
            sent["requests"] += 1
            await asyncio.sleep(0.02)  # let the request reach Triton before the others go
            first_sent.set()
            await call

    task = asyncio.create_task(keep_busy())
    try:
        await first_sent.wait()
        yield sent
    finally:
        stop.set()
        await task  # the last full batch completes: every one sent is counted by Triton
        await client.close()


async def test_a_bad_request_in_a_dynamic_batch_gets_its_own_error(triton):
    """Good and bad requests sent together to the encoder while it is busy: each bad one gets its
    own INVALID_ARGUMENT naming its fault, every good one its own features (those it gets alone),
    and the good ones shared executions.

    What "bad" can be: the encoder's input is fixed-size uint8 ([8, 112, 112, 3] per clip), and
    Triton itself refuses a wrong dtype, shape, byte size or batch size before a request reaches
    the dynamic batcher. Every request that gets past Triton is one the model can run, so no
    request can make `onnx_runner.execute` fail a batch it shares (its per-request errors are for
    the decoder's mask, see test_models.py). This test proves the isolation an operator can
    observe: bad requests in the same burst as good ones do not disturb them, and the good ones
    really were batched with each other (Triton's counters).
    """
    good = [clips(2, seed) for seed in range(8)]  # 16 clips: one preferred batch
    bad = {
        "shape": (clips(1, 90)[:, :7], "UINT8"),  # 7 frames a clip
        "dtype": (clips(1, 91).astype(np.float32), "FP32"),
        "batch": (np.zeros((FULL_BATCH + 1, 8, 112, 112, 3), np.uint8), "UINT8"),
    }
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        alone = [(await encoder_request(client, b)).as_numpy(contract.FEATURES) for b in good]
        before = await settled_counters(triton)
        async with encoder_kept_busy(triton) as busy:
            calls = [encoder_request(client, b) for b in good]
            calls += [encoder_request(client, a, t) for a, t in bad.values()]
            results = await asyncio.gather(*calls, return_exceptions=True)
        after = await settled_counters(triton)
    finally:
        await client.close()

    good_results, bad_results = results[: len(good)], results[len(good):]
    for result, want in zip(good_results, alone):
        assert not isinstance(result, BaseException), result
        np.testing.assert_allclose(result.as_numpy(contract.FEATURES), want, rtol=1e-4, atol=1e-5)
    for (fault, _), result in zip(bad.items(), bad_results):
        assert isinstance(result, InferenceServerException), (fault, result)
        assert result.status() == "StatusCode.INVALID_ARGUMENT", (fault, result)
    assert "unexpected shape" in bad_results[0].message()
    assert "FP32" in bad_results[1].message()
    assert "batch-size" in bad_results[2].message()

    requests = after["nv_inference_request_success"] - before["nv_inference_request_success"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert requests - busy["requests"] == len(good)  # the bad ones never ran
    assert executions - busy["requests"] < len(good), "the good requests were never batched together"


# -- 5. batching across gateway requests, by Triton's counters -----------------------------------


async def test_concurrent_gateway_requests_share_encoder_executions(gateway, triton, videos):
    """Six gateway requests at once, each one encoder call of 8 clips, while the encoder is busy.

    `nv_inference_count` counts clips and `nv_inference_exec_count` executions, so even one
    request of 8 clips alone makes exec < count. Batching *across requests* shows as fewer
    executions than encoder requests (`nv_inference_request_success`); with one encoder call per
    gateway request, that is clips of different gateway requests encoded together.
    """
    upload = videos["normal"].read_bytes()  # 4 s: one encoder call of 8 clips per request
    before = await settled_counters(triton)
    async with encoder_kept_busy(triton) as busy, stub_for(gateway) as stub:
        responses = await asyncio.gather(*(
            stub.Analyze(pb.AnalyzeRequest(video=upload), timeout=WAIT_S) for _ in range(6)
        ))
    after = await settled_counters(triton)

    clips_sent = sum(r.video.clips for r in responses)
    assert clips_sent <= len(responses) * Settings().limits.clips_per_batch  # one call each
    def delta(name: str) -> float:
        return after[name] - before[name]

    inferences = delta("nv_inference_count") - busy["requests"] * FULL_BATCH
    requests = delta("nv_inference_request_success") - busy["requests"]
    executions = delta("nv_inference_exec_count") - busy["requests"]
    assert inferences == clips_sent and requests == len(responses)
    assert executions < inferences
    assert executions < requests, f"{requests} encoder requests ran in {executions} executions"
    first = [(a.attribute, round(a.probability, 4)) for a in responses[0].answers]
    for response in responses[1:]:  # batched with others, each answered from its own clips
        assert [(a.attribute, round(a.probability, 4)) for a in response.answers] == first


# -- 6. missing model artifacts --------------------------------------------------------------------


def test_missing_model_artifacts_fail_the_run_with_a_clear_message(tmp_path):
    needs_models = ("tests/integration/test_operations.py"
                    "::test_concurrent_gateway_requests_share_encoder_executions")
    empty = tmp_path / "model_repository"
    empty.mkdir()
    env = {**os.environ, "VQS_TRITON__MODEL_REPOSITORY": str(empty)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", needs_models],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "model artifacts missing" in output and "make models" in output, output
    assert "skipped" not in output, output
