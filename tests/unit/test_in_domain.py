"""The in-domain flag from the score to the client: which score judges an encoder's clips (its own
per-clip `domain_distance`, the decoder's, or none), assembly, proto mapping and the JSON/console
display; absent (unknown) when nothing fitted to the encoder's features scores them."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from clients import render
from server import triton
from server.api.mapping import analyze_response
from server.errors import InferenceFailed
from server.pipeline import assemble
from server.pipeline.assemble import QuerySpec, VideoInfo
from server.settings import Settings
from tests.vocabulary import model_config

REPOSITORY = Path(Settings().triton.model_repository)

SPECS = [QuerySpec("twists", ("0", "1", "null"))]
VIDEO = VideoInfo(duration_s=1.0, fps=15.0, frames=15, width=112, height=112)


def _result(score: float | None = None, threshold: float | None = None):
    return assemble.build_result(
        encoder="s3d", specs=SPECS, logits={"twists": np.array([0.0, 2.0, 0.0])},
        attention=np.array([[1.0, 3.0]]), spans_s=np.array([[0.0, 0.5], [0.5, 1.0]]),
        video=VIDEO, timing_ms={"total": 1.0}, domain=assemble.domain(score, threshold),
    )


@pytest.mark.parametrize(("score", "threshold", "expected"), [
    (-1.5, -4.0, True), (-4.0, -4.0, True), (-9.0, -4.0, False), (math.nan, -4.0, False),
])
def test_in_domain_is_score_at_or_above_the_threshold(score, threshold, expected):
    d = assemble.domain(score, threshold)
    assert d.in_domain is expected
    assert d.threshold == threshold


def test_unknown_without_a_score_or_a_threshold():
    assert assemble.domain(None, -4.0) is None
    assert assemble.domain(-1.0, None) is None
    assert _result().domain is None


def _console_text(result: dict) -> str:
    console = Console(record=True, width=200)
    line = render.domain_line(result)
    if line is not None:
        console.print(line)
    return console.export_text()


def test_an_out_of_domain_result_reaches_the_client_flagged():
    response = analyze_response(_result(-9.0, -4.0), "req-1")
    assert response.HasField("domain")
    as_dict = render.response_to_dict(response)
    assert as_dict["domain"] == {"score": -9.0, "threshold": -4.0, "in_domain": False}
    assert "OUT OF DOMAIN" in _console_text(as_dict)

    inside = render.response_to_dict(
        analyze_response(_result(-1.25, -4.0), "req-2"))
    assert inside["domain"]["in_domain"] is True
    assert "in domain" in _console_text(inside) and "OUT" not in _console_text(inside)


def test_an_unknown_domain_is_absent_on_the_wire_and_in_the_json():
    response = analyze_response(_result(), "req-1")
    assert not response.HasField("domain")
    as_dict = render.response_to_dict(response)
    assert "domain" not in as_dict
    assert "domain not judged" in render.domain_line(as_dict).plain


def _decoder_config() -> dict:
    return model_config(REPOSITORY, triton.QUERY_DECODER_MODEL)


def _scoring(config: dict, threshold: str | None) -> dict:
    config = copy.deepcopy(config)
    config["output"] = [o for o in config["output"] if o["name"] != "in_domain_score"]
    config["output"].append({"name": "in_domain_score", "data_type": "TYPE_FP32", "dims": ["-1"]})
    config["parameters"].pop("in_domain_threshold", None)
    if threshold is not None:
        config["parameters"]["in_domain_threshold"] = {"string_value": threshold}
    return config


def test_the_decoder_spec_reads_the_optional_score_output_and_its_threshold():
    scoring = _scoring(_decoder_config(), "-3.25")
    spec = triton.query_decoder_spec(scoring)
    assert spec.in_domain_threshold == -3.25
    contract = triton.contract_for(triton.QUERY_DECODER_MODEL, scoring)
    assert contract.outputs[-1] == triton.TensorSpec("in_domain_score", "FP32", (-1,))
    assert [t.name for t in contract.outputs] == [o["name"] for o in scoring["output"]]

    plain = copy.deepcopy(scoring)
    plain["output"] = plain["output"][:-1]
    plain["parameters"].pop("in_domain_threshold")
    assert triton.query_decoder_spec(plain).in_domain_threshold is None
    assert triton.contract_for(triton.QUERY_DECODER_MODEL, plain).outputs[-1].name == "attention"


@pytest.mark.parametrize("threshold", [None, "", "high"])
def test_a_score_output_without_a_numeric_threshold_is_refused(threshold):
    with pytest.raises(ValueError, match="in_domain_threshold"):
        triton.query_decoder_spec(_scoring(_decoder_config(), threshold))


# -- an encoder's own in-domain score: `domain_distance` per clip, judged by its own threshold

PLAIN = triton.EncoderSpec("s3d", "clip_encoder_s3d", 8, 112, 256, 64)
SGS = triton.AdaptiveSpec("sgs", 8, 1)


def _judge(spec: triton.EncoderSpec, distances=None) -> assemble.Domain | None:
    """The verdict on clips `spec` encoded, beside a decoder that scores them -9 against -4."""
    return assemble.judge_domain(spec, distances=None if distances is None else np.array(distances),
                                 decoder_score=-9.0, decoder_threshold=-4.0)


def test_an_encoders_score_is_minus_the_mean_of_its_clips_distances():
    assert assemble.distance_score(np.array([1.0, 2.0, 4.5])) == pytest.approx(-2.5)
    assert assemble.distance_score(np.array([0.75])) == pytest.approx(-0.75)
    with pytest.raises(ValueError, match="no clip distances"):
        assemble.distance_score(np.array([]))


@pytest.mark.parametrize("adaptive", [None, SGS])
def test_an_encoder_with_distances_is_judged_by_them_and_its_own_threshold(adaptive):
    spec = dataclasses.replace(PLAIN, adaptive=adaptive, domain_scored=True, in_domain_threshold=-2.0)
    assert _judge(spec, [1.0, 2.0]) == assemble.Domain(score=-1.5, threshold=-2.0, in_domain=True)
    assert _judge(spec, [2.0, 3.0]) == assemble.Domain(score=-2.5, threshold=-2.0, in_domain=False)
    # without a threshold of its own, or without the distances: unknown, never the decoder's
    assert _judge(dataclasses.replace(spec, in_domain_threshold=None), [1.0, 2.0]) is None
    assert _judge(spec) is None


def test_the_plain_encoder_the_decoder_was_trained_with_is_judged_by_the_decoder():
    assert _judge(PLAIN) == assemble.Domain(score=-9.0, threshold=-4.0, in_domain=False)
    assert assemble.judge_domain(PLAIN, distances=None, decoder_score=None, decoder_threshold=None) is None


@pytest.mark.parametrize("spec", [
    dataclasses.replace(PLAIN, encoder="vit", in_domain_threshold=-3.0),  # a threshold of its own
    dataclasses.replace(PLAIN, adaptive=SGS),
    dataclasses.replace(PLAIN, adaptive=SGS, in_domain_threshold=-148.5),
], ids=["plain-own-threshold", "adaptive", "adaptive-own-threshold"])
def test_any_other_encoder_without_distances_is_unknown(spec):
    assert _judge(spec) is None


def _encoder_config(model: str, *, distance: bool) -> dict:
    """The committed config of `model`, declaring `domain_distance` or not."""
    config = model_config(REPOSITORY, model)
    config["output"] = [o for o in config["output"] if o["name"] != triton.DOMAIN_DISTANCE]
    if distance:
        config["output"].append({"name": triton.DOMAIN_DISTANCE, "data_type": "TYPE_FP32", "dims": ["1"]})
    return config


@pytest.mark.parametrize("model", ["clip_encoder_s3d", "clip_encoder_s3d_sgs"])
def test_an_encoder_that_declares_distances_has_them_in_its_contract_and_spec(model):
    without = _encoder_config(model, distance=False)
    scored = _encoder_config(model, distance=True)
    base = triton.contract_for(model, without)
    assert triton.DOMAIN_DISTANCE not in [t.name for t in base.outputs]
    assert triton.contract_for(model, scored) == dataclasses.replace(
        base, outputs=base.outputs + (triton.TensorSpec("domain_distance", "FP32", (1,)),))
    assert triton._encoder_spec(model, without).domain_scored is False
    assert triton._encoder_spec(model, scored).domain_scored is True


@pytest.mark.parametrize("adaptive", [None, SGS])
def test_encoded_clips_carry_each_clips_distance(adaptive):
    spec = dataclasses.replace(PLAIN, adaptive=adaptive, domain_scored=True)
    out = {triton.FEATURES: np.zeros((3, 256), np.float32),
           triton.KEPT: np.ones((3, 1), np.int64), triton.GMACS: np.ones((3, 1), np.float32),
           triton.DOMAIN_DISTANCE: np.array([[1.0], [2.5], [4.0]], np.float32)}
    encoded = triton.TritonClient._encoded(spec, out)
    assert encoded.domain_distance.dtype == np.float64
    assert encoded.domain_distance.tolist() == [1.0, 2.5, 4.0]
    undeclared = triton.TritonClient._encoded(dataclasses.replace(spec, domain_scored=False), out)
    assert undeclared.domain_distance is None


@pytest.mark.parametrize("shape", [(3,), (2, 1), (3, 2)])
def test_distances_of_the_wrong_shape_are_an_inference_failure(shape):
    spec = dataclasses.replace(PLAIN, domain_scored=True)
    out = {triton.FEATURES: np.zeros((3, 256), np.float32), triton.DOMAIN_DISTANCE: np.ones(shape, np.float32)}
    with pytest.raises(InferenceFailed, match=re.escape(
            f"clip_encoder_s3d returned domain_distance {list(shape)} for 3 clips; expected [3, 1]")):
        triton.TritonClient._encoded(spec, out)


def test_batches_join_their_distances():
    def part(distances):
        return triton.EncodedClips(np.zeros((len(distances), 4), np.float32), None, None, np.array(distances))

    joined = triton.EncodedClips.concatenate([part([1.0, 2.0]), part([3.0])])
    assert joined.domain_distance.tolist() == [1.0, 2.0, 3.0]
    assert joined.features.shape == (3, 4)
    unscored = triton.EncodedClips(np.zeros((1, 4), np.float32), None, None)
    assert triton.EncodedClips.concatenate([part([1.0]), unscored]).domain_distance is None
