"""The in-domain flag from the query decoder's score to the client: assembly, proto mapping and the
JSON/console display; absent (unknown) when the decoder does not score its domain."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from clients import render
from server.api.mapping import analyze_response
from server.pipeline import assemble
from server.pipeline.assemble import QuerySpec, VideoInfo

SPECS = [QuerySpec("twists", ("0", "1", "null"))]
VIDEO = VideoInfo(duration_s=1.0, fps=15.0, frames=15, width=112, height=112)


def _result(**domain):
    return assemble.build_result(
        encoder="s3d", specs=SPECS, logits={"twists": np.array([0.0, 2.0, 0.0])},
        attention=np.array([[1.0, 3.0]]), spans_s=np.array([[0.0, 0.5], [0.5, 1.0]]),
        video=VIDEO, timing_ms={"total": 1.0}, **domain,
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
    response = analyze_response(_result(in_domain_score=-9.0, in_domain_threshold=-4.0), "req-1")
    assert response.HasField("domain")
    as_dict = render.response_to_dict(response)
    assert as_dict["domain"] == {"score": -9.0, "threshold": -4.0, "in_domain": False}
    assert "OUT OF DOMAIN" in _console_text(as_dict)

    inside = render.response_to_dict(
        analyze_response(_result(in_domain_score=-1.25, in_domain_threshold=-4.0), "req-2"))
    assert inside["domain"]["in_domain"] is True
    assert "in domain" in _console_text(inside) and "OUT" not in _console_text(inside)


def test_an_unknown_domain_is_absent_on_the_wire_and_in_the_json():
    response = analyze_response(_result(), "req-1")
    assert not response.HasField("domain")
    as_dict = render.response_to_dict(response)
    assert "domain" not in as_dict
    assert "domain not judged" in render.domain_line(as_dict).plain


def _decoder_config() -> dict:
    from server import triton
    from tests.vocabulary import model_config
    from server.settings import Settings

    return model_config(Path(Settings().triton.model_repository), triton.QUERY_DECODER_MODEL)


def _scoring(config: dict, threshold: str | None) -> dict:
    config = copy.deepcopy(config)
    config["output"] = [o for o in config["output"] if o["name"] != "in_domain_score"]
    config["output"].append({"name": "in_domain_score", "data_type": "TYPE_FP32", "dims": ["-1"]})
    config["parameters"].pop("in_domain_threshold", None)
    if threshold is not None:
        config["parameters"]["in_domain_threshold"] = {"string_value": threshold}
    return config


def test_the_decoder_spec_reads_the_optional_score_output_and_its_threshold():
    from server import triton

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
    from server import triton

    with pytest.raises(ValueError, match="in_domain_threshold"):
        triton.query_decoder_spec(_scoring(_decoder_config(), threshold))
