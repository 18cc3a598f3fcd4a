from __future__ import annotations

import numpy as np
import pytest

from server.pipeline import assemble
from server.pipeline.assemble import QuerySpec

SPECS = [
    QuerySpec("take_off", ("backward", "forward", "null")),
    QuerySpec("class", ("a", "b")),
]


def test_softmax_is_a_stable_distribution():
    probs = assemble.softmax(np.array([1000.0, 1000.0, -1000.0]))
    np.testing.assert_allclose(probs, [0.5, 0.5, 0.0], atol=1e-12)
    assert probs.sum() == pytest.approx(1.0)


def test_answer_picks_the_most_likely_attribute():
    answer = assemble.answer(SPECS[0], np.array([0.1, 2.0, -1.0], np.float32))
    assert answer.attribute == "forward"
    assert list(answer.distribution) == ["backward", "forward", "null"]
    assert sum(answer.distribution.values()) == pytest.approx(1.0)
    assert answer.probability == pytest.approx(max(answer.distribution.values()))


def test_answer_rejects_a_wrong_number_of_logits():
    with pytest.raises(ValueError, match="2 logits for 3 attributes"):
        assemble.answer(SPECS[0], np.zeros(2))


def test_answers_need_logits_for_every_query():
    with pytest.raises(ValueError, match="class"):
        assemble.answers(SPECS, {"take_off": np.zeros(3)})


def test_attention_maps_are_renormalised_per_query():
    attention = np.array([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])  # unnormalised, one empty row
    spans = np.array([[0.0, 0.5], [0.5, 1.0], [1.0, 1.2]])
    maps = assemble.attention_maps(["take_off", "class"], attention, spans)

    np.testing.assert_allclose(maps[0].weights, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(maps[1].weights, [1 / 3] * 3)  # no signal -> uniform
    assert all(m.weights.sum() == pytest.approx(1.0) for m in maps)
    assert maps[0].spans_s is spans or np.array_equal(maps[0].spans_s, spans)


@pytest.mark.parametrize(
    ("attention", "spans", "message"),
    [
        (np.ones((3, 2)), np.zeros((2, 2)), "attention must be"),
        (np.ones((2, 2)), np.zeros((3, 2)), "clip spans"),
    ],
)
def test_attention_maps_check_shapes(attention, spans, message):
    with pytest.raises(ValueError, match=message):
        assemble.attention_maps(["take_off", "class"], attention, spans)


def test_build_result_orders_everything_like_the_specs():
    video = assemble.VideoInfo(fps=15, width=64, height=48, frames=18, duration_s=1.2)
    result = assemble.build_result(
        encoder="s3d",
        specs=SPECS,
        logits={"class": np.array([0.0, 1.0]), "take_off": np.array([3.0, 0.0, 0.0])},
        attention=np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]),  # rows follow the specs
        spans_s=np.array([[0.0, 0.5], [0.5, 1.0], [1.0, 1.2]]),
        video=video,
        timing_ms={"total": 12.0},
    )
    assert [a.query for a in result.answers] == ["take_off", "class"]
    assert [a.attribute for a in result.answers] == ["backward", "b"]
    assert [m.query for m in result.attention] == ["take_off", "class"]
    np.testing.assert_allclose(result.attention[0].weights, [1.0, 0.0, 0.0])
    assert result.video is video and result.clips == 3 and result.timing_ms == {"total": 12.0}


def test_one_video_metadata_type():
    from server.pipeline import decode

    assert assemble.VideoInfo is decode.VideoInfo
    assert not hasattr(assemble, "VideoSummary")
