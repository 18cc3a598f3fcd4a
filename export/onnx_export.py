"""torch -> ONNX for the served models, with explicit tensor names and dynamic batch/length axes.

Each artifact is written as `model_repository/<name>/1/model.onnx` with `model.json` beside it
(constructor config, tensor contract and, for decoders, the query vocabulary) and the torch
weights as `model.pt`, so an artifact always says how it was made.

What the gateway must know about a model is written into the model's `config.pbtxt` as config
parameters, which the gateway reads from Triton (so a gateway never needs the repository on its
disk): an encoder's `clip_fps` and `gmacs_per_clip` (multiply-adds of one clip / 1e9, counted
as for the adaptive encoders, so the gateway reports every encoder's compute); the query
decoder's `queries` (in output order), `attributes.<query>` (in logit order) and
`in_domain_threshold` (the lowest `in_domain_score` still called in domain, chosen on
validation). The rest of `config.pbtxt` is kept as it is.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

from export import vocab
from export.models.s3d import S3D
from export.models.s3d_sgs import s3d_macs
from export.models.tqn import TQNDecoder

OPSET = 18

ENCODER_INPUT = "clips"
ENCODER_OUTPUT = "features"
DECODER_INPUTS = ("features", "mask")
ATTENTION_OUTPUT = "attention"
IN_DOMAIN_OUTPUT = "in_domain_score"  # after the served outputs: a gateway that does not ask ignores it


# Config parameter names; server/triton.py reads them (the contract test holds the two together).
CLIP_FPS_PARAMETER = "clip_fps"
GMACS_PER_CLIP_PARAMETER = "gmacs_per_clip"
QUERIES_PARAMETER = "queries"
ATTRIBUTES_PARAMETER_PREFIX = "attributes."
IN_DOMAIN_THRESHOLD_PARAMETER = "in_domain_threshold"
_PARAMETERS_NOTE = "# Written by export/onnx_export.py from the exported model; re-export to change."
_PARAMETER_LINE = re.compile(r'^parameters: \{ key: "(?P<key>[^"]+)"')
_NAME = re.compile(r"^[A-Za-z0-9_./+-]+$")  # no commas, quotes or spaces: safe in a pbtxt list


def logits_name(query: str) -> str:
    return f"logits_{query}"


def encoder_parameters(clip_fps: float, gmacs_per_clip: float | None = None) -> dict[str, str]:
    parameters = {CLIP_FPS_PARAMETER: f"{clip_fps:g}"}
    if gmacs_per_clip is not None:
        parameters[GMACS_PER_CLIP_PARAMETER] = f"{gmacs_per_clip:.6g}"
    return parameters


def query_decoder_parameters(heads: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """`queries` in head (= output) order, and each query's attributes in logit order."""
    for name in [*heads, *(a for attributes in heads.values() for a in attributes)]:
        if not _NAME.match(name):
            raise ValueError(f"query or attribute name {name!r} cannot be a config parameter value")
    parameters = {QUERIES_PARAMETER: ",".join(heads)}
    for query, attributes in heads.items():
        parameters[ATTRIBUTES_PARAMETER_PREFIX + query] = ",".join(attributes)
    return parameters


def write_config_parameters(
    config_path: Path, parameters: Mapping[str, str], *, owns: Callable[[str], bool] | None = None
) -> None:
    """Set `parameters` in a `config.pbtxt`, replacing the lines of every parameter `owns` claims
    (by default those being set) and keeping every other line."""
    owns = owns or (lambda key: key in parameters)
    lines = config_path.read_text().splitlines()
    kept: list[str] = []
    at = None
    for line in lines:
        match = _PARAMETER_LINE.match(line)
        if line == _PARAMETERS_NOTE or (match and owns(match["key"])):
            at = len(kept) if at is None else at
            continue
        kept.append(line)
    if at is None:  # after the last parameter line, else at the end
        others = [i for i, line in enumerate(kept) if _PARAMETER_LINE.match(line)]
        at = others[-1] + 1 if others else len(kept)
    block = [_PARAMETERS_NOTE] + [
        f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        for key, value in parameters.items()
    ]
    config_path.write_text("\n".join(kept[:at] + block + kept[at:]) + "\n")


def _write_parameters_beside(out_dir: Path, parameters: Mapping[str, str], owns=None) -> None:
    """Into `<model>/config.pbtxt` when the version dir `out_dir` sits in a model repository."""
    config_path = out_dir.parent / "config.pbtxt"
    if not config_path.is_file():
        print(f"export: no {config_path}; config parameters not written", file=sys.stderr)
        return
    write_config_parameters(config_path, parameters, owns=owns)


def decoder_outputs() -> tuple[str, ...]:
    """The outputs every query decoder serves: logits per query, then attention."""
    return (*(logits_name(q) for q in vocab.head_attributes()), ATTENTION_OUTPUT)


def decoder_graph_outputs() -> tuple[str, ...]:
    """All outputs of an exported TQN decoder graph (`TQNDecoder.forward`'s order)."""
    return (*decoder_outputs(), IN_DOMAIN_OUTPUT)


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def drop_stack_traces(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the exporter's per-node source stack traces: they name the files of the machine that
    exported the model, absolute paths included. The rest of the node metadata stays."""
    for nodes in [proto.graph.node, *(f.node for f in proto.functions)]:
        for node in nodes:
            kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    return proto


def save(program: torch.onnx.ONNXProgram, path: Path) -> None:
    """Write an exported program as one self-contained .onnx file without stack traces."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(drop_stack_traces(program.model_proto), str(path))


def _export(model: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes):
    model.eval()
    program = torch.onnx.export(model, args, dynamo=True, opset_version=OPSET, input_names=list(input_names),
                                output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                optimize=True, verbose=False)
    save(program, path)
    onnx.checker.check_model(str(path))


class _Served(torch.nn.Module):
    """The graph an encoder serves: its `forward_served` (`forward` computed the served way, e.g.
    `S3D.patchify`) where it has one, else its `forward`; `knob` (an adaptive encoder's bins) is
    passed on when given."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, clips: torch.Tensor, knob: torch.Tensor | None = None):
        served = getattr(self.encoder, "forward_served", self.encoder.forward)
        return served(clips) if knob is None else served(clips, knob)


def export_encoder(encoder: S3D, config: dict, out_dir: Path, name: str, *, clip_fps: float) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.randint(0, 256, (2, encoder.clip_frames, encoder.frame_size, encoder.frame_size, 3),
                            dtype=torch.uint8)
    path = out_dir / "model.onnx"
    _export(_Served(encoder), (example,), path, [ENCODER_INPUT], [ENCODER_OUTPUT], {"clips": {0: batch}})
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
    _write_parameters_beside(out_dir, encoder_parameters(clip_fps, s3d_macs(encoder) / 1e9))
    return path


def export_decoder(decoder: TQNDecoder, config: dict, out_dir: Path, name: str = "tqn_decoder", *,
                   in_domain_threshold: float | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=64)
    clips = torch.export.Dim("clips", min=1, max=100_000)
    feature_dim = decoder.feature_dim
    example = (torch.randn(2, 5, feature_dim), torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    path = out_dir / "model.onnx"
    _export(decoder, example, path, DECODER_INPUTS, decoder_graph_outputs(),
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
                    ATTENTION_OUTPUT: {"dtype": "float32", "shape": ["batch", len(heads), "clips"]},
                    IN_DOMAIN_OUTPUT: {"dtype": "float32", "shape": ["batch"]}},
        "temperature": dict(zip(heads, decoder.temperature.tolist())),
        "in_domain_threshold": in_domain_threshold,
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    parameters = query_decoder_parameters(heads)
    if in_domain_threshold is not None:
        parameters[IN_DOMAIN_THRESHOLD_PARAMETER] = f"{in_domain_threshold:.6g}"
    _write_parameters_beside(
        out_dir, parameters,
        owns=lambda key: key in (QUERIES_PARAMETER, IN_DOMAIN_THRESHOLD_PARAMETER)
        or key.startswith(ATTRIBUTES_PARAMETER_PREFIX),
    )
    return path


def max_diff(model: torch.nn.Module, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest |torch - ONNX Runtime| per output, for parity checks; divided by the output's
    largest magnitude where that is above 1 (float32 keeps about 7 digits, so an in-domain score
    of -800 on random inputs cannot agree to 1e-4 absolutely)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = session.run(names, inputs)
    model.eval()
    with torch.inference_mode():
        want = model(*(torch.from_numpy(v) for v in inputs.values()))
    want = want if isinstance(want, tuple) else (want,)
    return {n: float(np.abs(g - w.numpy()).max() / max(1.0, float(np.abs(w.numpy()).max())))
            for n, g, w in zip(names, got, want)}
