"""A compute budget per request, through the real Triton, gateway and gRPC (issue 9, serving).

The adaptive encoders come from the model repository when they are exported there; until then
(and for any one missing) the fixture exports a random-init one with the export code
(`export.models.vit`; `export.models.s3d_sgs`, or `s3d_zoom_sgs` when the served clip encoder is an
s3d_zoom; `export.adaptive`) under the contract the gateway reads: input `budget` FP32 [1] per clip, outputs `kept` and `gmacs` counted in the graph, config
parameters `adaptive`, `budget_units`, `budget_floor`, `gmacs_per_clip`. Random weights are
enough here: what is tested is that the budget reaches the model per clip, that the gateway
reports what the model counted, and that the metrics follow.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from server import triton as contract
from server.main import Gateway
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from server.triton import TritonClient
from tests.gateways import own_triton_settings
from tests.integration.test_operations import settled_counters
from tests.vocabulary import model_config

pytestmark = pytest.mark.integration

SGS, ATS, VIT = "s3d_sgs", "vit_ats", "vit"
# Budgets from full to the floor: SGS's B = 8, 4, 1; ATS's K = 196, 98, 25 (or, spread over the
# clips by their motion, at most 196, 139, 70: `ats_knobs`).
BUDGETS = {SGS: (1.0, 0.5, 0.125), ATS: (1.0, 0.5, 0.125)}
S3D_GMACS = "0.0421"  # written into the copy's s3d config when the committed one lacks it

_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 64
input [
  {{ name: "clips" data_type: TYPE_UINT8 dims: [ 8, 112, 112, 3 ] }},
  {{ name: "budget" data_type: TYPE_FP32 dims: [ 1 ] }}
]
output [
  {{ name: "features" data_type: TYPE_FP32 dims: [ 256 ] }},
  {{ name: "kept" data_type: TYPE_INT64 dims: [ {kept} ] }},
  {{ name: "gmacs" data_type: TYPE_FP32 dims: [ 1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 20000 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters: {{ key: "intra_op_threads" value: {{ string_value: "1" }} }}
parameters: {{ key: "clip_fps" value: {{ string_value: "15" }} }}
parameters: {{ key: "gmacs_per_clip" value: {{ string_value: "{gmacs_full}" }} }}
parameters: {{ key: "adaptive" value: {{ string_value: "{kind}" }} }}
parameters: {{ key: "budget_units" value: {{ string_value: "{units}" }} }}
parameters: {{ key: "budget_floor" value: {{ string_value: "{floor}" }} }}
"""


def _export_random_adaptive(model_dir: Path, encoder: str, s3d_dir: Path) -> None:
    """A random-init adaptive encoder under the serving contract (torch only in the test process);
    s3d_sgs is the SGS version of the clip encoder `s3d_dir` serves (a plain s3d or an s3d_zoom)."""
    import torch
    from torch import nn

    from export.adaptive import onnx_functions
    from export.models import s3d_sgs, s3d_zoom_sgs, vit
    from export.train import encoder_from_config

    torch.manual_seed(0)
    if encoder == ATS:
        net = vit.create("vit_tiny_112").eval()
        units, floor, kept_dims, gmacs_full = net.tokens, 8, len(net.ats_blocks), net.macs() / 1e9
        dim, hidden = net.cls.shape[-1], net.blocks[0].mlp[0].out_features

        class Served(nn.Module):
            def forward(self, clips, budget):
                # each ATS block's K = max(ceil(budget * tokens it receives), floor); kept: cls included
                features, kept = net(clips, budget.clamp(0.0, 1.0))
                # net.macs() on each clip's kept counts, as tensor arithmetic
                total = torch.full_like(kept[:, 0], 0, dtype=torch.float64) + (
                    net.tokens * dim * net.embed.weight[0].numel() + dim * net.feature_dim)
                n = torch.full_like(total, net.tokens + 1.0)
                for i in range(len(net.blocks)):
                    m = kept[:, net.ats_blocks.index(i)].to(torch.float64) if i in net.ats_blocks else n
                    total = total + n * dim * 3 * dim + n * n * dim + m * n * dim + m * dim * dim + 2 * m * dim * hidden
                    n = m
                return features, kept - 1, (total / 1e9).to(torch.float32)[:, None]
    else:
        served = json.loads((s3d_dir / "1" / "model.json").read_text())["config"]
        net = s3d_zoom_sgs.from_config({**served, "sgs_after": "stem"}).eval()
        units, floor, kept_dims = net.clip_frames, 1, 1
        gmacs_full = s3d_sgs.s3d_macs(encoder_from_config(served)) / 1e9
        table = torch.tensor([net.macs(b) / 1e9 for b in range(1, units + 1)], dtype=torch.float32)

        class Served(nn.Module):
            def forward(self, clips, budget):
                bins = torch.clamp(torch.ceil(budget[:, 0] * units), min=floor).to(torch.int64)  # N
                features, kept = net(clips, bins)
                return features, kept[:, None], table[kept - 1][:, None]

    version = model_dir / "1"
    version.mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=64)
    example = (torch.randint(0, 256, (2, 8, 112, 112, 3), dtype=torch.uint8), torch.tensor([[1.0], [0.3]]))
    onnx_functions.export(
        Served().eval(), example, version / "model.onnx", input_names=["clips", "budget"],
        output_names=["features", "kept", "gmacs"], dynamic_shapes={"clips": {0: batch}, "budget": {0: batch}},
    )
    os.symlink("../../onnx_runner.py", version / "model.py")
    (model_dir / "config.pbtxt").write_text(_CONFIG.format(
        name=model_dir.name, kept=kept_dims, gmacs_full=f"{gmacs_full:.6g}", kind=encoder[-3:],
        units=units, floor=floor))


@pytest.fixture(scope="module")
def adaptive_repository(trained_models: Path, tmp_path_factory) -> Path:
    """The query decoder, s3d (its config with a cost) and both adaptive encoders of the model
    repository (links; other models, e.g. one being exported, are left out)."""
    repository = tmp_path_factory.mktemp("adaptive") / "model_repository"
    repository.mkdir()
    (repository / "onnx_runner.py").symlink_to((trained_models / "onnx_runner.py").resolve())
    served = [contract.QUERY_DECODER_MODEL] + [contract.ENCODER_PREFIX + e for e in (SGS, ATS, VIT)]
    for name in served:
        if (trained_models / name / "config.pbtxt").is_file():
            (repository / name).symlink_to((trained_models / name).resolve(), target_is_directory=True)
    s3d = repository / "clip_encoder_s3d"
    s3d.mkdir()
    (s3d / "1").symlink_to((trained_models / "clip_encoder_s3d" / "1").resolve(), target_is_directory=True)
    text = (trained_models / "clip_encoder_s3d" / "config.pbtxt").read_text()
    if contract.GMACS_PER_CLIP not in text:
        text += f'parameters: {{ key: "{contract.GMACS_PER_CLIP}" value: {{ string_value: "{S3D_GMACS}" }} }}\n'
    (s3d / "config.pbtxt").write_text(text)
    for encoder in (SGS, ATS):
        model_dir = repository / f"{contract.ENCODER_PREFIX}{encoder}"
        if not model_dir.exists():
            _export_random_adaptive(model_dir, encoder, trained_models / "clip_encoder_s3d")
    return repository


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(adaptive_repository: Path, tmp_path_factory):
    """A gateway that launched its own Triton over the repository, and a stub to it."""
    log = tmp_path_factory.mktemp("adaptive_logs") / "tritonserver.log"
    gateway = Gateway(own_triton_settings(adaptive_repository), triton_log=log)
    try:
        await gateway.start()
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            yield gateway, pb_grpc.VideoAnalyticsStub(channel)
    except BaseException:
        if log.exists():
            print(log.read_text()[-6000:])
        raise
    finally:
        await gateway.stop()


async def analyze(stub, video: Path, encoder: str, budget: float | None = None) -> pb.AnalyzeResponse:
    request = pb.AnalyzeRequest(video=video.read_bytes(), encoder=encoder)
    if budget is not None:
        request.budget = budget
    return await stub.Analyze(request, timeout=300)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def ats_knobs(repository: Path, budgets: tuple[float, ...]) -> list[int]:
    """The served vit_ats's knob at each budget, by its config (`AdaptiveSpec.knob_for`)."""
    config = model_config(repository, contract.ENCODER_PREFIX + ATS)
    return [contract._encoder_spec(contract.ENCODER_PREFIX + ATS, config).adaptive.knob_for(b) for b in budgets]


def _kept(response: pb.AnalyzeResponse) -> list[list[int]]:
    return [list(c.kept) for c in response.compute.clips]


async def test_describe_models_lists_each_encoders_compute_and_budget_limits(served, adaptive_repository):
    _, stub = served
    described = await stub.DescribeModels(pb.DescribeModelsRequest(), timeout=30)
    details = {d.name: d for d in described.encoder_details}
    assert {SGS, ATS, "s3d"} <= set(details)
    for encoder in (SGS, ATS):
        parameters = model_config(adaptive_repository, contract.ENCODER_PREFIX + encoder)["parameters"]
        detail = details[encoder]
        assert detail.adaptive == parameters["adaptive"]["string_value"] == encoder[-3:]
        assert detail.knob_full == int(parameters["budget_units"]["string_value"])
        assert detail.knob_min == int(parameters["budget_floor"]["string_value"])
        assert detail.gmacs_per_clip == pytest.approx(float(parameters["gmacs_per_clip"]["string_value"]))
        # an encoder that spreads a request's budget over its clips by their motion says so
        assert ("by its motion" in detail.knob) == ("budget_powers" in parameters)
    assert details[ATS].knob.startswith("K") and details[SGS].knob.startswith("B")
    assert details["s3d"].adaptive == "" and details["s3d"].gmacs_per_clip > 0


@pytest.mark.parametrize("encoder", [SGS, ATS])
async def test_a_lower_budget_spends_less_and_says_what_each_clip_kept(served, videos, encoder, adaptive_repository):
    _, stub = served
    responses = [await analyze(stub, videos["normal"], encoder, budget) for budget in BUDGETS[encoder]]
    clips = responses[0].video.clips
    blocks = 1 if encoder == SGS else 4
    for budget, response in zip(BUDGETS[encoder], responses):
        compute = response.compute
        assert (compute.encoder, compute.adaptive) == (encoder, encoder[-3:])
        assert compute.budget == pytest.approx(budget)
        assert len(compute.clips) == clips and all(len(c.kept) == blocks for c in compute.clips)
        assert all(1 <= k <= compute.knob for c in compute.clips for k in c.kept)
        gmacs = [c.gmacs for c in compute.clips]
        assert compute.gmacs_per_clip == pytest.approx(np.mean(gmacs), rel=1e-5)
        assert len(response.answers) > 0  # the answers still come
    assert [r.compute.knob for r in responses] == ([8, 4, 1] if encoder == SGS
                                                   else ats_knobs(adaptive_repository, BUDGETS[ATS]))
    kept = [np.array(_kept(r)) for r in responses]
    if encoder == SGS:  # halving B merges bins pairwise: clip by clip, B' can only stay or drop
        assert all((low <= high).all() for high, low in zip(kept, kept[1:]))
    ratios = [r.compute.kept_ratio for r in responses]
    gmacs = [r.compute.gmacs_per_clip for r in responses]
    assert ratios[0] >= ratios[1] >= ratios[2] > 0 and gmacs[0] >= gmacs[1] >= gmacs[2] > 0
    # spending strictly less wherever the full budget kept more
    if (kept[0] > kept[2]).any():
        assert ratios[2] < ratios[0] and gmacs[2] < gmacs[0]
    # GMACs are counted from what was kept: clips that kept the same cost the same
    by_kept: dict[tuple, set] = {}
    for response in responses:
        for clip in response.compute.clips:
            by_kept.setdefault(tuple(clip.kept), set()).add(round(clip.gmacs, 6))
    assert all(len(costs) == 1 for costs in by_kept.values())
    if encoder == ATS:  # K >= the 196 tokens there are: nothing dropped, the plain ViT's cost
        assert (kept[0] == 196).all() and ratios[0] == pytest.approx(1.0, rel=1e-5)
        assert ratios[2] < ratios[1] < ratios[0]
    else:  # one bin: every clip is merged into one feature map
        assert (kept[2] == 1).all()


async def test_vit_ats_at_budget_one_answers_as_the_plain_vit_and_both_judge_their_own_domain(
        served, adaptive_repository, videos):
    """One set of weights: at budget 1 ATS keeps every token, so vit_ats is the plain vit (answers,
    cost); each is judged in or out of domain by its own threshold (the decoder's was chosen on s3d's
    features)."""
    if not (adaptive_repository / f"{contract.ENCODER_PREFIX}{VIT}" / "config.pbtxt").is_file():
        pytest.fail("clip_encoder_vit is not served: run `vqs models --part adaptive`", pytrace=False)
    _, stub = served
    plain, ats = await analyze(stub, videos["normal"], VIT), await analyze(stub, videos["normal"], ATS, 1.0)
    assert [(a.query, a.attribute) for a in plain.answers] == [(a.query, a.attribute) for a in ats.answers]
    assert [a.probability for a in plain.answers] == pytest.approx([a.probability for a in ats.answers], abs=1e-4)
    assert ats.compute.kept_ratio == pytest.approx(1.0, rel=1e-5)
    assert plain.compute.gmacs_per_clip == pytest.approx(ats.compute.gmacs_per_clip, rel=1e-5)
    for encoder, response in ((VIT, plain), (ATS, ats)):
        own = model_config(adaptive_repository, contract.ENCODER_PREFIX + encoder)["parameters"]
        assert response.domain.threshold == pytest.approx(float(own[contract.IN_DOMAIN_THRESHOLD]["string_value"]))


async def test_no_budget_is_full_compute_and_a_fixed_encoder_reports_its_constant(served, videos):
    _, stub = served
    unset, full = await analyze(stub, videos["short"], ATS), await analyze(stub, videos["short"], ATS, 1.0)
    assert unset.compute.budget == 1.0 and _kept(unset) == _kept(full)
    assert unset.compute.gmacs_per_clip == pytest.approx(full.compute.gmacs_per_clip)
    s3d = await analyze(stub, videos["short"], "s3d")
    assert (s3d.compute.encoder, s3d.compute.adaptive, s3d.compute.kept_ratio) == ("s3d", "", 1.0)
    described = await stub.DescribeModels(pb.DescribeModelsRequest(), timeout=30)
    (detail,) = [d for d in described.encoder_details if d.name == "s3d"]
    assert s3d.compute.gmacs_per_clip == pytest.approx(detail.gmacs_per_clip) and not s3d.compute.clips


@pytest.mark.parametrize(
    ("encoder", "budget", "message"),
    [(ATS, 1.5, r"outside \(0, 1\]"), (ATS, -0.25, r"outside \(0, 1\]"), (SGS, float("nan"), r"outside \(0, 1\]"),
     ("s3d", 0.5, "no adaptive module")],
)
async def test_a_bad_budget_is_invalid_argument_and_the_server_keeps_serving(served, videos, encoder, budget, message):
    _, stub = served
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await analyze(stub, videos["short"], encoder, budget)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() and re.search(message, error.value.details())
    assert (await analyze(stub, videos["short"], encoder)).compute.encoder == encoder


async def test_the_metrics_count_what_the_responses_report(served, videos):
    gateway, stub = served
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    before = scrape(url)
    response = await analyze(stub, videos["normal"], ATS, 0.25)
    after = scrape(url)
    labels = (("encoder", ATS),)

    def moved(name: str) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    gmacs = [c.gmacs for c in response.compute.clips]
    assert moved("vqs_encoder_gmacs_total") == pytest.approx(sum(gmacs), rel=1e-5)
    assert moved("vqs_adaptive_kept_ratio_count") == len(gmacs)
    assert moved("vqs_adaptive_kept_ratio_sum") == pytest.approx(response.compute.kept_ratio * len(gmacs), rel=1e-5)


async def test_mixed_budgets_in_one_dynamic_batch_each_get_their_own_compute(served, videos):
    gateway, stub = served
    model = contract.ENCODER_PREFIX + ATS
    clips = np.random.default_rng(5).integers(0, 256, (3, 8, 112, 112, 3), dtype=np.uint8)
    budgets = (1.0, 0.6, 0.3, 0.1, 0.05, 0.8)
    client = TritonClient(gateway.triton.url, shared_memory_bytes=0)
    try:
        alone = [await client.encode(clips, encoder=ATS, budget=b) for b in budgets]
        before = await settled_counters(gateway.triton_process, model)
        together = await asyncio.gather(*(client.encode(clips, encoder=ATS, budget=b) for b in budgets))
        after = await settled_counters(gateway.triton_process, model)
    finally:
        await client.close()
    assert after["nv_inference_count"] - before["nv_inference_count"] == len(budgets) * len(clips)
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert executions < len(budgets)  # so some requests at different budgets shared a batch
    for one, mixed in zip(alone, together):
        np.testing.assert_array_equal(mixed.kept, one.kept)
        np.testing.assert_allclose(mixed.gmacs, one.gmacs, rtol=1e-6)
        np.testing.assert_allclose(mixed.features, one.features, rtol=1e-4, atol=1e-5)
    assert len({float(e.gmacs.mean()) for e in together}) == len(budgets)
    # and through the gateway: concurrent requests at different budgets, each its own compute
    solo = {b: _kept(await analyze(stub, videos["short"], ATS, b)) for b in (1.0, 0.2)}
    concurrent = await asyncio.gather(*(analyze(stub, videos["short"], ATS, b) for b in (1.0, 0.2, 1.0, 0.2)))
    assert [_kept(r) for r in concurrent] == [solo[1.0], solo[0.2], solo[1.0], solo[0.2]]
    assert math.isclose(concurrent[1].compute.budget, 0.2, rel_tol=1e-6)


async def test_a_stream_runs_at_its_budget_and_every_window_says_what_it_spent(served, videos, adaptive_repository):
    from tests.integration.test_stream import collect

    _, stub = served
    data = videos["normal"].read_bytes()
    options = pb.StreamOptions(encoder=ATS, budget=0.25, mode=pb.STREAM_MODE_ARCHIVE, window_clips=2)
    events = await collect(stub, options, data)
    windows = [e for e in events if e.kind == pb.StreamEvent.WINDOW]
    final = events[-1]
    assert final.kind == pb.StreamEvent.FINAL and windows
    for window in windows:
        compute = window.result.compute
        assert (compute.budget, compute.knob) == (pytest.approx(0.25), *ats_knobs(adaptive_repository, (0.25,)))
        assert len(compute.clips) == window.last_clip - window.first_clip + 1
    analyzed = await analyze(stub, videos["normal"], ATS, 0.25)
    assert _kept(final.result) == _kept(analyzed)  # the whole stream's clips, as Analyze kept them
    assert final.result.compute.gmacs_per_clip == pytest.approx(analyzed.compute.gmacs_per_clip, rel=1e-5)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await collect(stub, pb.StreamOptions(encoder=ATS, budget=2.0), b"")  # refused before any chunk
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "(0, 1]" in error.value.details()


async def test_vqs_describe_and_vqs_analyze_show_the_compute(served, videos, adaptive_repository):
    import json

    from typer.testing import CliRunner

    from clients.cli import app

    gateway, _ = served
    runner = CliRunner()
    described = await asyncio.to_thread(runner.invoke, app, ["describe", "--server", gateway.address, "--json"])
    assert described.exit_code == 0, described.output
    encoders = {e["name"]: e for e in json.loads(described.stdout)["encoders"]}
    assert (encoders[ATS]["adaptive"], encoders[ATS]["knob_full"]) == ("ats", 196) and encoders["s3d"]["adaptive"] is None
    table = await asyncio.to_thread(runner.invoke, app, ["describe", "--server", gateway.address])
    assert table.exit_code == 0 and "fixed" in table.stdout and "ATS" in table.stdout

    args = ["analyze", str(videos["short"]), "--server", gateway.address, "--encoder", ATS, "--budget", "0.5"]
    as_json = await asyncio.to_thread(runner.invoke, app, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    compute = json.loads(as_json.stdout)["compute"]
    knob, = ats_knobs(adaptive_repository, (0.5,))
    assert (compute["encoder"], compute["knob"], compute["budget"]) == (ATS, knob, 0.5)
    assert compute["kept_ratio"] < 1 and all(len(c["kept"]) == 4 for c in compute["clips"])
    shown = await asyncio.to_thread(runner.invoke, app, args)
    assert shown.exit_code == 0 and f"0.5 -> K = {knob}" in shown.stdout and "K' ATS block 4" in shown.stdout
    refused = await asyncio.to_thread(runner.invoke, app, [*args[:-1], "1.5"])
    assert refused.exit_code == 2  # a usage error, caught before any upload
    fixed = await asyncio.to_thread(
        runner.invoke, app, ["analyze", str(videos["short"]), "--server", gateway.address, "--encoder", "s3d",
                             "--budget", "0.5"])
    assert fixed.exit_code == 1 and "INVALID_ARGUMENT" in fixed.output and "no adaptive module" in fixed.output


async def test_vqs_evaluate_reports_the_compute_at_a_budget(served, tmp_path):
    import json

    from export.synth import render_video
    from tests.integration.test_evaluate import run_cli

    gateway, _ = served
    split = tmp_path / "split"
    split.mkdir()
    records = [{"file": f"v{i}.mp4", **render_video(split / f"v{i}.mp4", seed=90 + i, seconds=2.0)} for i in range(2)]
    (split / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    served_at = {}
    for budget in ("1", "0.1"):
        out = tmp_path / f"results_{budget}.json"
        code, stdout, stderr = await run_cli(str(split), "--out", str(out), "--server", gateway.address,
                                             "--encoder", ATS, "--budget", budget, "--rounds", "100")
        assert code == 0, stderr
        served_at[budget] = json.loads(out.read_text())["served"]
        assert f"at budget {budget}" in stdout
    assert served_at["1"]["budget"] == [1.0] and served_at["0.1"]["budget"] == [pytest.approx(0.1)]
    assert served_at["0.1"]["gmacs_per_clip"] < served_at["1"]["gmacs_per_clip"]
    assert served_at["0.1"]["kept_ratio"] < served_at["1"]["kept_ratio"] == pytest.approx(1.0, rel=1e-5)
