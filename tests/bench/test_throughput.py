"""End-to-end throughput and memory of the gateway against a TQN-style reference pipeline.

`make bench` runs this once. It synthesizes a 60 s 1280x720 30 fps H.264 video and reports
video-seconds processed per wall-second for:
  (1)  the gateway end to end: `Analyze` over gRPC with the video's bytes;
  (1u) the same by `uri` (no upload);
  (a)  the reference, written like the TQN reference code (its loader reads every frame at full
       size, its transforms then resize them, then the model runs once): decord decodes every
       frame at native resolution into memory, torch resizes the held frames to 112x112
       (antialiased bilinear on uint8, as torchvision's Resize does), then one PyTorch eager
       forward of the same clip encoder and decoder (built from each model's `model.json`,
       weights from `model.pt`);
  (a') the reference given the gateway's own trick of resizing inside the decoder: decord
       decodes every frame into memory already at 112x112, then the same eager forward;
  (b)  decode only, with decord at the same resize (as in (a'));
  (c)  decode only, with the gateway's `VideoDecoder` (worker processes, keyframe segments).
Ratios are against (a) and (a') measured in the same run; nothing about speed is asserted (the
machine is noisy); the goal, the gateway at >= 1.5x the reference (a), is reported as met or not.
(a') shows how much of the gain is the resize. Both references and the gateway sample the video
at the encoder's frame rate (`clip_fps`), so all compute the same clips.

It also sends a 10-minute 720p video by `uri` and checks the peak RSS of the gateway process
plus its decode workers (VmHWM from /proc) against the 600 MB budget.

The gateway runs as its own process (`server.main.run`, configured through `VQS_*` variables) so
its memory is not mixed with this process's (which imports torch for the reference); Triton and
the allowed root are the session fixtures from `tests/conftest.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.launcher import free_port
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# Smaller values make a quick dry run of the harness (the defaults are the benchmark).
SECONDS = float(os.environ.get("VQS_BENCH_SECONDS", "60"))
LONG_REPEATS = int(os.environ.get("VQS_BENCH_LONG_REPEATS", "10"))  # the long video = the short one, remuxed
WIDTH, HEIGHT, FPS = 1280, 720, 30
RSS_BUDGET_MB = 600.0
GOAL = 1.5  # the gateway against the reference (a)
RUNS = 2  # rounds; best of RUNS per pipeline: the machine is shared, the best run is the least disturbed
REPO = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="session")
def bench_video(tmp_path_factory) -> Path:
    from export.synth import render_video

    path = tmp_path_factory.mktemp("bench") / f"bench_720p_{SECONDS:g}s.mp4"
    started = time.perf_counter()
    render_video(path, seed=2024, seconds=SECONDS, width=WIDTH, height=HEIGHT, fps=FPS)
    print(f"\nrendered {path.name} ({path.stat().st_size / 2**20:.1f} MB) in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


@pytest.fixture(scope="session")
def long_video(bench_video: Path, allowed_root: Path) -> Path:
    """A 10-minute 720p video under the allowed root: the 60 s video, remuxed back to back."""
    path = allowed_root / f"bench_720p_{SECONDS * LONG_REPEATS:g}s.mp4"
    remux_repeated(bench_video, path, LONG_REPEATS)
    return path


def remux_repeated(src: Path, dst: Path, repeats: int) -> None:
    """Write `src`'s video stream `repeats` times in a row (no re-encoding)."""
    import av

    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        step = max(p.pts + (p.duration or 0) for p in inp.demux(stream) if p.pts is not None)
    with av.open(str(src)) as first, av.open(str(dst), "w") as out:
        dst_stream = out.add_stream_from_template(first.streams.video[0])
        for i in range(repeats):
            with av.open(str(src)) as inp:
                for packet in inp.demux(inp.streams.video[0]):
                    if packet.dts is None:
                        continue
                    packet.pts += i * step
                    packet.dts += i * step
                    packet.stream = dst_stream
                    out.mux(packet)


@pytest.fixture
def gateway_process(triton, allowed_root: Path, tmp_path_factory):
    """A fresh real gateway (`server.main.run`) in its own process, using the session's Triton.

    Fresh per test, so one test's peak memory (e.g. a 200 MB upload) does not show in another's.
    """
    port = free_port()
    log = tmp_path_factory.mktemp("bench_logs") / "gateway.log"
    env = dict(
        os.environ,
        VQS_GRPC_PORT=str(port),
        VQS_METRICS_PORT=str(free_port()),
        VQS_TRITON__URL=triton.grpc_url,
        VQS_TRITON__MODEL_REPOSITORY=str(triton.model_repository),
        VQS_SECURITY__ALLOWED_ROOT=str(allowed_root),
        # The 10-minute video is a ~2 GB file: allow it by uri (the upload limit applies to uris).
        VQS_LIMITS__MAX_UPLOAD_BYTES=str(8 * 2**30),
        VQS_LOG_LEVEL="WARNING",
    )
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from server.main import run; run()"],
            env=env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        time.sleep(1.0)  # let the decode pool finish starting
        yield proc, address
    except grpc.FutureTimeoutError:
        pytest.fail(f"gateway did not start; log:\n{log.read_text(errors='replace')[-4000:]}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _channel(address: str) -> grpc.Channel:
    limit = 512 * 2**20
    return grpc.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
    )


def _analyze(address: str, request: pb.AnalyzeRequest) -> pb.AnalyzeResponse:
    with _channel(address) as channel:
        return pb_grpc.VideoAnalyticsStub(channel).Analyze(request, timeout=900)


@dataclass
class _Pipeline:
    name: str
    run: Callable[[], object]
    pids: Callable[[], list[int]] = lambda: []
    wall: float = float("inf")  # best of the rounds
    cpu: float = 0.0  # CPU time of that run: this process plus the process trees of `pids()`
    result: object = None
    walls: list[float] = field(default_factory=list)  # every round's


def _measure(pipelines: list[_Pipeline], rounds: int = RUNS) -> None:
    """Per round, each pipeline in turn runs twice and the second run is measured; each keeps its
    best measured run. The unmeasured run puts it in its steady state, as in a batch job (the
    reference's first 5 GB allocation after other work measured up to 2x slower than its next
    ones); interleaving keeps a drift in the machine's speed from favouring one pipeline."""
    for _ in range(rounds):
        for p in pipelines:
            p.run()
            roots = p.pids()
            cpu_before = time.process_time() + _tree_cpu(roots)
            started = time.perf_counter()
            result = p.run()
            wall = time.perf_counter() - started
            p.walls.append(wall)
            if wall < p.wall:
                p.wall, p.result = wall, result
                p.cpu = time.process_time() + _tree_cpu(roots) - cpu_before


def _tree_cpu(roots: list[int]) -> float:
    """user + system seconds of the processes `roots` and all their descendants."""
    ticks = 0
    seen = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
        todo.extend(_children(pid))
    return ticks / os.sysconf("SC_CLK_TCK")


# -- the reference pipeline (TQN reference style) ---------------------------------------------------


@dataclass
class _Models:
    encoder: object
    decoder: object
    clip_frames: int
    frame_size: int
    clip_fps: float  # the encoder's frame rate: both pipelines sample the video at it


def _load_reference_models(repo: Path) -> _Models:
    import torch

    from export.models.s3d import S3D
    from export.models.tqn import TQNDecoder

    enc_meta = json.loads((repo / "clip_encoder_s3d" / "1" / "model.json").read_text())
    dec_meta = json.loads((repo / "tqn_decoder" / "1" / "model.json").read_text())
    enc_cfg = dict(enc_meta["config"])
    enc_cfg["channels"] = tuple(enc_cfg["channels"])
    encoder = S3D(**enc_cfg)
    decoder = TQNDecoder(**dec_meta["config"])
    for model, name in ((encoder, "clip_encoder_s3d"), (decoder, "tqn_decoder")):
        weights = repo / name / "1" / "model.pt"
        if weights.is_file():
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
    return _Models(encoder, decoder, enc_meta["clip_frames"], enc_meta["frame_size"], enc_meta["clip_fps"])


def _decode_all_decord(path: Path, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every frame in memory (N, H, W, 3), at native resolution or resized by decord to `size`,
    and each frame's [start, end] seconds (N, 2)."""
    import decord

    resize = {} if size is None else dict(width=size, height=size)
    vr = decord.VideoReader(str(path), **resize)  # decord's default threads (both cores)
    # Filled in place, frame by frame: the cheapest way to hold them all (get_batch of every
    # index measured 1.9x slower and 1.7x the memory at 720p).
    first = vr.next().asnumpy()
    frames = np.empty((len(vr), *first.shape), np.uint8)
    frames[0] = first
    for i in range(1, len(vr)):
        frames[i] = vr.next().asnumpy()
    return frames, vr.get_frame_timestamp(list(range(len(frames))))


def _resize_held(frames: np.ndarray, picked: np.ndarray, size: int, batch: int = 64) -> np.ndarray:
    """frames[picked] resized by torch's antialiased bilinear on uint8 (torchvision's Resize on
    tensors), in batches."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(picked), size, size, 3), np.uint8)
    for i in range(0, len(picked), batch):
        x = torch.from_numpy(frames[picked[i : i + batch]]).permute(0, 3, 1, 2)  # N, 3, H, W (channels last)
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out[i : i + batch] = y.permute(0, 2, 3, 1).numpy()
    return out


def _reference(path: Path, m: _Models, *, resize_in_decoder: bool):
    """Decode every frame into memory, sample them at the encoder's rate (as the TQN loader's
    `downsample` stride does; here the same time grid as the gateway), resize, one forward."""
    import torch

    from server.pipeline.chunk import TimeGrid

    size = m.frame_size
    frames, times = _decode_all_decord(path, size if resize_in_decoder else None)
    picked, _ = TimeGrid(m.clip_fps).pick(times[:, 0], times[:, 1])
    frames = frames[picked] if resize_in_decoder else _resize_held(frames, picked, size)
    pad = (-len(frames)) % m.clip_frames
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    clips = frames.reshape(-1, m.clip_frames, size, size, 3)  # N, T, H, W, 3
    with torch.no_grad():
        features = m.encoder(torch.from_numpy(clips))  # N, D
        mask = torch.ones(1, len(features), dtype=torch.bool)
        outputs = m.decoder(features[None], mask)
    return outputs, len(clips)


class _VqsDecodeOnly:
    """The gateway's decoder on its own, pool started outside the timed part."""

    def __init__(self, m: _Models) -> None:
        from server.pipeline.decode import VideoDecoder
        from server.settings import DecodeSettings

        self.models = m
        self.loop = asyncio.new_event_loop()
        self.decoder = VideoDecoder(DecodeSettings())
        self.loop.run_until_complete(self.decoder.start())

    def run(self, path: Path) -> int:
        m = self.models

        async def count() -> int:
            clips = 0
            async for batch in self.decoder.stream(
                path, frame_size=m.frame_size, clip_frames=m.clip_frames, clips_per_batch=16,
                sample_fps=m.clip_fps,
            ):
                clips += len(batch.clips)
            return clips

        return self.loop.run_until_complete(count())

    def close(self) -> None:
        self.loop.run_until_complete(self.decoder.close())
        self.loop.close()


# -- the benchmarks --------------------------------------------------------------------------------


def test_throughput_against_reference(
    bench_video: Path, gateway_process, trained_models, triton, allowed_root: Path
):
    proc, address = gateway_process
    data = bench_video.read_bytes()
    (allowed_root / bench_video.name).write_bytes(data)
    models = _load_reference_models(trained_models)

    def reference(resize_in_decoder: bool):
        return _reference(bench_video, models, resize_in_decoder=resize_in_decoder)

    # CPU time counts the gateway, its decode workers and Triton (with its model stubs): on a
    # shared machine wall time depends on the other load, CPU time much less.
    gateway_tree = lambda: [proc.pid, triton.pid]  # noqa: E731
    vqs_decoder = _VqsDecodeOnly(models)
    pipelines = [
        gateway := _Pipeline(
            "(1)  gateway end to end (Analyze, bytes)",
            lambda: _analyze(address, pb.AnalyzeRequest(video=data)), gateway_tree,
        ),
        _Pipeline(
            "(1u) gateway end to end (Analyze, uri)",
            lambda: _analyze(address, pb.AnalyzeRequest(uri=bench_video.name)), gateway_tree,
        ),
        ref := _Pipeline("(a)  reference: decord native + torch resize + eager", lambda: reference(False)),
        resized := _Pipeline("(a') reference, decord resizes: decord 112 + eager", lambda: reference(True)),
        decord_only := _Pipeline(
            "(b)  decode only: decord at 112, all frames",
            lambda: _decode_all_decord(bench_video, models.frame_size),
        ),
        vqs_only := _Pipeline(
            "(c)  decode only: vqs VideoDecoder",
            lambda: vqs_decoder.run(bench_video), vqs_decoder.decoder.worker_pids,
        ),
    ]
    try:
        _measure(pipelines)
    finally:
        vqs_decoder.close()
    reference_hwm = _status(os.getpid()).get("VmHWM", 0.0)  # the reference's 720p frames dominate

    resp = gateway.result
    assert resp.video.clips == ref.result[1] == vqs_only.result  # the same clips, sampled alike
    assert resp.video.frames <= len(decord_only.result[0])  # it may skip non-reference frames
    duration = resp.video.duration_s
    load = os.getloadavg()[0]
    vs_resized = "vs (a')"
    lines = [
        f"\nthroughput on a {duration:.0f} s {WIDTH}x{HEIGHT} {FPS} fps H.264 video "
        f"(best of {RUNS} interleaved rounds, each run after a warm-up run; video-s per wall-s; load average {load:.1f} on "
        f"{os.cpu_count()} cores)",
        f"{'pipeline':<54} {'wall s':>7} {'video-s/s':>9} {'vs (a)':>7} {vs_resized:>7} "
        f"{'cpu s':>6} {'cpu vs (a)':>10}  every round's wall s",
    ]
    for p in pipelines:
        lines.append(
            f"{p.name:<54} {p.wall:>7.2f} {duration / p.wall:>9.1f} {ref.wall / p.wall:>6.2f}x "
            f"{resized.wall / p.wall:>6.2f}x {p.cpu:>6.1f} {ref.cpu / p.cpu if p.cpu else 0:>9.2f}x  "
            + " ".join(f"{w:.2f}" for w in p.walls)
        )
    lines.append(f"peak RSS of the benchmark process (VmHWM; the reference's frames): {reference_hwm:.0f} MB")
    lines.append(f"gateway stage timings (ms): {dict(sorted(resp.timing_ms.items()))}")
    speedup = ref.wall / gateway.wall
    # Reported, not asserted: near the goal the verdict flips with the machine's noise.
    lines.append(f"goal: gateway >= {GOAL}x the reference (a): {'met' if speedup >= GOAL else 'NOT met'} "
                 f"({speedup:.2f}x)")
    print("\n".join(lines))


def test_gateway_peak_rss_on_10_minute_720p(long_video: Path, gateway_process, allowed_root: Path):
    proc, address = gateway_process
    sampler = _RssSampler(proc.pid)
    sampler.start()
    try:
        started = time.perf_counter()
        resp = _analyze(address, pb.AnalyzeRequest(uri=long_video.name))
        wall = time.perf_counter() - started
    finally:
        sampler.stop()
    gateway_hwm, workers_hwm = sampler.high_water_marks()
    bound = gateway_hwm + sum(workers_hwm.values())
    print(
        f"\n{SECONDS * LONG_REPEATS / 60:g}-minute 720p by uri: {resp.video.duration_s:.0f} s, {resp.video.clips} clips in {wall:.1f} s "
        f"({resp.video.duration_s / wall:.1f} video-s/s)\n"
        f"peak RSS (VmHWM): gateway {gateway_hwm:.0f} MB + decode workers "
        f"{' + '.join(f'{v:.0f}' for v in workers_hwm.values()) or '0'} MB = {bound:.0f} MB "
        f"(budget {RSS_BUDGET_MB:.0f} MB); largest sampled simultaneous RSS {sampler.peak_total:.0f} MB"
    )
    assert resp.video.duration_s == pytest.approx(SECONDS * LONG_REPEATS, rel=0.01)
    assert bound < RSS_BUDGET_MB


class _RssSampler:
    """Samples the RSS of a process and its children; keeps each one's VmHWM."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.hwm: dict[int, float] = {}
        self.peak_total = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        total = 0.0
        for pid in [self.pid, *_children(self.pid)]:
            status = _status(pid)
            if not status:
                continue
            self.hwm[pid] = max(self.hwm.get(pid, 0.0), status.get("VmHWM", 0.0))
            total += status.get("VmRSS", 0.0)
        self.peak_total = max(self.peak_total, total)

    def high_water_marks(self) -> tuple[float, dict[int, float]]:
        workers = {pid: mb for pid, mb in self.hwm.items() if pid != self.pid}
        return self.hwm.get(self.pid, 0.0), workers


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(stat.parent.name))
    return out


def _status(pid: int) -> dict[str, float]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) / 1024  # kB -> MB
    return values
