"""torch -> ONNX for the served models, with explicit tensor names and dynamic batch/length axes.

Each artifact is written as `model_repository/<name>/1/model.onnx` with `model.json` beside it
(constructor config, tensor contract and, for decoders, the query vocabulary) and the torch
weights as `model.pt`, so an artifact always says how it was made.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from export import vocab
from export.models.s3d import S3D
from export.models.tqn import TQNDecoder

OPSET = 18

ENCODER_INPUT = "clips"
ENCODER_OUTPUT = "features"
DECODER_INPUTS = ("features", "mask")
ATTENTION_OUTPUT = "attention"


def logits_name(query: str) -> str:
    return f"logits_{query}"


def decoder_outputs() -> tuple[str, ...]:
    return (*(logits_name(q) for q in vocab.head_attributes()), ATTENTION_OUTPUT)


def _export(model: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes):
    model.eval()
    program = torch.onnx.export(model, args, dynamo=True, opset_version=OPSET, input_names=list(input_names),
                                output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                optimize=True, verbose=False)
    program.save(str(path))
    onnx.checker.check_model(str(path))


def export_encoder(encoder: S3D, config: dict, out_dir: Path, name: str, *, clip_fps: float) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.randint(0, 256, (2, encoder.clip_frames, encoder.frame_size, encoder.frame_size, 3),
                            dtype=torch.uint8)
    path = out_dir / "model.onnx"
    _export(encoder, (example,), path, [ENCODER_INPUT], [ENCODER_OUTPUT], {"clips": {0: batch}})
    torch.save(encoder.state_dict(), out_dir / "model.pt")
    meta = {
        "name": name,
        "encoder": name.removeprefix("clip_encoder_"),
        "clip_frames": encoder.clip_frames,
        "frame_size": encoder.frame_size,
        "feature_dim": encoder.feature_dim,
        "clip_fps": clip_fps,
        "config": config,
        "inputs": {ENCODER_INPUT: {"dtype": "uint8", "shape": ["batch", encoder.clip_frames,
                                                              encoder.frame_size, encoder.frame_size, 3]}},
        "outputs": {ENCODER_OUTPUT: {"dtype": "float32", "shape": ["batch", encoder.feature_dim]}},
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def export_decoder(decoder: TQNDecoder, config: dict, out_dir: Path, name: str = "tqn_decoder") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=64)
    clips = torch.export.Dim("clips", min=1, max=100_000)
    feature_dim = decoder.feature_dim
    example = (torch.randn(2, 5, feature_dim), torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    path = out_dir / "model.onnx"
    _export(decoder, example, path, DECODER_INPUTS, decoder_outputs(),
            {"features": {0: batch, 1: clips}, "mask": {0: batch, 1: clips}})
    torch.save(decoder.state_dict(), out_dir / "model.pt")
    heads = vocab.head_attributes()
    meta = {
        "name": name,
        "config": config,
        "queries": [{"query": q, "attributes": list(a)} for q, a in heads.items()],
        "inputs": {"features": {"dtype": "float32", "shape": ["batch", "clips", feature_dim]},
                   "mask": {"dtype": "bool", "shape": ["batch", "clips"]}},
        "outputs": {**{logits_name(q): {"dtype": "float32", "shape": ["batch", len(a)]} for q, a in heads.items()},
                    ATTENTION_OUTPUT: {"dtype": "float32", "shape": ["batch", len(heads), "clips"]}},
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def max_abs_diff(model: torch.nn.Module, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest |torch - ONNX Runtime| per output, for parity checks."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = session.run(names, inputs)
    model.eval()
    with torch.inference_mode():
        want = model(*(torch.from_numpy(v) for v in inputs.values()))
    want = want if isinstance(want, tuple) else (want,)
    return {n: float(np.abs(g - w.numpy()).max()) for n, g, w in zip(names, got, want)}
