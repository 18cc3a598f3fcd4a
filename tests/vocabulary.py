"""The query decoder's vocabulary as the gateway reads it (its Triton config), for tests."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from server import triton


def model_config(repository: Path, model: str) -> dict:
    """`<model>/config.pbtxt` in the form Triton serves it (`get_model_config(as_json=True)`)."""
    text = (Path(repository) / model / "config.pbtxt").read_text()
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def query_specs(repository: Path) -> tuple[triton.QuerySpec, ...]:
    return triton.query_decoder_spec(model_config(repository, triton.QUERY_DECODER_MODEL)).queries


def query_names(repository: Path) -> list[str]:
    """The queries in the query decoder's output order (= the order of answers and attention)."""
    return [q.query for q in query_specs(repository)]
