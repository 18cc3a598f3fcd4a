"""The parser and the embedder exported to ONNX compute what torch computes (<= 1e-4)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.models.embedder import FrameEmbedder
from export.models.parser import ActionParser
from export.train_embedder import EMBEDDER_OUTPUTS
from export.train_parser import FRAMES_INPUT, PARSER_OUTPUTS, export_onnx


def _parity(model, outputs, tmp_path, lengths=(7, 31)):
    path = export_onnx(model, tmp_path / "model.onnx", outputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, length in ((1, lengths[0]), (2, lengths[1])):  # other lengths than the example's
        frames = rng.integers(0, 256, (batch, length, 112, 112, 3), dtype=np.uint8)
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
    _parity(ActionParser(classes=48).eval(), PARSER_OUTPUTS, tmp_path)


@pytest.mark.filterwarnings("ignore")
def test_embedder_onnx_parity(tmp_path):
    torch.manual_seed(0)
    _parity(FrameEmbedder().eval(), EMBEDDER_OUTPUTS, tmp_path, lengths=(7, 40))
