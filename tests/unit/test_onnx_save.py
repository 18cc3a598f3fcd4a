"""Exported graphs carry no source stack traces: they would put the exporting machine's paths
into every committed model.onnx."""

from __future__ import annotations

import onnx
import torch

from export import onnx_export


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def test_saved_graph_has_no_stack_traces_or_source_paths(tmp_path):
    program = torch.onnx.export(_Tiny().eval(), (torch.zeros(1, 4),), dynamo=True, opset_version=onnx_export.OPSET,
                                verbose=False)
    assert any(p.key == onnx_export.STACK_TRACE for n in program.model_proto.graph.node for p in n.metadata_props), \
        "the exporter no longer writes stack traces: this test would prove nothing"
    path = tmp_path / "tiny.onnx"
    onnx_export.save(program, path)
    saved = onnx.load(str(path))
    assert not [p for n in saved.graph.node for p in n.metadata_props if p.key == onnx_export.STACK_TRACE]
    assert __file__.encode() not in path.read_bytes()
    assert len(saved.graph.node) == len(program.model_proto.graph.node)
