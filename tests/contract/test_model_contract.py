"""The three views of every model agree: config.pbtxt, server/triton.py, and the ONNX graph; and
the config parameters the gateway reads are the ones export/onnx_export.py writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from server import triton
from server.settings import Settings

# The repository the server would use (`VQS_TRITON__MODEL_REPOSITORY`), by default ours.
REPOSITORY = Path(Settings().triton.model_repository)
MODELS = sorted(p.parent.name for p in REPOSITORY.glob("*/config.pbtxt"))
# ONNX TensorProto element types of the Triton dtypes in the contract.
ONNX_TYPES = {"UINT8": 2, "FP32": 1, "BOOL": 9, "INT64": 7}


def load_config(model: str) -> model_config_pb2.ModelConfig:
    text = (REPOSITORY / model / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def config_dict(model: str) -> dict:
    """The config as the gateway gets it from Triton (`get_model_config(as_json=True)`)."""
    return json_format.MessageToDict(load_config(model), preserving_proto_field_name=True)


def tensors(entries) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        t.name: (model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_"), tuple(t.dims))
        for t in entries
    }


def contract_tensors(specs) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {s.name: (s.dtype, s.dims) for s in specs}


def test_the_repository_has_the_expected_models():
    assert {"clip_encoder_s3d", "tqn_decoder"} <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_config_matches_triton_py(model):
    config = load_config(model)
    contract = triton.contract_for(model, config_dict(model))

    assert config.name == model
    assert config.backend == "python"
    assert config.max_batch_size == contract.max_batch_size
    assert tensors(config.input) == contract_tensors(contract.inputs)
    assert tensors(config.output) == contract_tensors(contract.outputs)


@pytest.mark.parametrize("model", MODELS)
def test_python_backend_entry_is_the_shared_runner(model):
    entry = REPOSITORY / model / "1" / "model.py"
    assert entry.is_symlink(), "model.py must link to the shared onnx_runner.py"
    assert entry.resolve() == (REPOSITORY / "onnx_runner.py").resolve()


def test_query_decoder_config_holds_the_vocabulary_in_output_order():
    spec = triton.query_decoder_spec(config_dict(triton.QUERY_DECODER_MODEL))
    queries = [q.query for q in spec.queries]
    outputs = [t.name for t in load_config(triton.QUERY_DECODER_MODEL).output]
    scored = [triton.IN_DOMAIN_SCORE] if spec.in_domain_threshold is not None else []
    assert outputs == [triton.logits_name(q) for q in queries] + [triton.ATTENTION] + scored
    assert all(q.attributes for q in spec.queries)


def test_query_decoder_spec_refuses_a_config_without_vocabulary():
    config = config_dict(triton.QUERY_DECODER_MODEL)
    del config["parameters"][triton.QUERIES_PARAMETER]
    with pytest.raises(ValueError, match="re-export"):
        triton.query_decoder_spec(config)
    config = config_dict(triton.QUERY_DECODER_MODEL)
    config["output"] = config["output"][::-1]
    with pytest.raises(ValueError, match="do not follow its queries"):
        triton.query_decoder_spec(config)


def _onnx(model: str):
    onnx = pytest.importorskip("onnx")
    path = REPOSITORY / model / "1" / "model.onnx"
    if not path.is_file():
        pytest.skip(f"{model}/1/model.onnx not exported yet")
    return onnx.load(str(path), load_external_data=False)


def _graph_tensors(values) -> dict[str, tuple[int, tuple]]:
    out = {}
    for v in values:
        tensor = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        out[v.name] = (tensor.elem_type, dims)
    return out


@pytest.mark.parametrize("model", MODELS)
def test_onnx_graph_matches_the_contract(model):
    graph = _onnx(model).graph
    contract = triton.contract_for(model, config_dict(model))
    batched = contract.max_batch_size > 0
    graph_inputs = _graph_tensors(graph.input)
    graph_outputs = _graph_tensors(graph.output)
    initializers = {i.name for i in graph.initializer}

    assert set(graph_inputs) - initializers == {s.name for s in contract.inputs}
    assert set(graph_outputs) == {s.name for s in contract.outputs}
    for spec, table in [(s, graph_inputs) for s in contract.inputs] + [
        (s, graph_outputs) for s in contract.outputs
    ]:
        elem_type, dims = table[spec.name]
        expected = ((-1,) if batched else ()) + spec.dims
        assert elem_type == ONNX_TYPES[spec.dtype], f"{model}.{spec.name} dtype"
        assert len(dims) == len(expected), f"{model}.{spec.name} rank {dims} vs {expected}"
        for got, want in zip(dims, expected):
            if want != -1 and got != -1:
                assert got == want, f"{model}.{spec.name} dims {dims} vs {expected}"


def test_query_decoder_config_matches_its_model_json_and_graph():
    path = REPOSITORY / triton.QUERY_DECODER_MODEL / "1" / "model.json"
    if not path.is_file():
        pytest.skip("tqn_decoder/1/model.json not exported yet")
    meta = json.loads(path.read_text())
    spec = triton.query_decoder_spec(config_dict(triton.QUERY_DECODER_MODEL))
    assert [(q["query"], tuple(q["attributes"])) for q in meta["queries"]] == [
        (q.query, q.attributes) for q in spec.queries
    ]

    graph = _onnx(triton.QUERY_DECODER_MODEL).graph if (path.parent / "model.onnx").is_file() else None
    if graph is not None:
        outputs = _graph_tensors(graph.output)
        for q in spec.queries:
            width = outputs[triton.logits_name(q.query)][1][-1]
            if width != -1:
                assert width == len(q.attributes), q.query


@pytest.mark.parametrize("model", [m for m in MODELS if m.startswith(triton.ENCODER_PREFIX)])
def test_encoder_model_json_matches_the_config(model):
    path = REPOSITORY / model / "1" / "model.json"
    if not path.is_file():
        pytest.skip(f"{model}/1/model.json not exported yet")
    meta = json.loads(path.read_text())
    # by name: an adaptive encoder also takes `budget` and outputs `kept` and `gmacs`
    clips = next(t for t in load_config(model).input if t.name == triton.CLIPS)
    features = next(t for t in load_config(model).output if t.name == triton.FEATURES)
    assert meta["encoder"] == model.removeprefix(triton.ENCODER_PREFIX)
    assert list(clips.dims) == [meta["clip_frames"], meta["frame_size"], meta["frame_size"], 3]
    assert list(features.dims) == [meta["feature_dim"]]
    # The frame rate the gateway samples at is the one the encoder was trained at.
    config = load_config(model)
    assert float(config.parameters[triton.CLIP_FPS].string_value) == meta["clip_fps"]
    spec = triton._encoder_spec(model, config_dict(model))
    assert spec.clip_fps == meta["clip_fps"]


def test_export_code_uses_the_same_names():
    export = pytest.importorskip("export.onnx_export", reason="export/onnx_export.py not there yet")
    vocab = pytest.importorskip("export.vocab")

    heads = vocab.head_attributes()
    assert export.ENCODER_INPUT == triton.CLIPS
    assert export.ENCODER_OUTPUT == triton.FEATURES
    assert tuple(export.DECODER_INPUTS) == (triton.FEATURES, triton.MASK)
    contract = triton.query_decoder_contract(list(heads))
    assert tuple(export.decoder_outputs()) == tuple(s.name for s in contract.outputs)
    assert export.CLIP_FPS_PARAMETER == triton.CLIP_FPS
    assert export.QUERIES_PARAMETER == triton.QUERIES_PARAMETER
    assert export.ATTRIBUTES_PARAMETER_PREFIX == triton.ATTRIBUTES_PARAMETER_PREFIX
    assert export.decoder_graph_outputs() == (*export.decoder_outputs(), triton.IN_DOMAIN_SCORE)
    assert export.IN_DOMAIN_OUTPUT == triton.IN_DOMAIN_SCORE
    assert export.IN_DOMAIN_THRESHOLD_PARAMETER == triton.IN_DOMAIN_THRESHOLD


def test_the_exporter_writes_the_vocabulary_the_gateway_reads(tmp_path):
    """Written into a copy of the committed config, the exporter's parameters are exactly the
    committed ones, and `server/triton.py` reads the exporter's vocabulary back."""
    export = pytest.importorskip("export.onnx_export", reason="export/onnx_export.py not there yet")
    vocab = pytest.importorskip("export.vocab")
    heads = vocab.head_attributes()
    committed = (REPOSITORY / triton.QUERY_DECODER_MODEL / "config.pbtxt").read_text()
    path = tmp_path / "config.pbtxt"
    path.write_text(committed.replace('"attributes.class"', '"attributes.stale_query"'))
    export.write_config_parameters(
        path, export.query_decoder_parameters(heads),
        owns=lambda key: key == triton.QUERIES_PARAMETER or key.startswith(triton.ATTRIBUTES_PARAMETER_PREFIX),
    )
    assert path.read_text() == committed
    config = json_format.MessageToDict(
        text_format.Parse(path.read_text(), model_config_pb2.ModelConfig()),
        preserving_proto_field_name=True,
    )
    spec = triton.query_decoder_spec(config)
    assert {q.query: q.attributes for q in spec.queries} == heads
    assert [q.query for q in spec.queries] == list(heads)


@pytest.mark.parametrize("model", [m for m in MODELS if m.startswith(triton.ENCODER_PREFIX)])
def test_the_exporter_writes_the_clip_fps_the_gateway_reads(model, tmp_path):
    export = pytest.importorskip("export.onnx_export", reason="export/onnx_export.py not there yet")
    committed = (REPOSITORY / model / "config.pbtxt").read_text()
    path = tmp_path / "config.pbtxt"
    path.write_text(committed)
    fps = float(load_config(model).parameters[triton.CLIP_FPS].string_value)
    export.write_config_parameters(path, export.encoder_parameters(fps))
    assert path.read_text() == committed


_JSON_DTYPES = {"uint8": "UINT8", "float32": "FP32", "bool": "BOOL", "int64": "INT64"}


@pytest.mark.parametrize("model", MODELS)
def test_model_json_tensor_table_matches_the_contract(model):
    path = REPOSITORY / model / "1" / "model.json"
    if not path.is_file():
        pytest.skip(f"{model}/1/model.json not exported yet")
    meta = json.loads(path.read_text())
    assert "inputs" in meta and "outputs" in meta, f"{model}/1/model.json has no tensor table"
    contract = triton.contract_for(model, config_dict(model))
    batched = contract.max_batch_size > 0
    for specs, table in ((contract.inputs, meta["inputs"]), (contract.outputs, meta["outputs"])):
        assert set(table) == {s.name for s in specs}
        for spec in specs:
            entry = table[spec.name]
            assert _JSON_DTYPES[entry["dtype"]] == spec.dtype, spec.name
            rank = len(spec.dims) + (1 if batched else 0)
            assert len(entry["shape"]) == rank, spec.name
