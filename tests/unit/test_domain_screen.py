"""The in-domain screen's selection videos (`export.domain_screen`): rendered from what ships in the
test extra, decodable the way the gateway feeds clips, and not rendered twice."""

from __future__ import annotations

from export import build, domain_screen


def test_selection_videos_render_decode_and_are_reused(tmp_path):
    paths = domain_screen.render_selection(tmp_path)
    assert [p.stem for p in paths] == list(domain_screen.SELECTION)
    for path in paths:
        clips = build._clips_at_fps(path)
        # 10-12 s at the clip rate: at least 18 clips of 8 frames, 112 px, RGB
        assert clips.shape[0] >= 18 and clips.shape[1:] == (8, 112, 112, 3), (path.name, clips.shape)
        assert clips.std() > 5, f"{path.name} is blank"
    written = {p: p.stat().st_mtime_ns for p in paths}
    domain_screen.render_selection(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in paths} == written
