"""`vqs render` and `vqs analyze --png` on answers from the real gateway: the picture's size, a
frame strip that shows frames, and heatmap rows bright exactly where the served attention is high."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the render extra (matplotlib) is not installed")


@pytest.fixture(scope="module")
def clip_video(tmp_path_factory) -> Path:
    from export.synth import render_video

    path = tmp_path_factory.mktemp("render") / "dive.mp4"
    render_video(path, seed=7, seconds=6.0, width=160, height=120)
    return path


async def vqs(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode, out.decode(), err.decode()


def luminance(png: Path) -> np.ndarray:
    from matplotlib.image import imread

    rgb = imread(png)[..., :3]  # floats in 0..1, rows top to bottom
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


async def test_report_picture_shows_frames_and_attention_where_it_is_high(gateway, clip_video, tmp_path):
    from clients.report import render_report

    code, out, err = await vqs("analyze", str(clip_video), "--server", gateway.address, "--json")
    assert code == 0, err
    result = json.loads(out)
    png = tmp_path / "report.png"
    layout = render_report(result, clip_video, png, title=clip_video.name)
    lum = luminance(png)
    assert lum.shape == (layout.height, layout.width)
    assert layout.width == 1300 and 300 < layout.height < 800

    # The frame strip shows decoded frames: textured, not the white page.
    s = layout.strip
    strip = lum[s.top + 2 : s.bottom - 2, s.left + 2 : s.right - 2]
    assert strip.std() > 0.08 and strip.mean() < 0.9
    # Blank without a video: the same box is then uniform.
    blank = tmp_path / "blank.png"
    render_report(result, None, blank)
    bs = luminance(blank)[s.top + 2 : s.bottom - 2, s.left + 2 : s.right - 2]
    assert bs.std() < 0.01

    assert list(layout.rows) == [a["query"] for a in result["attention"]]
    for att in result["attention"]:
        box = layout.rows[att["query"]]
        y = (box.top + box.bottom) // 2
        width = box.right - box.left

        def x_of(t: float) -> int:
            return box.left + int(t / layout.duration_s * width)

        weights = np.array(att["weights"])
        centres = [(a + b) / 2 for a, b in att["clip_spans_s"]]
        brightness = np.array([lum[y, x_of(t)] for t in centres])
        top, low = int(weights.argmax()), int(weights.argmin())
        assert brightness[top] > 0.8, att["query"]  # the peak is drawn brightest (inferno's yellow)
        assert brightness[top] == brightness.max() and brightness[low] == brightness.min()
        # Brightness never falls as the weight rises along the whole row (the colormap is
        # monotonic in luminance), so the picture ranks clips as the served weights do. Weights
        # closer than one colour step draw the same colour: a peaked attention leaves many
        # near-zero clips equally dark, so ties are allowed, a reversal is not.
        by_weight = brightness[np.argsort(weights, kind="stable")]
        assert np.all(np.diff(by_weight) >= -0.01), (att["query"], weights.round(4), brightness.round(3))


async def test_analyze_png_and_render_from_a_score_line_draw_the_same_picture(gateway, clip_video, tmp_path):
    direct = tmp_path / "direct.png"
    code, out, err = await vqs("analyze", str(clip_video), "--server", gateway.address, "--png", str(direct))
    assert code == 0, err
    assert "Answers" in out and f"report picture: {direct}" in err

    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / clip_video.name).write_bytes(clip_video.read_bytes())
    jsonl = tmp_path / "scores.jsonl"
    code, _, err = await vqs("score", str(folder), "--out", str(jsonl), "--server", gateway.address)
    assert code == 0, err
    from_score = tmp_path / "from_score.png"
    code, out, err = await vqs("render", str(jsonl), "--id", clip_video.name, "--out", str(from_score))
    assert code == 0, err
    assert out.strip() == str(from_score)

    a, b = luminance(direct), luminance(from_score)
    assert a.shape == b.shape
    # Same video, same answers (up to float noise): the same picture.
    assert np.abs(a - b).mean() < 0.01


async def test_render_says_what_to_do_with_a_failed_line(tmp_path):
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text('{"id":"x.mp4","source":"/nowhere/x.mp4","error":{"code":"INVALID_ARGUMENT","message":"bad"}}\n'
                     '{"id":"y.mp4","source":"/nowhere/y.mp4","error":{"code":"NOT_FOUND","message":"gone"}}\n')
    code, _, err = await vqs("render", str(jsonl), "--out", str(tmp_path / "r.png"))
    assert code == 2 and "pick one with --id" in err
    code, _, err = await vqs("render", str(jsonl), "--id", "x.mp4", "--out", str(tmp_path / "r.png"))
    assert code == 2 and "has no result: INVALID_ARGUMENT bad" in err
    assert not (tmp_path / "r.png").exists()
