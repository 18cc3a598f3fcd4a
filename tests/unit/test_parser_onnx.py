"""The served parser and embedder exported to ONNX compute what torch computes (<= 1e-4), at
other lengths than the export example's."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.models.embedder import FrameEmbedder, ServedEmbedder
from export.models.parser import ActionParser, ServedParser
from export.segments_export import EMBEDDER_OUTPUTS, FRAMES_INPUT, MIN_FRAMES, PARSER_OUTPUTS, export_onnx


def _parity(model, outputs, tmp_path):
    path = export_onnx(model, tmp_path / "model.onnx", outputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for length in (MIN_FRAMES, 31, 97):
        frames = rng.integers(0, 256, (1, length, 28, 28, 3), dtype=np.uint8)
        with torch.no_grad():
            expected = model(torch.from_numpy(frames))
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(list(outputs), {FRAMES_INPUT: frames})
        for e, g in zip(expected, got):
            assert g.shape == tuple(e.shape)
            np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore")
def test_parser_onnx_parity(tmp_path):
    torch.manual_seed(0)
    _parity(ServedParser(ActionParser(classes=48, front=True)).eval(), PARSER_OUTPUTS, tmp_path)


@pytest.mark.filterwarnings("ignore")
def test_embedder_onnx_parity(tmp_path):
    torch.manual_seed(0)
    _parity(ServedEmbedder(FrameEmbedder()).eval(), EMBEDDER_OUTPUTS, tmp_path)
