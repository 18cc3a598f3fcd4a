"""The `vqs` command: one typer app; each command lives in its own module or is a thin wrapper.

`serve`, `synth` and `models` import server/export code lazily, so the client commands need only
grpc, typer, rich and the generated proto stubs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clients import align, analyze, describe, evaluate, metrics, report, score, search, stream

app = typer.Typer(
    name="vqs",
    help="Video question answering server: serve, analyze videos, make data and models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("analyze")(analyze.analyze)
app.command("score")(score.score)
app.command("render")(report.render)
app.command("metrics")(metrics.metrics)
app.command("stream")(stream.stream)
app.command("evaluate")(evaluate.evaluate)
app.command("align")(align.align)
app.command("search")(search.search)
app.command("describe")(describe.describe)


@app.command("serve")
def serve() -> None:
    """Run the gateway (and Triton unless VQS_TRITON__URL is set) until Ctrl-C."""
    from server.main import run

    run()


@app.command("synth")
def synth(
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="Output directory.")],
    count: Annotated[int, typer.Option(min=1, help="Number of videos.")],
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same dataset.")],
    width: Annotated[int, typer.Option(min=16, help="Frame width (even).")] = 112,
    height: Annotated[int, typer.Option(min=16, help="Frame height (even).")] = 112,
    fps: Annotated[float, typer.Option(min=1.0, help="Frames per second.")] = 15.0,
    codec: Annotated[str, typer.Option(help="h264, mpeg4, vp9 or mix.")] = "h264",
    min_seconds: Annotated[float, typer.Option(min=0.1, help="Shortest video.")] = 2.0,
    max_seconds: Annotated[float, typer.Option(min=0.1, help="Longest video.")] = 20.0,
) -> None:
    """Write a synthetic labelled dataset of encoded videos plus labels.jsonl."""
    if width % 2 or height % 2:
        raise typer.BadParameter("width and height must be even (yuv420p)")
    if min_seconds > max_seconds:
        raise typer.BadParameter("--min-seconds must not exceed --max-seconds")
    from export.synth import write_dataset

    try:
        labels = write_dataset(
            out, count=count, seed=seed, width=width, height=height, fps=fps, codec=codec,
            min_seconds=min_seconds, max_seconds=max_seconds,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(str(labels))


@app.command("models")
def models(
    parts: Annotated[list[str] | None, typer.Option(
        "--part", help="Build this part (repeatable; default tqn), in the order tqn, "
                       "adaptive, segments; adaptive trains against the served s3d and TQN decoder.")] = None,
) -> None:
    """Regenerate data, train every served model, export it to the model repository and print
    the evaluations."""
    from export import make_models

    try:
        chosen = make_models.chosen_parts(parts)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--part") from None
    make_models.main(chosen)


if __name__ == "__main__":
    app()
