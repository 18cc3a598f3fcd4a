"""What the s3d_zoom encoder costs against s3d (issue 8): multiply-adds per clip, and the time of a
batch of clips on one thread in torch (forward, and forward + backward as training pays it) and in
ONNX Runtime (as served), rounds alternating between the two encoders in this process. Prints the
ratios and the load average; only the multiply-add ratio (deterministic) is asserted."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest
import torch

from export import onnx_export
from export.models import s3d_zoom
from export.models.s3d import S3D
from export.models.s3d_sgs import s3d_macs

VARIANT = "s3d_zoom_32x56_112"
BATCH, ROUNDS = 24, 7


def _median_seconds(run, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


@pytest.mark.slow
def test_s3d_zoom_cost_against_s3d(tmp_path):
    import onnxruntime as ort

    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = {"s3d": S3D(), "s3d_zoom": s3d_zoom.create(VARIANT)}
    macs = {"s3d": s3d_macs(models["s3d"]), "s3d_zoom": s3d_zoom.zoom_macs(models["s3d_zoom"])}
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(str(onnx_export.export_encoder(m, {}, tmp_path / name, name, clip_fps=15)),
                                           options, providers=["CPUExecutionProvider"])
                for name, m in models.items()}
    clips = np.random.default_rng(0).integers(0, 256, (BATCH, 8, 112, 112, 3), dtype=np.uint8)
    batch = torch.from_numpy(clips)

    def forward(m):
        m.eval()
        with torch.inference_mode():
            m(batch)

    def train_step(m):
        m.train()
        m(batch).square().mean().backward()

    times = {(kind, name): [] for kind in ("torch forward", "torch forward+backward", "onnxruntime") for name in models}
    load = [os.getloadavg()[0]]
    for _ in range(ROUNDS):  # alternating, so both encoders see the same load
        for name, m in models.items():
            times["torch forward", name] += _median_seconds(lambda: forward(m), 1)
            times["torch forward+backward", name] += _median_seconds(lambda: train_step(m), 1)
            times["onnxruntime", name] += _median_seconds(lambda: sessions[name].run(None, {"clips": clips}), 1)
        load.append(os.getloadavg()[0])
    print(f"\nmultiply-adds per clip: s3d {macs['s3d'] / 1e6:.1f} M, s3d_zoom {macs['s3d_zoom'] / 1e6:.1f} M "
          f"({macs['s3d_zoom'] / macs['s3d']:.2f}x)")
    for kind in ("torch forward", "torch forward+backward", "onnxruntime"):
        base, zoom = (statistics.median(times[kind, n]) for n in models)
        print(f"{kind}, {BATCH} clips, one thread, median of {ROUNDS}: s3d {base:.3f} s, s3d_zoom {zoom:.3f} s "
              f"({zoom / base:.2f}x)")
    print(f"load average (1 min) during the rounds: {min(load):.1f}-{max(load):.1f}")
    assert 1 < macs["s3d_zoom"] / macs["s3d"] < 2  # the window stream is narrower than the full one
