"""`vqs score ARCHIVE --out results.jsonl`: analyze every video of a folder, archive or list.

One JSONL line per video: `{"id", "source", "via", "result"}` or `{"id", "source", "via",
"error": {"code", "message", ...}}`. Each line is written whole with one `write` on an
`O_APPEND` file, so a run killed at any point (Ctrl-C, SIGKILL) leaves only whole lines, and
`--resume` scores only the ids not yet in the file (after cutting a torn last line, which only a
crash of the machine itself can leave). Concurrency is `--workers` requests in flight on one
grpc.aio channel; archive members are read by one thread, at most 2 x workers ahead.
"""

from __future__ import annotations

import asyncio
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from clients import analyze
from clients.archive import open_listing
from clients.channel import (
    DEFAULT_SERVER, ServerOption, TlsCaOption, TlsCertOption, TlsKeyOption, TokenOption, config_from_options,
)
from clients.scoring import (
    EXIT_INTERRUPTED, EXIT_SOME_FAILED, GatewayRefused, GatewayUnreachable, LineWriter, Tally, load_done, rates,
    run_batch, uri_for,
)

stdout = Console()
stderr = Console(stderr=True)


def summary_table(tally: Tally, *, skipped: int, out: Path, in_output: dict[str, bool]) -> Table:
    took = time.monotonic() - tally.started
    table = Table(title=f"vqs score → {out}", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("videos", justify="right")
    table.add_row("scored now", str(tally.done))
    table.add_row("  with a result", str(tally.ok))
    for code, n in sorted(tally.failed.items()):
        table.add_row(f"  error {code}", str(n))
    table.add_row("already in the output", str(skipped))
    failed_total = sum(1 for ok in in_output.values() if not ok)
    table.add_row("errors in the output", str(failed_total))
    table.add_row("video seconds now", f"{tally.video_s:.1f}")
    table.add_row("wall time", f"{took:.1f} s")
    table.add_row("rate", rates(tally))
    return table


def score(
    archive: Annotated[Path, typer.Argument(
        exists=True, readable=True,
        help="A folder (searched recursively), a .tar/.tar.gz/.zip, or a text file of paths.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", dir_okay=False, help="JSONL output, one line per video.")] = Path("results.jsonl"),
    server: ServerOption = DEFAULT_SERVER,
    workers: Annotated[int, typer.Option(
        min=1, max=64, help="Requests in flight at once (with --ray: Ray actors).")] = 4,
    ray_address: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS",
        help="Run on this Ray cluster (HOST:PORT of its head, or 'auto'); needs the ray extra.")] = None,
    resume: Annotated[bool, typer.Option(
        help="Skip videos already in --out (after an interrupted run).")] = False,
    force: Annotated[bool, typer.Option(
        help="Overwrite an existing --out instead of refusing.")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="List what would be scored (id, source, uri or bytes) and exit.")] = False,
    uri_root: Annotated[Path | None, typer.Option(
        envvar="VQS_URI_ROOT", file_okay=False,
        help="The gateway's allowed root (security.allowed_root) as seen from here: files under it "
             "are sent as paths for the server to read, the rest as bytes.")] = None,
    encoder: Annotated[str, typer.Option(help="Clip encoder; empty = the server's default.")] = "",
    budget: Annotated[float | None, typer.Option(
        callback=analyze.check_budget,
        help="Share of an adaptive encoder's full compute to spend, in (0, 1] (default 1 = full).")] = None,
    timeout: Annotated[float | None, typer.Option(
        min=0.1, help="Deadline per video, in seconds.")] = 600.0,
    retries: Annotated[int, typer.Option(
        min=0, help="Retries of a video when the gateway is busy or its Triton restarting.")] = 3,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    token: TokenOption = None,
) -> None:
    """Analyze every video of a folder, archive or list of paths; write one JSONL line each."""
    config = config_from_options(server, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
    if ray_address:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise typer.BadParameter("Ray is not installed: pip install 'vqs[ray]'", param_hint="--ray")
    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other", param_hint="--resume")
    try:
        listing = open_listing(archive)
        items = listing.items()
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc), param_hint="ARCHIVE") from None
    if out.exists() and out.stat().st_size and not (resume or force or dry_run):
        raise typer.BadParameter(
            f"{out} exists: pass --resume to continue it or --force to start over", param_hint="--out"
        )
    if force and out.exists() and not dry_run:
        out.unlink()
    done = load_done(out) if (resume or dry_run) and out.exists() else {}
    todo = [i for i in items if i.id not in done]
    skipped = len(items) - len(todo)
    root = uri_root.resolve() if uri_root else None

    if dry_run:
        for item in todo:
            sys.stdout.write(f"{item.id}\t{item.source}\t{'uri' if uri_for(item, root) else 'bytes'}\n")
        stderr.print(f"{len(todo)} of {len(items)} videos to score ({listing.kind}); {skipped} already in {out}")
        return
    stderr.print(f"{len(items)} videos in {archive} ({listing.kind}); {skipped} already in {out}; "
                 f"{len(todo)} to score with {workers} {'Ray actors' if ray_address else 'workers'} on {server}", highlight=False)

    tally = Tally()
    writer = LineWriter(out)
    code = analyze.EXIT_OK
    try:
        if ray_address:
            from clients.score_ray import run_ray

            run_ray(listing, todo, writer, tally, address=ray_address, actors=workers, server=config,
                    uri_root=root, encoder=encoder, budget=budget or 0.0, timeout=timeout, retries=retries)
        else:
            asyncio.run(run_batch(
                listing, todo, writer, tally, server=config, workers=workers, uri_root=root,
                encoder=encoder, budget=budget or 0.0, timeout=timeout, retries=retries,
            ))
    except GatewayRefused as exc:
        stderr.print(f"[red]error[/red] the gateway at {server} refused the call ({exc}); "
                     "check --token / VQS_TOKEN and the TLS options", highlight=False)
        code = analyze.EXIT_ERROR
    except GatewayUnreachable as exc:
        stderr.print(f"[red]error[/red] the gateway at {server} is unreachable ({exc}); "
                     "start it (`vqs serve`) and rerun with --resume", highlight=False)
        code = analyze.EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        stderr.print(f"interrupted after {tally.done} videos; rerun with --resume to finish")
        code = EXIT_INTERRUPTED
    except (OSError, ValueError, EOFError, tarfile.TarError, zipfile.BadZipFile) as exc:
        # a broken archive mid-way
        stderr.print(f"[red]error[/red] reading {archive}: {exc}; the lines written so far are "
                     "whole: fix the input and rerun with --resume", highlight=False)
        code = analyze.EXIT_ERROR
    finally:
        writer.close()
    ids = {i.id for i in items}
    in_output = {k: v for k, v in load_done(out).items() if k in ids}
    stdout.print(summary_table(tally, skipped=skipped, out=out, in_output=in_output))
    if code == analyze.EXIT_OK and not all(in_output.values()):
        code = EXIT_SOME_FAILED
    raise typer.Exit(code)
