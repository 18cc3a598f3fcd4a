"""Compute accounting of adaptive encoders: the config parameters the gateway reads, the budget ->
knob rule, the per-result record and its Prometheus metrics (pure functions; the served path is
tests/integration/test_adaptive_serving.py)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import generate_latest

from server import triton
from server.errors import InvalidInput
from server.metrics import Metrics
from server.pipeline import assemble


def _config(**parameters: str) -> dict:
    adaptive = "adaptive" in parameters
    return {
        "name": "clip_encoder_x",
        "max_batch_size": 64,
        "input": [{"name": "clips", "dims": ["8", "112", "112", "3"]}]
        + ([{"name": "budget", "dims": ["1"]}] if adaptive else []),
        "output": [{"name": "features", "dims": ["256"]}]
        + ([{"name": "kept", "dims": ["-1"]}, {"name": "gmacs", "dims": ["1"]}] if adaptive else []),
        "parameters": {k: {"string_value": v} for k, v in parameters.items()},
    }


ATS = _config(clip_fps="15", gmacs_per_clip="0.331", adaptive="ats", budget_units="196", budget_floor="8")


def test_an_adaptive_config_gives_its_kind_knob_and_cost():
    spec = triton._encoder_spec("clip_encoder_vit_ats", ATS)
    assert spec.encoder == "vit_ats" and spec.gmacs_per_clip == pytest.approx(0.331)
    assert spec.adaptive == triton.AdaptiveSpec("ats", 196, 8)
    assert triton.contract_for("clip_encoder_vit_ats", ATS) == triton.ADAPTIVE_ENCODER_CONTRACT
    plain = _config(clip_fps="15", gmacs_per_clip="1.2")
    assert triton._encoder_spec("clip_encoder_s3d", plain).adaptive is None
    assert triton.contract_for("clip_encoder_s3d", plain) == triton.ENCODER_CONTRACT


@pytest.mark.parametrize(
    "change",
    [dict(adaptive="token_merging"), dict(budget_floor="300"), dict(budget_units=""), dict(budget_default="1.5"),
     dict(budget_powers="1.25"), dict(budget_powers="1.25,-0.5"), dict(budget_powers="still,moving")],
)
def test_a_broken_adaptive_config_is_refused(change):
    config = _config(**{**{k: v["string_value"] for k, v in ATS["parameters"].items()}, **change})
    with pytest.raises(ValueError):
        triton._encoder_spec("clip_encoder_vit_ats", config)


def test_budget_powers_say_how_each_clip_moves_the_budget():
    config = _config(**{**{k: v["string_value"] for k, v in ATS["parameters"].items()}, "budget_powers": "1.25,0.5"})
    spec = triton._encoder_spec("clip_encoder_vit_ats", config).adaptive
    assert spec.powers == (1.25, 0.5)
    assert spec.knob == ("K (tokens per ATS block), each clip's at budget ** p by its motion "
                         "(p 1.25 still .. 0.5 moving; the knob is the most any clip takes)")
    # the knob bounds every clip's K: a moving clip's, budget ** 0.5
    assert [spec.knob_for(b) for b in (1.0, 0.25, 0.01)] == [196, 98, 20]
    assert triton._encoder_spec("clip_encoder_vit_ats", ATS).adaptive.knob == "K (tokens per ATS block)"


def test_budget_to_knob_follows_the_floor_and_the_full_count():
    ats = triton.AdaptiveSpec("ats", 196, 8)
    assert [ats.knob_for(b) for b in (1.0, 0.5, 0.25, 0.01)] == [196, 98, 49, 8]
    sgs = triton.AdaptiveSpec("sgs", 8, 1)
    assert [sgs.knob_for(b) for b in (1.0, 0.5, 0.3, 0.01)] == [8, 4, 3, 1]


def test_budget_checks_name_the_range():
    spec = triton._encoder_spec("clip_encoder_vit_ats", ATS)
    assert spec.check_budget(0.05) == 0.05
    for bad in (0.0, 1.01, float("nan")):
        with pytest.raises(InvalidInput, match=r"outside \(0, 1\]"):
            spec.check_budget(bad)


def test_compute_of_an_adaptive_encoder_averages_its_clips():
    spec = triton._encoder_spec("clip_encoder_vit_ats", ATS)
    kept = np.array([[40, 30, 30, 20], [90, 80, 70, 60]])
    compute = assemble.compute(spec, 0.5, kept, np.array([0.2, 0.3]))
    assert compute.knob == 98 and compute.adaptive == "ats"
    assert compute.gmacs_per_clip == pytest.approx(0.25)
    np.testing.assert_allclose(compute.kept_ratios, [0.2 / 0.331, 0.3 / 0.331])
    assert compute.kept_ratio == pytest.approx(0.25 / 0.331)


def test_compute_of_a_fixed_encoder_is_its_constant():
    spec = triton._encoder_spec("clip_encoder_s3d", _config(clip_fps="15", gmacs_per_clip="1.2"))
    compute = assemble.compute(spec, 1.0, None, np.full(3, 1.2))
    assert compute.kept_ratio == 1.0 and compute.knob is None and compute.kept_ratios is None
    assert compute.gmacs_per_clip == pytest.approx(1.2)


def _sample(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_metrics_count_gmacs_and_observe_each_clips_ratio():
    metrics = Metrics()
    spec = triton._encoder_spec("clip_encoder_vit_ats", ATS)
    metrics.compute(assemble.compute(spec, 0.5, np.array([[40] * 4, [90] * 4]), np.array([0.2, 0.3])))
    assert _sample(metrics, "vqs_encoder_gmacs_total", encoder="vit_ats") == pytest.approx(0.5)
    assert _sample(metrics, "vqs_adaptive_kept_ratio_count", encoder="vit_ats") == 2
    assert _sample(metrics, "vqs_adaptive_kept_ratio_bucket", encoder="vit_ats", le="0.7") == 1
    plain = triton._encoder_spec("clip_encoder_s3d", _config(clip_fps="15", gmacs_per_clip="1.2"))
    metrics.compute(assemble.compute(plain, 1.0, None, np.full(3, 1.2)))
    assert _sample(metrics, "vqs_encoder_gmacs_total", encoder="s3d") == pytest.approx(3.6)
    assert b'vqs_adaptive_kept_ratio_count{encoder="s3d"}' not in generate_latest(metrics.registry)


def test_the_proto_carries_compute_and_encoder_details():
    from server.api import mapping
    from server.pipeline.analyze import ModelCatalog

    assert mapping.budget(0.0) == 1.0 and mapping.budget(0.4) == 0.4
    spec = triton._encoder_spec("clip_encoder_vit_ats", ATS)
    message = mapping.compute_message(
        assemble.compute(spec, 0.5, np.array([[40, 30, 30, 20], [90, 80, 70, 60]]), np.array([0.2, 0.3]))
    )
    assert (message.encoder, message.adaptive, message.knob) == ("vit_ats", "ats", 98)
    assert message.kept_ratio == pytest.approx(0.25 / 0.331) and message.gmacs_per_clip == pytest.approx(0.25)
    assert [list(c.kept) for c in message.clips] == [[40, 30, 30, 20], [90, 80, 70, 60]]
    assert [c.gmacs for c in message.clips] == pytest.approx([0.2, 0.3])
    plain = triton._encoder_spec("clip_encoder_s3d", _config(clip_fps="15", gmacs_per_clip="1.2"))
    described = mapping.describe_response(
        ModelCatalog(queries=(), encoders={"vit_ats": spec, "s3d": plain}),
        default_encoder="s3d", max_upload_bytes=1, max_duration_s=1.0,
    )
    details = {d.name: d for d in described.encoder_details}
    assert (details["vit_ats"].adaptive, details["vit_ats"].knob_full, details["vit_ats"].knob_min) == ("ats", 196, 8)
    assert details["s3d"].adaptive == "" and details["s3d"].gmacs_per_clip == pytest.approx(1.2)
    assert details["vit_ats"].budget_default == 0.0  # none chosen
    chosen = _config(**{**{k: v["string_value"] for k, v in ATS["parameters"].items()}, "budget_default": "0.4"})
    assert mapping.encoder_details(triton._encoder_spec("clip_encoder_vit_ats", chosen)).budget_default == pytest.approx(0.4)


def test_the_contract_takes_the_kept_counts_per_clip_from_the_config():
    config = _config(**{k: v["string_value"] for k, v in ATS["parameters"].items()})
    config["output"][1]["dims"] = ["4"]
    kept = {t.name: t for t in triton.contract_for("clip_encoder_vit_ats", config).outputs}["kept"]
    assert (kept.dtype, kept.dims) == ("INT64", (4,))


def test_vqs_analyze_shows_compute_in_json_and_as_a_table():
    from rich.console import Console

    from clients import compute as client_compute
    from clients import render
    from server.proto import video_analytics_pb2 as pb

    response = pb.AnalyzeResponse(encoder="vit_ats", compute=pb.Compute(
        encoder="vit_ats", budget=0.5, knob=98, adaptive="ats", kept_ratio=0.7, gmacs_per_clip=0.23,
        clips=[pb.ClipCompute(kept=[90, 80, 70, 60], gmacs=0.24), pb.ClipCompute(kept=[80, 70, 60, 50], gmacs=0.22)]))
    result = render.response_to_dict(response)
    assert result["compute"] == {
        "encoder": "vit_ats", "budget": 0.5, "adaptive": "ats", "knob": 98, "kept_ratio": pytest.approx(0.7),
        "gmacs_per_clip": pytest.approx(0.23),
        "clips": [{"kept": [90, 80, 70, 60], "gmacs": pytest.approx(0.24)},
                  {"kept": [80, 70, 60, 50], "gmacs": pytest.approx(0.22)}],
    }
    console = Console(width=120, record=True)
    console.print(client_compute.compute_table(result))
    text = console.export_text()
    assert "0.5 -> K = 98" in text and "K' ATS block 1" in text and "85.0 (80-90)" in text
    plain = render.response_to_dict(pb.AnalyzeResponse(compute=pb.Compute(encoder="s3d", budget=1, kept_ratio=1)))
    assert plain["compute"]["adaptive"] is None and plain["compute"]["knob"] is None
    assert "compute" not in render.response_to_dict(pb.AnalyzeResponse())


def test_a_streams_budget_reaches_its_options():
    from server.api import mapping
    from server.pipeline.stream import StreamLimits
    from server.proto import video_analytics_pb2 as pb
    from server.settings import LimitsSettings

    limits = StreamLimits.from_settings(LimitsSettings())
    assert mapping.stream_options(pb.StreamOptions(), "vit_ats", limits).budget == 1.0
    assert mapping.stream_options(pb.StreamOptions(budget=0.25), "vit_ats", limits).budget == 0.25


def test_vqs_metrics_shows_each_encoders_compute():
    from rich.console import Console

    from clients import metrics as client_metrics

    metrics = Metrics()
    spec = triton._encoder_spec("clip_encoder_vit_ats", ATS)
    metrics.compute(assemble.compute(spec, 0.5, np.array([[40] * 4, [90] * 4]), np.array([0.2, 0.3])))
    plain = triton._encoder_spec("clip_encoder_s3d", _config(clip_fps="15", gmacs_per_clip="1.2"))
    metrics.compute(assemble.compute(plain, 1.0, None, np.full(3, 1.2)))
    now = client_metrics.parse(generate_latest(metrics.registry).decode(), at=100.0)
    view = client_metrics.gateway_view(now, None)
    assert view["encoders"]["vit_ats"]["gmacs"] == pytest.approx(0.5)
    assert view["encoders"]["vit_ats"]["mean_kept_ratio"] == pytest.approx(0.25 / 0.331)
    assert view["encoders"]["s3d"]["gmacs"] == pytest.approx(3.6) and view["encoders"]["s3d"]["mean_kept_ratio"] is None
    console = Console(width=120, record=True)
    console.print(client_metrics.tables({"gateway": view, "one_shot": True}))
    text = console.export_text()
    assert "encoder compute" in text and "0.755" in text


def test_vqs_evaluate_summarises_what_the_encoder_spent():
    from clients.evaluate import served_compute

    rows = [{"video": {"clips": 3}, "compute": {"budget": 0.5, "gmacs_per_clip": 0.2, "kept_ratio": 0.6}},
            {"video": {"clips": 1}, "compute": {"budget": 0.5, "gmacs_per_clip": 0.4, "kept_ratio": 1.0}}]
    assert served_compute(rows) == {"budget": [0.5], "gmacs_per_clip": pytest.approx(0.25),
                                    "kept_ratio": pytest.approx(0.7)}
    assert served_compute([{"video": {"clips": 2}}]) == {}  # a gateway that does not report compute


def test_vqs_score_sends_the_budget():
    from clients.archive import Item
    from clients.scoring import prepare

    _, request = prepare(Item("a", "a.mp4", None, None), b"video", None, encoder="vit_ats",
                         max_upload_bytes=100, budget=0.3)
    assert (request.encoder, request.budget) == ("vit_ats", pytest.approx(0.3))
