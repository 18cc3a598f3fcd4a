"""What s3d_zoom's window cut costs in ONNX Runtime as served: one intra-op thread, the serving
batch sizes (model_repository/clip_encoder_s3d/config.pbtxt's preferred 16 and 64). The cut it
replaced (grid_sample, exported as ONNX `GridSample`) against `S3DZoom.window` (a patch gather and
two small matrix products): the cut alone, and the whole served encoder (`s3d_zoom_32x112_112`)
with either cut, beside the plain `s3d` for scale. A cut alone is a graph of its own, whose
output ONNX Runtime copies once more (its last Reshape, ~0.3 ms per clip in a profile at batch 16;
both cuts pay it, the encoder does not). Rounds alternate between the graphs in this process, so
all see the same load. Prints the times per clip, their ratios and the load average;
asserts only that the two cuts agree (never a time).

    pytest -m slow tests/bench/test_window_cut_cost.py -s
"""

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

VARIANT = "s3d_zoom_32x112_112"
BATCHES = (16, 64)
ROUNDS = int(os.environ.get("VQS_BENCH_WINDOW_ROUNDS", "7"))


class _GridSampleZoom(s3d_zoom.S3DZoom):
    """The encoder as it cut its window before."""

    def window(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return s3d_zoom.grid_sample_window(self, x, centres)


class _Cut(torch.nn.Module):
    """The window cut alone: normalised frames (B, 3, T, H, W) and centres (B, 2) -> windows."""

    def __init__(self, model: s3d_zoom.S3DZoom):
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return self.model.window(x, centres)


def _export_cut(model: s3d_zoom.S3DZoom, path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = (torch.randn(2, 3, model.clip_frames, model.frame_size, model.frame_size), torch.full((2, 2), 56.0))
    program = torch.onnx.export(_Cut(model), example, dynamo=True, opset_version=onnx_export.OPSET,
                                input_names=["x", "centres"], output_names=["windows"],
                                dynamic_shapes={"x": {0: batch}, "centres": {0: batch}}, verbose=False)
    onnx_export.save(program, path)


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@pytest.mark.slow
def test_window_cut_cost_in_onnx_runtime(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    new = s3d_zoom.create(VARIANT).eval()
    old = _GridSampleZoom(**s3d_zoom.VARIANTS[VARIANT]).eval()
    old.load_state_dict(new.state_dict())
    _export_cut(old, tmp_path / "cut_grid_sample.onnx")
    _export_cut(new, tmp_path / "cut_gather_matmul.onnx")
    paths = {
        "cut, grid_sample": tmp_path / "cut_grid_sample.onnx",
        "cut, gather + matmul": tmp_path / "cut_gather_matmul.onnx",
        "s3d_zoom, grid_sample": onnx_export.export_encoder(old, {}, tmp_path / "old", "old", clip_fps=15),
        "s3d_zoom, gather + matmul": onnx_export.export_encoder(new, {}, tmp_path / "new", "new", clip_fps=15),
        "s3d": onnx_export.export_encoder(S3D().eval(), {}, tmp_path / "s3d", "s3d", clip_fps=15),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in paths.items()}

    rng = np.random.default_rng(0)
    inputs = {}
    for n in BATCHES:
        clips = rng.integers(0, 256, (n, 8, 112, 112, 3), dtype=np.uint8)
        x = S3D().prepare(torch.from_numpy(clips)).numpy()
        centres = rng.uniform(3.5, 107.5, (n, 2)).astype(np.float32)  # where the localiser can point
        for name in paths:
            inputs[name, n] = {"x": x, "centres": centres} if name.startswith("cut") else {"clips": clips}
    for n in BATCHES:  # the same windows from both exported cuts
        a, b = (sessions[k].run(None, inputs[k, n])[0] for k in ("cut, grid_sample", "cut, gather + matmul"))
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)

    times = {key: [] for key in inputs}
    load = [os.getloadavg()[0]]
    for key in inputs:  # an unmeasured run each
        sessions[key[0]].run(None, inputs[key])
    for _ in range(ROUNDS):
        for key in inputs:
            times[key].append(_seconds(lambda: sessions[key[0]].run(None, inputs[key])) / key[1])
        load.append(os.getloadavg()[0])

    print(f"\nONNX Runtime, one thread, ms per clip, median (best) of {ROUNDS} interleaved rounds:")
    per_clip = {}
    for (name, n), t in times.items():
        per_clip[name, n] = statistics.median(t), min(t)
        print(f"  batch {n:2d}  {name:26s} {1e3 * per_clip[name, n][0]:7.2f} ({1e3 * per_clip[name, n][1]:.2f})")
    for n in BATCHES:
        for what in ("cut", "s3d_zoom"):
            (old_med, old_best), (new_med, new_best) = (per_clip[f"{what}, {c}", n] for c in ("grid_sample", "gather + matmul"))
            print(f"  batch {n:2d}  {what}: grid_sample / gather + matmul {old_med / new_med:.2f}x by the median, "
                  f"{old_best / new_best:.2f}x by the best")
        s3d_med = per_clip["s3d", n][0]
        print(f"  batch {n:2d}  s3d_zoom / s3d: {per_clip['s3d_zoom, grid_sample', n][0] / s3d_med:.2f}x with "
              f"grid_sample, {per_clip['s3d_zoom, gather + matmul', n][0] / s3d_med:.2f}x with gather + matmul "
              f"(the cut's share of the new encoder: "
              f"{per_clip['cut, gather + matmul', n][0] / per_clip['s3d_zoom, gather + matmul', n][0]:.0%})")
    print(f"load average (1 min) during the rounds: {min(load):.1f}-{max(load):.1f}")
