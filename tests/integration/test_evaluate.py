"""`vqs evaluate` against the real gateway and Triton, run as a separate process (as users run it).

A small labelled split is rendered by the project's generator under the gateway's allowed root.
The test asks the gateway itself for every video's answer and checks that the command's numbers
are those answers scored against the labels; a second run sends the bytes instead of the paths
and, paired with the first, must agree on every answer with a zero difference.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from clients import evaluate as ev
from server.proto import video_analytics_pb2 as pb

pytestmark = pytest.mark.integration

VIDEOS = 6
# The gateway runs in this test process's event loop: the CLI is an asyncio subprocess.
_VQS = "from clients.cli import app; app()"


async def run_cli(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _VQS, "evaluate", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "240"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
def split(allowed_root: Path) -> Path:
    from export.synth import write_dataset

    folder = allowed_root / "evaluate_split"
    write_dataset(folder, count=VIDEOS, seed=808, min_seconds=2.5, max_seconds=12.0, codec="mix")
    return folder


async def served_answers(stub, split: Path, records: list[dict]) -> dict[str, dict[str, pb.Answer]]:
    out = {}
    for r in records:
        response = await stub.Analyze(pb.AnalyzeRequest(video=(split / r["file"]).read_bytes()), timeout=120)
        out[r["file"]] = {a.query: a for a in response.answers}
    return out


async def test_evaluate_scores_what_the_gateway_answers(gateway, stub, split, allowed_root, tmp_path, queries):
    records, sha = ev.read_labels(split)
    by_uri, by_bytes = tmp_path / "uri.json", tmp_path / "bytes.json"
    code, stdout, stderr = await run_cli(
        str(split), "--out", str(by_uri), "--server", gateway.address, "--uri-root", str(allowed_root),
        "--length-bins", "5,9", "--rounds", "500")
    assert code == 0, stderr
    results = json.loads(by_uri.read_text())
    rows = [json.loads(line) for line in ev.answers_path_for(by_uri).read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(r["file"] for r in records)
    assert {r["via"] for r in rows} == {"uri"}
    assert results["split"]["labels_sha256"] == sha and results["split"]["videos"] == VIDEOS

    labelled = [q for q in queries if q in records[0]]
    assert list(results["metrics"]["queries"]) == labelled
    direct = await served_answers(stub, split, records)
    videos = {v["id"]: v for v in results["videos"]}
    for r in records:
        for q in labelled:
            assert videos[r["file"]]["answers"][q] == direct[r["file"]][q].attribute, (r["file"], q)
            assert videos[r["file"]]["confidence"][q] == pytest.approx(direct[r["file"]][q].probability, abs=1e-5)
    routine = [r for r in records if any(r[q] != "null" for q in labelled)]  # per-query metrics' videos
    assert results["metrics"]["routine_videos"] == len(routine) > 0
    for q in labelled:
        hits = [direct[r["file"]][q].attribute == r[q] for r in routine]
        m = results["metrics"]["queries"][q]
        assert m["accuracy"] == pytest.approx(sum(hits) / len(routine))
        lo, hi = m["accuracy_95"]
        assert lo <= m["accuracy"] <= hi
        assert m["ece"] == pytest.approx(ev.expected_calibration_error(
            [direct[r["file"]][q].probability for r in routine], hits), abs=1e-5)
        assert m["mean_class_accuracy"] == pytest.approx(ev.mean_class_accuracy([r[q] for r in routine], hits))
        assert f"{100 * m['accuracy']:.1f}" in stdout
    bins = results["metrics"]["by_length"]
    assert [b["bin"] for b in bins] == ["0-5 s", "5-9 s", ">=9 s"]
    assert sum(b["videos"] for b in bins) == len(routine)

    # The bytes instead of the paths, paired with the first run: the same answers on every video.
    code, stdout, stderr = await run_cli(
        str(split), "--out", str(by_bytes), "--server", gateway.address, "--against", str(by_uri),
        "--rounds", "500")
    assert code == 0, stderr
    rows = [json.loads(line) for line in ev.answers_path_for(by_bytes).read_text().splitlines()]
    assert {r["via"] for r in rows} == {"bytes"}
    comparison = json.loads(by_bytes.read_text())["comparison"]
    assert comparison["videos"] == VIDEOS
    for q in labelled:
        c = comparison["queries"][q]
        assert c["agreement"] == 1.0 and c["difference"] == 0.0 and c["difference_95"] == [0.0, 0.0]
    assert "agree" in stdout


async def test_evaluate_resumes_from_its_answers_without_a_server(gateway, split, tmp_path):
    """A finished answers file is scored again offline; a video missing from it is what gets sent."""
    from server.launcher import free_port

    out = tmp_path / "new_folder" / "r.json"
    code, _, stderr = await run_cli(str(split), "--out", str(out), "--server", gateway.address, "--rounds", "200")
    assert code == 0, stderr
    first = json.loads(out.read_text())["metrics"]
    nowhere = f"127.0.0.1:{free_port()}"
    code, _, stderr = await run_cli(str(split), "--out", str(out), "--server", nowhere, "--resume", "--rounds", "200")
    assert code == 0, stderr
    assert json.loads(out.read_text())["metrics"] == first

    answers = ev.answers_path_for(out)
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[1:]) + "\n")
    code, _, stderr = await run_cli(str(split), "--out", str(out), "--server", nowhere, "--resume")
    assert code == 4 and "unreachable" in stderr
    code, _, stderr = await run_cli(str(split), "--out", str(out), "--server", gateway.address, "--rounds", "200")
    assert code == 2 and "--resume" in stderr  # refuses to overwrite the answers
    code, _, stderr = await run_cli(str(split), "--out", str(out), "--server", gateway.address, "--resume",
                                    "--rounds", "200")
    assert code == 0, stderr
    assert json.loads(out.read_text())["metrics"] == first
    assert len(answers.read_text().splitlines()) == VIDEOS


async def test_a_failed_video_counts_wrong_and_exits_3(gateway, split, videos, tmp_path):
    folder = tmp_path / "with_broken"
    folder.mkdir()
    records, _ = ev.read_labels(split)
    (folder / records[0]["file"]).write_bytes((split / records[0]["file"]).read_bytes())
    (folder / "broken.mp4").write_bytes(videos["corrupt"].read_bytes())
    broken = {**records[0], "file": "broken.mp4"}
    (folder / "labels.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(broken) + "\n")
    out = tmp_path / "r.json"
    code, stdout, stderr = await run_cli(str(folder), "--out", str(out), "--server", gateway.address, "--rounds", "200")
    assert code == 3, stderr
    results = json.loads(out.read_text())
    assert results["metrics"]["errors"] == {"INVALID_ARGUMENT": 1}
    assert results["metrics"]["answered"] == 1
    for m in results["metrics"]["queries"].values():
        assert m["accuracy"] <= 0.5  # the failed one is wrong whatever the other
    assert "failed (counted wrong): INVALID_ARGUMENT 1" in stdout
