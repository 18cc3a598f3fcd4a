import json
import socket

import grpc
import pytest
import typer
from typer.testing import CliRunner

from clients import analyze, render
from clients.cli import app
from server.proto import video_analytics_pb2 as pb

runner = CliRunner()


def _response() -> pb.AnalyzeResponse:
    spans = [pb.ClipSpan(start_s=0.0, end_s=0.5), pb.ClipSpan(start_s=0.5, end_s=1.0)]
    return pb.AnalyzeResponse(
        video=pb.VideoInfo(duration_s=1.0, fps=15.0, clips=2, frames=15, width=112, height=112),
        answers=[
            pb.Answer(
                query="take_off", attribute="forward", probability=0.7,
                distribution={"forward": 0.7, "backward": 0.2, "inward": 0.1},
            )
        ],
        attention=[pb.Attention(query="take_off", weights=[0.25, 0.75], clip_spans=spans)],
        timing_ms={"decode": 12.5, "total": 40.0},
        encoder="s3d",
        request_id="req-1",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_response_to_json_mapping():
    result = render.response_to_dict(_response())
    assert json.loads(json.dumps(result)) == result
    assert result["video"] == {
        "duration_s": 1.0, "fps": 15.0, "clips": 2, "frames": 15, "width": 112, "height": 112,
    }
    (answer,) = result["answers"]
    assert answer["query"] == "take_off" and answer["attribute"] == "forward"
    assert answer["probability"] == pytest.approx(0.7)
    assert list(answer["distribution"]) == ["forward", "backward", "inward"]  # most likely first
    (att,) = result["attention"]
    assert att["weights"] == [0.25, 0.75]
    assert att["clip_spans_s"] == [[0.0, 0.5], [0.5, 1.0]]
    assert result["timing_ms"] == {"decode": 12.5, "total": 40.0}
    assert result["encoder"] == "s3d" and result["request_id"] == "req-1"


def test_heatmap():
    assert render.heatmap([]) == ""
    assert render.heatmap([0.0, 1.0]) == " █"
    assert render.heatmap([0.0, 0.0, 0.0]) == "   "
    long = render.heatmap([1.0] * 100 + [9.0] * 10, width=11)
    assert len(long) == 11 and long[-1] == "█"
    with pytest.raises(ValueError):
        render.heatmap([1.0], width=0)


def test_tables_render():
    from rich.console import Console

    console = Console(record=True, width=120)
    result = render.response_to_dict(_response())
    console.print(render.answers_table(result))
    console.print(render.attention_table(result))
    text = console.export_text()
    assert "forward" in text and "0.70" in text and "0.5–1.0 s" in text


def test_upload_limit_and_channel_options():
    analyze.check_upload_size(10, max_upload_mb=1)
    with pytest.raises(typer.BadParameter, match="upload limit"):
        analyze.check_upload_size(2 * 2**20, max_upload_mb=1)
    options = dict(analyze.channel_options(256))
    assert options["grpc.max_send_message_length"] > 256 * 2**20
    assert options["grpc.max_receive_message_length"] > 256 * 2**20


def test_exit_codes_for_grpc_status():
    assert analyze.exit_code_for(grpc.StatusCode.UNAVAILABLE) == 4
    # The gateway answered UNAVAILABLE (its Triton is restarting): an error, not "unreachable".
    assert analyze.exit_code_for(grpc.StatusCode.UNAVAILABLE, answered=True) == 1
    assert analyze.exit_code_for(grpc.StatusCode.INVALID_ARGUMENT) == 1
    assert analyze.error_message(grpc.StatusCode.INVALID_ARGUMENT, "bad video") == "INVALID_ARGUMENT: bad video"


def test_missing_file_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["analyze", str(tmp_path / "nope.mp4")])
    assert result.exit_code == 2


def test_file_above_the_limit_is_refused_client_side(tmp_path):
    video = tmp_path / "big.mp4"
    video.write_bytes(b"\0" * (2 * 2**20))
    result = runner.invoke(app, ["analyze", str(video), "--max-upload-mb", "1", "--server", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "upload limit" in result.output


def test_unreachable_server_exits_4(tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"not really a video")
    result = runner.invoke(app, ["analyze", str(video), "--server", f"127.0.0.1:{_free_port()}", "--timeout", "5"])
    assert result.exit_code == 4, result.output
    assert "UNAVAILABLE" in result.output


def test_server_from_environment(tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    port = _free_port()
    result = runner.invoke(app, ["analyze", str(video), "--json"], env={"VQS_SERVER": f"127.0.0.1:{port}"})
    assert result.exit_code == 4
    assert f"127.0.0.1:{port}" in result.output


def test_synth_validates_arguments(tmp_path):
    result = runner.invoke(app, ["synth", "--out", str(tmp_path), "--count", "1", "--seed", "0", "--width", "111"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["synth", "--out", str(tmp_path), "--count", "0", "--seed", "0"])
    assert result.exit_code == 2


def test_synth_writes_a_dataset(tmp_path):
    result = runner.invoke(
        app, ["synth", "--out", str(tmp_path), "--count", "1", "--seed", "3", "--max-seconds", "3"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "labels.jsonl").is_file()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("analyze", "serve", "synth", "models"):
        assert command in result.output


def test_the_client_imports_only_the_stubs_and_its_own_code():
    """`vqs analyze` needs grpc, typer, rich and the generated stubs: no server code (logging,
    metrics, settings), no prometheus."""
    import subprocess
    import sys

    code = (
        "import sys, clients.cli, clients.analyze, clients.render; "
        "print('\\n'.join(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('server', 'prometheus_client', 'tritonclient', 'numpy'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert loaded <= {"server", "server.proto", "server.proto.video_analytics_pb2",
                      "server.proto.video_analytics_pb2_grpc"}, loaded


def test_the_request_id_header_is_the_gateways():
    from server.api.interceptor import REQUEST_ID_HEADER

    assert analyze.REQUEST_ID_HEADER == REQUEST_ID_HEADER
