"""`vqs score` against the real gateway and Triton, run as a separate process (as users run it).

The gateway runs in this test process's event loop, so the CLI runs as an asyncio subprocess and
the tests await it (a blocking `subprocess.run` would stall the gateway).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

VIDEO_COUNT = 40
VIDEO_S = 4.0


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory, videos) -> Path:
    """40 four-second synthetic videos (some in a subfolder; a few seconds of scoring, so a kill
    lands part-way), one corrupt, and a non-video file."""
    from export.synth import render_video

    root = tmp_path_factory.mktemp("score_folder")
    (root / "sub").mkdir()
    for i in range(VIDEO_COUNT):
        render_video(root / ("sub" if i % 3 == 0 else "") / f"v{i:02d}.mp4", seed=500 + i, seconds=VIDEO_S)
    shutil.copy(videos["corrupt"], root / "broken.mp4")
    (root / "labels.jsonl").write_text("{}\n")
    return root


# SIGINT restored to Python's handler: a child of a shell that ignores SIGINT (CI's background
# jobs) would inherit SIG_IGN, and Ctrl-C is what the interrupt test sends.
_VQS = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from clients.cli import app; app()")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", _VQS, "score", *args]


async def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cli(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def rows(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the output ends on a whole line"
    return [json.loads(line) for line in data.splitlines()]


def expected_ids(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.mp4")}


async def test_sigkill_then_resume_scores_every_video_exactly_once(gateway, video_folder, tmp_path, queries):
    out = tmp_path / "results.jsonl"
    proc = await asyncio.create_subprocess_exec(
        *cli(str(video_folder), "--out", str(out), "--server", gateway.address, "--workers", "1"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
        assert proc.returncode is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no 3 lines within 240 s"
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    first = rows(out)
    assert 3 <= len(first) < VIDEO_COUNT, "killed part-way"

    code, stdout, stderr = await run_cli(
        str(video_folder), "--out", str(out), "--server", gateway.address, "--workers", "2", "--resume"
    )
    assert code == 3, stderr  # the corrupt video failed
    final = rows(out)
    assert final[: len(first)] == first, "resuming only appends"
    ids = [r["id"] for r in final]
    assert sorted(ids) == sorted(expected_ids(video_folder)), "every video exactly once"
    assert "labels.jsonl" not in ids
    by_id = {r["id"]: r for r in final}
    broken = by_id["broken.mp4"]
    assert broken["error"]["code"] == "INVALID_ARGUMENT" and broken["error"]["message"]
    assert broken["error"]["request_id"]
    for name, row in by_id.items():
        if name != "broken.mp4":
            assert [a["query"] for a in row["result"]["answers"]] == queries, name
            assert row["via"] == "bytes" and row["source"] == str(video_folder / name)
    assert "already in the output" in stdout and "errors in the output" in stdout

    # Nothing left: a second resume scores nothing and still reports the failure.
    code, stdout, _ = await run_cli(str(video_folder), "--out", str(out), "--server", gateway.address, "--resume")
    assert code == 3 and rows(out) == final


async def test_ctrl_c_stops_with_whole_lines_and_resume_finishes(gateway, video_folder, tmp_path):
    out = tmp_path / "results.jsonl"
    args = (str(video_folder), "--out", str(out), "--server", gateway.address, "--workers", "2")
    proc = await asyncio.create_subprocess_exec(
        *cli(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
        assert proc.returncode is None and time.monotonic() < deadline
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    first = rows(out)
    assert proc.returncode == 130, err.decode()
    assert f"interrupted after {len(first)} videos; rerun with --resume" in err.decode()
    assert len(first) < VIDEO_COUNT
    code, _, stderr = await run_cli(*args, "--resume")
    assert code == 3, stderr
    assert sorted(r["id"] for r in rows(out)) == sorted(expected_ids(video_folder))


async def test_tar_gz_and_zip_members_are_read_without_extracting(gateway, video_folder, tmp_path):
    names = sorted(expected_ids(video_folder))[:3]
    tgz, zipped = tmp_path / "videos.tar.gz", tmp_path / "videos.zip"
    with tarfile.open(tgz, "w:gz") as tar, zipfile.ZipFile(zipped, "w") as z:
        for name in names:
            tar.add(video_folder / name, arcname=f"clips/{name}")
            z.write(video_folder / name, arcname=f"clips/{name}")
        tar.add(video_folder / "labels.jsonl", arcname="clips/labels.jsonl")
    before = set(tmp_path.iterdir())
    for archive in (tgz, zipped):
        out = tmp_path / f"{archive.name}.jsonl"
        code, _, stderr = await run_cli(str(archive), "--out", str(out), "--server", gateway.address)
        result = {r["id"]: r for r in rows(out)}
        assert set(result) == {f"clips/{n}" for n in names}
        assert code == (3 if "broken.mp4" in names else 0), stderr
        for name, row in result.items():
            assert row["source"] == f"{archive}::{name}" and row["via"] == "bytes"
            assert ("result" in row) == (not name.endswith("broken.mp4"))
    assert set(tmp_path.iterdir()) - before == {tmp_path / f"{a.name}.jsonl" for a in (tgz, zipped)}


async def test_a_list_of_paths_sends_files_under_the_allowed_root_as_uris(
    gateway, allowed_root, video_folder, tmp_path
):
    inside = allowed_root / "score_batch"
    inside.mkdir(exist_ok=True)
    shutil.copy(video_folder / "v01.mp4", inside / "a.mp4")
    listing = tmp_path / "paths.txt"
    listing.write_text(
        f"# videos to score\n{inside / 'a.mp4'}\n\n{video_folder / 'v02.mp4'}\n"
        f"{inside / 'a.mp4'}\nmissing.mp4\n"
    )
    out = tmp_path / "list.jsonl"
    code, dry, _ = await run_cli(
        str(listing), "--out", str(out), "--dry-run", "--uri-root", str(allowed_root)
    )
    assert code == 0 and not out.exists()
    assert [line.split("\t")[2] for line in dry.splitlines()] == ["uri", "bytes", "bytes"]

    code, _, stderr = await run_cli(
        str(listing), "--out", str(out), "--server", gateway.address, "--uri-root", str(allowed_root)
    )
    assert code == 3, stderr
    result = {r["id"]: r for r in rows(out)}
    assert len(result) == 3
    assert result[str(inside / "a.mp4")]["via"] == "uri" and "result" in result[str(inside / "a.mp4")]
    assert result[str(video_folder / "v02.mp4")]["via"] == "bytes"
    assert "result" in result[str(video_folder / "v02.mp4")]
    assert result["missing.mp4"]["error"] == {
        "code": "NOT_FOUND", "message": f"no such file: {tmp_path / 'missing.mp4'}", "where": "client"
    }


async def test_refuses_to_overwrite_and_says_so_when_the_gateway_is_down(video_folder, tmp_path):
    from server.launcher import free_port

    out = tmp_path / "r.jsonl"
    out.write_text('{"id": "v01.mp4", "result": {}}\n')
    code, _, stderr = await run_cli(str(video_folder), "--out", str(out))
    assert code == 2 and "--resume" in stderr
    code, _, stderr = await run_cli(
        str(video_folder), "--out", str(out), "--resume", "--server", f"127.0.0.1:{free_port()}"
    )
    assert code == 4 and "unreachable" in stderr
    assert out.read_text() == '{"id": "v01.mp4", "result": {}}\n'


def test_a_torn_last_line_is_cut_and_its_video_scored_again(tmp_path):
    from clients.scoring import load_done

    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"id":"a","result":{}}\n{"id":"b","error":{"code":"X"}}\n{"id":"c","res')
    assert load_done(out) == {"a": True, "b": False}
    assert out.read_bytes() == b'{"id":"a","result":{}}\n{"id":"b","error":{"code":"X"}}\n'


# --- the same through Ray ---------------------------------------------------------------------

# Loopback only: without this Ray on Linux advertises the address of the default-route interface
# and its processes talk to each other over it.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _session_pids(sid: int) -> list[int]:
    """Processes of the session the Ray head was started in (it and everything it spawned)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ...
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray head on loopback (2 CPUs, small object store), in its own session so that
    everything it starts is stopped by process id at the end."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    import subprocess

    from server.launcher import free_port

    tmp = tmp_path_factory.mktemp("ray")
    port = free_port()
    log = tmp / "head.log"
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
         f"--ray-client-server-port={free_port()}", "--object-store-memory=100000000",
         f"--temp-dir={tmp / 't'}", "--disable-usage-stats"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **RAY_ENV},
    )
    try:
        deadline = time.monotonic() + 180
        while "block forever" not in log.read_text():
            assert head.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "Ray head not up in 180 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
        # Every address Ray advertised is loopback.
        gcs = (tmp / "t" / "session_latest" / "logs" / "gcs_server.out")
        if gcs.exists():
            import re

            addresses = set(re.findall(r"\b(\d+\.\d+\.\d+\.\d+):\d+", gcs.read_text(errors="replace")))
            assert addresses <= {"127.0.0.1", "0.0.0.0"}, addresses
    finally:
        head.terminate()
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if head.poll() is None:
            head.wait(10)

        def alive() -> list[int]:
            out = []
            for pid in _session_pids(head.pid):
                try:
                    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        out.append(pid)
                except OSError:
                    pass
            return out

        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(), "Ray processes outlived the test"


async def test_ray_sigkill_then_resume_scores_every_video_exactly_once(gateway, video_folder, ray_head, tmp_path):
    out = tmp_path / "ray.jsonl"
    args = (str(video_folder), "--out", str(out), "--server", gateway.address, "--ray", ray_head,
            "--workers", "2")
    proc = await asyncio.create_subprocess_exec(
        *cli(*args), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, **RAY_ENV},
    )
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
        assert proc.returncode is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no 3 lines within 300 s"
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    first = rows(out)
    assert 3 <= len(first) <= VIDEO_COUNT

    code, _, stderr = await run_cli(*args, "--resume", env=RAY_ENV)
    assert code == 3, stderr
    final = rows(out)
    assert final[: len(first)] == first
    assert sorted(r["id"] for r in final) == sorted(expected_ids(video_folder)), "every video exactly once"
    by_id = {r["id"]: r for r in final}
    assert by_id["broken.mp4"]["error"]["code"] == "INVALID_ARGUMENT"
    assert all("result" in r for name, r in by_id.items() if name != "broken.mp4")


async def test_ray_actors_read_zip_members(gateway, video_folder, ray_head, tmp_path):
    names = ["v01.mp4", "v02.mp4", "broken.mp4"]
    zipped = tmp_path / "videos.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for name in names:
            z.write(video_folder / name, arcname=name)
    out = tmp_path / "zip.jsonl"
    code, _, stderr = await run_cli(str(zipped), "--out", str(out), "--server", gateway.address,
                                    "--ray", ray_head, "--workers", "2", env=RAY_ENV)
    assert code == 3, stderr
    result = {r["id"]: r for r in rows(out)}
    assert set(result) == set(names)
    assert "result" in result["v01.mp4"] and "result" in result["v02.mp4"]
    assert result["broken.mp4"]["error"]["code"] == "INVALID_ARGUMENT"
