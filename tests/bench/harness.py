"""What every benchmark shares: timing interleaved rounds, CPU accounting by process role, the
ffmpeg floor, comparing answers, and goals checked after everything is printed."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc

RUNS = 2  # rounds; best of RUNS per pipeline: the machine is shared, the best run is the least disturbed


# -- timing ------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    name: str
    run: Callable[[], object]
    # Cumulative CPU-seconds by role of the processes it uses besides this one (see `cpu_roles`).
    roles: Callable[[], dict[str, float]] = dict
    # Cumulative CPU-seconds of parts of this process's work (printed, not added to the total).
    parts: Callable[[], dict[str, float]] = dict
    warm_up: Callable[[], object] | None = None  # the unmeasured run; `run` itself by default
    wall: float = float("inf")  # best of the rounds
    cpu: dict[str, float] = field(default_factory=dict)  # CPU-s of that run by role ("bench": this process + waited children)
    cpu_parts: dict[str, float] = field(default_factory=dict)
    result: object = None
    walls: list[float] = field(default_factory=list)  # every round's
    cpu_rounds: list[dict[str, float]] = field(default_factory=list)  # every round's CPU-s by role
    cpu_parts_rounds: dict[str, list[float]] = field(default_factory=dict)  # every round's CPU-s by part

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())

    @property
    def cpu_totals(self) -> list[float]:
        """Every round's CPU-s, all roles."""
        return [sum(cpu.values()) for cpu in self.cpu_rounds]


def measure(pipelines: list[Pipeline], rounds: int = RUNS) -> None:
    """Per round, each pipeline in turn runs unmeasured once, then measured; each keeps its best
    measured run. The unmeasured run puts it in its steady state, as in a batch job (the 720p
    reference's first 5 GB allocation after other work measured up to 2x slower than its next
    ones); interleaving keeps a drift in the machine's speed from favouring one pipeline."""
    for _ in range(rounds):
        for p in pipelines:
            (p.warm_up or p.run)()
            before, parts_before = {"bench": _own_cpu(), **p.roles()}, p.parts()
            started = time.perf_counter()
            result = p.run()
            wall = time.perf_counter() - started
            after, parts_after = {"bench": _own_cpu(), **p.roles()}, p.parts()
            p.walls.append(wall)
            cpu = {k: after[k] - before.get(k, 0.0) for k in after}
            p.cpu_rounds.append(cpu)
            for k in parts_after:
                p.cpu_parts_rounds.setdefault(k, []).append(parts_after[k] - parts_before.get(k, 0.0))
            if wall < p.wall:
                p.wall, p.result, p.cpu = wall, result, cpu
                p.cpu_parts = {k: parts_after[k] - parts_before.get(k, 0.0) for k in parts_after}


def paired_overheads(serving: Pipeline, reference: Pipeline) -> list[float]:
    """Per interleaved round, the CPU-seconds `serving` spent over `reference`'s, as a fraction.
    Pairing by round cancels a drift of the machine that both pipelines of a round share."""
    return [s / r - 1 for s, r in zip(serving.cpu_totals, reference.cpu_totals, strict=True)]


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_roles(**roots: int) -> dict[str, float]:
    """Cumulative CPU-seconds (user + system, with reaped children's) of each named process and
    of its descendants: `{name: ..., name + " children": ...}`; Triton's python-backend stubs are
    named by the model they serve (`stub <model>`)."""
    out: dict[str, float] = {}
    for role, pid in roots.items():
        out[role], out[f"{role} children"] = cpu_of(pid)
        for child in _descendants(pid):
            model = _stub_model(child)
            key = f"stub {model}" if model else f"{role} children"
            out[key] = out.get(key, 0.0) + sum(cpu_of(child))
    return out


def cpu_of(pid: int) -> tuple[float, float]:
    """(its own user + system seconds, its reaped children's): a recycled worker's time moves
    into its parent's cutime/cstime once reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _stub_model(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    if not argv or not argv[0].endswith(b"triton_python_backend_stub"):
        return ""
    model_path = argv[1].decode(errors="replace") if len(argv) > 1 else ""
    # .../<model>/<version>/model.py
    parts = Path(model_path).parts
    return parts[-3] if len(parts) >= 3 else model_path


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(stat.parent.name))
    return out


def status(pid: int) -> dict[str, float]:
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


class RssSampler:
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
        for pid in [self.pid, *children(self.pid)]:
            values = status(pid)
            if not values:
                continue
            self.hwm[pid] = max(self.hwm.get(pid, 0.0), values.get("VmHWM", 0.0))
            total += values.get("VmRSS", 0.0)
        self.peak_total = max(self.peak_total, total)

    def high_water_marks(self) -> tuple[float, dict[int, float]]:
        workers = {pid: mb for pid, mb in self.hwm.items() if pid != self.pid}
        return self.hwm.get(self.pid, 0.0), workers


def table(pipelines: list[Pipeline], video_s: float, baselines: dict[str, Pipeline]) -> list[str]:
    """One line per pipeline: wall, video-s/s, ratio against each baseline (its wall / this
    wall: > 1 means faster than it), CPU-s (and by role), every round's wall."""
    heads = " ".join(f"{'vs ' + k:>8}" for k in baselines)
    lines = [f"{'pipeline':<58} {'wall s':>7} {'video-s/s':>9} {heads} {'cpu s':>6}  every round's wall s; cpu-s by role"]
    for p in pipelines:
        ratios = " ".join(f"{b.wall / p.wall:>7.2f}x" for b in baselines.values())
        roles = ", ".join(f"{k} {v:.1f}" for k, v in sorted(p.cpu.items()) if v >= 0.05)
        if p.cpu_parts:
            roles += " (of which " + ", ".join(f"{k} {v:.1f}" for k, v in p.cpu_parts.items()) + ")"
        lines.append(
            f"{p.name:<58} {p.wall:>7.2f} {video_s / p.wall:>9.1f} {ratios} {p.cpu_total:>6.1f}  "
            + " ".join(f"{w:.2f}" for w in p.walls) + f"; {roles}"
        )
    return lines


# -- the gateway and ffmpeg --------------------------------------------------------------------------


def channel(address: str) -> grpc.Channel:
    limit = 512 * 2**20
    return grpc.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
    )


def analyze(address: str, request: pb.AnalyzeRequest) -> pb.AnalyzeResponse:
    with channel(address) as ch:
        return pb_grpc.VideoAnalyticsStub(ch).Analyze(request, timeout=900)


def analyze_all(address: str, uris: list[str], in_flight: int) -> list[pb.AnalyzeResponse]:
    """`Analyze` of every uri, `in_flight` requests at a time, answers in order (without the
    action parser's segments: the references run only the encoder and the query decoder)."""
    with channel(address) as ch, ThreadPoolExecutor(in_flight) as pool:
        stub = pb_grpc.VideoAnalyticsStub(ch)
        request = lambda uri: pb.AnalyzeRequest(uri=uri, omit_segments=True)  # noqa: E731
        return list(pool.map(lambda uri: stub.Analyze(request(uri), timeout=600), uris))


def ffmpeg_floor(path: Path, *, fps: float, size: int) -> None:
    """The physical floor of this machine: ffmpeg decoding the video to nothing with the gateway's
    frame skipping, threads (2) and output (sampled at `fps`, scaled to size x size)."""
    import imageio_ffmpeg

    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostats", "-skip_frame", "noref",
         "-threads", "2", "-i", str(path), "-vf", f"fps={fps:g},scale={size}:{size}", "-f", "null", "-"],
        check=True,
    )


# -- answers -------------------------------------------------------------------------------------


def answers_of(resp: pb.AnalyzeResponse) -> dict[str, dict[str, float]]:
    """query -> {attribute: probability}, from the gateway's response."""
    return {a.query: dict(a.distribution) for a in resp.answers}


def answers_from_logits(queries, logits: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """query -> {attribute: probability}, from raw logits (the gateway's softmax)."""
    from server.pipeline.assemble import softmax

    return {
        q.query: dict(zip(q.attributes, softmax(np.asarray(logits[q.query]).reshape(-1)).tolist()))
        for q in queries
    }


def differences(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> tuple[list[str], float]:
    """(queries whose chosen attribute differs, the largest probability difference)."""
    if a.keys() != b.keys():
        return [f"queries {sorted(a)} vs {sorted(b)}"], float("inf")
    flipped = [q for q in a if max(a[q], key=a[q].get) != max(b[q], key=b[q].get)]
    worst = max(abs(a[q][k] - b[q].get(k, float("nan"))) for q in a for k in a[q])
    return flipped, worst


# -- goals ---------------------------------------------------------------------------------------


class Goals:
    """Goals checked after every number is printed: `check` records and prints a verdict,
    `assert_met` fails the test naming every goal missed."""

    def __init__(self) -> None:
        self.missed: list[str] = []
        self.lines: list[str] = []

    def check(self, what: str, value: float, goal: float, *, at_most: bool = False, unit: str = "x") -> None:
        met = value <= goal if at_most else value >= goal
        verdict = f"goal: {what} {'<=' if at_most else '>='} {goal:g}{unit}: {'met' if met else 'NOT met'} ({value:.2f}{unit})"
        self.lines.append(verdict)
        if not met:
            self.missed.append(verdict)

    def assert_met(self) -> None:
        if self.missed:
            pytest.fail("goals not met (the numbers are printed above):\n" + "\n".join(self.missed), pytrace=False)
