"""The in-domain flag from the query decoder's score to the client: assembly, proto mapping and the
JSON/console display; absent (unknown) when the decoder does not score its domain."""

from __future__ import annotations

import math

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
    assert render.domain_line(as_dict) is None
