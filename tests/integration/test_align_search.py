"""`vqs align` and `vqs search` through the real gateway and Triton (issue 11).

Two renders of one routine (same diver, same dive) that differ in speed and in how long the diver
waits before the dive: B starts later and plays 1.5x slower, so no single shift or stretch of time
maps A onto B. The truth (each frame's phase) comes from the generator."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from export import synth

pytestmark = pytest.mark.integration

SLOWER = 1.5
ACTION_PHASES = (1, 2, 3)  # take-off, flight, entry (0 and 4 are the idle before and after)


@dataclasses.dataclass(frozen=True)
class Render:
    path: Path
    routine: synth.Routine
    slower: float  # video seconds per routine second

    def phase_at(self, t_video: float) -> int:
        return int(np.searchsorted(np.asarray(synth.phase_times(self.routine)), t_video / self.slower, side="right"))

    def phase_start(self, phase: int) -> float:
        """Video time at which `phase` (1..4) starts."""
        return synth.phase_times(self.routine)[phase - 1] * self.slower


def render(path: Path, routine: synth.Routine, slower: float) -> Render:
    fps = 15.0 * slower  # rendered finer, played at 15 fps: slow motion
    synth.encode(synth.render_frames(routine, 112, 112, fps), path, 112, 112, 15.0, "h264")
    return Render(path, routine, slower)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Render, Render]:
    out = tmp_path_factory.mktemp("align")
    seed = 424_242
    routine = synth.sample_routine(np.random.default_rng([seed, 0]), seed, 6.0)
    routine = dataclasses.replace(routine, start_s=1.5)
    later = dataclasses.replace(routine, start_s=3.0, duration_s=7.0)
    return render(out / "a.mp4", routine, 1.0), render(out / "b.mp4", later, SLOWER)


async def vqs(*args: str):
    from typer.testing import CliRunner

    from clients.cli import app

    # The CLI's blocking gRPC runs in a thread: this test's event loop serves the gateway.
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


def flat(output: str) -> str:
    """The CLI's message without rich's box and line breaks."""
    return " ".join(output.replace("│", " ").split())


def agreement(pairs, a: Render, b: Render) -> float:
    """Share of matched (A, B) times, over A's frames inside the dive, where both show the same phase."""
    inside = [(x, y) for x, y in pairs if a.phase_at(x) in ACTION_PHASES]
    return float(np.mean([a.phase_at(x) == b.phase_at(y) for x, y in inside]))


async def test_align_matches_the_phases_of_two_speeds(gateway, pair):
    a, b = pair
    result = await vqs("align", str(a.path), str(b.path), "--server", gateway.address, "--json")
    assert result.exit_code == 0, result.output
    aligned = json.loads(result.stdout)
    path = aligned["path_s"]
    assert path[0] == [0.0, 0.0] and aligned["frames"] == [90, synth.num_frames(b.routine, 15.0 * SLOWER)]
    assert all(x2 >= x1 and y2 >= y1 for (x1, y1), (x2, y2) in zip(path, path[1:]))

    served = agreement(path, a, b)
    # The best a uniform stretch of time can do here (it ignores the longer wait): the control.
    stretch = [(x, x * (7.0 * SLOWER) / 6.0) for x, _ in path]
    control = agreement(stretch, a, b)
    # Where A's phases start, DTW's match in B against B's own phase starts.
    errors = []
    for phase in (1, 2, 3, 4):
        t = a.phase_start(phase)
        matched = np.median([y for x, y in path if abs(x - t) < 1 / 30])
        errors.append(abs(matched - b.phase_start(phase)))
    print(f"phase agreement inside the dive: DTW {served:.3f}, uniform stretch {control:.3f}; "
          f"phase-start errors in B (s): {np.round(errors, 3).tolist()}; parser agreement "
          f"{aligned['phase_agreement']}")
    assert served >= 0.8 and served > control + 0.2
    assert np.mean(errors) < 0.35  # about 5 frames of B
    assert aligned["phase_agreement"] is None or 0 <= aligned["phase_agreement"] <= 1


async def test_align_prints_matched_times(gateway, pair):
    a, b = pair
    result = await vqs("align", str(a.path), str(b.path), "--server", gateway.address)
    assert result.exit_code == 0, result.output
    assert "phase agreement" in result.stdout and "A s" in result.stdout


async def test_search_at_a_flight_frame_finds_the_flight_of_the_other_render(gateway, pair):
    a, b = pair
    t = (a.phase_start(2) + a.phase_start(3)) / 2  # mid-flight
    result = await vqs("search", "--at", f"{a.path}:{t:.3f}", str(b.path), "--server", gateway.address,
                       "--json", "--top", "3")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    hits = found["results"]
    assert found["query"] == {"video": str(a.path), "time_s": pytest.approx(t, abs=1e-3)}
    assert len(hits) == 3 and all(h["video"] == str(b.path) for h in hits)
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    assert b.phase_at(hits[0]["time_s"]) == 2, hits


async def test_search_with_a_picture_ranks_by_the_stills_frame(gateway, stub, pair, tmp_path):
    """A picture is a one-second still video whose middle frame is the query, compared by the
    embedder's context-free features when it serves them (else by embeddings): the hits are the
    frames most like it by those (recomputed here from Analyze). With features, a mid-flight
    picture finds its own frame and the other render's flight; a still's contextual embedding
    lacks the motion the embedder reads (README), so without them no phase is asserted."""
    import av
    import cv2

    from clients.embeddings import nearest_frames, tensor_array
    from clients.search import still_video
    from server.proto import video_analytics_pb2 as pb

    a, b = pair
    with av.open(str(a.path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    t = (a.phase_start(2) + a.phase_start(3)) / 2  # mid-flight
    picture = tmp_path / "query.png"
    cv2.imwrite(str(picture), frames[round(t * 15)][:, :, ::-1])  # cv2 writes BGR
    result = await vqs("search", str(picture), str(a.path), str(b.path), "--server", gateway.address, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    hits = found["results"]
    assert found["query"]["picture"] == str(picture) and len(hits) == 5
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    by_features = found["query"]["by"] == "features"

    async def embedded(data: bytes):
        response = await stub.Analyze(pb.AnalyzeRequest(video=data, embeddings=True, omit_segments=True), timeout=120)
        e = response.embeddings
        assert e.HasField("features") == by_features
        values = tensor_array(e.features if by_features else e.values).astype(np.float32)
        return values, np.asarray(e.times_s)

    still, _ = await embedded(still_video(picture))
    query = still[len(still) // 2]
    best = []
    for render in (a, b):
        values, times = await embedded(render.path.read_bytes())
        best += [(score, str(render.path), times[i]) for i, score in nearest_frames(query, values, 1, 1)]
    score, video, time_s = max(best)
    assert (hits[0]["video"], hits[0]["time_s"]) == (video, pytest.approx(time_s, abs=1e-3))
    assert hits[0]["similarity"] == pytest.approx(score, abs=2e-3)
    if by_features:
        assert hits[0]["video"] == str(a.path) and abs(hits[0]["time_s"] - t) <= 0.1
        in_b = [h for h in hits if h["video"] == str(b.path)]
        assert in_b and b.phase_at(in_b[0]["time_s"]) == 2, hits


async def test_pictures_of_each_dive_phase_find_that_phase_in_their_video(gateway, stub, tmp_path):
    """`vqs search PICTURE VIDEO` on 5 dives x a mid-take-off, mid-flight and mid-entry picture:
    the served context-free `frame_features` put the best hit in the picture's phase for nearly
    all 15; the control ranks by the contextual embeddings instead (a still looks idle to them,
    README), recomputed here from Analyze."""
    import av
    import cv2

    from clients.embeddings import nearest_frames, tensor_array
    from clients.search import still_video
    from server.proto import video_analytics_pb2 as pb

    async def analyzed(data: bytes):
        response = await stub.Analyze(pb.AnalyzeRequest(video=data, embeddings=True, omit_segments=True), timeout=120)
        return tensor_array(response.embeddings.values).astype(np.float32), np.asarray(response.embeddings.times_s)

    by_features = by_embeddings = 0
    for seed in range(5):
        routine = synth.sample_routine(np.random.default_rng([9_000 + seed, 0]), 9_000 + seed, 5.0)
        dive = render(tmp_path / f"dive{seed}.mp4", routine, 1.0)
        with av.open(str(dive.path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        values, times = await analyzed(dive.path.read_bytes())
        for phase in ACTION_PHASES:
            t = (dive.phase_start(phase) + dive.phase_start(phase + 1)) / 2
            picture = tmp_path / f"dive{seed}_{phase}.png"
            cv2.imwrite(str(picture), frames[round(t * 15)][:, :, ::-1])  # cv2 writes BGR
            result = await vqs("search", str(picture), str(dive.path), "--server", gateway.address, "--json",
                               "--top", "1")
            assert result.exit_code == 0, result.output
            found = json.loads(result.stdout)
            assert found["query"]["by"] == "features"  # the served embedder has them
            by_features += dive.phase_at(found["results"][0]["time_s"]) == phase
            still, _ = await analyzed(still_video(picture))
            [(index, _)] = nearest_frames(still[len(still) // 2], values, 1, 1)
            by_embeddings += dive.phase_at(times[index]) == phase
    print(f"pictures whose best hit is in their phase: by frame_features {by_features}/15, "
          f"by contextual embeddings {by_embeddings}/15")
    assert by_features >= 13 and by_features > by_embeddings


@pytest.mark.parametrize("args,message", [
    (["--at", "no-colon", "{b}"], "VIDEO:SECONDS"),
    (["--at", "{a}:soon", "{b}"], "not a number"),
    (["--at", "{a}:-2", "{b}"], "seconds >= 0"),
    (["--at", "{missing}:1", "{b}"], "not a file"),
    (["--at", "{a}:1"], "no videos"),
    (["{missing}", "{a}"], "not a file"),
    (["{a}", "{b}"], "not a picture"),  # a video given as the query picture
    (["{text}", "{a}"], "not a picture"),
    (["{png}"], "no videos"),
])
async def test_search_refuses_bad_arguments_with_a_clear_message(gateway, pair, tmp_path, args, message):
    import cv2

    a, b = pair
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    png = tmp_path / "q.png"
    cv2.imwrite(str(png), np.zeros((16, 16, 3), np.uint8))
    names = dict(a=a.path, b=b.path, missing=tmp_path / "missing.mp4", text=text, png=png)
    result = await vqs("search", *(x.format(**names) for x in args), "--server", gateway.address)
    assert result.exit_code == 2, result.output
    assert message in flat(result.output), result.output


async def test_search_refuses_a_time_past_the_end_and_align_a_missing_file(gateway, pair, tmp_path):
    a, b = pair
    result = await vqs("search", "--at", f"{a.path}:60", str(b.path), "--server", gateway.address)
    assert result.exit_code == 2 and "past its end" in flat(result.output), result.output
    result = await vqs("align", str(a.path), str(tmp_path / "gone.mp4"), "--server", gateway.address)
    assert result.exit_code == 2 and "does not exist" in flat(result.output), result.output
