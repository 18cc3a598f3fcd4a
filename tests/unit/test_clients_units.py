"""Pure parts of `vqs metrics` and `vqs score`: the exposition parser, PromQL's quantile rule,
interval deltas, listings of folders, archives and path lists."""

from __future__ import annotations

import io
import math
import tarfile
import zipfile

import pytest

from clients import metrics
from clients.archive import FolderListing, PathListListing, TarListing, ZipListing, open_listing

INF = math.inf


def test_parse_reads_labels_with_escapes_and_skips_comments():
    text = (
        '# HELP x help\n# TYPE x counter\n'
        'x_total{code="A \\"quoted\\" \\\\ path",b="2"} 3.0\n'
        'up 1\n'
        'h_bucket{le="+Inf"} 4 1700000000000\n'
    )
    s = metrics.parse(text, at=10.0)
    assert s.series("x_total") == {(("b", "2"), ("code", 'A "quoted" \\ path')): 3.0}
    assert s.series("up") == {(): 1.0}
    assert s.series("h_bucket") == {(("le", "+Inf"),): 4.0}


@pytest.mark.parametrize(("q", "expected"), [
    (0.5, 0.5 + 0.5 * (5 - 4) / 4),     # rank 5 in the (0.5, 1] bucket holding counts 5..8
    (0.25, 0.1 + 0.4 * (2.5 - 2) / 2),  # rank 2.5 in (0.1, 0.5]
    (0.05, 0.1 * 0.5 / 2),              # first bucket: interpolated from 0
    (0.99, 1.0),                        # rank in +Inf: the largest finite bound
])
def test_histogram_quantile_is_promqls(q, expected):
    buckets = [(0.1, 2), (0.5, 4), (1.0, 8), (INF, 10)]
    assert metrics.histogram_quantile(q, buckets) == pytest.approx(expected)


def test_histogram_quantile_of_nothing_is_none():
    assert metrics.histogram_quantile(0.5, [(0.1, 0), (INF, 0)]) is None
    assert metrics.histogram_quantile(0.5, []) is None
    assert metrics.histogram_quantile(0.5, [(0.1, 3)]) is None  # no +Inf bucket: not a histogram


def _gateway_text(ok: int, bad: int, fast: int) -> str:
    lines = []
    for status, n, quick in (("OK", ok, fast), ("INVALID_ARGUMENT", bad, bad)):
        for le, c in (("0.1", quick), ("1.0", n), ("+Inf", n)):
            lines.append(f'vqs_request_duration_seconds_bucket{{rpc="Analyze",status="{status}",le="{le}"}} {c}')
        lines.append(f'vqs_request_duration_seconds_count{{rpc="Analyze",status="{status}"}} {n}')
    return "\n".join(lines) + "\n"


def test_watch_intervals_are_deltas_of_the_cumulative_buckets():
    before = metrics.parse(_gateway_text(ok=10, bad=0, fast=10), at=100.0)
    now = metrics.parse(_gateway_text(ok=14, bad=2, fast=10), at=104.0)
    row = metrics.gateway_view(now, before)["rpcs"]["Analyze"]
    assert row["count"] == 6 and row["errors"] == 2 and row["per_s"] == pytest.approx(1.5)
    assert row["error_rate"] == pytest.approx(1 / 3)
    # In the interval: 2 requests <= 0.1 s (the failures), 4 in (0.1, 1]: p50 = rank 3 -> 0.325.
    assert row["p50_s"] == pytest.approx(0.1 + 0.9 * (3 - 2) / 4)


def test_a_reset_counter_counts_from_zero():
    assert metrics._delta({"a": 3.0}, {"a": 10.0}) == {"a": 3.0}
    assert metrics._delta({"a": 12.0}, {"a": 10.0}) == {"a": 2.0}


def test_urls_get_a_scheme_and_the_usual_path():
    assert metrics.normalise_url("127.0.0.1:9090") == "http://127.0.0.1:9090/metrics"
    assert metrics.normalise_url("http://h:1/x/metrics") == "http://h:1/x/metrics"


def test_listings_pick_videos_by_kind(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.mp4", "d/sub/b.MKV", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"x" * 3)
    folder = open_listing(tmp_path / "d")
    assert isinstance(folder, FolderListing)
    assert [i.id for i in folder.items()] == ["a.mp4", "sub/b.MKV"]

    tgz = tmp_path / "v.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in (("x/one.mp4", b"1"), ("x/labels.json", b"{}"), ("x/two.avi", b"22")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    listing = open_listing(tgz)
    assert isinstance(listing, TarListing)
    assert [(i.id, i.size) for i in listing.items()] == [("x/one.mp4", 1), ("x/two.avi", 2)]
    assert [(i.id, d) for i, d in listing.read({"x/two.avi"})] == [("x/two.avi", b"22")]
    assert listing.read_one("x/one.mp4", None) == b"1"

    zipped = tmp_path / "v.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("c.webm", b"333")
    listing = open_listing(zipped)
    assert isinstance(listing, ZipListing)
    assert [(i.id, d) for i, d in listing.read({"c.webm"})] == [("c.webm", b"333")]
    with pytest.raises(OSError):
        listing.read_one("missing.mp4", None)

    paths = tmp_path / "list.txt"
    paths.write_text(f"# comment\n\nd/a.mp4\n{tmp_path / 'd/a.mp4'}\nd/a.mp4\nnope.mp4\n")
    listing = open_listing(paths)
    assert isinstance(listing, PathListListing)
    items = listing.items()
    assert [i.id for i in items] == ["d/a.mp4", str(tmp_path / "d/a.mp4"), "nope.mp4"]
    read = dict((i.id, d) for i, d in listing.read({i.id for i in items}))
    assert read["d/a.mp4"] == b"xxx" and isinstance(read["nope.mp4"], FileNotFoundError)


def test_a_video_or_a_misnamed_archive_is_refused_with_what_to_do(tmp_path):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    with pytest.raises(ValueError, match="vqs analyze"):
        open_listing(video)
    fake = tmp_path / "b.zip"
    fake.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not one"):
        open_listing(fake)
    binary = tmp_path / "c.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="UTF-8 text file of paths"):
        open_listing(binary).items()


def test_metrics_without_a_reachable_gateway_exits_4_saying_what_to_pass():
    from typer.testing import CliRunner

    from clients.cli import app
    from server.launcher import free_port

    result = CliRunner().invoke(app, ["metrics", "--gateway", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 4
    assert "cannot scrape" in result.output and "--gateway" in result.output


def test_the_new_commands_are_registered_and_documented():
    from typer.testing import CliRunner

    from clients.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("score", "render", "metrics"):
        assert command in result.output
    score_help = CliRunner().invoke(app, ["score", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--out", "--workers", "--resume", "--dry-run", "--uri-root", "--ray"):
        assert option in score_help


def test_triton_summary_quantiles_are_shown_when_triton_exports_them():
    """`--metrics-config summary_latencies=true` (seen on Triton 2.51): quantile series per model."""
    text = (
        'nv_inference_request_success{model="m",version="1"} 4\n'
        'nv_inference_request_duration_us{model="m",version="1"} 8000\n'
        'nv_inference_request_summary_us{model="m",version="1",quantile="0.5"} 1500\n'
        'nv_inference_request_summary_us{model="m",version="1",quantile="0.99"} 3000\n'
        'nv_inference_request_summary_us{model="m",version="1",quantile="0.999"} 3100\n'
        'nv_inference_request_summary_us_count{model="m",version="1"} 4\n'
    )
    row = metrics.triton_view(metrics.parse(text, at=1.0), None)["models"]["m"]
    assert row["mean_request_ms"] == 2.0
    assert (row["p50_ms"], row["p99_ms"]) == (1.5, 3.0) and "p100_ms" not in row
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(metrics.tables({"triton": {"models": {"m": row}, "interval_s": None}, "one_shot": True}))
    text = console.export_text()
    assert "p50*" in text and "sliding window" in text
